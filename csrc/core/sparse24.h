// Torch-free 2:4 sparse kernels: compression, pruning and the sparse linear layer.
//
// Packed layout (shared by every CPU kernel and by the hand-written CUDA kernels):
//   values [N, K/2]       the two kept weights of each group of 4 along K, in ascending index order
//   meta   [N, ceil(K/8)] uint8; per group one nibble = idx0 | idx1 << 2 (idx0 < idx1, each 0..3),
//                         two groups per byte, the even group in the low nibble. When K/4 is odd the
//                         last high nibble is 0.
// A group with fewer than two nonzeros stores explicit zeros; its indices are the nonzero ones
// completed with the lowest free indices, so the packed form of a tensor is unique.
//
// Everything here takes raw pointers and sizes so the googletests build without libtorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace pysparse::core {

// ---- bf16 <-> fp32 -------------------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest, ties to even (what torch does); NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline int64_t meta_cols(int64_t K) { return (K / 4 + 1) / 2; }

// ---- compression -----------------------------------------------------------------------------
// Outcome of compress24: ok, or the first group (row-major order) holding more than two nonzeros.
struct Compress24Status {
  int64_t row = -1;
  int64_t group = -1;
  int nonzeros = 0;
  bool ok() const { return row < 0; }
};

// dense: [N, K] with row stride ld (elements); elem_size 2, 4 or 8 bytes. A value counts as zero
// when all its bits but the sign are clear (+0 and -0), which is right for every IEEE type.
// On failure nothing past the offending row is written.
Compress24Status compress24(const void* dense, int64_t N, int64_t K, int64_t ld, int elem_size,
                            void* values, uint8_t* meta);

void decompress24(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                  void* dense);

// Keeps the two largest scores of each group of 4 (ties: lower index first; NaN scores rank
// lowest), copies those elements of w bitwise and zeroes the rest. w and out: [N, K] contiguous.
void prune24(const void* w, const float* score, int64_t N, int64_t K, int elem_size, void* out);

// ---- sparse linear: y[M, N] = x[M, K] @ W^T + bias ---------------------------------------------
// x rows have stride ldx, y rows stride ldy (elements). bias may be null. nthreads <= 0 means
// "OpenMP default". fp32: everything float. bf16: x, values, bias and y are bf16 bit patterns;
// products are accumulated in fp32 and y is rounded once.
void sparse24_linear_f32(const float* x, int64_t M, int64_t ldx, const float* values,
                         const uint8_t* meta, int64_t N, int64_t K, const float* bias, float* y,
                         int64_t ldy, int nthreads);
void sparse24_linear_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                          const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                          uint16_t* y, int64_t ldy, int nthreads);

// ---- CPU features and kernel selection --------------------------------------------------------
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512bf16 = false;  // vdpbf16ps
  bool avx512vbmi = false;  // vpmultishiftqb (with BW: vpermt2w)
  bool avx512vnni = false;  // vpdpbusd (the int8 linears' VNNI route)
};
CpuFeatures cpu_features();

// Which implementation the linear kernels use:
//   "avx512": AVX-512 GEMV and GEMM (CPU has AVX-512F as well as AVX2+FMA)
//   "avx2":   AVX2 GEMV and GEMM      (CPU has AVX2+FMA)
//   "scalar": portable fallback
// PYSPARSE_DISABLE_AVX512=1 / PYSPARSE_DISABLE_AVX2=1 step down a level; they are read on every
// call, so tests can exercise every path in one process.
const char* sparse24_linear_impl();

// Whether the bf16 GEMV (1-16 rows of x, no AMX) runs on AVX512-BF16 dot products
// (sparse24_gemv_bf16dot.cpp): CPU with AVX-512 BW, BF16 and VBMI; PYSPARSE_DISABLE_BF16_DOT=1
// (read per call) keeps the widening AVX-512 kernel.
bool sparse24_bf16_dot();

// bf16 from kAmxMinRows rows of x on a CPU with AMX-BF16 (Linux, which must grant the tile state;
// PYSPARSE_DISABLE_AMX=1 turns it off, read per call): W is decompressed tile by tile into L1 and
// multiplied on the tile unit. sparse24_bf16_amx() says whether that route is taken here.
// Measured (same-run A/B, LLaMA-7B 4096x11008 and 11008x4096, bf16, 2 threads): the FMA kernels win
// up to 6 rows (M=4: 1.4-1.6x torch dense vs 0.95-1.04x for the tiles), at 8 rows the tiles are
// ahead (0.94-0.99x vs 0.80-0.89x), at 16 rows twice as fast (1.0x vs 0.44-0.53x).
constexpr int64_t kAmxMinRows = 7;
bool sparse24_bf16_amx();

// Rows of x at or below which the GEMV (row-at-a-time) kernel is used instead of the GEMM kernel
// that vectorises over rows of x.
int sparse24_gemv_max_rows();

// The ProxSparse proximal operator (prox24_group.h) applied in place to `groups` consecutive
// groups of 4 (a contiguous weight whose rows have a multiple of 4 elements). Returns the total
// number of coordinate-descent sweeps used (the costlier candidate of each group), for reporting.
int64_t prox24(float* w, int64_t groups, float lam, int max_iters, float tol);
int64_t prox24(double* w, int64_t groups, double lam, int max_iters, double tol);

}  // namespace pysparse::core
