// Declarations shared by the kernel translation units of the core (not part of the public header).
#pragma once

#include "sparse24.h"

namespace pysparse::core::detail {

// Implemented in sparse24_linear_avx2.cpp, which is the only file compiled with -mavx2 -mfma -mf16c.
// Callers must check the CPU first.
void sparse24_linear_f32_avx2(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads);
void sparse24_linear_bf16_avx2(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads);

// AVX-512 builds of the GEMV and GEMM (sparse24_linear_avx512.cpp, compiled with -mavx512f).
void sparse24_gemv_f32_avx512(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads);
void sparse24_gemv_bf16_avx512(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads);
void sparse24_gemm_f32_avx512(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads);
void sparse24_gemm_bf16_avx512(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads);

// Up to this many rows of x the AVX2 code runs the GEMV kernel (row of x at a time, x gathered in
// registers); above it the GEMM kernel that vectorises over rows of x. Measured with
// bench/linear24.py on the 2-core AVX2 dev machine, see the comment at its definition.
extern const int kGemvMaxRows;

}  // namespace pysparse::core::detail
