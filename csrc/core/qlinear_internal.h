// Declarations shared by the int8 linear translation units (not part of the public header).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernel_trace.h"
#include "sparse24.h"

namespace pysparse::core::detail {

// x as fp32 rows of K (the weight-only kernels' form of x; qlinear_driver.inc).
struct FloatRows {
  const float* p;
  int64_t K;
  FloatRows at(int64_t m) const { return {p + m * K, K}; }
};

// s plus the kept weights of groups [g0, K/4) of one 2:4 int8 row against x, in ascending k:
// the remainder after a kernel's full chunks (and, from g0 = 0, the whole scalar route).
inline float q_packed_tail(float s, const float* x, const int8_t* v, const uint8_t* meta,
                           int64_t g0, int64_t K) {
  for (int64_t g = g0; g < K / 4; ++g) {
    const unsigned nib = (meta[g / 2] >> ((g & 1) * 4)) & 0xFu;
    s = std::fma(static_cast<float>(v[2 * g]), x[4 * g + (nib & 3u)], s);
    s = std::fma(static_cast<float>(v[2 * g + 1]), x[4 * g + (nib >> 2)], s);
  }
  return s;
}

// ---- the VNNI route (qlinear_vnni.cpp): x quantised per row and per block of kQBlock columns ----
constexpr int64_t kQBlock = 32;

bool qlinear_vnni_built();
void int8_linear_vnni(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_vnni(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt);

// In qlinear_avx2.cpp / qlinear_avx512.cpp (compiled for those ISAs; called only where the CPU
// has them). nt: resolved thread count.
void int8_linear_avx2(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_avx2(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt);
void int8_linear_avx512(const float* x, int64_t M, const int8_t* q, const float* scale,
                        const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_avx512(const float* x, int64_t M, const int8_t* values,
                                 const uint8_t* meta, const float* scale, const float* bias,
                                 int64_t N, int64_t K, float* y, int nt);

}  // namespace pysparse::core::detail
