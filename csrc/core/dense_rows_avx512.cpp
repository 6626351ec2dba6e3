// The dense linear for 2-16 rows of x (dense_rows.inc: one row of W against several rows of x)
// built with AVX-512VL for its 32 ymm registers: 6 rows of x per pass over a row of W where the
// AVX2 build fits 3. The instructions per (row of W, row of x) are the AVX2 build's, so each row
// of x gets the same bits either way, alone or batched. The lm_head of a decode step with 8
// sequences (SmolLM2, 49152 x 576 fp32, 2 threads): 3 + 3 + 2 rows -> 6 + 2.
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

constexpr int kDenseXRows = 6;  // 24 accumulators + a W vector and x: within the 32 registers
#include "dense_rows.inc"

}  // namespace

void dense_gemm_rows_avx512(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N,
                            int64_t K, float* y, int nthreads) {
  const int nt = resolve_threads(nthreads);
  by_weight_type(dtype, w, [&](const auto* wt) { dense_gemm_small(x, M, wt, N, K, y, nt); });
}

}  // namespace pysparse::core::detail
