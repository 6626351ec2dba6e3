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

#include <vector>

#include "../core/qlinear.h"
#include "../core/sparse24.h"
#include "common.h"

namespace pysparse::aten {
namespace {

// The most rows of x the core's kernels take (the 2:4 GEMV's limit too); past it the kernels read
// the weight once per 4 rows of x, and the dequantised weight on torch's GEMM wins.
// PYSPARSE_INT8_GEMV_MAX_ROWS overrides.
constexpr int64_t kMaxRows = 16;

// bias: optional [N] in x's dtype `st`, on the weight's device.
void check_bias(const char* op, at::ScalarType st, const at::Tensor& w, int64_t N,
                const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got shape ",
              bias->sizes());
  TORCH_CHECK(bias->scalar_type() == st, op, ": bias is ", bias->scalar_type(), " but x is ", st,
              "; cast the bias");
  TORCH_CHECK(bias->device() == w.device(), op, ": bias is on ", bias->device(),
              " but the weight is on ", w.device());
}

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
  check_bias(op, st, w, N, bias);
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
  const int64_t max_rows =
      routes::batch_invariant() ? kMaxRows : env_int("PYSPARSE_INT8_GEMV_MAX_ROWS", kMaxRows);
  return M >= 1 && M <= max_rows ? M : 0;
}

// Batch-invariant mode (routes.h): the kernels take every row alike, kMaxRows rows at a time.
bool chunk_rows(const at::Tensor& x, int64_t K) {
  return routes::batch_invariant() && x.device().is_cpu() && K > 0 && x.numel() / K > kMaxRows;
}

// Runs fn(x fp32 [M, K], bias fp32 or null, y fp32 [M, N]) and returns y in x's dtype and shape.
template <typename Fn>
at::Tensor run_core(const at::Tensor& x, int64_t M, int64_t N, int64_t K,
                    const c10::optional<at::Tensor>& bias, Fn fn) {
  at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();
  // (an fp32 contiguous bias, the lowered graphs' case, is used as is: .to/.contiguous return it)
  at::Tensor b32 = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous()
                                                       : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  fn(x32.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr, y.data_ptr<float>());
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  return y.view(linear_out_shape(x, N));
}

// More rows than the kernels take (a prefill): torch's GEMM over the weight dequantised a
// cache-sized chunk of rows at a time (linear_by_dense_chunks), never the whole float weight at
// once (SmolLM2's lm_head would be a 113 MB fp32 copy per call). row(n, out) writes row n of W
// dequantised in fp32 into out [K]; bf16 x gets the chunks rounded to bf16.
template <typename Row>
at::Tensor quantized_by_dense_chunks(const at::Tensor& x, int64_t N, int64_t K,
                                     const c10::optional<at::Tensor>& bias, Row row) {
  const auto st = x.scalar_type();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = linear_by_dense_chunks(
      as_rows(x, K).contiguous(), N, K, st, b, [&](int64_t n0, int64_t nc, void* dst) {
        at::parallel_for(0, nc, 16, [&](int64_t r0, int64_t r1) {
          std::vector<float> tmp(st == at::kFloat ? 0 : static_cast<size_t>(K));
          for (int64_t r = r0; r < r1; ++r) {
            if (st == at::kFloat) {
              row(n0 + r, static_cast<float*>(dst) + r * K);
            } else {
              row(n0 + r, tmp.data());
              uint16_t* out = static_cast<uint16_t*>(dst) + r * K;
              for (int64_t k = 0; k < K; ++k) out[k] = core::float_to_bf16(tmp[k]);
            }
          }
        });
      });
  return y.view(linear_out_shape(x, N));
}

