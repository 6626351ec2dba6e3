// CUDA activation-sparse FFN (the four ops of csrc/core/sparse_ffn.h), decode sizes (M <= 8).
//
// Three launches, no atomics, a fixed summation order (results do not depend on scheduling):
//   1. neuron kernel   one warp per neuron (with activation predictors, a neuron predicted for no
//                      row of x writes h = 0 and reads nothing): gate row . x (lanes read consecutive 16-byte pieces of
//                      the row, so a warp's loads coalesce), warp-shuffle sum, FATReLU; only if the
//                      neuron fires for some row of x, the same over the up row. Writes
//                      h[m][f] = a * u (plain FFN: h = a), 0 for silent neurons.
//   2. down kernel     grid = (column tiles of 4 x 256 outputs) x (chunks of 64 neurons). A block
//                      stages its chunk's h in shared memory, then every thread owns 4 output
//                      columns and walks the chunk's live neurons (2:4: live groups of 4), reading
//                      the transposed down rows coalesced (256 threads x 16 bytes), and writes its
//                      partial sums to partial[chunk][m][n]. Each partial has one writer: no race.
//   3. reduce kernel   y[m][n] = sum over chunks (ascending) of partial + bias, rounded once.
// x is fp32 (the glue widens bf16 x, a few KB); weights fp32 or bf16; math fp32.
#include <cuda_runtime.h>

#include <cstdint>

#include "../core/launch_rules.h"
#include "bf16.cuh"
#include "sparse24_cuda.h"

namespace pysparse::cuda {
namespace {

constexpr int kChunk = 64;         // neurons per down-kernel block (16 groups of 4)
constexpr int kDownThreads = 256;  // threads per down-kernel block, 4 output columns each

// Four consecutive weights as fp32 (16 bytes of fp32, 8 of bf16; the caller guarantees alignment).
__device__ inline void load4(const float* p, float (&w)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
}
__device__ inline void load4(const uint16_t* p, float (&w)[4]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  w[0] = bf16_to_float(uint16_t(v.x & 0xFFFFu)), w[1] = bf16_to_float(uint16_t(v.x >> 16));
  w[2] = bf16_to_float(uint16_t(v.y & 0xFFFFu)), w[3] = bf16_to_float(uint16_t(v.y >> 16));
}
__device__ inline float load1(const float* p) { return __ldg(p); }
__device__ inline float load1(const uint16_t* p) { return bf16_to_float(__ldg(p)); }
__device__ inline void store1(float* p, float v) { *p = v; }
__device__ inline void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }

__device__ inline float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// acc[m] (this lane's share) += row . x_m for a dense row of D (D % 4 == 0).
template <typename T, int MT>
__device__ inline void dense_row_dot(const T* row, const float* x, int M, int64_t D, int lane,
                                     float (&acc)[MT]) {
  for (int64_t c = lane; c < D / 4; c += 32) {
    float w[4];
    load4(row + 4 * c, w);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        const float4 xv = __ldg(reinterpret_cast<const float4*>(x + m * D) + c);
        acc[m] = fmaf(w[0], xv.x, fmaf(w[1], xv.y, fmaf(w[2], xv.z, fmaf(w[3], xv.w, acc[m]))));
      }
    }
  }
}

// The same for a 2:4 packed row (values D/2, meta ceil(D/8) bytes): lane walks meta bytes.
template <typename T, int MT>
__device__ inline void packed_row_dot(const T* vrow, const uint8_t* mrow, const float* x, int M,
                                      int64_t D, int lane, float (&acc)[MT]) {
  const int64_t groups = D / 4;
  for (int64_t j = lane; j < (groups + 1) / 2; j += 32) {
    const unsigned b = __ldg(mrow + j);
    const int nw = (2 * j + 1 < groups) ? 4 : 2;  // a last half-filled byte holds one group
    for (int i = 0; i < nw; ++i) {
      const unsigned nib = (b >> (4 * (i / 2))) & 0xFu;
      const int64_t k = 8 * j + 4 * (i / 2) + ((i & 1) ? (nib >> 2) : (nib & 3u));
      const float w = load1(vrow + 4 * j + i);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = fmaf(w, __ldg(x + m * D + k), acc[m]);
    }
  }
}

