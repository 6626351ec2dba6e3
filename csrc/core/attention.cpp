// Decode attention: dispatch, and the portable build (used when the CPU lacks AVX2/FMA, or with
// PYSPARSE_DISABLE_AVX2=1). The loop itself is attention_impl.inc.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "sparse24_internal.h"

namespace pysparse::core {
namespace detail {
void attention_avx2(const AttnProblem& p);
}  // namespace detail

namespace {

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }

template <typename E>
float dot_row(const float* q, const E* k, int64_t D) {
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s = std::fma(q[d], load1(k + d), s);
  return s;
}

template <typename E>
void axpy_row(float w, const E* v, float* acc, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] = std::fma(w, load1(v + d), acc[d]);
}

#include "attention_impl.inc"
}  // namespace

const char* attention_impl() { return detail::sparse24_use_avx2() ? "avx2" : "scalar"; }

void attention(const AttnProblem& p) {
  if (p.B * p.H * p.T == 0 || p.Dv == 0) return;
  if (detail::sparse24_use_avx2()) return detail::attention_avx2(p);
  if (p.bf16)
    attention_rows<uint16_t>(p);
  else
    attention_rows<float>(p);
}

}  // namespace pysparse::core
