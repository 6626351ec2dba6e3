// pysparse::int8_linear and pysparse::sparse24_int8_linear: weight-only int8 linears (the quantize
// pass's weights; csrc/core/qlinear.h). A decode step's few rows of x run the core's kernels,
// which widen the int8 weight in registers and read a quarter of the fp32 bytes (2:4: ~5/32).
// From more rows of x (a prefill) the weight is dequantised once per call into x's dtype and
// torch's GEMM (dense) or the 2:4 linear's own large-batch route takes it: reading it once per
// row of x is then the cost, not its bytes. Other devices take the dequantising route too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../core/qlinear.h"
#include "common.h"

namespace pysparse::aten {
namespace {

// The most rows of x the core's kernels take (the 2:4 GEMV's limit too); past it the kernels read
// the weight once per 4 rows of x, and the dequantised weight on torch's GEMM wins.
// PYSPARSE_INT8_GEMV_MAX_ROWS overrides.
constexpr int64_t kMaxRows = 16;

void check_common(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t N, int64_t K,
                  const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == K, op, ": x.shape[-1] is ", x.size(-1),
              " but the weight has in_features=", K, " (x shape ", x.sizes(), ")");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, op, ": scale must be [out_features] = [", N,
              "], got shape ", scale.sizes(), "; pass the scales quantize_int8 made for this weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(x.device() == w.device() && scale.device() == w.device(), op, ": x (", x.device(),
              "), the weight (", w.device(), ") and scale (", scale.device(),
              ") must be on one device; move them");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N,
                "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st, op, ": bias is ", bias->scalar_type(), " but x is ", st,
                "; cast the bias");
    TORCH_CHECK(bias->device() == w.device(), op, ": bias is on ", bias->device(),
                " but the weight is on ", w.device());
  }
}

void check_int8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_linear";
  TORCH_CHECK(q.dim() == 2, op, ": qweight must be 2-D [out_features, in_features], got shape ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kChar, op, ": qweight must be int8, got ", q.scalar_type(),
              "; quantize the weight with pysparse.kernels.formats.quantize_int8");
  check_common(op, x, q, q.size(0), q.size(1), scale, bias);
}

int64_t check_sparse24_int8(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_int8_linear";
  TORCH_CHECK(values.dim() == 2, op,
              ": values must be 2-D [out_features, in_features/2], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kChar, op, ": values must be int8, got ",
              values.scalar_type(), "; compress the int8 weight (Quantize before Compress24)");
  const int64_t K = values.size(1) * 2;
  check_packed(values, meta, K, op);
  check_common(op, x, values, values.size(0), K, scale, bias);
  return K;
}

at::Tensor bias_or_undefined(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? *bias : at::Tensor();
}

// The weight as x's dtype: q * scale per row (computed in fp32, rounded once).
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scale, at::ScalarType st) {
  return (q.to(at::kFloat) * scale.unsqueeze(1)).to(st);
}

// Rows of x the core takes, or 0 where the dequantising route runs.
int64_t kernel_rows(const at::Tensor& x, int64_t K) {
  const int64_t M = K > 0 ? x.numel() / K : 0;
  return M >= 1 && M <= env_int("PYSPARSE_INT8_GEMV_MAX_ROWS", kMaxRows) ? M : 0;
}

// Runs fn(x fp32 [M, K], bias fp32 or null, y fp32 [M, N]) and returns y in x's dtype and shape.
template <typename Fn>
at::Tensor run_core(const at::Tensor& x, int64_t M, int64_t N, int64_t K,
                    const c10::optional<at::Tensor>& bias, Fn fn) {
  at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();
  at::Tensor b32 = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous()
                                                       : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  fn(x32.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr, y.data_ptr<float>());
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.view(linear_out_shape(x, N));
}

// More rows than the kernels take (a prefill): torch's GEMM over the weight dequantised a
// cache-sized chunk of rows at a time (linear_by_dense_chunks), never the whole float weight at
// once (SmolLM2's lm_head would be a 113 MB fp32 copy per call). float16 x: one dequantised copy.
at::Tensor int8_by_dense_chunks(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& bias) {
  const int64_t N = q.size(0), K = q.size(1);
  const auto st = x.scalar_type();
  if (st == at::kHalf || K == 0)
    return at::linear(x, dequantize(q, scale, st), bias_or_undefined(bias)).contiguous();
  at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = linear_by_dense_chunks(
      as_rows(x, K).contiguous(), N, K, st, b, [&](int64_t n0, int64_t nc, void* dst) {
        at::parallel_for(0, nc, 16, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int8_t* row = qp + (n0 + r) * K;
            const float s = sp[n0 + r];
            if (st == at::kFloat) {
              float* out = static_cast<float*>(dst) + r * K;
              for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(row[k]) * s;
            } else {
              uint16_t* out = static_cast<uint16_t*>(dst) + r * K;
              for (int64_t k = 0; k < K; ++k) out[k] = core::float_to_bf16(static_cast<float>(row[k]) * s);
            }
          }
        });
      });
  return y.view(linear_out_shape(x, N));
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  check_int8(x, q, scale, bias);
  const int64_t N = q.size(0), K = q.size(1);
  const int64_t M = kernel_rows(x, K);
  if (M == 0) return int8_by_dense_chunks(x, q, scale, bias);
  at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  return run_core(x, M, N, K, bias, [&](const float* xp, const float* bp, float* yp) {
    core::int8_linear(xp, M, qc.data_ptr<int8_t>(), sc.data_ptr<float>(), bp, N, K, yp,
                      at::get_num_threads());
  });
}

at::Tensor sparse24_linear_call(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const c10::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pysparse::sparse24_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(x, values, meta, bias);
}

// The 2:4 linear over the dequantised values (it takes fp32 and bf16; float16 x runs in fp32).
at::Tensor sparse24_dequantized(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& bias) {
  const auto st = x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
  c10::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(st);
  return sparse24_linear_call(x.to(st), dequantize(values, scale, st), meta, b)
      .to(x.scalar_type());
}

at::Tensor sparse24_int8_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& meta, const at::Tensor& scale,
                                    const c10::optional<at::Tensor>& bias) {
  const int64_t K = check_sparse24_int8(x, values, meta, scale, bias);
  const int64_t N = values.size(0);
  const int64_t M = kernel_rows(x, K);
  if (M == 0) return sparse24_dequantized(x, values, meta, scale, bias);
  at::Tensor vc = values.contiguous(), mc = meta.contiguous(), sc = scale.contiguous();
  return run_core(x, M, N, K, bias, [&](const float* xp, const float* bp, float* yp) {
    core::sparse24_int8_linear(xp, M, vc.data_ptr<int8_t>(), mc.data_ptr<uint8_t>(),
                               sc.data_ptr<float>(), bp, N, K, yp, at::get_num_threads());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cpu);
}

// Other devices: the dequantising route (the op exists so a lowered graph runs anywhere; CUDA
// kernels of their own are still to come).
TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("int8_linear", [](const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
    check_int8(x, q, scale, bias);
    return at::linear(x, dequantize(q, scale, x.scalar_type()), bias_or_undefined(bias))
        .contiguous();
  });
  m.impl("sparse24_int8_linear",
         [](const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
            const at::Tensor& scale, const c10::optional<at::Tensor>& bias) {
           check_sparse24_int8(x, values, meta, scale, bias);
           return sparse24_dequantized(x, values, meta, scale, bias);
         });
}

}  // namespace pysparse::aten
