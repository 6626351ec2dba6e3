// AVX2/FMA build of the activation-sparse FFN (driver: sparse_ffn_driver.inc).
//
// Batch-1 decode is memory-bound, so each phase is written to stream its bytes once:
//   gate   dense: 8 rows in flight per thread (the stream count that kept the 2:4 GEMV nearest a
//          plain read); 2:4: the linear layer's GEMV itself.
//   up     one row per active neuron, read only for active neurons.
//   down   each thread walks its own column slice of every active row (dense W_down^T rows, or the
//          8-byte-per-output blocks of a 2:4 neuron group), accumulating in an fp32 slice that stays
//          in L1/L2. The 2:4 group step picks h[idx] for 8 outputs with one vpermps per kept plane,
//          the indices shifted out of a 32-bit meta word (8 nibbles).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "qlinear.h"
#include "sparse24_internal.h"
#include "sparse_ffn_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

constexpr Route kGemvRoute = Route::kGemvAvx2;  // the FFN's packed gate on the AVX2 GEMV

#include "sparse24_gemv_rows_avx2.inc"
#include "sparse24_gemv.inc"
#include "sparse_ffn_groups_scalar.inc"

// One accumulator chain per row whatever RB is (see the driver): RB = 8 for the gate gives eight
// streams and eight independent chains; the up phase uses RB = 4. Row r against x_at(r).
template <int RB, typename W, typename XAt>
void dense_dot_impl(XAt x_at, const W* const* rows, int64_t D, float* out) {
  const int64_t body = D / 8 * 8;
  __m256 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < body; k += 8)
    for (int r = 0; r < RB; ++r)
      acc[r] = _mm256_fmadd_ps(load8(rows[r] + k), _mm256_loadu_ps(x_at(r) + k), acc[r]);
  for (int r = 0; r < RB; ++r) {
    const float* x = x_at(r);
    float s = hsum(acc[r]);
    for (int64_t k = body; k < D; ++k) s = std::fma(load1(rows[r] + k), x[k], s);
    out[r] = s;
  }
}

template <int RB, typename W>
void dense_dot_rows(const float* x, const W* const* rows, int64_t D, float* out) {
  dense_dot_impl<RB>([x](int) { return x; }, rows, D, out);
}

template <int RB, typename W>
void dense_pairs_dot(const float* const* x, const W* const* rows, int64_t D, float* out) {
  dense_dot_impl<RB>([x](int r) { return x[r]; }, rows, D, out);
}

// One row of W against one fp32 row of x on a single address stream (the dense GEMV's order:
// a thread walks its rows one after another, so the hardware prefetcher sees one sequential
// stream), four accumulator chains of 8 lanes over k = 32j + 8c + lane, summed at the end.
template <typename W>
float dense_dot_stream(const float* x, const W* row, int64_t D) {
  const int64_t body = D / 32 * 32;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  // kStreamAheadBytes ahead in the stream (into the next rows; a prefetch past the end of W is a
  // no-op hint): the hardware prefetcher alone left the lm_head GEMV at ~30 GB/s where this
  // reaches ~33-35 (SmolLM2 49152 x 576 fp32, AMD EPYC, 2 threads; noisy; bench/dense_gemv.py).
  const char* ahead = reinterpret_cast<const char*>(row) + kStreamAheadBytes;
  for (int64_t k = 0; k < body; k += 32) {
    _mm_prefetch(ahead + k * sizeof(W), _MM_HINT_T0);
    _mm_prefetch(ahead + k * sizeof(W) + 64, _MM_HINT_T0);
    for (int c = 0; c < 4; ++c)
      acc[c] = _mm256_fmadd_ps(load8(row + k + 8 * c), _mm256_loadu_ps(x + k + 8 * c), acc[c]);
  }
  int64_t k = body;
  for (; k + 8 <= D; k += 8) acc[0] = _mm256_fmadd_ps(load8(row + k), _mm256_loadu_ps(x + k), acc[0]);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; k < D; ++k) s = std::fma(load1(row + k), x[k], s);
  return s;
}

