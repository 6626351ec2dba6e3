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

// int4 weights (the quantize pass's bits=4; pysparse.kernels.formats.quantize_int4): values in
// [-8, 7] with one fp16 scale per `group` (32 or 64) consecutive stored values of a row, packed two
// to a byte per block of 32 values: byte i of a block holds value i + 8 in its low nibble and value
// i + 16 + 8 in its high one; a row of V stored values is ceil(V / 32) * 16 bytes (the last block
// padded with zeros, i.e. nibbles of 8). Each output is
//   y[m][n] = sum over blocks b of scale[n][group of b] * (sum over k in b of x[m][k] * q[n][k])
//             + bias[n]
// (blocks of 32 values; a group of 64 is two blocks under one scale). Dense: V = K, stored values
// are columns. 2:4: V = K / 2 stored (kept) values, the int8 2:4 layout's meta, so a block of 32
// kept values spans 64 columns of x. Batch-1 decode reads 9/16 (dense, g32) or 13/32 (2:4, g32)
// of a byte per weight.
void int4_linear(const float* x, int64_t M, const uint8_t* q, const uint16_t* scale, int group,
                 const float* bias, int64_t N, int64_t K, float* y, int nthreads);
void sparse24_int4_linear(const float* x, int64_t M, const uint8_t* values, const uint8_t* meta,
                          const uint16_t* scale, int group, const float* bias, int64_t N,
                          int64_t K, float* y, int nthreads);

// Bytes of one packed int4 row of V values, and scales per row for a group.
inline int64_t int4_row_bytes(int64_t V) { return (V + 31) / 32 * 16; }
inline int64_t int4_row_groups(int64_t V, int group) { return (V + group - 1) / group; }

// Rows [n0, n0 + rows) of a dense int4 weight dequantised into dst (fp32, row stride K): the
// prefill route's chunks (torch's GEMM takes them).
void int4_dequantize_rows(const uint8_t* q, const uint16_t* scale, int group, int64_t K,
                          int64_t n0, int64_t rows, float* dst);

// "avx512_vnni", "avx512", "avx2" or "scalar": the route these kernels take on this CPU
// (PYSPARSE_DISABLE_VNNI, PYSPARSE_DISABLE_AVX512 and PYSPARSE_DISABLE_AVX2 turn routes off).
// avx512_vnni computes with x quantised too (int8 per row and block of 32 columns, see
// qlinear_vnni.cpp): y[m][n] = scale[n] * sum over blocks b of sx[m][b] * (xq[m] . q[n]) over
// the block, + bias[n]; every other route is weight-only (x used as given).
const char* int8_linear_impl();
// The int4 linears' route: "avx512_vnni", "avx2" (weight-only, nibbles widened in registers) or
// "scalar". (An AVX-512 CPU without VNNI takes the AVX2 route: every AVX-512 CPU of the machines
// pysparse targets has VNNI.)
const char* int4_linear_impl();

}  // namespace pysparse::core
