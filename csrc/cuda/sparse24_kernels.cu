// Hand-written CUDA kernels for the packed 2:4 layout: compress / decompress / prune (offline), and
// the GEMV used for decode (M <= 16), where cuSPARSELt (and PyTorch's 2:4 path, which pads M to
// 32) waste most of the work. Plain CUDA: no torch headers, so this file compiles in seconds.
#include <cuda_runtime.h>

#include <cstdint>

#include "bf16.cuh"
#include "sparse24_cuda.h"

namespace pysparse::cuda {
namespace {

__host__ __device__ inline int64_t meta_cols(int64_t K) { return (K / 4 + 1) / 2; }

template <typename Bits>
__device__ inline bool is_zero(Bits b) {
  constexpr Bits sign = Bits(1) << (sizeof(Bits) * 8 - 1);
  return (b & static_cast<Bits>(~sign)) == 0;
}

// Canonical index pair of a group (see csrc/core/sparse24.h): nonzero indices completed with the
// lowest free ones, ascending.
__device__ inline unsigned canonical_nibble(unsigned nz) {
  int p0 = -1, p1 = -1;
  for (int i = 0; i < 4; ++i)
    if (nz & (1u << i)) (p0 < 0 ? p0 : p1) = i;
  for (int i = 0; i < 4 && p1 < 0; ++i) {
    if (nz & (1u << i)) continue;
    if (p0 < 0) p0 = i;
    else if (i != p0) p1 = i;
  }
  const int lo = p0 < p1 ? p0 : p1, hi = p0 < p1 ? p1 : p0;
  return unsigned(lo | (hi << 2));
}

// One thread per meta byte (two groups), so every byte is written by exactly one thread.
template <typename Bits>
__global__ void compress_kernel(const Bits* dense, int64_t N, int64_t K, Bits* values,
                                uint8_t* meta, int64_t* bad_group) {
  const int64_t mcols = meta_cols(K);
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= N * mcols) return;
  const int64_t n = idx / mcols, j = idx % mcols;
  const int64_t groups = K / 4;
  uint8_t byte = 0;
  for (int h = 0; h < 2; ++h) {
    const int64_t g = 2 * j + h;
    if (g >= groups) break;
    const Bits* src = dense + n * K + 4 * g;
    unsigned nz = 0;
    for (int i = 0; i < 4; ++i)
      if (!is_zero(src[i])) nz |= 1u << i;
    if (__popc(nz) > 2) {
      atomicMin(reinterpret_cast<unsigned long long*>(bad_group),
                static_cast<unsigned long long>(n * groups + g));
      return;
    }
    const unsigned nib = canonical_nibble(nz);
    values[n * (K / 2) + 2 * g] = src[nib & 3u];
    values[n * (K / 2) + 2 * g + 1] = src[nib >> 2];
    byte |= uint8_t(nib << (4 * h));
  }
  meta[n * mcols + j] = byte;
}

// One thread per group.
template <typename Bits>
__global__ void decompress_kernel(const Bits* values, const uint8_t* meta, int64_t N, int64_t K,
                                  Bits* dense) {
  const int64_t groups = K / 4;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= N * groups) return;
  const int64_t n = idx / groups, g = idx % groups;
  const unsigned nib = (meta[n * meta_cols(K) + g / 2] >> ((g & 1) * 4)) & 0xFu;
  Bits* dst = dense + n * K + 4 * g;
  for (int i = 0; i < 4; ++i) dst[i] = Bits(0);
  dst[nib & 3u] = values[n * (K / 2) + 2 * g];
  dst[nib >> 2] = values[n * (K / 2) + 2 * g + 1];
}

template <typename Bits>
__global__ void prune_kernel(const Bits* w, const float* score, int64_t total_groups, Bits* out) {
  const int64_t gi = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (gi >= total_groups) return;
  float s[4];
  for (int i = 0; i < 4; ++i) {
    s[i] = score[4 * gi + i];
    if (isnan(s[i])) s[i] = -INFINITY;
  }
  for (int i = 0; i < 4; ++i) {
    int rank = 0;
    for (int j = 0; j < 4; ++j)
      if (j != i && (s[j] > s[i] || (s[j] == s[i] && j < i))) ++rank;
    out[4 * gi + i] = rank < 2 ? w[4 * gi + i] : Bits(0);
  }
}

template <typename T>
struct Io;
template <>
struct Io<float> {
  static __device__ float load(const float* p) { return __ldg(p); }
  static __device__ void store(float* p, float v) { *p = v; }
};
template <>
struct Io<uint16_t> {
  static __device__ float load(const uint16_t* p) { return bf16_to_float(__ldg(p)); }
  static __device__ void store(uint16_t* p, float v) { *p = float_to_bf16(v); }
};

