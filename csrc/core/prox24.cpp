// prox24 over a whole weight: groups of 4 consecutive elements, independent, spread over OpenMP
// threads in static chunks (every group costs about the same, so no dynamic schedule). fp32 runs
// lane-parallel (prox24_simd.inc: AVX-512, else AVX2, bit-identical to this file's scalar loop,
// which remains the fallback, PYSPARSE_DISABLE_AVX512 / PYSPARSE_DISABLE_AVX2 as for the linear
// layer); fp64 (the reference precision) stays scalar.
#include <cstdint>

#include "prox24_group.h"
#include "sparse24.h"
#include "sparse24_internal.h"

namespace pysparse::core {

template <typename T>
static int64_t prox24_impl(T* w, int64_t groups, T lam, int max_iters, T tol) {
  int64_t sweeps = 0;
#pragma omp parallel for schedule(static, 4096) reduction(+ : sweeps) if (groups > 16384)
  for (int64_t g = 0; g < groups; ++g) sweeps += prox24_group<T>(w + 4 * g, lam, max_iters, tol);
  return sweeps;
}

int64_t prox24(float* w, int64_t groups, float lam, int max_iters, float tol) {
  if (detail::sparse24_use_avx512()) return detail::prox24_f32_avx512(w, groups, lam, max_iters, tol, 0);
  if (detail::sparse24_use_avx2()) return detail::prox24_f32_avx2(w, groups, lam, max_iters, tol, 0);
  return prox24_impl<float>(w, groups, lam, max_iters, tol);
}

int64_t prox24(double* w, int64_t groups, double lam, int max_iters, double tol) {
  return prox24_impl<double>(w, groups, lam, max_iters, tol);
}

}  // namespace pysparse::core
