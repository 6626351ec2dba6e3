// AVX2/FMA build of the int8 linears (qlinear.h); the dispatcher (qlinear.cpp) calls it only on
// CPUs with AVX2 and FMA.
//
// int8 weights are widened in registers (vpmovsxbd + vcvtdq2ps per 8). 2:4: per 16 columns of x
// (two meta bytes, 8 kept weights) the kept x values come from two vpermps with the index table
// of the fp32 kernels (sparse24_simd_common.inc) and one blend.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

constexpr Route kQRoute = Route::kInt8Linear;

template <int RB, int MT>
inline void q_dense(const FloatRows& xs, int64_t K, const int8_t* w, float (*out)[RB]) {
  const float* x = xs.p;
  const int64_t chunks = K / 8;
  __m256 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  // RB contiguous rows: one stream, asked for kStreamAheadBytes ahead, a line per 64 bytes.
  const char* ahead = reinterpret_cast<const char*>(w) + kStreamAheadBytes;
  for (int64_t j = 0; j < chunks; ++j) {
    if ((j * RB * 8) % 64 < RB * 8) _mm_prefetch(ahead + RB * 8 * j, _MM_HINT_T0);
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(x + m * K + 8 * j);
    for (int r = 0; r < RB; ++r) {
      const __m256 wv = load8(w + r * K + 8 * j);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = chunks * 8; k < K; ++k)
        s = std::fma(static_cast<float>(w[r * K + k]), x[m * K + k], s);
      out[m][r] = s;
    }
}

template <int RB, int MT>
inline void q_packed(const FloatRows& xs, int64_t K, const int8_t* v, const uint8_t* meta,
                     float (*out)[RB]) {
  const float* x = xs.p;
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 16;  // 4 groups, 8 kept weights, 2 meta bytes
  __m256 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  const char* vahead = reinterpret_cast<const char*>(v) + kStreamAheadBytes;
  const char* mahead = reinterpret_cast<const char*>(meta) + kStreamAheadBytes / 4;
  for (int64_t j = 0; j < chunks; ++j) {
    if ((j & 1) == 0) _mm_prefetch(vahead + RB * 8 * j, _MM_HINT_T0);
    if ((j & 7) == 0) _mm_prefetch(mahead + RB * 2 * j, _MM_HINT_T0);
    __m256 xlo[MT], xhi[MT];
    for (int m = 0; m < MT; ++m) {
      xlo[m] = _mm256_loadu_ps(x + m * K + 16 * j);
      xhi[m] = _mm256_loadu_ps(x + m * K + 16 * j + 8);
    }
    for (int r = 0; r < RB; ++r) {
      const uint8_t* mr = meta + r * mcols + 2 * j;
      const __m256i p0 = perm_index(mr[0]), p1 = perm_index(mr[1]);
      const __m256 wv = load8(v + r * half + 8 * j);
      for (int m = 0; m < MT; ++m) {
        const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo[m], p0),
                                          _mm256_permutevar8x32_ps(xhi[m], p1), 0xF0);
        acc[m][r] = _mm256_fmadd_ps(wv, xg, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r)
      out[m][r] = q_packed_tail(hsum(acc[m][r]), x + m * K, v + r * half, meta + r * mcols,
                                chunks * 4, K);
}

#include "qlinear_driver.inc"

}  // namespace

void int8_linear_avx2(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<false>(FloatRows{x, K}, M, q, nullptr, scale, bias, N, K, y, nt);
}

void sparse24_int8_linear_avx2(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<true>(FloatRows{x, K}, M, values, meta, scale, bias, N, K, y, nt);
}

}  // namespace pysparse::core::detail
