// AVX-512 build of the int8 linears (qlinear.h). Only this file is compiled with -mavx512f; the
// dispatcher (qlinear.cpp) calls it only on CPUs that report AVX-512F/BW.
//
// int8 weights are widened in registers: vpmovsxbd + vcvtdq2ps per 16 weights, then the fp32
// FMA (qlinear_widen.inc, shared with the AVX2 build).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

constexpr Route kQRoute = Route::kInt8Linear;

// The widening int8 kernels (qlinear_widen.inc) on 16 lanes: 2:4 picks the 16 kept x values of
// 32 columns with one vpermt2ps, indices from the chunk's 32-bit meta word as in the fp32 GEMV
// (sparse24_linear_avx512.cpp).
struct QVec {
  using T = __m512;
  using Sel = __m512i;
  static constexpr int kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static T widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  // Lane t takes kept weight t: group t/2, slot t%2, whose index sits at bits 2t..2t+1 of the
  // word: idx = base | ((word >> 2t) & 3), one vpternlogd (0xEA = (A & B) | C).
  static Sel select(const uint8_t* meta) {
    const __m512i base =
        _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    const __m512i shifts =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    int32_t word;
    std::memcpy(&word, meta, sizeof(word));
    return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts),
                                     _mm512_set1_epi32(3), base, 0xEA);
  }
  static T kept(T lo, T hi, Sel idx) { return _mm512_permutex2var_ps(lo, idx, hi); }
};

#include "qlinear_widen.inc"

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
