// The AVX2 build of the lane-parallel prox24 (prox24_simd.inc): 8 groups per vector. Compiled
// with -ffp-contract=off (see the .inc); prox24.cpp checks the CPU before calling in.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#include "prox24_group.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {
#include "prox24_simd.inc"
}  // namespace

int64_t prox24_f32_avx2(float* w, int64_t groups, float lam, int max_iters, float tol, int nthreads) {
  return prox24_lanes<8, 2>(w, groups, lam, max_iters, tol, resolve_threads(nthreads));
}

}  // namespace pysparse::core::detail
