// AVX2/FMA build of the decode attention loop (attention_impl.inc); attention.cpp calls it only on
// CPUs with AVX2 and FMA.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

template <typename E>
float dot_row(const float* q, const E* k, int64_t D) {
  const int64_t body = D / 16 * 16;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (int64_t d = 0; d < body; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k + d + 8), a1);
  }
  int64_t d = body;
  if (d + 8 <= D) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
    d += 8;
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; d < D; ++d) s = std::fma(q[d], load1(k + d), s);
  return s;
}

template <typename E>
void axpy_row(float w, const E* v, float* acc, int64_t D) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(wv, load8(v + d), _mm256_loadu_ps(acc + d)));
  for (; d < D; ++d) acc[d] = std::fma(w, load1(v + d), acc[d]);
}

#include "attention_impl.inc"
}  // namespace

void attention_avx2(const AttnProblem& p) {
  if (p.bf16)
    attention_rows<uint16_t>(p);
  else
    attention_rows<float>(p);
}

}  // namespace pysparse::core::detail