template <typename T, int MT>
__global__ void neuron_kernel(const float* __restrict__ x, int M, int64_t D, int64_t F,
                              const T* __restrict__ gv, const uint8_t* __restrict__ gm,
                              const T* __restrict__ gb, const T* __restrict__ uv,
                              const uint8_t* __restrict__ um, float threshold,
                              const uint8_t* __restrict__ predicted, float* __restrict__ h) {
  const int lane = threadIdx.x & 31;
  const int64_t f = blockIdx.x * int64_t(blockDim.x / 32) + (threadIdx.x >> 5);
  if (f >= F) return;
  bool pred[MT];
  bool any_pred = false;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    pred[m] = m < M && (!predicted || __ldg(predicted + m * F + f) != 0);
    any_pred |= pred[m];
  }
  if (!any_pred) {
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) h[m * F + f] = 0.f;
    }
    return;
  }
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  if (gm)
    packed_row_dot<T, MT>(gv + f * (D / 2), gm + f * ((D / 4 + 1) / 2), x, M, D, lane, acc);
  else
    dense_row_dot<T, MT>(gv + f * D, x, M, D, lane, acc);
  bool any = false;
  const float bias = gb ? load1(gb + f) : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float g = warp_sum(acc[m]) + bias;  // every lane holds the sum after the xor shuffle
    acc[m] = (pred[m] && g >= threshold) ? g : 0.f;
    any |= acc[m] != 0.f;
  }
  if (uv && any) {
    float u[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) u[m] = 0.f;
    if (um)
      packed_row_dot<T, MT>(uv + f * (D / 2), um + f * ((D / 4 + 1) / 2), x, M, D, lane, u);
    else
      dense_row_dot<T, MT>(uv + f * D, x, M, D, lane, u);
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] *= warp_sum(u[m]);
  } else if (uv) {
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) h[m * F + f] = acc[m];
  }
}

// kMode 0: dv is W_down^T [F, D]. 1 (groups): dv [F/4, 2, D], dm [F/4, ceil(D/2)]. 2 (rows):
// W_down^T packed 2:4 along D, dv [F, D/2], dm [F, ceil(D/8)]; a thread's 4 columns are one group.
template <typename T, int MT, int kMode>
__global__ void down_kernel(const float* __restrict__ h, int M, int64_t D, int64_t F,
                            const T* __restrict__ dv, const uint8_t* __restrict__ dm,
                            float* __restrict__ partial) {
  __shared__ float hs[MT][kChunk];
  __shared__ int live[kChunk];
  const int64_t f0 = int64_t(blockIdx.y) * kChunk;
  const int nf = static_cast<int>(F - f0 < kChunk ? F - f0 : kChunk);
  for (int i = threadIdx.x; i < kChunk; i += blockDim.x) {
    bool any = false;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float v = (m < M && i < nf) ? h[m * F + f0 + i] : 0.f;
      hs[m][i] = v;
      any |= v != 0.f;
    }
    live[i] = any;
  }
  __syncthreads();
  const int64_t n = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 4;  // first of 4 columns
  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] = 0.f;
  if (n < D) {
    if (kMode == 2) {
      const int64_t mcols = (D / 4 + 1) / 2;
      for (int i = 0; i < nf; ++i) {
        if (!live[i]) continue;
        const int64_t f = f0 + i;
        const float w0 = load1(dv + f * (D / 2) + n / 2), w1 = load1(dv + f * (D / 2) + n / 2 + 1);
        const unsigned nib = (__ldg(dm + f * mcols + n / 8) >> (4 * ((n / 4) & 1))) & 0xFu;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (j == int(nib & 3u)) acc[m][j] = fmaf(hs[m][i], w0, acc[m][j]);
            if (j == int(nib >> 2)) acc[m][j] = fmaf(hs[m][i], w1, acc[m][j]);
          }
      }
    } else if (kMode == 0) {
      for (int i = 0; i < nf; ++i) {
        if (!live[i]) continue;
        float w[4];
        load4(dv + (f0 + i) * D + n, w);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[m][j] = fmaf(hs[m][i], w[j], acc[m][j]);
      }
    } else {
      const int64_t mcols = (D + 1) / 2;
      for (int gi = 0; gi < nf / 4; ++gi) {
        if (!(live[4 * gi] | live[4 * gi + 1] | live[4 * gi + 2] | live[4 * gi + 3])) continue;
        const int64_t g = f0 / 4 + gi;
        float w0[4], w1[4];
        load4(dv + g * 2 * D + n, w0);
        load4(dv + g * 2 * D + D + n, w1);
        const unsigned lo = __ldg(dm + g * mcols + n / 2), hi = __ldg(dm + g * mcols + n / 2 + 1);
        const unsigned nib[4] = {lo & 0xFu, lo >> 4, hi & 0xFu, hi >> 4};
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            acc[m][j] = fmaf(w0[j], hs[m][4 * gi + (nib[j] & 3u)], acc[m][j]);
            acc[m][j] = fmaf(w1[j], hs[m][4 * gi + (nib[j] >> 2)], acc[m][j]);
          }
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float4* dst = reinterpret_cast<float4*>(partial + (int64_t(blockIdx.y) * M + m) * D + n);
        *dst = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
      }
    }
  }
}

