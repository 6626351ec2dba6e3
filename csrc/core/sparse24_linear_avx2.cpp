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

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"

namespace pysparse::core::detail {

// Crossover between the GEMV and GEMM kernels, measured with bench/linear24.py (fp32 and bf16,
// 4096x4096 and 11008x4096, 2 threads): the AVX2 GEMV re-decodes W for every row of x, so past ~6
// rows the GEMM (which vectorises over rows of x) wins; the AVX-512 GEMV decodes W once for 4 rows
// of x at a time and stays ahead up to 16 rows (fp32 11008x4096 at M=12: GEMV 7.8 ms, GEMM 14.7).
const int kGemvMaxRowsAvx2 = 6;
const int kGemvMaxRowsAvx512 = 16;

namespace {

#include "sparse24_simd_common.inc"

constexpr Route kGemvRoute = Route::kGemvAvx2;
constexpr Route kGemmRoute = Route::kGemmAvx2;

#include "sparse24_gemv_rows_avx2.inc"
#include "sparse24_gemv.inc"

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


}  // namespace

void sparse24_linear_f32_avx2(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  if (M <= kGemvMaxRowsAvx2)
    gemv_entry(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

void sparse24_linear_bf16_avx2(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  if (M <= kGemvMaxRowsAvx2)
    gemv_entry(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

}  // namespace pysparse::core::detail
