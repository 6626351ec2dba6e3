// AVX-512 build of the int8 linears (qlinear.h). Only this file is compiled with -mavx512f; the
// dispatcher (qlinear.cpp) calls it only on CPUs that report AVX-512F/BW.
//
// int8 weights are widened in registers: vpmovsxbd + vcvtdq2ps per 16 weights, then the fp32
// FMA. 2:4: per 32 columns of x (16 kept weights, one 32-bit meta word) one vpermt2ps picks the
// 16 x values, with indices from the meta word as in the fp32 GEMV (sparse24_linear_avx512.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

constexpr Route kQRoute = Route::kInt8Linear;

inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

template <int RB, int MT>
inline void q_dense(const FloatRows& xs, int64_t K, const QWeight& qw, float (*out)[RB]) {
  const float* x = xs.p;
  const int8_t* w = reinterpret_cast<const int8_t*>(qw.w);
  const int64_t chunks = K / 16;
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  // The RB rows are contiguous: 16 bytes of each per chunk is RB * 16 bytes of one stream, asked
  // for kStreamAheadBytes ahead (into the next block; past the end of W it is a no-op hint).
  const char* ahead = reinterpret_cast<const char*>(w) + kStreamAheadBytes;
  for (int64_t j = 0; j < chunks; ++j) {
    _mm_prefetch(ahead + RB * 16 * j, _MM_HINT_T0);
    __m512 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_ps(x + m * K + 16 * j);
    for (int r = 0; r < RB; ++r) {
      const __m512 wv = widen16(w + r * K + 16 * j);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      for (int64_t k = chunks * 16; k < K; ++k)
        s = std::fma(static_cast<float>(w[r * K + k]), x[m * K + k], s);
      out[m][r] = s;
    }
}

template <int RB, int MT>
inline void q_packed(const FloatRows& xs, int64_t K, const QWeight& qw, float (*out)[RB]) {
  const float* x = xs.p;
  const int8_t* v = reinterpret_cast<const int8_t*>(qw.w);
  const uint8_t* meta = qw.meta;
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 32;  // 8 groups, 16 kept weights, 4 meta bytes
  // Lane t takes kept weight t: group t/2, slot t%2, whose index sits at bits 2t..2t+1 of the word.
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* vahead = reinterpret_cast<const char*>(v) + kStreamAheadBytes;
  const char* mahead = reinterpret_cast<const char*>(meta) + kStreamAheadBytes / 4;
  for (int64_t j = 0; j < chunks; ++j) {
    _mm_prefetch(vahead + RB * 16 * j, _MM_HINT_T0);
    if ((j & 3) == 0) _mm_prefetch(mahead + RB * 4 * j, _MM_HINT_T0);
    __m512 xa[MT], xb[MT];
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_loadu_ps(x + m * K + 32 * j);
      xb[m] = _mm512_loadu_ps(x + m * K + 32 * j + 16);
    }
    for (int r = 0; r < RB; ++r) {
      int32_t word;
      std::memcpy(&word, meta + r * mcols + 4 * j, sizeof(word));
      // idx = base | ((word >> 2t) & 3): one vpternlogd (0xEA = (A & B) | C)
      const __m512i idx = _mm512_ternarylogic_epi32(
          _mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three, base, 0xEA);
      const __m512 wv = widen16(v + r * half + 16 * j);
      for (int m = 0; m < MT; ++m)
        acc[m][r] = _mm512_fmadd_ps(wv, _mm512_permutex2var_ps(xa[m], idx, xb[m]), acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      out[m][r] = q_packed_tail(s, x + m * K, v + r * half, meta + r * mcols, chunks * 8, K);
    }
}

// int4 takes the AVX2 or VNNI builds (qlinear.cpp), never this one.
template <int RB, int MT, bool kPacked>
inline void q_int4(const FloatRows&, int64_t, const QWeight&, float (*)[RB]) {
  static_assert(RB < 0, "the AVX-512 widening build has no int4 kernels");
}

#include "qlinear_driver.inc"

}  // namespace

void int8_linear_avx512(const float* x, int64_t M, const int8_t* q, const float* scale,
                        const float* bias, int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kDense8>(FloatRows{x, K}, M, int8_weight(q, nullptr, scale, K), bias, N, K, y, nt);
}

void sparse24_int8_linear_avx512(const float* x, int64_t M, const int8_t* values,
                                 const uint8_t* meta, const float* scale, const float* bias,
                                 int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kPacked8>(FloatRows{x, K}, M, int8_weight(values, meta, scale, K), bias, N, K, y,
                        nt);
}

}  // namespace pysparse::core::detail
