// pysparse::dense_linear on the CPU: y = x @ W^T + bias for a dense weight. A decode step reads
// every dense weight it has once per token with one row of x (the lm_head above all: 49152 x 576
// on SmolLM2, a third of a 2:4 + act-sparse token's bytes). torch sends that GEMV to its BLAS,
// which on AMD EPYC takes MKL's generic path on one thread (profiled: mkl_blas_def_xsgemv, the
// other OpenMP thread spinning). The core's dense GEMV (the FFN kernels' gate pass) streams W on
// every thread. From more rows of x than kMaxRows* (PYSPARSE_DENSE_GEMV_MAX_ROWS), and for
// dtypes the core has no kernel for, torch's GEMM runs instead: the same op either way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../core/sparse_ffn.h"
#include "common.h"

namespace pysparse::aten {
namespace {

// The most rows of x the GEMV takes: it reads each row of W once and dots it with every row of x
// in turn, so past a few rows torch's GEMM wins. bench/dense_gemv.py (AMD EPYC AVX-512, 2
// threads), ours vs torch: fp32 M=1 2.4-5.9x, M=8 1.5-2.3x, M=16 0.99-1.6x; bf16 (widened per
// row of x) M=1 1.8-3.8x, M=2 0.88-2.4x, M=4 0.62-1.8x, M=8 0.46-1.15x.
constexpr int64_t kMaxRowsF32 = 16;
constexpr int64_t kMaxRowsBf16 = 2;

void check_dense_linear(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "dense_linear";
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ",
              w.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == w.size(1), op, ": x.shape[-1] is ", x.size(-1),
              " but the weight has in_features=", w.size(1), " (x shape ", x.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), op, ": x is ", x.scalar_type(),
              " but the weight is ", w.scalar_type(), "; cast x with x.to(", w.scalar_type(), ")");
  TORCH_CHECK(x.device() == w.device(), op, ": x is on ", x.device(), " but the weight is on ",
              w.device(), "; move one of them");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op, ": bias must be [", w.size(0),
                "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == w.scalar_type(), op, ": bias is ", bias->scalar_type(),
                " but the weight is ", w.scalar_type(), "; cast the bias");
    TORCH_CHECK(bias->device() == w.device(), op, ": bias is on ", bias->device(),
                " but the weight is on ", w.device());
  }
}

at::Tensor torch_linear(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias) {
  // contiguous, as the fake says (compiled code indexes the result by the fake's strides)
  return at::linear(x, w, bias.has_value() && bias->defined() ? *bias : at::Tensor()).contiguous();
}

at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias) {
  check_dense_linear(x, w, bias);
  const auto st = w.scalar_type();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t M = K > 0 ? x.numel() / K : 0;
  // Batch-invariant mode: the GEMV (each row of x dotted with each row of W on its own) for
  // every dtype it takes, 16 rows at a time.
  const bool invariant = routes::batch_invariant();
  const int64_t max_rows =
      invariant ? kMaxRowsF32
                : env_int("PYSPARSE_DENSE_GEMV_MAX_ROWS", st == at::kFloat ? kMaxRowsF32 : kMaxRowsBf16);
  const bool core_dtype = (st == at::kFloat || st == at::kBFloat16) && w.is_contiguous() && K > 0;
  if (invariant && core_dtype && M > max_rows)
    return by_row_chunks(x, K, max_rows,
                         [&](const at::Tensor& rows) { return dense_linear_cpu(rows, w, bias); });
  const bool kernel = core_dtype && M >= 1 && M <= max_rows;
  if (!kernel) return torch_linear(x, w, bias);
  at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  core::dense_gemv(x32.data_ptr<float>(), M, w.data_ptr(),
                   st == at::kFloat ? core::FfnDtype::f32 : core::FfnDtype::bf16, N, K,
                   y.data_ptr<float>(), at::get_num_threads());
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  if (st != at::kFloat) y = y.to(st);
  return y.view(linear_out_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("dense_linear", &dense_linear_cpu); }

// Other devices: torch's own linear (the op exists so a lowered graph runs anywhere).
TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("dense_linear", [](const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias) {
    check_dense_linear(x, w, bias);
    return torch_linear(x, w, bias);
  });
}

}  // namespace pysparse::aten