// One warp per output feature n. Each lane walks meta bytes j = lane, lane+32, ...: 4 kept weights
// (16 B of fp32 or 8 B of bf16, consecutive lanes read consecutive bytes of the row: coalesced)
// against MT rows of x read through the read-only cache. A warp shuffle reduces at the end.
template <typename T, int MT>
__global__ void gemv_kernel(const T* __restrict__ x, int64_t M, const T* __restrict__ values,
                            const uint8_t* __restrict__ meta, int64_t N, int64_t K,
                            const T* __restrict__ bias, T* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t n = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= N) return;
  const int64_t groups = K / 4;
  const int64_t mcols = meta_cols(K);
  const T* vrow = values + n * (K / 2);
  const uint8_t* mrow = meta + n * mcols;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const int64_t full_bytes = groups / 2;
  for (int64_t j = lane; j < full_bytes; j += 32) {
    const unsigned b = __ldg(mrow + j);
    const int64_t k0 = 8 * j;
    const int64_t k[4] = {k0 + (b & 3u), k0 + ((b >> 2) & 3u), k0 + 4 + ((b >> 4) & 3u),
                          k0 + 4 + ((b >> 6) & 3u)};
    float w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = Io<T>::load(vrow + 4 * j + i);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const T* xr = x + m * K;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m] = fmaf(w[i], Io<T>::load(xr + k[i]), acc[m]);
      }
    }
  }
  if ((groups & 1) && lane == 0) {  // a last half-filled meta byte
    const int64_t g = groups - 1;
    const unsigned b = __ldg(mrow + g / 2) & 0xFu;
    const float w0 = Io<T>::load(vrow + 2 * g), w1 = Io<T>::load(vrow + 2 * g + 1);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const T* xr = x + m * K;
        acc[m] = fmaf(w0, Io<T>::load(xr + 4 * g + (b & 3u)), acc[m]);
        acc[m] = fmaf(w1, Io<T>::load(xr + 4 * g + (b >> 2)), acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    float v = acc[m];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    acc[m] = v;
  }
  if (lane == 0) {
    const float bv = bias ? Io<T>::load(bias + n) : 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) Io<T>::store(y + m * N + n, acc[m] + bv);
  }
}

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

template <typename T, int MT>
int launch_gemv(const void* x, int64_t M, const void* values, const uint8_t* meta, int64_t N,
                int64_t K, const void* bias, void* y, cudaStream_t s) {
  constexpr int kWarps = 8;
  gemv_kernel<T, MT><<<blocks_for(N, kWarps), kWarps * 32, 0, s>>>(
      static_cast<const T*>(x), M, static_cast<const T*>(values), meta, N, K,
      static_cast<const T*>(bias), static_cast<T*>(y));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int dispatch_gemv(const void* x, int64_t M, const void* values, const uint8_t* meta, int64_t N,
                  int64_t K, const void* bias, void* y, cudaStream_t s) {
  if (M <= 1) return launch_gemv<T, 1>(x, M, values, meta, N, K, bias, y, s);
  if (M <= 2) return launch_gemv<T, 2>(x, M, values, meta, N, K, bias, y, s);
  if (M <= 4) return launch_gemv<T, 4>(x, M, values, meta, N, K, bias, y, s);
  if (M <= 8) return launch_gemv<T, 8>(x, M, values, meta, N, K, bias, y, s);
  return launch_gemv<T, 16>(x, M, values, meta, N, K, bias, y, s);
}

}  // namespace

int compress24(const void* dense, int64_t N, int64_t K, int elem_size, void* values, uint8_t* meta,
               int64_t* bad_group, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t work = N * meta_cols(K);
  if (work == 0) return 0;
  const unsigned grid = blocks_for(work, 256);
  switch (elem_size) {
    case 2:
      compress_kernel<<<grid, 256, 0, s>>>(static_cast<const uint16_t*>(dense), N, K,
                                           static_cast<uint16_t*>(values), meta, bad_group);
      break;
    case 4:
      compress_kernel<<<grid, 256, 0, s>>>(static_cast<const uint32_t*>(dense), N, K,
                                           static_cast<uint32_t*>(values), meta, bad_group);
      break;
    default:
      compress_kernel<<<grid, 256, 0, s>>>(static_cast<const unsigned long long*>(dense), N, K,
                                           static_cast<unsigned long long*>(values), meta,
                                           bad_group);
  }
  return static_cast<int>(cudaGetLastError());
}

int decompress24(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                 void* dense, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t work = N * (K / 4);
  if (work == 0) return 0;
  const unsigned grid = blocks_for(work, 256);
  switch (elem_size) {
    case 2:
      decompress_kernel<<<grid, 256, 0, s>>>(static_cast<const uint16_t*>(values), meta, N, K,
                                             static_cast<uint16_t*>(dense));
      break;
    case 4:
      decompress_kernel<<<grid, 256, 0, s>>>(static_cast<const uint32_t*>(values), meta, N, K,
                                             static_cast<uint32_t*>(dense));
      break;
    default:
      decompress_kernel<<<grid, 256, 0, s>>>(static_cast<const unsigned long long*>(values), meta,
                                             N, K, static_cast<unsigned long long*>(dense));
  }
  return static_cast<int>(cudaGetLastError());
}

int prune24(const void* w, const float* score, int64_t N, int64_t K, int elem_size, void* out,
            void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t work = N * (K / 4);
  if (work == 0) return 0;
  const unsigned grid = blocks_for(work, 256);
  switch (elem_size) {
    case 2:
      prune_kernel<<<grid, 256, 0, s>>>(static_cast<const uint16_t*>(w), score, work,
                                        static_cast<uint16_t*>(out));
      break;
    case 4:
      prune_kernel<<<grid, 256, 0, s>>>(static_cast<const uint32_t*>(w), score, work,
                                        static_cast<uint32_t*>(out));
      break;
    default:
      prune_kernel<<<grid, 256, 0, s>>>(static_cast<const unsigned long long*>(w), score, work,
                                        static_cast<unsigned long long*>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

int sparse24_gemv(DType dtype, const void* x, int64_t M, const void* values, const uint8_t* meta,
                  int64_t N, int64_t K, const void* bias, void* y, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (M == 0 || N == 0) return 0;
  if (M > kGemvMaxRows) return static_cast<int>(cudaErrorInvalidValue);
  switch (dtype) {
    case DType::F32: return dispatch_gemv<float>(x, M, values, meta, N, K, bias, y, s);
    case DType::BF16: return dispatch_gemv<uint16_t>(x, M, values, meta, N, K, bias, y, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace pysparse::cuda
