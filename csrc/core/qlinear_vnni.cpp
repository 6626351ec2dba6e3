// The int8 linears on AVX512-VNNI dot products (qlinear.h, route "avx512_vnni"). Only this file is
// compiled with -mavx512vnni -mavx512vbmi; the dispatcher (qlinear.cpp) calls it only on CPUs
// that report AVX512-VNNI and VBMI, unless PYSPARSE_DISABLE_VNNI=1.
//
// Why: widening int8 weights to fp32 costs ~3 instructions per 16 weights (dense) and ~6 per 16
// kept weights (2:4), which left the 2:4 int8 GEMV compute-bound (~32 GB/s on Zen 4, no faster
// than bf16 2:4). vpdpbusd does 64 int8 products in one instruction, but both operands must be
// integers: x is quantised on the fly, per row and per block of 32 columns (kQBlock; symmetric,
// round to nearest even: xq = rint(x * (127 / amax)), x ~ xq * amax / 127). Blocks of 32 are
// what llama.cpp quantises activations to for its Q8_0 dot products; one scale per whole row
// cost SmolLM2 3.6% perplexity against 0.2% for blocks of 32 (bench/llm_quality.py notes).
// vpdpbusd multiplies unsigned by signed bytes, so x goes in as xq + 128 and each lane's
// 128 * sum(w) is taken back (a second vpdpbusd on the weights alone, shared by every row of x).
// Each 32-bit lane holds one block's integer partial sum exactly; it is converted and scaled by
// its block's scale into an fp32 accumulator. 2:4: per 128 columns the 64 kept weights' x bytes
// are picked by one vpermt2b, with byte indices from the 16 meta bytes by one vpmultishiftqb and
// one vpternlogd. A row's last, partial chunk takes masked loads: no scalar remainder (one for
// SmolLM2's K = 576, 4.5 chunks of 128, made the VNNI gate slower than widening).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {

#ifdef PYSPARSE_NO_VNNI

bool qlinear_vnni_built() { return false; }
void int8_linear_vnni(const float*, int64_t, const int8_t*, const float*, const float*, int64_t,
                      int64_t, float*, int) {}
void sparse24_int8_linear_vnni(const float*, int64_t, const int8_t*, const uint8_t*, const float*,
                               const float*, int64_t, int64_t, float*, int) {}

#else

namespace {

constexpr Route kQRoute = Route::kInt8Linear;

// x quantised per row: q [M, K] (xq + 128), and per chunk the 16 lanes' block scales (dense: 64
// columns a chunk, 8 lanes a block; 2:4: 128 columns, 4 lanes a block), so that a chunk's scales
// are one load.
struct QuantRows {
  const uint8_t* q;
  const float* lane;
  int64_t K, nlanes;
  QuantRows at(int64_t m) const { return {q + m * K, lane + m * nlanes, K, nlanes}; }
};

struct QuantBuffer {
  std::vector<uint8_t> q;
  std::vector<float> block, lane;
  QuantRows rows;
};

// One block of n <= 32 values: xq + 128 into q, the block's scale (max |x| / 127) returned, with
// xq = x * (127 / max |x|) in fp32 rounded to nearest even (vcvtps2dq under the default rounding
// mode) and clamped to +-127; 0 for an all-zero block. The tests' reference
// (pysparse.kernels.reference.quantize_activations_a8, the gtests' quantised_x) does the same
// fp32 operations.
inline float quantize_block(const float* x, int64_t n, uint8_t* q) {
  const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(n >= 32 ? 0xFFFF : (n > 16 ? (1u << (n - 16)) - 1 : 0));
  const __m512 a = _mm512_maskz_loadu_ps(m0, x), b = _mm512_maskz_loadu_ps(m1, x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
  auto quant = [&](__m512 v) {
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    return _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi), off);
  };
  _mm512_mask_cvtepi32_storeu_epi8(q, m0, quant(a));
  _mm512_mask_cvtepi32_storeu_epi8(q + 16, m1, quant(b));
  return amax / 127.f;
}

QuantBuffer quantize_rows(const float* x, int64_t M, int64_t K, bool packed) {
  QuantBuffer b;
  const int64_t nblocks = (K + kQBlock - 1) / kQBlock;
  const int64_t chunk = packed ? 128 : 64;
  const int64_t nlanes = (K + chunk - 1) / chunk * 16;  // the last chunk may be partial
  b.q.resize(static_cast<size_t>(M * K));
  b.block.resize(static_cast<size_t>(M * nblocks));
  b.lane.resize(static_cast<size_t>(std::max<int64_t>(M * nlanes, 1)));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t k0 = blk * kQBlock, k1 = std::min(K, k0 + kQBlock);
      b.block[m * nblocks + blk] = quantize_block(xr + k0, k1 - k0, b.q.data() + m * K + k0);
    }
    for (int64_t l = 0; l < nlanes; ++l) {
      // lane l of chunk j covers columns chunk*j + (chunk/16)*(l%16) onward, all in one block
      const int64_t col = std::min((l / 16) * chunk + (l % 16) * (chunk / 16), K - 1);
      b.lane[m * nlanes + l] = b.block[m * nblocks + col / kQBlock];
    }
  }
  b.rows = {b.q.data(), b.lane.data(), K, nlanes};
  return b;
}

// -128 * sum(w) per lane of 4 bytes: what xq + 128 adds to every lane's dot product.
inline __m512i minus_offset(__m512i w) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, w));
}