template <typename T>
__global__ void reduce_kernel(const float* __restrict__ partial, int64_t chunks, int M, int64_t D,
                              const T* __restrict__ bias, T* __restrict__ y) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= M * D) return;
  const int64_t n = idx % D;
  float s = 0.f;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * M * D + idx];
  store1(y + idx, s + (bias ? load1(bias + n) : 0.f));
}

inline unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

template <typename T, int MT>
int launch(const FfnLaunch& a, cudaStream_t s) {
  constexpr int kWarps = 8;
  neuron_kernel<T, MT><<<blocks_for(a.F, kWarps), kWarps * 32, 0, s>>>(
      a.x, static_cast<int>(a.M), a.D, a.F, static_cast<const T*>(a.gate_values), a.gate_meta,
      static_cast<const T*>(a.gate_bias), static_cast<const T*>(a.up_values), a.up_meta,
      a.threshold, a.predicted, a.h);
  const dim3 grid(blocks_for(a.D, 4 * kDownThreads), static_cast<unsigned>(ffn_down_chunks(a.F)));
  if (a.down_meta && a.down_by_row)
    down_kernel<T, MT, 2><<<grid, kDownThreads, 0, s>>>(
        a.h, static_cast<int>(a.M), a.D, a.F, static_cast<const T*>(a.down_values), a.down_meta,
        a.partial);
  else if (a.down_meta)
    down_kernel<T, MT, 1><<<grid, kDownThreads, 0, s>>>(
        a.h, static_cast<int>(a.M), a.D, a.F, static_cast<const T*>(a.down_values), a.down_meta,
        a.partial);
  else
    down_kernel<T, MT, 0><<<grid, kDownThreads, 0, s>>>(
        a.h, static_cast<int>(a.M), a.D, a.F, static_cast<const T*>(a.down_values), nullptr,
        a.partial);
  reduce_kernel<T><<<blocks_for(a.M * a.D, 256), 256, 0, s>>>(
      a.partial, ffn_down_chunks(a.F), static_cast<int>(a.M), a.D,
      static_cast<const T*>(a.down_bias), static_cast<T*>(a.y));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int dispatch(const FfnLaunch& a, cudaStream_t s) {
  if (a.M <= 1) return launch<T, 1>(a, s);
  if (a.M <= 2) return launch<T, 2>(a, s);
  if (a.M <= 4) return launch<T, 4>(a, s);
  return launch<T, 8>(a, s);
}

}  // namespace

int64_t ffn_down_chunks(int64_t F) { return (F + kChunk - 1) / kChunk; }

bool ffn_vector_operands_aligned(const FfnLaunch& a) {
  const std::size_t w = core::vec4_bytes(a.dtype == DType::F32 ? 4 : 2);
  return core::is_aligned(a.x, 16) && core::is_aligned(a.partial, 16) &&
         (a.gate_meta || core::is_aligned(a.gate_values, w)) &&
         (!a.up_values || a.up_meta || core::is_aligned(a.up_values, w)) &&
         ((a.down_meta && a.down_by_row) || core::is_aligned(a.down_values, w));
}

int sparse_ffn(const FfnLaunch& a, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (a.M == 0 || a.D == 0) return 0;
  if (a.M > kFfnMaxRows || a.D % 4 != 0 || (a.down_meta && !a.down_by_row && a.F % 4 != 0))
    return static_cast<int>(cudaErrorInvalidValue);
  // A misaligned vector load faults and poisons the CUDA context: refuse instead (the glue copies
  // misaligned operands first, so this only guards other callers).
  if (!ffn_vector_operands_aligned(a)) return static_cast<int>(cudaErrorMisalignedAddress);
  switch (a.dtype) {
    case DType::F32: return dispatch<float>(a, s);
    case DType::BF16: return dispatch<uint16_t>(a, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace pysparse::cuda
