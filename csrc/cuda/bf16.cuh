// bf16 <-> fp32 on the device, shared by the CUDA kernels (same rounding as csrc/core/sparse24.h:
// to nearest, ties to even; NaN stays a quiet NaN).
#pragma once

#include <cstdint>

namespace pysparse::cuda {

__device__ inline float bf16_to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

__device__ inline uint16_t float_to_bf16(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

}  // namespace pysparse::cuda
