// AVX2/FMA build of the int8 linears (qlinear.h); the dispatcher (qlinear.cpp) calls it only on
// CPUs with AVX2 and FMA.
//
// int8 weights are widened in registers (vpmovsxbd + vcvtdq2ps per 8). 2:4: per 16 columns of x
// (two meta bytes, 8 kept weights) the kept x values come from two vpermps with the index table
// of the fp32 kernels (sparse24_simd_common.inc) and one blend. int4: per block of 32 values one
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

template <int RB, int MT>
inline void q_dense(const FloatRows& xs, int64_t K, const QWeight& qw, float (*out)[RB]) {
  const float* x = xs.p;
  const int8_t* w = reinterpret_cast<const int8_t*>(qw.w);
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
inline void q_packed(const FloatRows& xs, int64_t K, const QWeight& qw, float (*out)[RB]) {
  const float* x = xs.p;
  const int8_t* v = reinterpret_cast<const int8_t*>(qw.w);
  const uint8_t* meta = qw.meta;
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

void int4_linear_avx2(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                      int64_t K, float* y, int nt) {
  if (w.meta)
    qlinear_run<kPacked4>(FloatRows{x, K}, M, w, bias, N, K, y, nt);
  else
    qlinear_run<kDense4>(FloatRows{x, K}, M, w, bias, N, K, y, nt);
}

}  // namespace pysparse::core::detail
