// pysparse::attention: scaled dot-product attention, on the core's decode kernel (attention.h) for
// a few query rows on the CPU, torch's scaled_dot_product_attention otherwise. Lower puts it in
// the generation step graph, where a decode step's query is one row: torch's CPU attention ran
// that through its flash kernel and BLAS GEMVs, 29 us (fp32) and 80 us (bf16) per call on
// SmolLM2's 9 heads over 129 positions (AMD EPYC, 2 threads): 0.9 and 2.4 ms of a decode step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../core/attention.h"
#include "common.h"

namespace pysparse::aten {
namespace {

// Query rows up to which the kernel runs (PYSPARSE_ATTENTION_MAX_QUERIES): the decode step's one,
// a few speculative ones; prefill's hundreds are torch's flash kernel's business.
constexpr int64_t kMaxQueries = 4;

at::Tensor torch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& mask, bool is_causal,
                           c10::optional<double> scale, bool enable_gqa) {
  // contiguous, as the fake says: torch's CPU flash kernel returns a [B, T, H, D]-major view, and
  // compiled code (AOTInductor) indexes the result by the strides the fake declared
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale, enable_gqa)
      .contiguous();
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     bool enable_gqa) {
  constexpr const char* op = "attention";
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k and v must be 4-D [batch, heads, seq, head_dim], got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
              ", ", v.scalar_type());
  TORCH_CHECK(q.size(-1) == k.size(-1), op, ": q's head_dim ", q.size(-1), " differs from k's ",
              k.size(-1));
  TORCH_CHECK(k.size(2) == v.size(2) && k.size(1) == v.size(1), op,
              ": k and v must have the same heads and length, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && (enable_gqa || q.size(1) == k.size(1)), op, ": q has ",
              q.size(1), " heads and k ", k.size(1),
              "; they must be equal, or a multiple with enable_gqa=True");
}

// The kernel's problem, or false where the kernel does not take these inputs.
bool kernel_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const c10::optional<at::Tensor>& mask, bool is_causal,
                    c10::optional<double> scale, at::Tensor& mask_view, core::AttnProblem& p) {
  const auto st = q.scalar_type();
  if (is_causal || (st != at::kFloat && st != at::kBFloat16)) return false;
  if (q.size(2) > env_int("PYSPARSE_ATTENTION_MAX_QUERIES", kMaxQueries)) return false;
  if (q.size(0) != k.size(0) || k.size(0) != v.size(0)) return false;  // batch broadcast: torch
  for (const at::Tensor* t : {&q, &k, &v})
    if (t->size(-1) > 1 && t->stride(-1) != 1) return false;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Hkv = k.size(1);
  p.T = q.size(2);
  p.L = k.size(2);
  p.D = q.size(3);
  p.Dv = v.size(3);
  if (mask.has_value() && mask->defined()) {
    if (mask->scalar_type() != at::kBool || mask->dim() > 4) return false;
    try {
      mask_view = mask->expand({p.B, p.H, p.T, p.L});
    } catch (const c10::Error&) {
      return false;  // not broadcastable: torch's own error
    }
    p.mask = mask_view.data_ptr<bool>();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = mask_view.stride(i);
  }
  p.bf16 = st == at::kBFloat16;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(p.D)));
  p.nthreads = at::get_num_threads();
  return true;
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, bool is_causal,
                         c10::optional<double> scale, bool enable_gqa) {
  check_attention(q, k, v, enable_gqa);
  at::Tensor mask_view;
  core::AttnProblem p;
  if (!kernel_problem(q, k, v, mask, is_causal, scale, mask_view, p))
    return torch_attention(q, k, v, mask, is_causal, scale, enable_gqa);
  at::Tensor out = at::empty({p.B, p.H, p.T, p.Dv}, q.options());
  p.out = out.data_ptr();
  core::attention(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("attention", &attention_cpu); }

// Other devices: torch's own attention.
TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& mask, bool is_causal,
                         c10::optional<double> scale, bool enable_gqa) {
    check_attention(q, k, v, enable_gqa);
    return torch_attention(q, k, v, mask, is_causal, scale, enable_gqa);
  });
}

}  // namespace pysparse::aten
