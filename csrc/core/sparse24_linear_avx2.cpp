// AVX2/FMA kernels for y = x @ W^T with W in the packed 2:4 layout (see sparse24.h).
//
// GEMV (few rows of x; batch-1 decode): memory-bound, so the goal is to stream values+meta once at
// full bandwidth. For 16 columns of x (4 groups, 2 meta bytes, 8 kept weights) we load x twice,
// pick the 4+4 needed elements with vpermps driven by a 256-entry table indexed by the meta byte,
// blend, and do one 8-wide FMA against the 8 packed weights. Four rows of W are in flight at once:
// they share the x loads and give the core four independent streams and FMA chains.
//
// GEMM (many rows of x): compute-bound. x is packed transposed in panels of 32 rows
// (xp[k][32], zero-padded), so each kept weight w[n,k] becomes a broadcast and four 8-wide FMAs
// against xp[k][0:32]; two rows of W at a time keep 8 accumulators (enough chains to cover the FMA
// latency). Only the kept half of the multiply-adds is done, so at equal FMA throughput this is up
// to 2x a dense GEMM. W is walked in chunks of rows that stay in L2 while every x panel passes over
// them, so W is read from memory once per call.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <array>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"

namespace pysparse::core::detail {

// Crossover between the GEMV and GEMM kernels, measured with bench/linear24.py (fp32 and bf16,
// 4096x4096 and 11008x4096) on the 2-core AVX2 dev machine: the GEMV kernel pays vpermps per row
// of x, the GEMM kernel wastes lanes when M is far below its 8-row granularity.
const int kGemvMaxRows = 4;

namespace {

#include "sparse24_simd_common.inc"

// ---- GEMV -------------------------------------------------------------------------------------
// RB rows of W (starting at n) against one fp32 row of x; returns the RB dot products.
template <int RB, typename W>
inline void gemv_rows(const float* x, const W* values, const uint8_t* meta, int64_t n, int64_t K,
                      float* out) {
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 16;  // 4 groups each
  __m256 acc[RB];
  const W* v[RB];
  const uint8_t* mt[RB];
  for (int r = 0; r < RB; ++r) {
    acc[r] = _mm256_setzero_ps();
    v[r] = values + (n + r) * half;
    mt[r] = meta + (n + r) * mcols;
  }
  for (int64_t j = 0; j < chunks; ++j) {
    const __m256 xa = _mm256_loadu_ps(x + 16 * j);
    const __m256 xb = _mm256_loadu_ps(x + 16 * j + 8);
    for (int r = 0; r < RB; ++r) {
      const __m256 pa = _mm256_permutevar8x32_ps(xa, perm_index(mt[r][2 * j]));
      const __m256 pb = _mm256_permutevar8x32_ps(xb, perm_index(mt[r][2 * j + 1]));
      const __m256 xs = _mm256_blend_ps(pa, pb, 0xF0);
      acc[r] = _mm256_fmadd_ps(load8(v[r] + 8 * j), xs, acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    float s = hsum(acc[r]);
    for (int64_t g = chunks * 4; g < K / 4; ++g) {
      const unsigned nib = (mt[r][g / 2] >> ((g & 1) * 4)) & 0xFu;
      s += load1(v[r] + 2 * g) * x[4 * g + (nib & 3u)];
      s += load1(v[r] + 2 * g + 1) * x[4 * g + (nib >> 2)];
    }
    out[r] = s;
  }
}

template <typename W, typename Y>
void gemv(const float* xf, int64_t M, const W* values, const uint8_t* meta, int64_t N, int64_t K,
          const W* bias, Y* y, int64_t ldy, int nt) {
  constexpr int RB = 4;
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * RB;
    const int rows = static_cast<int>(std::min<int64_t>(RB, N - n0));
    for (int64_t m = 0; m < M; ++m) {
      float out[RB];
      const float* xr = xf + m * K;
      if (rows == RB) {
        gemv_rows<RB>(xr, values, meta, n0, K, out);
      } else {
        for (int r = 0; r < rows; ++r) gemv_rows<1>(xr, values, meta, n0 + r, K, out + r);
      }
      for (int r = 0; r < rows; ++r)
        store1(y + m * ldy + n0 + r, out[r] + (bias ? load1(bias + n0 + r) : 0.f));
    }
  }
}

struct Vec {
  using T = __m256;
  static constexpr int kRowsPerPass = 2;  // accumulators: 2 rows x 4 vectors
  static constexpr int kWidth = 8;
  static T load(const float* p) { return _mm256_load_ps(p); }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};

#include "sparse24_gemm.inc"

template <typename X>
std::vector<float> to_f32_rows(const X* x, int64_t M, int64_t ldx, int64_t K) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = load1(x + m * ldx + k);
  return xf;
}

}  // namespace

void sparse24_linear_f32_avx2(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  const int nt = resolve_threads(nthreads);
  if (M <= kGemvMaxRows) {
    if (ldx == K) {
      gemv(x, M, values, meta, N, K, bias, y, ldy, nt);
    } else {
      const std::vector<float> xf = to_f32_rows(x, M, ldx, K);
      gemv(xf.data(), M, values, meta, N, K, bias, y, ldy, nt);
    }
  } else {
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, nt);
  }
}

void sparse24_linear_bf16_avx2(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  const int nt = resolve_threads(nthreads);
  if (M <= kGemvMaxRows) {
    // x is tiny next to W; widening it once keeps the inner loop identical to fp32.
    const std::vector<float> xf = to_f32_rows(x, M, ldx, K);
    gemv(xf.data(), M, values, meta, N, K, bias, y, ldy, nt);
  } else {
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, nt);
  }
}

}  // namespace pysparse::core::detail
