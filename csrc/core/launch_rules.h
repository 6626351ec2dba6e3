// Host-side rules the CUDA glue applies before a launch, kept free of torch and CUDA so that a
// CPU-only build compiles them too and the CPU tests check them (through pysparse._C).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pysparse::core {

// Bytes one vectorised load of 4 consecutive elements reads (float4 for fp32, uint2 for bf16):
// the address must be a multiple of this or the load faults (and takes the CUDA context with it).
constexpr std::size_t vec4_bytes(int elem_size) { return 4 * static_cast<std::size_t>(elem_size); }

inline bool is_aligned(std::uintptr_t address, std::size_t bytes) {
  return bytes == 0 || address % bytes == 0;
}
inline bool is_aligned(const void* p, std::size_t bytes) {
  return is_aligned(reinterpret_cast<std::uintptr_t>(p), bytes);
}

// The number of rows cuSPARSELt is asked for when x has M rows (M > 0). cuSPARSELt plans are built
// (and their algorithm searched) per problem size, so every distinct prefill length would cost a
// plan and a search; rows are bucketed instead and x is padded to the bucket: powers of two up to
// 256 (at those sizes the weight read dominates, so the padded rows cost little), then multiples
// of 256 (at most 255 padded rows: <= 50% at 512, <= 6% at 4096). Always a multiple of 8, which
// cuSPARSELt requires of the dense operand.
constexpr std::int64_t cusparselt_rows(std::int64_t M) {
  if (M <= 8) return 8;
  if (M <= 256) {
    std::int64_t b = 16;
    while (b < M) b *= 2;
    return b;
  }
  return (M + 255) / 256 * 256;
}

}  // namespace pysparse::core
