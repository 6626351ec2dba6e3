// Compression, decompression and pruning to the packed 2:4 layout described in sparse24.h.
// These run once per weight (offline), so they favour clarity over speed, but stay O(N*K) and
// parallel over rows because LLaMA-sized weights have 45M elements.
#include "sparse24.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>

#include "sparse24_internal.h"

namespace pysparse::core {
namespace {

// Zero test on raw bits: +0 and -0 are zero for fp16, bf16, fp32 and fp64 alike.
template <typename Bits>
inline bool is_zero(Bits b) {
  constexpr Bits sign = Bits(1) << (sizeof(Bits) * 8 - 1);
  return (b & static_cast<Bits>(~sign)) == 0;
}

// The canonical index pair of a group whose nonzero positions are in `nz_mask` (<= 2 bits set):
// the nonzero indices, completed with the lowest free indices, ascending.
inline void canonical_pair(unsigned nz_mask, int& i0, int& i1) {
  int picked[2];
  int count = 0;
  for (int i = 0; i < 4 && count < 2; ++i)
    if (nz_mask & (1u << i)) picked[count++] = i;
  for (int i = 0; i < 4 && count < 2; ++i) {
    if (nz_mask & (1u << i)) continue;
    if (count == 1 && picked[0] == i) continue;
    picked[count++] = i;
  }
  i0 = picked[0] < picked[1] ? picked[0] : picked[1];
  i1 = picked[0] < picked[1] ? picked[1] : picked[0];
}

template <typename Bits>
Compress24Status compress_impl(const Bits* dense, int64_t N, int64_t K, int64_t ld, Bits* values,
                               uint8_t* meta) {
  const int64_t groups = K / 4;
  const int64_t mcols = meta_cols(K);
  // Rows are independent; remember the first bad row so the error names the earliest one.
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    if (n > first_bad.load(std::memory_order_relaxed)) continue;
    const Bits* row = dense + n * ld;
    Bits* vrow = values + n * (K / 2);
    uint8_t* mrow = meta + n * mcols;
    for (int64_t b = 0; b < mcols; ++b) mrow[b] = 0;
    for (int64_t g = 0; g < groups; ++g) {
      unsigned nz = 0;
      for (int i = 0; i < 4; ++i)
        if (!is_zero(row[4 * g + i])) nz |= 1u << i;
      if (__builtin_popcount(nz) > 2) {
        int64_t prev = first_bad.load();
        while (n < prev && !first_bad.compare_exchange_weak(prev, n)) {
        }
        break;
      }
      int i0, i1;
      canonical_pair(nz, i0, i1);
      vrow[2 * g] = row[4 * g + i0];
      vrow[2 * g + 1] = row[4 * g + i1];
      const uint8_t nibble = static_cast<uint8_t>(i0 | (i1 << 2));
      mrow[g / 2] |= (g & 1) ? static_cast<uint8_t>(nibble << 4) : nibble;
    }
  }
  Compress24Status st;
  const int64_t bad = first_bad.load();
  if (bad == std::numeric_limits<int64_t>::max()) return st;
  const Bits* row = dense + bad * ld;
  for (int64_t g = 0; g < groups; ++g) {
    int nz = 0;
    for (int i = 0; i < 4; ++i) nz += !is_zero(row[4 * g + i]);
    if (nz > 2) {
      st.row = bad;
      st.group = g;
      st.nonzeros = nz;
      break;
    }
  }
  return st;
}

template <typename Bits>
void decompress_impl(const Bits* values, const uint8_t* meta, int64_t N, int64_t K, Bits* dense) {
  const int64_t groups = K / 4;
  const int64_t mcols = meta_cols(K);
#pragma omp parallel for schedule(static) if (N * K > 65536)
  for (int64_t n = 0; n < N; ++n) {
    Bits* row = dense + n * K;
    const Bits* vrow = values + n * (K / 2);
    const uint8_t* mrow = meta + n * mcols;
    for (int64_t g = 0; g < groups; ++g) {
      const unsigned nibble = (mrow[g / 2] >> ((g & 1) * 4)) & 0xFu;
      write_group(row + 4 * g, nibble, vrow[2 * g], vrow[2 * g + 1]);
    }
  }
}

template <typename Bits>
void prune_impl(const Bits* w, const float* score, int64_t N, int64_t K, Bits* out) {
  const int64_t total_groups = N * (K / 4);
#pragma omp parallel for schedule(static)
  for (int64_t gi = 0; gi < total_groups; ++gi) {
    const int64_t base = gi * 4;
    float s[4];
    for (int i = 0; i < 4; ++i) {
      s[i] = score[base + i];
      if (std::isnan(s[i])) s[i] = -std::numeric_limits<float>::infinity();
    }
    for (int i = 0; i < 4; ++i) {
      // Rank = how many entries beat this one; a strict total order (value, then lower index),
      // so exactly two entries get rank < 2.
      int rank = 0;
      for (int j = 0; j < 4; ++j)
        if (j != i && (s[j] > s[i] || (s[j] == s[i] && j < i))) ++rank;
      out[base + i] = rank < 2 ? w[base + i] : Bits(0);
    }
  }
}

}  // namespace

Compress24Status compress24(const void* dense, int64_t N, int64_t K, int64_t ld, int elem_size,
                            void* values, uint8_t* meta) {
  switch (elem_size) {
    case 2:
      return compress_impl(static_cast<const uint16_t*>(dense), N, K, ld,
                           static_cast<uint16_t*>(values), meta);
    case 4:
      return compress_impl(static_cast<const uint32_t*>(dense), N, K, ld,
                           static_cast<uint32_t*>(values), meta);
    default:
      return compress_impl(static_cast<const uint64_t*>(dense), N, K, ld,
                           static_cast<uint64_t*>(values), meta);
  }
}

// Defined in sparse24_linear.cpp (which owns the CPU-feature dispatch): the AVX-512 decompressors,
// when the CPU has them; false means "use the portable code".
bool decompress_fast(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                     void* dense);

void decompress24(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                  void* dense) {
  if (decompress_fast(values, meta, N, K, elem_size, dense)) return;
  switch (elem_size) {
    case 2:
      return decompress_impl(static_cast<const uint16_t*>(values), meta, N, K,
                             static_cast<uint16_t*>(dense));
    case 4:
      return decompress_impl(static_cast<const uint32_t*>(values), meta, N, K,
                             static_cast<uint32_t*>(dense));
    default:
      return decompress_impl(static_cast<const uint64_t*>(values), meta, N, K,
                             static_cast<uint64_t*>(dense));
  }
}

void prune24(const void* w, const float* score, int64_t N, int64_t K, int elem_size, void* out) {
  switch (elem_size) {
    case 2:
      return prune_impl(static_cast<const uint16_t*>(w), score, N, K, static_cast<uint16_t*>(out));
    case 4:
      return prune_impl(static_cast<const uint32_t*>(w), score, N, K, static_cast<uint32_t*>(out));
    default:
      return prune_impl(static_cast<const uint64_t*>(w), score, N, K, static_cast<uint64_t*>(out));
  }
}

}  // namespace pysparse::core
