// The bf16 2:4 GEMV on AVX512-BF16 dot products (compiled with -mavx512bf16 -mavx512vbmi; the
// dispatcher calls it only on CPUs that report both, see sparse24_linear.cpp).
//
// The AVX-512 GEMV of sparse24_linear_avx512.cpp widens every bf16 weight to fp32 (a shuffle and a
// shift) and gathers 16 fp32 x values per 16 weights: about ten cycles per 16 weights on Zen 4,
// which left a bf16 decode GEMV compute-bound at ~24 GB/s where a plain read reaches ~40. Here x
// stays bf16 (it is bf16 already) and one step takes 32 kept weights (16 groups, 64 columns):
//   idx  the 64-bit meta word broadcast, vpmultishiftqb moves the 2-bit index of weight t to the
//        low byte of 16-bit lane t, one vpternlogd masks it and adds the group's base column;
//   xs   one vpermt2w picks the 32 needed x values out of the 64 columns (two registers);
//   acc  one vdpbf16ps multiplies the 32 weight / x pairs and adds each group's two products to
//        its fp32 lane (products of bf16 are exact in fp32; each add rounds, as an FMA's would).
// Four instructions per 32 weights instead of ~12: the GEMV becomes memory-bound (SmolLM2 shapes
// and 16384 x 4096, AMD EPYC Zen 4, 2 threads: 576x576 12.5 -> 10.7 us, 16384x4096 3.1 -> 2.6 ms).
// The hardware flushes denormal inputs and outputs of the dot to zero (weights and activations of a
// trained model are far from 1e-38).
//
// A row's result is the same bits whichever kernel computes it (the one-row stream for M = 1, the
// blocked kernel for 2-16 rows of x): one accumulator chain per (row of W, row of x), the same
// order, the same scalar remainder.
#include "sparse24_internal.h"

#ifdef PYSPARSE_NO_BF16_DOT
// A compiler without AVX512-BF16 / VBMI: the dispatcher never takes this route.
namespace pysparse::core::detail {
bool bf16_dot_built() { return false; }
void sparse24_gemv_bf16dot(const uint16_t*, int64_t, int64_t, const uint16_t*, const uint8_t*,
                           int64_t, int64_t, const uint16_t*, uint16_t*, int64_t, int) {}
void sparse24_gemv_bf16dot_f32out(const uint16_t*, int64_t, int64_t, const uint16_t*,
                                  const uint8_t*, int64_t, int64_t, const uint16_t*, float*,
                                  int64_t, int) {}
}  // namespace pysparse::core::detail
#else

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace pysparse::core::detail {
namespace {

constexpr int64_t kCols = 64;  // columns of x per step (16 groups, 32 kept weights)

struct DotConsts {
  __m512i ctrl;  // byte 2t: bit offset 2t (weight t's index in the meta word); byte 2t+1: 0
  __m512i base;  // lane t: 4 * (t / 2), the first column of weight t's group
  __m512i three;
  DotConsts() {
    alignas(64) uint8_t c[64];
    alignas(64) uint16_t b[32];
    for (int t = 0; t < 32; ++t) {
      c[2 * t] = static_cast<uint8_t>(2 * t);
      c[2 * t + 1] = 0;
      b[t] = static_cast<uint16_t>(4 * (t / 2));
    }
    ctrl = _mm512_load_si512(c);
    base = _mm512_load_si512(b);
    three = _mm512_set1_epi16(3);
  }
};

// vpermt2w indices of the 32 weights of step j: column of weight t within the step's 64.
inline __m512i step_index(const DotConsts& k, const uint8_t* meta_row, int64_t j) {
  uint64_t word;
  std::memcpy(&word, meta_row + 8 * j, sizeof(word));
  const __m512i sel =
      _mm512_multishift_epi64_epi8(k.ctrl, _mm512_set1_epi64(static_cast<long long>(word)));
  return _mm512_ternarylogic_epi32(sel, k.three, k.base, 0xEA);  // (sel & 3) | base
}

inline float bf16f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The groups past the last full step, in order, for one row of W and one row of x.
inline float remainder(float s, const uint16_t* x, const uint16_t* v, const uint8_t* mt,
                       int64_t K) {
  for (int64_t g = K / kCols * 16; g < K / 4; ++g) {
    const unsigned nib = (mt[g / 2] >> ((g & 1) * 4)) & 0xFu;
    s = std::fma(bf16f(v[2 * g]), bf16f(x[4 * g + (nib & 3u)]), s);
    s = std::fma(bf16f(v[2 * g + 1]), bf16f(x[4 * g + (nib >> 2)]), s);
  }
  return s;
}

// Row n of W against one bf16 row of x: one sequential stream per thread (see gemv_row_stream in
// sparse24_linear_avx512.cpp), kStreamAheadBytes asked for ahead.
inline float row_stream(const DotConsts& k, const uint16_t* x, const uint16_t* values,
                        const uint8_t* meta, int64_t n, int64_t K) {
  const uint16_t* v = values + n * (K / 2);
  const uint8_t* mt = meta + n * meta_cols(K);
  const char* ahead = reinterpret_cast<const char*>(v) + kStreamAheadBytes;
  const int64_t steps = K / kCols;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < steps; ++j) {
    _mm_prefetch(ahead + 64 * j, _MM_HINT_T0);
    const __m512i idx = step_index(k, mt, j);
    const __m512i xs = _mm512_permutex2var_epi16(_mm512_loadu_si512(x + kCols * j), idx,
                                                 _mm512_loadu_si512(x + kCols * j + 32));
    acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(v + 32 * j)),
                           reinterpret_cast<__m512bh>(xs));
  }
  return remainder(_mm512_reduce_add_ps(acc), x, v, mt, K);
}

