// Declarations shared by the kernel translation units of the core (not part of the public header).
#pragma once

#include <cstring>
#include <type_traits>

#include "kernel_trace.h"
#include "sparse24.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pysparse::core {
// Threads for a kernel call: nthreads > 0 as given, else OpenMP's default (1 without OpenMP).
inline int resolve_threads(int nthreads) {
#ifdef _OPENMP
  return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
  (void)nthreads;
  return 1;
#endif
}

// How far ahead of its loads a streaming GEMV row kernel (the 2:4 GEMV's one-row stream, the
// dense GEMV) asks for memory. 1-8 KB measured alike on SmolLM2's decode step (AMD EPYC); 2 KB
// stays well inside L1 for every row length.
constexpr int64_t kStreamAheadBytes = 2048;

// One group of 4 (kept values v0 at index nib & 3, v1 at nib >> 2, zeros elsewhere) assembled in a
// register and written with one store: no zero-fill pass, no read-modify-write. The portable
// decompressors of both 2:4 layouts use it.
template <typename Bits>
inline void write_group(Bits* dst, unsigned nib, Bits v0, Bits v1) {
  if constexpr (sizeof(Bits) <= 4) {
    using Group = std::conditional_t<sizeof(Bits) == 2, uint64_t, unsigned __int128>;
    constexpr int bits = 8 * sizeof(Bits);
    const Group out = (Group(v0) << (bits * (nib & 3u))) | (Group(v1) << (bits * (nib >> 2)));
    std::memcpy(dst, &out, sizeof(out));
  } else {
    dst[0] = dst[1] = dst[2] = dst[3] = Bits(0);
    dst[nib & 3u] = v0;
    dst[nib >> 2] = v1;
  }
}
}  // namespace pysparse::core

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

// The AVX-512 GEMV with contiguous fp32 x and fp32 output for either weight dtype (the FFN
// kernels' 2:4 gate, which thresholds the unrounded value).
void sparse24_gemv_f32out_avx512(const float* x, int64_t M, const float* values, const uint8_t* meta,
                                 int64_t N, int64_t K, const float* bias, float* y, int64_t ldy,
                                 int nthreads);
void sparse24_gemv_f32out_avx512(const float* x, int64_t M, const uint16_t* values,
                                 const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                                 float* y, int64_t ldy, int nthreads);
// The bf16 GEMV on AVX512-BF16 dot products with bf16 x (sparse24_gemv_bf16dot.cpp, compiled with
// -mavx512bf16 -mavx512vbmi; only where sparse24_use_bf16_dot() says so). The f32out form writes
// unrounded fp32 (the FFN's 2:4 gate).
bool bf16_dot_built();  // false where the compiler could not build the kernel
void sparse24_gemv_bf16dot(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                           const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                           uint16_t* y, int64_t ldy, int nthreads);
void sparse24_gemv_bf16dot_f32out(const uint16_t* x, int64_t M, int64_t ldx,
                                  const uint16_t* values, const uint8_t* meta, int64_t N,
                                  int64_t K, const uint16_t* bias, float* y, int64_t ldy,
                                  int nthreads);
// AMX-BF16 build of the bf16 linear layer (sparse24_amx.cpp, compiled with -mamx-*): W is
// decompressed tile by tile into L1 and multiplied on the tile unit. amx_bf16_ready() checks the CPU
// and asks the kernel for the tile state once per process; nothing else may be called before it
// said yes. The f32out form writes unrounded fp32 (the FFN's 2:4 gate thresholds it).
bool amx_bf16_ready();
void sparse24_linear_bf16_amx(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                              const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                              uint16_t* y, int64_t ldy, int nthreads);
void sparse24_linear_bf16_amx_f32out(const uint16_t* x, int64_t M, int64_t ldx,
                                     const uint16_t* values, const uint8_t* meta, int64_t N,
                                     int64_t K, const uint16_t* bias, float* y, int64_t ldy,
                                     int nthreads);
// The FFN down projection with W_down in the neuron-group layout (sparse_ffn.h), h fp32 (rounded
// to bf16 for the tiles), y bf16; 32-neuron blocks silent for a whole 16-row slice are skipped.
void ffn_down24_groups_amx(const float* h, int64_t M, int64_t ldh, const uint16_t* values,
                           const uint8_t* meta, int64_t F, int64_t D, const uint16_t* bias,
                           uint16_t* y, int64_t ldy, int nthreads);

// The lane-parallel fp32 prox24 (prox24_simd.inc): 16 / 8 groups per vector.
int64_t prox24_f32_avx512(float* w, int64_t groups, float lam, int max_iters, float tol, int nthreads);
int64_t prox24_f32_avx2(float* w, int64_t groups, float lam, int max_iters, float tol, int nthreads);

// Whether the linear layer's AVX-512 kernels are in use (CPU support, PYSPARSE_DISABLE_AVX512).
bool sparse24_use_avx512();
// Whether the AVX2 kernels are in use (CPU support, PYSPARSE_DISABLE_AVX2); the FFN kernels follow it.
bool sparse24_use_avx2();
// Whether the bf16 AMX route is in use (CPU, OS permission, PYSPARSE_DISABLE_AMX).
bool sparse24_use_amx();
// Whether the bf16 GEMV takes the AVX512-BF16 dot kernel (CPU has AVX512-BF16 and VBMI,
// PYSPARSE_DISABLE_BF16_DOT unset, AVX-512 in use).
bool sparse24_use_bf16_dot();

// 16-bit (AVX-512BW) and 32-bit (AVX-512F) decompression: same bytes as the portable code.
void decompress16_avx512(const uint16_t* values, const uint8_t* meta, int64_t N, int64_t K,
                         uint16_t* dense);
void decompress32_avx512(const uint32_t* values, const uint8_t* meta, int64_t N, int64_t K,
                         uint32_t* dense);

// Up to this many rows of x the GEMV kernel (x gathered in registers, W streamed once per pass) is
// used instead of the GEMM kernel that vectorises over rows of x; per ISA level, measured (see the
// definitions in sparse24_linear_avx2.cpp).
extern const int kGemvMaxRowsAvx2;
extern const int kGemvMaxRowsAvx512;

}  // namespace pysparse::core::detail
