// Torch-free int8 weight-only linear layers: the weights are stored as int8 with one fp32 scale
// per output row (symmetric, round-to-nearest or GPTQ-style; pysparse.kernels.formats), the
// activations stay fp32, and each output is
//   y[m][n] = (sum over k of x[m][k] * q[n][k]) * scale[n] + bias[n]
// with the dot product accumulated in fp32 on the int8 values widened in registers (no copy of
// the weight in any wider type is ever made). Two weight layouts:
//   dense  q [N, K] int8, row-major;
//   2:4    values [N, K/2] int8 and meta uint8 [N, ceil(K/8)]: compress24's layout (sparse24.h)
//          over an int8 weight: the kept values of each group of 4, two 2-bit indices per group.
// Batch-1 decode reads a quarter of an fp32 weight's bytes (dense) or ~5/32 of them (2:4:
// 0.5 + 0.125 bytes per weight), which is what these kernels are for: the lm_head and every
// projection of a decode step.
//
// Each (row of W, row of x) is one fp32 FMA chain over the kernel's chunks in ascending k, then
// the remainder in ascending k, whatever the batch, blocking or thread count: a row of x gets
// the same bits alone or batched (what a server's continuous batching needs). The AVX2, AVX-512
// and scalar routes chunk differently, so they agree only to rounding.
#pragma once

#include <cstdint>

namespace pysparse::core {

// x [M, K] fp32 contiguous; y [M, N] fp32; scale [N] fp32; bias [N] fp32 or null.
void int8_linear(const float* x, int64_t M, const int8_t* q, const float* scale,
                 const float* bias, int64_t N, int64_t K, float* y, int nthreads);

// The same over a 2:4 int8 weight (K % 4 == 0).
void sparse24_int8_linear(const float* x, int64_t M, const int8_t* values, const uint8_t* meta,
                          const float* scale, const float* bias, int64_t N, int64_t K, float* y,
                          int nthreads);

// "avx512_vnni", "avx512", "avx2" or "scalar": the route these kernels take on this CPU
// (PYSPARSE_DISABLE_VNNI, PYSPARSE_DISABLE_AVX512 and PYSPARSE_DISABLE_AVX2 turn routes off).
// avx512_vnni computes with x quantised too (int8 per row and block of 32 columns, see
// qlinear_vnni.cpp): y[m][n] = scale[n] * sum over blocks b of sx[m][b] * (xq[m] . q[n]) over
// the block, + bias[n]; every other route is weight-only (x used as given).
const char* int8_linear_impl();

}  // namespace pysparse::core
