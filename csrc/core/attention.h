// Torch-free attention of a few query rows over a KV cache: the decode step's attention.
//
//   out[b, h, t, :] = sum_l p_l v[b, kh, l, :],  p = softmax_l(scale * q[b, h, t, :] . k[b, kh, l, :])
//
// over the keys l the mask allows (mask[b, h, t, l] true; no mask: all), with grouped KV heads
// kh = h / (H / Hkv). fp32 or bf16 inputs (same dtype), fp32 arithmetic, out rounded once. Each
// (b, h, t) is computed on its own, in the same order whatever the batch or the thread count. A row
// whose keys are all masked gives NaN, as torch's math attention does.
#pragma once

#include <cstdint>

namespace pysparse::core {

struct AttnProblem {
  bool bf16 = false;
  int64_t B = 0, H = 0, Hkv = 0, T = 0, L = 0, D = 0, Dv = 0;
  // Element strides of the leading dims; the last dim of q, k, v is contiguous.
  const void* q = nullptr;
  int64_t q_stride[3] = {0, 0, 0};  // b, h, t
  const void* k = nullptr;
  int64_t k_stride[3] = {0, 0, 0};  // b, kh, l
  const void* v = nullptr;
  int64_t v_stride[3] = {0, 0, 0};  // b, kh, l
  const bool* mask = nullptr;       // null: every key; else strides (0 where broadcast)
  int64_t mask_stride[4] = {0, 0, 0, 0};  // b, h, t, l
  float scale = 1.f;
  void* out = nullptr;  // [B, H, T, Dv] contiguous, q's dtype
  int nthreads = 0;
};

void attention(const AttnProblem& p);
const char* attention_impl();  // "avx2" or "scalar" (PYSPARSE_DISABLE_AVX2=1 steps down)

}  // namespace pysparse::core