at::Tensor int8_by_dense_chunks(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& bias) {
  const int64_t N = q.size(0), K = q.size(1);
  if (x.scalar_type() == at::kHalf || K == 0)  // float16 x: one dequantised copy
    return at::linear(x, dequantize(q, scale, x.scalar_type()), bias_or_undefined(bias))
        .contiguous();
  at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  return quantized_by_dense_chunks(x, N, K, bias, [&](int64_t n, float* out) {
    const int8_t* r = qp + n * K;
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<float>(r[k]) * sp[n];
  });
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  check_int8(x, q, scale, bias);
  const int64_t N = q.size(0), K = q.size(1);
  if (chunk_rows(x, K))
    return by_row_chunks(x, K, kMaxRows,
                         [&](const at::Tensor& c) { return int8_linear_cpu(c, q, scale, bias); });
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
  if (chunk_rows(x, K))
    return by_row_chunks(x, K, kMaxRows, [&](const at::Tensor& c) {
      return sparse24_int8_linear_cpu(c, values, meta, scale, bias);
    });
  const int64_t M = kernel_rows(x, K);
  if (M == 0) return sparse24_dequantized(x, values, meta, scale, bias);
  at::Tensor vc = values.contiguous(), mc = meta.contiguous(), sc = scale.contiguous();
  return run_core(x, M, N, K, bias, [&](const float* xp, const float* bp, float* yp) {
    core::sparse24_int8_linear(xp, M, vc.data_ptr<int8_t>(), mc.data_ptr<uint8_t>(),
                               sc.data_ptr<float>(), bp, N, K, yp, at::get_num_threads());
  });
}

// ---- int4 (csrc/core/qlinear.h's packed layout) ----

// Checks an int4 weight of V stored values a row (dense: V = K; 2:4: V = K / 2) and returns N.
int64_t check_int4(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   int64_t group, int64_t V, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(group == 32 || group == 64, op, ": group must be 32 or 64, got ", group);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, op,
              ": the int4 weight must be uint8 [out_features, ceil(stored values / 32) * 16] "
              "(pysparse.kernels.formats.pack_int4), got ", q.scalar_type(), " ", q.sizes());
  const int64_t N = q.size(0);
  TORCH_CHECK(q.size(1) == core::int4_row_bytes(V), op, ": the int4 weight has ", q.size(1),
              " bytes a row but x.shape[-1] = ", x.size(-1), " needs ", core::int4_row_bytes(V),
              " (", V, " stored values); x does not match this weight");
  const int64_t G = core::int4_row_groups(V, static_cast<int>(group));
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G &&
                  scale.scalar_type() == at::kHalf,
              op, ": scale must be float16 [", N, ", ", G, "] (one per ", group,
              " stored values), got ", scale.scalar_type(), " ", scale.sizes(),
              "; pass the scales quantize_int4 made for this weight with its group");
  TORCH_CHECK(x.device() == q.device() && scale.device() == q.device(), op, ": x (", x.device(),
              "), the weight (", q.device(), ") and scale (", scale.device(),
              ") must be on one device; move them");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", st);
  check_bias(op, st, q, N, bias);
  return N;
}

int64_t int4_in_features(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  return x.size(-1);
}

// An int4 weight [N, V] dequantised in `st` by tensor ops (any device): the nibbles of each block
// of 16 bytes are values [0, 16) (low) and [16, 32) (high), minus 8, times their group's scale.
at::Tensor int4_dequantized(const at::Tensor& q, const at::Tensor& scale, int64_t group, int64_t V,
                            at::ScalarType st) {
  const int64_t N = q.size(0);
  at::Tensor b = q.reshape({N, -1, 16});
  at::Tensor vals = at::cat({at::bitwise_and(b, 15), at::bitwise_right_shift(b, 4)}, 2)
                        .reshape({N, -1})
                        .narrow(1, 0, V)
                        .to(at::kFloat)
                        .sub_(8);
  at::Tensor s = scale.to(at::kFloat).repeat_interleave(group, 1).narrow(1, 0, V);
  return vals.mul_(s).to(st);
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           int64_t group, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "int4_linear";
  const int64_t K = int4_in_features(op, x);
  const int64_t N = check_int4(op, x, q, scale, group, K, bias);
  if (chunk_rows(x, K))
    return by_row_chunks(x, K, kMaxRows, [&](const at::Tensor& c) {
      return int4_linear_cpu(c, q, scale, group, bias);
    });
  at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const int g = static_cast<int>(group);
  const int64_t M = kernel_rows(x, K);
  if (M == 0) {
    if (x.scalar_type() == at::kHalf || K == 0)
      return at::linear(x, int4_dequantized(q, scale, group, K, x.scalar_type()),
                        bias_or_undefined(bias))
          .contiguous();
    return quantized_by_dense_chunks(x, N, K, bias, [&](int64_t n, float* out) {
      core::int4_dequantize_rows(qp, sp, g, K, n, 1, out);
    });
  }
  return run_core(x, M, N, K, bias, [&](const float* xp, const float* bp, float* yp) {
    core::int4_linear(xp, M, qp, sp, g, bp, N, K, yp, at::get_num_threads());
  });
}

