// AVX2/FMA build of the int8 linears (qlinear.h); the dispatcher (qlinear.cpp) calls it only on
// CPUs with AVX2 and FMA.
//
// int8 weights are widened in registers (vpmovsxbd + vcvtdq2ps per 8): qlinear_widen.inc, shared
// with the AVX-512 build. int4: per block of 32 values one
// 16-byte load, each piece of 8 values unpacked (nibble mask/shift, -8), widened and multiplied by
// its group's scale (q * scale is exact in fp32: the dequantised weight), then the same FMA and,
// for 2:4, the same x selection as int8.
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

// The widening int8 kernels (qlinear_widen.inc) on 8 lanes: 2:4 picks the 8 kept x values of 16
// columns with two vpermps (the fp32 kernels' index table) and one blend.
struct QVec {
  using T = __m256;
  struct Sel {
    __m256i lo, hi;
  };
  static constexpr int kWidth = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static T widen(const int8_t* p) { return load8(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(T v) { return ::pysparse::core::detail::hsum(v); }
  static Sel select(const uint8_t* meta) { return {perm_index(meta[0]), perm_index(meta[1])}; }
  static T kept(T lo, T hi, Sel s) {
    return _mm256_blend_ps(_mm256_permutevar8x32_ps(lo, s.lo), _mm256_permutevar8x32_ps(hi, s.hi),
                           0xF0);
  }
};

#include "qlinear_widen.inc"

// Piece p (0-3: 8 values each) of a block of 32 packed int4 values, dequantised: lo nibbles of
// bytes 0-7 / 8-15, then hi nibbles of bytes 0-7 / 8-15 (qlinear.h's layout), times the scale.
inline __m256 int4_piece(__m128i raw, int p, __m256 s) {
  const __m128i src = (p & 1) ? _mm_srli_si128(raw, 8) : raw;
  const __m128i nib = _mm_and_si128(p >= 2 ? _mm_srli_epi16(src, 4) : src, _mm_set1_epi8(0x0F));
  const __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), s);
}

template <int RB, int MT, bool kPacked>
inline void q_int4(const FloatRows& xs, int64_t K, const QWeight& w, float (*out)[RB]) {
  const float* x = xs.p;
  // Blocks of 32 values whose columns lie inside the row (dense 32 columns, 2:4 64); the rest
  // (a partial last block) go through q4_tail.
  const int64_t full = kPacked ? K / 64 : K / 32;
  __m256 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm256_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w.w) + kStreamAheadBytes;
  for (int64_t b = 0; b < full; ++b) {
    if ((b & 3) == 0)
      for (int r = 0; r < RB; ++r) _mm_prefetch(ahead + r * w.wstride + 16 * b, _MM_HINT_T0);
    const int64_t g = b * 32 / w.group;
    for (int p = 0; p < 4; ++p) {
      __m256 xlo[MT], xhi[MT];
      for (int m = 0; m < MT; ++m) {
        if constexpr (kPacked) {
          xlo[m] = _mm256_loadu_ps(x + m * K + 64 * b + 16 * p);
          xhi[m] = _mm256_loadu_ps(x + m * K + 64 * b + 16 * p + 8);
        } else {
          xlo[m] = _mm256_loadu_ps(x + m * K + 32 * b + 8 * p);
        }
      }
      for (int r = 0; r < RB; ++r) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.w + r * w.wstride + 16 * b));
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(w.gscale[r * w.sstride + g]));
        const __m256 wv = int4_piece(raw, p, s);
        if constexpr (kPacked) {
          const uint8_t* mr = w.meta + r * w.mstride + 8 * b + 2 * p;
          const __m256i p0 = perm_index(mr[0]), p1 = perm_index(mr[1]);
          for (int m = 0; m < MT; ++m) {
            const __m256 xg = _mm256_blend_ps(_mm256_permutevar8x32_ps(xlo[m], p0),
                                              _mm256_permutevar8x32_ps(xhi[m], p1), 0xF0);
            acc[m][r] = _mm256_fmadd_ps(wv, xg, acc[m][r]);
          }
        } else {
          for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xlo[m], acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r)
      out[m][r] = q4_tail(hsum(acc[m][r]), x + m * K, w.row(r), K, kPacked, full);
}

#include "qlinear_driver.inc"

}  // namespace

void int8_linear_avx2(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kDense8>(FloatRows{x, K}, M, int8_weight(q, nullptr, scale, K), bias, N, K, y, nt);
}

void sparse24_int8_linear_avx2(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kPacked8>(FloatRows{x, K}, M, int8_weight(values, meta, scale, K), bias, N, K, y,
                        nt);
}

void int4_dequantize_row_avx2(const QWeight& w, int64_t K, float* out) {
  const int64_t full = K / 32;
  for (int64_t b = 0; b < full; ++b) {
    const __m256 s = _mm256_set1_ps(_cvtsh_ss(w.gscale[b * 32 / w.group]));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.w + 16 * b));
    for (int p = 0; p < 4; ++p) _mm256_storeu_ps(out + 32 * b + 8 * p, int4_piece(raw, p, s));
  }
  for (int64_t k = full * 32; k < K; ++k)
    out[k] = static_cast<float>(int4_value(w.w, k)) * half_to_float(w.gscale[k / w.group]);
}

void int4_linear_avx2(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                      int64_t K, float* y, int nt) {
  if (w.meta)
    qlinear_run<kPacked4>(FloatRows{x, K}, M, w, bias, N, K, y, nt);
  else
    qlinear_run<kDense4>(FloatRows{x, K}, M, w, bias, N, K, y, nt);
}

}  // namespace pysparse::core::detail