template <typename W>
void packed_gate(const float* x, const uint16_t* xb, int64_t M, const W* values,
                 const uint8_t* meta, const W* bias, int64_t F, int64_t D, float* a, int nt) {
  // The AVX-512 GEMV (one permute per 16 kept weights instead of four) streams the packed gate
  // nearer the memory's speed (bench/ffn.py, bench/ffn_layers.py).
  if constexpr (std::is_same_v<W, uint16_t>) {
    // bf16 weights and the caller's bf16 x: the dot-product GEMV takes them as they are
    if (xb != nullptr && M <= kGemvMaxRowsAvx512 && sparse24_use_bf16_dot()) {
      sparse24_gemv_bf16dot_f32out(xb, M, D, values, meta, F, D, bias, a, F, nt);
      return;
    }
  }
  if (sparse24_use_avx512() && M <= kGemvMaxRowsAvx512)
    sparse24_gemv_f32out_avx512(x, M, values, meta, F, D, bias, a, F, nt);
  else
    gemv<W, float>(x, M, values, meta, F, D, bias, a, F, nt);
}

template <int R, typename W>
void axpy_dense_rows(const float* h, const W* const* rows, float* acc, int64_t len) {
  __m256 hv[R];
  for (int r = 0; r < R; ++r) hv[r] = _mm256_set1_ps(h[r]);
  const int64_t body = len / 8 * 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256 s = _mm256_loadu_ps(acc + i);
    for (int r = 0; r < R; ++r) s = _mm256_fmadd_ps(hv[r], load8(rows[r] + i), s);
    _mm256_storeu_ps(acc + i, s);
  }
  for (int64_t i = body; i < len; ++i) {
    float s = acc[i];
    for (int r = 0; r < R; ++r) s = std::fma(h[r], load1(rows[r] + i), s);
    acc[i] = s;
  }
}

// For a meta byte (two groups, 8 outputs): which of the byte's 4 packed values lands in each
// output lane, and a mask of the lanes that receive one (the scatter that undoes compression).
struct ScatterTables {
  alignas(32) int32_t idx[256][8]{};
  alignas(32) int32_t mask[256][8]{};
  constexpr ScatterTables() {
    for (int b = 0; b < 256; ++b)
      for (int grp = 0; grp < 2; ++grp) {
        const int nib = (b >> (4 * grp)) & 0xF;
        idx[b][4 * grp + (nib & 3)] = 2 * grp;
        mask[b][4 * grp + (nib & 3)] = -1;
        idx[b][4 * grp + (nib >> 2)] = 2 * grp + 1;
        mask[b][4 * grp + (nib >> 2)] = -1;
      }
  }
};
constexpr ScatterTables kScatter{};

inline __m128 load4f(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4f(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, sizeof(four));
  return _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four)));
}
inline __m128 load4f(const uint16_t* p) {
  __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_castsi128_ps(_mm_slli_epi32(w, 16));
}

template <int R, typename W>
void axpy_packed_rows(const float* h, const W* const* v, const uint8_t* const* meta, float* acc,
                      int64_t len) {
  __m256 hv[R];
  for (int r = 0; r < R; ++r) hv[r] = _mm256_set1_ps(h[r]);
  const int64_t body = len / 8 * 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256 s = _mm256_loadu_ps(acc + i);
    for (int r = 0; r < R; ++r) {
      const uint8_t b = meta[r][i / 8];
      const __m256 vals = _mm256_castps128_ps256(load4f(v[r] + i / 2));
      const __m256i ix = _mm256_load_si256(reinterpret_cast<const __m256i*>(kScatter.idx[b]));
      const __m256 mk = _mm256_load_ps(reinterpret_cast<const float*>(kScatter.mask[b]));
      const __m256 w = _mm256_and_ps(_mm256_permutevar8x32_ps(vals, ix), mk);
      s = _mm256_fmadd_ps(hv[r], w, s);
    }
    _mm256_storeu_ps(acc + i, s);
  }
  // a last group of 4 (d_model % 8 == 4)
  axpy_packed_groups_scalar<R>(h, v, meta, acc, body / 4, len / 4);
}

