// AVX-512 build of the 2:4 GEMM (sparse24_gemm.inc): the compute-bound large-M path, where 16-wide
// FMAs double the work per instruction over AVX2. Only this file is compiled with -mavx512f; the
// dispatcher (sparse24_linear.cpp) calls it only on CPUs that report AVX-512F. The GEMV stays on
// AVX2: it is bound by memory bandwidth, not by vector width.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <cstdlib>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

struct Vec {
  using T = __m512;
  static constexpr int kRowsPerPass = 4;  // accumulators: 4 rows x 4 vectors
  static constexpr int kWidth = 16;
  static T load(const float* p) { return _mm512_load_ps(p); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};

#include "sparse24_gemm.inc"

}  // namespace

void sparse24_gemm_f32_avx512(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

void sparse24_gemm_bf16_avx512(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

}  // namespace pysparse::core::detail