// Bytes [0, n) of a 64-byte load (n <= 64), zeros past them: a chunk's part inside the row.
inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

template <int RB, int MT>
inline void q_dense(const QuantRows& x, int64_t K, const int8_t* w, float (*out)[RB]) {
  // 64 columns a chunk, the last one partial: its loads are masked to the row (x and w zero past
  // it, so those lanes add exact zeros: 0 * w, and no offset since w = 0).
  const int64_t chunks = (K + 63) / 64;
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w) + kStreamAheadBytes;
  for (int64_t j = 0; j < chunks; ++j) {
    for (int r = 0; r < RB; ++r) _mm_prefetch(ahead + RB * 64 * j + 64 * r, _MM_HINT_T0);
    const __mmask64 live = first_bytes(K - 64 * j);
    __m512i xq[MT];
    __m512 ls[MT];
    for (int m = 0; m < MT; ++m) {
      xq[m] = _mm512_maskz_loadu_epi8(live, x.q + m * x.K + 64 * j);
      ls[m] = _mm512_loadu_ps(x.lane + m * x.nlanes + 16 * j);
    }
    for (int r = 0; r < RB; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi8(live, w + r * K + 64 * j);
      const __m512i base = minus_offset(wv);
      for (int m = 0; m < MT; ++m) {
        const __m512i d = _mm512_dpbusd_epi32(base, xq[m], wv);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls[m], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int RB, int MT>
inline void q_packed(const QuantRows& x, int64_t K, const int8_t* v, const uint8_t* meta,
                     float (*out)[RB]) {
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  // 128 columns a chunk (32 groups, 64 kept weights, 16 meta bytes), the last one partial: its
  // values, meta and x loads masked to the row (values zero past it: those lanes add nothing,
  // whatever index a zero meta nibble points at).
  const int64_t chunks = (K + 127) / 128;
  // Kept weight t of a chunk (group t/2) has its index at bits 2t..2t+1 of the chunk's 128 meta
  // bits: byte t of the selection takes bits from offset 2t mod 64 of meta qword t/32 (the meta
  // spread so that output qword q reads meta qword q/4), then idx = (bits & 3) | 4 * (t / 2).
  alignas(64) static constexpr struct Consts {
    uint8_t shift[64], base[64];
    constexpr Consts() : shift(), base() {
      for (int t = 0; t < 64; ++t) {
        shift[t] = static_cast<uint8_t>((2 * t) & 63);
        base[t] = static_cast<uint8_t>(4 * (t / 2));
      }
    }
  } kC{};
  const __m512i shift = _mm512_load_si512(kC.shift);
  const __m512i base = _mm512_load_si512(kC.base);
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i spread = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* vahead = reinterpret_cast<const char*>(v) + kStreamAheadBytes;
  const char* mahead = reinterpret_cast<const char*>(meta) + kStreamAheadBytes / 4;
  for (int64_t j = 0; j < chunks; ++j) {
    for (int r = 0; r < RB; ++r) _mm_prefetch(vahead + RB * 64 * j + 64 * r, _MM_HINT_T0);
    if ((j & 3) == 0) _mm_prefetch(mahead + RB * 16 * j, _MM_HINT_T0);
    const int64_t cols = K - 128 * j;  // >= 128 but in the last chunk
    const __mmask64 xa_live = first_bytes(cols), xb_live = first_bytes(std::max<int64_t>(cols - 64, 0));
    const __mmask64 v_live = first_bytes(cols / 2);
    const __mmask16 m_live = static_cast<__mmask16>(first_bytes((cols + 7) / 8));
    __m512i xa[MT], xb[MT];
    __m512 ls[MT];
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_maskz_loadu_epi8(xa_live, x.q + m * x.K + 128 * j);
      xb[m] = _mm512_maskz_loadu_epi8(xb_live, x.q + m * x.K + 128 * j + 64);
      ls[m] = _mm512_loadu_ps(x.lane + m * x.nlanes + 16 * j);
    }
    for (int r = 0; r < RB; ++r) {
      const __m128i m16 = _mm_maskz_loadu_epi8(m_live, meta + r * mcols + 16 * j);
      const __m512i bits = _mm512_multishift_epi64_epi8(
          shift, _mm512_permutexvar_epi64(spread, _mm512_castsi128_si512(m16)));
      const __m512i idx = _mm512_ternarylogic_epi32(bits, three, base, 0xEA);  // (a & b) | c
      const __m512i wv = _mm512_maskz_loadu_epi8(v_live, v + r * half + 64 * j);
      const __m512i off = minus_offset(wv);
      for (int m = 0; m < MT; ++m) {
        const __m512i xs = _mm512_permutex2var_epi8(xa[m], idx, xb[m]);
        const __m512i d = _mm512_dpbusd_epi32(off, xs, wv);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls[m], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

#include "qlinear_driver.inc"

}  // namespace

bool qlinear_vnni_built() { return true; }

void int8_linear_vnni(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt) {
  const QuantBuffer xq = quantize_rows(x, M, K, false);
  qlinear_run<false>(xq.rows, M, q, nullptr, scale, bias, N, K, y, nt);
}

void sparse24_int8_linear_vnni(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt) {
  const QuantBuffer xq = quantize_rows(x, M, K, true);
  qlinear_run<true>(xq.rows, M, values, meta, scale, bias, N, K, y, nt);
}

#endif  // PYSPARSE_NO_VNNI

}  // namespace pysparse::core::detail
