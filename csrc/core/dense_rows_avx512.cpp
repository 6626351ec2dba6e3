// The dense linear for 2-16 rows of x with AVX-512 (dense_gemv with M > 1 where the CPU has it):
// one row of W against up to four rows of x at once in zmm registers. Each (row of W, row of x)
// keeps the one-row GEMV's four chains of 8 lanes and their order (dense_dot_stream): a zmm
// accumulator holds two chains side by side (k = 32j + 0..15: chains 0 and 1; + 16..31: chains 2
// and 3), its lanes fuse the same products in the same order, and the halves are summed as the
// GEMV sums its chains, so a row of x gets the same bits alone or batched (the tests compare them
// bit for bit). From ~6 rows the kernel is bound by the FMA units, not the memory: SmolLM2's
// lm_head (49152 x 576 fp32) at 8 rows is 226M multiply-adds, ~4.4 ms at this CPU's peak on 2
// cores. Measured against the ymm kernel of dense_rows.inc built with AVX-512VL's 32 registers
// (one row of W against 6 rows of x), the two alternated in one process (AMD EPYC Zen 4, 2
// threads, ms): 8 rows 7.2-7.4 -> 5.8-6.0, 16 rows 14.3 -> 12.8-13.1, 2-5 rows the same within
// the noise (memory-bound). (Two rows of W a pass, which saves x loads, ran slower: 7.6 at 8 rows.)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"
#include "sparse_ffn_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

constexpr int kRowsX = 4;  // rows of x a pass over a row of W (8 accumulators)

// y[m * N] = x_m . w for one row w of W and MT rows of x.
template <int MT, typename W>
inline void dense_row(const float* x, int64_t K, const W* w, float* y, int64_t N) {
  const int64_t body = K / 32 * 32;
  __m512 acc[MT][2];
  for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < body; k += 32) {
    const __m512 w01 = load16(w + k);
    const __m512 w23 = load16(w + k + 16);
    for (int m = 0; m < MT; ++m) {
      acc[m][0] = _mm512_fmadd_ps(w01, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w23, _mm512_loadu_ps(x + m * K + k + 16), acc[m][1]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    const float* xm = x + m * K;
    __m256 c0 = _mm512_castps512_ps256(acc[m][0]);
    const __m256 c1 = _mm512_extractf32x8_ps(acc[m][0], 1);
    const __m256 c2 = _mm512_castps512_ps256(acc[m][1]);
    const __m256 c3 = _mm512_extractf32x8_ps(acc[m][1], 1);
    int64_t k = body;
    for (; k + 8 <= K; k += 8) c0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(xm + k), c0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
    for (; k < K; ++k) s = std::fma(load1(w + k), xm[k], s);
    y[m * N] = s;
  }
}

template <typename W>
void dense_gemm_zmm(const float* x, int64_t M, const W* w, int64_t N, int64_t K, float* y,
                    int nt) {
  const bool parallel = N * K * M >= (1 << 16);
  RegionTrace trace(parallel ? nt : 1);
#pragma omp parallel num_threads(nt) if (parallel)
  {
    trace.mark();
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += kRowsX) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N + n;
        switch (std::min<int64_t>(kRowsX, M - m0)) {
          case 1: dense_row<1>(xm, K, w + n * K, ym, N); break;
          case 2: dense_row<2>(xm, K, w + n * K, ym, N); break;
          case 3: dense_row<3>(xm, K, w + n * K, ym, N); break;
          default: dense_row<kRowsX>(xm, K, w + n * K, ym, N); break;
        }
      }
  }
  trace.finish(Route::kDenseGemv);
}

}  // namespace

void dense_gemm_rows_avx512(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N,
                            int64_t K, float* y, int nthreads) {
  const int nt = resolve_threads(nthreads);
  by_weight_type(dtype, w, [&](const auto* wt) { dense_gemm_zmm(x, M, wt, N, K, y, nt); });
}

}  // namespace pysparse::core::detail