// n rows of x at once over R neuron groups (the driver's down phase): row j's acc[j][i] +=, per
// group r in order, v0_r[i] h4[j][r][idx0(i)] then v1_r[i] h4[j][r][idx1(i)] -- for each row the
// same fused multiply-adds in the same order whatever n is; the meta is decoded and the values
// loaded once for all n rows.
template <int R, typename W>
void axpy_group_rows(int n, const float* const* h4, float* const* acc, const W* const* v0,
                     const W* const* v1, const uint8_t* const* meta, int64_t len) {
  const __m256i shift0 = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i shift1 = _mm256_add_epi32(shift0, _mm256_set1_epi32(2));
  const __m256i three = _mm256_set1_epi32(3);
  const int64_t body = len / 8 * 8;
  for (int64_t i = 0; i < body; i += 8) {
    __m256i i0[R], i1[R];
    __m256 w0[R], w1[R];
    for (int r = 0; r < R; ++r) {
      uint32_t word;
      std::memcpy(&word, meta[r] + i / 2, sizeof(word));
      const __m256i wv = _mm256_set1_epi32(static_cast<int>(word));
      i0[r] = _mm256_and_si256(_mm256_srlv_epi32(wv, shift0), three);
      i1[r] = _mm256_and_si256(_mm256_srlv_epi32(wv, shift1), three);
      w0[r] = load8(v0[r] + i);
      w1[r] = load8(v1[r] + i);
    }
    for (int j = 0; j < n; ++j) {
      __m256 s = _mm256_loadu_ps(acc[j] + i);
      for (int r = 0; r < R; ++r) {
        const __m256 hv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(h4[j * R + r]));
        s = _mm256_fmadd_ps(w0[r], _mm256_permutevar8x32_ps(hv, i0[r]), s);
        s = _mm256_fmadd_ps(w1[r], _mm256_permutevar8x32_ps(hv, i1[r]), s);
      }
      _mm256_storeu_ps(acc[j] + i, s);
    }
  }
  axpy_group_rows_scalar<R>(n, h4, acc, v0, v1, meta, body, len);
}

#include "sparse_ffn_driver.inc"
#include "sparse_ffn_unpack_down.inc"

constexpr int kDenseXRows = 3;  // 12 accumulators + a W vector: within the 16 ymm registers
#include "dense_rows.inc"

}  // namespace

int64_t ffn_gate_avx2(const FfnProblem& p, float* a, int32_t* active) {
  return ffn_gate_entry(p, a, active);
}

void ffn_tail_avx2(const FfnProblem& p, const float* a, const int32_t* active, int64_t nactive,
                   void* y, int64_t ldy) {
  ffn_tail_entry(p, a, active, nactive, y, ldy);
}

void dense_gemv_avx2(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N,
                     int64_t K, float* y, int nthreads) {
  if (M == 1) return dense_gemv_entry(x, M, w, dtype, N, K, y, nthreads);
  const int nt = resolve_threads(nthreads);
  by_weight_type(dtype, w, [&](const auto* wt) { dense_gemm_small(x, M, wt, N, K, y, nt); });
}

void unpack_down24_avx2(const void* values, const uint8_t* meta, int64_t F, int64_t D, int64_t n0,
                        int64_t cols, int elem_size, void* dense, int nthreads) {
  unpack_down_bits(values, meta, F, D, n0, cols, elem_size, dense, resolve_threads(nthreads));
}

}  // namespace pysparse::core::detail