// RB rows of W (from n) against MT rows of x (stride ldx): each step's indices and weights are
// loaded once for all MT rows of x. out[m][r].
template <int RB, int MT>
inline void rows_block(const DotConsts& k, const uint16_t* x, int64_t ldx, const uint16_t* values,
                       const uint8_t* meta, int64_t n, int64_t K, float (*out)[RB]) {
  const int64_t steps = K / kCols;
  const uint16_t* v[RB];
  const uint8_t* mt[RB];
  __m512 acc[MT][RB];
  for (int r = 0; r < RB; ++r) {
    v[r] = values + (n + r) * (K / 2);
    mt[r] = meta + (n + r) * meta_cols(K);
    for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < steps; ++j) {
    __m512i xa[MT], xb[MT];
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_loadu_si512(x + m * ldx + kCols * j);
      xb[m] = _mm512_loadu_si512(x + m * ldx + kCols * j + 32);
    }
    for (int r = 0; r < RB; ++r) {
      const __m512i idx = step_index(k, mt[r], j);
      const __m512bh w = reinterpret_cast<__m512bh>(_mm512_loadu_si512(v[r] + 32 * j));
      for (int m = 0; m < MT; ++m)
        acc[m][r] = _mm512_dpbf16_ps(
            acc[m][r], w, reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(xa[m], idx, xb[m])));
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r)
      out[m][r] = remainder(_mm512_reduce_add_ps(acc[m][r]), x + m * ldx, v[r], mt[r], K);
}

template <int RB, int MT>
inline void rows_block_upto(int mt, const DotConsts& k, const uint16_t* x, int64_t ldx,
                            const uint16_t* values, const uint8_t* meta, int64_t n, int64_t K,
                            float (*out)[RB]) {
  if (mt == MT)
    rows_block<RB, MT>(k, x, ldx, values, meta, n, K, out);
  else if constexpr (MT > 1)
    rows_block_upto<RB, MT - 1>(mt, k, x, ldx, values, meta, n, K, out);
}

inline void put(uint16_t* p, float v) { *p = float_to_bf16(v); }
inline void put(float* p, float v) { *p = v; }

template <typename Y>
void gemv_dot(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
              const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias, Y* y, int64_t ldy,
              int nthreads) {
  const int nt = resolve_threads(nthreads);
  const DotConsts k;
  const bool parallel = N * K * M >= (1 << 16);
  RegionTrace trace(parallel ? nt : 1);
  if (M == 1) {
#pragma omp parallel num_threads(nt) if (parallel)
    {
      trace.mark();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        put(y + n, row_stream(k, x, values, meta, n, K) + (bias ? bf16f(bias[n]) : 0.f));
    }
    trace.finish(Route::kGemvAvx512);
    return;
  }
  // 4 rows of W x up to 4 rows of x: 16 accumulators, 8 x registers and the constants fit the 32
  // vector registers.
  constexpr int RB = 4, MT = 4;
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel num_threads(nt) if (parallel)
  {
    trace.mark();
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t n0 = b * RB;
      const int rows = static_cast<int>(std::min<int64_t>(RB, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int mt = static_cast<int>(std::min<int64_t>(MT, M - m0));
        const uint16_t* xr = x + m0 * ldx;
        float out[MT][RB];
        if (rows == RB) {
          rows_block_upto<RB, MT>(mt, k, xr, ldx, values, meta, n0, K, out);
        } else {
          for (int r = 0; r < rows; ++r)
            for (int m = 0; m < mt; ++m) {
              float one[1][1];
              rows_block<1, 1>(k, xr + m * ldx, ldx, values, meta, n0 + r, K, one);
              out[m][r] = one[0][0];
            }
        }
        for (int m = 0; m < mt; ++m)
          for (int r = 0; r < rows; ++r)
            put(y + (m0 + m) * ldy + n0 + r,
                out[m][r] + (bias ? bf16f(bias[n0 + r]) : 0.f));
      }
    }
  }
  trace.finish(Route::kGemvAvx512);
}

}  // namespace

bool bf16_dot_built() { return true; }

void sparse24_gemv_bf16dot(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                           const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                           uint16_t* y, int64_t ldy, int nthreads) {
  gemv_dot(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_gemv_bf16dot_f32out(const uint16_t* x, int64_t M, int64_t ldx,
                                  const uint16_t* values, const uint8_t* meta, int64_t N,
                                  int64_t K, const uint16_t* bias, float* y, int64_t ldy,
                                  int nthreads) {
  gemv_dot(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

}  // namespace pysparse::core::detail

#endif  // PYSPARSE_NO_BF16_DOT