int64_t check_sparse24_int4(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const at::Tensor& scale, int64_t group,
                            const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_int4_linear";
  const int64_t K = int4_in_features(op, x);
  TORCH_CHECK(K % 4 == 0, op, ": in_features (x.shape[-1] = ", K, ") must be a multiple of 4");
  const int64_t N = check_int4(op, x, values, scale, group, K / 2, bias);
  TORCH_CHECK(meta.dim() == 2 && meta.scalar_type() == at::kByte && meta.size(0) == N &&
                  meta.size(1) == core::meta_cols(K),
              op, ": meta must be uint8 [", N, ", ", core::meta_cols(K),
              "] (compress24's metadata of the weight), got ", meta.scalar_type(), " ",
              meta.sizes());
  TORCH_CHECK(meta.device() == values.device(), op, ": meta is on ", meta.device(),
              " but the values are on ", values.device());
  return K;
}

at::Tensor sparse24_int4_linear_any(const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& meta, const at::Tensor& scale,
                                    int64_t group, const c10::optional<at::Tensor>& bias) {
  const int64_t K = check_sparse24_int4(x, values, meta, scale, group, bias);
  const int64_t N = values.size(0);
  if (chunk_rows(x, K))
    return by_row_chunks(x, K, kMaxRows, [&](const at::Tensor& c) {
      return sparse24_int4_linear_any(c, values, meta, scale, group, bias);
    });
  const int64_t M = x.device().is_cpu() ? kernel_rows(x, K) : 0;
  if (M == 0) {  // a prefill, or another device: the 2:4 linear over the dequantised values
    const auto st = x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
    c10::optional<at::Tensor> b;
    if (bias.has_value() && bias->defined()) b = bias->to(st);
    return sparse24_linear_call(x.to(st), int4_dequantized(values, scale, group, K / 2, st), meta,
                                b)
        .to(x.scalar_type());
  }
  at::Tensor vc = values.contiguous(), mc = meta.contiguous(), sc = scale.contiguous();
  return run_core(x, M, N, K, bias, [&](const float* xp, const float* bp, float* yp) {
    core::sparse24_int4_linear(xp, M, vc.data_ptr<uint8_t>(), mc.data_ptr<uint8_t>(),
                               reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
                               static_cast<int>(group), bp, N, K, yp, at::get_num_threads());
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("sparse24_int8_linear", &sparse24_int8_linear_cpu);
  m.impl("int4_linear", &int4_linear_cpu);
  m.impl("sparse24_int4_linear", &sparse24_int4_linear_any);
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
  m.impl("int4_linear", [](const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                           int64_t group, const c10::optional<at::Tensor>& bias) {
    const int64_t K = int4_in_features("int4_linear", x);
    check_int4("int4_linear", x, q, scale, group, K, bias);
    return at::linear(x, int4_dequantized(q, scale, group, K, x.scalar_type()),
                      bias_or_undefined(bias))
        .contiguous();
  });
  m.impl("sparse24_int4_linear", &sparse24_int4_linear_any);
}

}  // namespace pysparse::aten
