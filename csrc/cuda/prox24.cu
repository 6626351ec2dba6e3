// prox24 on the GPU: one thread per group of 4 (a group is 16 bytes in fp32, loaded as one
// float4), the same per-group code as the CPU (csrc/core/prox24_group.h), computed in fp32 for
// fp32/bf16/fp16 weights and in fp64 for fp64 ones. Groups converge in a few sweeps, so the
// kernel is bound by reading and writing the weight once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../core/prox24_group.h"
#include "sparse24_cuda.h"

namespace pysparse::cuda {
namespace {

template <typename S>
__device__ __forceinline__ float to_f(S v);
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <typename S>
__device__ __forceinline__ S from_f(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

__global__ void prox24_f32_kernel(float4* w, int64_t groups, float lam, int max_iters, float tol) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    float4 v = w[g];
    float t[4] = {v.x, v.y, v.z, v.w};
    core::prox24_group<float>(t, lam, max_iters, tol);
    w[g] = make_float4(t[0], t[1], t[2], t[3]);
  }
}

__global__ void prox24_f64_kernel(double* w, int64_t groups, double lam, int max_iters,
                                  double tol) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    double t[4] = {w[4 * g], w[4 * g + 1], w[4 * g + 2], w[4 * g + 3]};
    core::prox24_group<double>(t, lam, max_iters, tol);
    for (int i = 0; i < 4; ++i) w[4 * g + i] = t[i];
  }
}

template <typename S>
__global__ void prox24_half_kernel(S* w, int64_t groups, float lam, int max_iters, float tol) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    float t[4];
    for (int i = 0; i < 4; ++i) t[i] = to_f<S>(w[4 * g + i]);
    core::prox24_group<float>(t, lam, max_iters, tol);
    for (int i = 0; i < 4; ++i) w[4 * g + i] = from_f<S>(t[i]);
  }
}

unsigned grid_for(int64_t groups, int threads) {
  const int64_t blocks = (groups + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
}

}  // namespace

int prox24(DType dtype, void* w, int64_t groups, double lam, int max_iters, double tol,
           void* stream) {
  if (groups == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  constexpr int kThreads = 256;
  const unsigned grid = grid_for(groups, kThreads);
  switch (dtype) {
    case DType::F32:
      prox24_f32_kernel<<<grid, kThreads, 0, s>>>(static_cast<float4*>(w), groups, float(lam),
                                                  max_iters, float(tol));
      break;
    case DType::F64:
      prox24_f64_kernel<<<grid, kThreads, 0, s>>>(static_cast<double*>(w), groups, lam, max_iters,
                                                  tol);
      break;
    case DType::BF16:
      prox24_half_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
          static_cast<__nv_bfloat16*>(w), groups, float(lam), max_iters, float(tol));
      break;
    case DType::F16:
      prox24_half_kernel<__half><<<grid, kThreads, 0, s>>>(static_cast<__half*>(w), groups,
                                                          float(lam), max_iters, float(tol));
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace pysparse::cuda
