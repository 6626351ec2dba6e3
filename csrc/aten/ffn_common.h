// Argument checks and the dense routes shared by the CPU and CUDA glue of the FFN ops
// (sparse_ffn, sparse_mlp, sparse_ffn24, sparse_mlp24; layouts in csrc/core/sparse_ffn.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace pysparse::aten {

// One FFN weight argument: dense [F, D], or 2:4 packed along D (values + meta).
struct FfnArg {
  const char* name;
  at::Tensor values;
  at::Tensor meta;  // undefined: dense
};

inline void check_ffn_x(const at::Tensor& x, at::ScalarType st, const at::Device& dev, int64_t D,
                        const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension [..., d_model], got a scalar");
  TORCH_CHECK(x.scalar_type() == st, op, ": x is ", x.scalar_type(), " but the weights are ", st,
              "; cast x with x.to(", st, ")");
  TORCH_CHECK(x.size(-1) == D, op, ": x.shape[-1] is ", x.size(-1),
              " but the weights have d_model=", D, " (x shape ", x.sizes(), ")");
  TORCH_CHECK(x.device() == dev, op, ": x is on ", x.device(), " but the weights are on ", dev,
              "; move one of them");
}

inline void check_threshold(double t, const char* op) {
  TORCH_CHECK(std::isfinite(t) && t >= 0, op,
              ": threshold must be finite and >= 0 (0 is ReLU, t > 0 FATReLU), got ", t);
}

inline at::ScalarType ffn_dtype(const at::Tensor& w, const char* op, const char* name) {
  const auto st = w.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", st, "; convert the weights (model.to(dtype))");
  return st;
}

// Dense [F, D] weight: returns nothing, checks shape/dtype/device against the first weight.
inline void check_ffn_dense(const at::Tensor& w, const char* name, int64_t F, int64_t D,
                            at::ScalarType st, const at::Device& dev, const char* op) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == F && w.size(1) == D, op, ": ", name, " must be [", F,
              ", ", D, "] (d_ff, d_model), got shape ", w.sizes(),
              (std::string(name).find("_t") != std::string::npos
                   ? "; pass the down weight transposed and contiguous: w_down.t().contiguous()"
                   : ""));
  TORCH_CHECK(w.scalar_type() == st, op, ": ", name, " is ", w.scalar_type(), " but the other weights are ",
              st, "; give every weight one dtype");
  TORCH_CHECK(w.device() == dev, op, ": ", name, " is on ", w.device(), " but the other weights are on ",
              dev);
}

// 2:4 packed [F, D] weight (values [F, D/2], meta [F, ceil(D/8)]).
inline void check_ffn_packed(const at::Tensor& v, const at::Tensor& m, const char* name, int64_t F,
                             int64_t D, at::ScalarType st, const at::Device& dev, const char* op) {
  check_packed(v, m, D, op);
  TORCH_CHECK(v.size(0) == F, op, ": ", name, " has ", v.size(0), " rows but d_ff is ", F);
  TORCH_CHECK(v.scalar_type() == st, op, ": ", name, " is ", v.scalar_type(),
              " but the other weights are ", st, "; give every weight one dtype");
  TORCH_CHECK(v.device() == dev, op, ": ", name, " is on ", v.device(),
              " but the other weights are on ", dev);
}

// The 2:4 down projection: regrouped by neuron group, values [F/4, 2, D] + meta uint8
// [F/4, ceil(D/2)] (pack_down24 of the usual mask along d_ff), or by neuron row, W_down^T [F, D]
// pruned along d_model and packed by compress24 (values [F, D/2], meta [F, ceil(D/8)]).
// Returns whether it is the by-row layout.
inline bool check_ffn_down24(const at::Tensor& v, const at::Tensor& m, int64_t F, int64_t D,
                             at::ScalarType st, const at::Device& dev, const char* op) {
  const char* fix =
      "; make it with pysparse.kernels.formats.pack_down24 from the compressed down weight (mask along "
      "d_ff), or compress24(W_down.T) for a mask along d_model";
  TORCH_CHECK(v.scalar_type() == st, op, ": down_values is ", v.scalar_type(),
              " but the other weights are ", st);
  TORCH_CHECK(v.device() == dev && m.device() == dev, op, ": down_values/down_meta are on ",
              v.device(), "/", m.device(), " but the other weights are on ", dev);
  TORCH_CHECK(m.scalar_type() == at::kByte, op, ": down_meta must be uint8, got ", m.scalar_type(), fix);
  if (v.dim() == 2) {
    check_packed(v, m, D, op);
    TORCH_CHECK(v.size(0) == F, op, ": down_values (by row) has ", v.size(0), " rows but d_ff is ", F, fix);
    return true;
  }
  TORCH_CHECK(F % 4 == 0, op, ": d_ff must be a multiple of 4 for a 2:4 down projection, got ", F);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == F / 4 && v.size(1) == 2 && v.size(2) == D, op,
              ": down_values must be [d_ff/4, 2, d_model] = [", F / 4, ", 2, ", D,
              "] (or [d_ff, d_model/2] by row), got shape ", v.sizes(), fix);
  TORCH_CHECK(m.dim() == 2 && m.size(0) == F / 4 && m.size(1) == (D + 1) / 2, op,
              ": down_meta must be [d_ff/4, ceil(d_model/2)] = [", F / 4, ", ", (D + 1) / 2,
              "], got shape ", m.sizes(), fix);
  return false;
}

inline void check_ffn_bias(const c10::optional<at::Tensor>& b, const char* name, int64_t n,
                           at::ScalarType st, const at::Device& dev, const char* op) {
  if (!(b.has_value() && b->defined())) return;
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, op, ": ", name, " must be [", n, "], got shape ",
              b->sizes());
  TORCH_CHECK(b->scalar_type() == st, op, ": ", name, " is ", b->scalar_type(),
              " but the weights are ", st, "; cast the bias");
  TORCH_CHECK(b->device() == dev, op, ": ", name, " is on ", b->device(), " but the weights are on ", dev);
}

// Activation predictors' output: bool [..., d_ff] with x's leading shape (true: the neuron is
// computed for that row), or none (exact). Returned contiguous.
inline at::Tensor check_predicted(const c10::optional<at::Tensor>& pred, const at::Tensor& x,
                                  int64_t F, const at::Device& dev, const char* op) {
  if (!(pred.has_value() && pred->defined())) return at::Tensor();
  const at::Tensor& p = *pred;
  TORCH_CHECK(p.scalar_type() == at::kBool, op, ": predicted must be a bool tensor (true = compute ",
              "the neuron for that row), got ", p.scalar_type(), "; pass e.g. logits > 0");
  TORCH_CHECK(p.dim() == x.dim() && p.size(-1) == F &&
                  p.sizes().slice(0, p.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              op, ": predicted must be x's leading shape + [d_ff] = ", x.sizes().slice(0, x.dim() - 1),
              " + [", F, "], got shape ", p.sizes());
  TORCH_CHECK(p.device() == dev, op, ": predicted is on ", p.device(), " but the weights are on ", dev);
  return p.contiguous();
}

inline const void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline const uint8_t* mptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<uint8_t>() : nullptr;
}

inline at::Tensor opt(const c10::optional<at::Tensor>& b) {
  return b.has_value() && b->defined() ? b->contiguous() : at::Tensor();
}

inline at::Tensor fatrelu_dense(const at::Tensor& g, double t) { return at::where(g >= t, g, 0); }

// Dense W_down^T [F, D] from the neuron-group layout (the large-batch route; torch ops, any device).
inline at::Tensor unpack_down24(const at::Tensor& v, const at::Tensor& m, int64_t D) {
  const int64_t G = v.size(0);
  at::Tensor lo = at::bitwise_and(m, 15), hi = at::bitwise_right_shift(m, 4);
  at::Tensor nib = at::stack({lo, hi}, 2).reshape({G, -1}).narrow(1, 0, D).to(at::kLong);
  at::Tensor dense = at::zeros({G, 4, D}, v.options());
  dense.scatter_(1, at::bitwise_and(nib, 3).unsqueeze(1), v.narrow(1, 0, 1));
  dense.scatter_(1, at::bitwise_right_shift(nib, 2).unsqueeze(1), v.narrow(1, 1, 1));
  return dense.view({G * 4, D});
}

// sparse24_linear through the dispatcher (whatever device the tensors are on).
inline at::Tensor call_sparse24_linear(const at::Tensor& x, const at::Tensor& v, const at::Tensor& m,
                                       const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pysparse::sparse24_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(x, v, m, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt);
}

inline at::Tensor call_decompress24(const at::Tensor& v, const at::Tensor& m, int64_t K) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pysparse::decompress24", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(v, m, K);
}

// The FFN ops' weights, normalised: gate (plain: w1) + bias, up (plain: undefined), down (dense
// W_down^T [F, D], or the neuron-group 2:4 layout when dm is defined) + bias.
struct FfnWeights {
  at::Tensor gv, gm, b1;
  at::Tensor uv, um;
  at::Tensor dv, dm, b2;
  bool down_by_row = false;
  at::Tensor pred;  // bool [..., F] (check_predicted) or undefined: exact
};

// The activations h [M, F] restricted to the predicted (row, neuron) pairs, in place.
inline void apply_predicted_(at::Tensor& h, const FfnWeights& w) {
  if (w.pred.defined()) h.mul_(w.pred.view({h.size(0), h.size(1)}));
}

// dense_linear through the dispatcher: on the CPU the core's GEMV for a few rows of x (torch's
// BLAS GEMM ran MiniLM's 14 x 384 x 1536 FFN gate at ~20 GFLOP/s on AMD EPYC), torch's linear
// elsewhere.
inline at::Tensor call_dense_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pysparse::dense_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const c10::optional<at::Tensor>&)>();
  return op.call(x, w, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt);
}

inline at::Tensor linear_any(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& m,
                             const at::Tensor& b) {
  if (m.defined()) return call_sparse24_linear(x2, v, m, b);
  return call_dense_linear(x2, v, b);
}

// Torch's dense kernels over the same weights (large batches; 2:4 gate/up on sparse24_linear and
// the down projection rebuilt dense).
inline at::Tensor ffn_dense_route(const at::Tensor& x2, const FfnWeights& w, double t, int64_t D) {
  at::Tensor h = fatrelu_dense(linear_any(x2, w.gv, w.gm, w.b1), t);
  apply_predicted_(h, w);
  if (w.uv.defined()) h = h * linear_any(x2, w.uv, w.um, at::Tensor());
  at::Tensor wd = !w.dm.defined() ? w.dv
                  : w.down_by_row ? call_decompress24(w.dv, w.dm, D)
                                  : unpack_down24(w.dv, w.dm, D);
  return w.b2.defined() ? at::addmm(w.b2, h, wd) : at::mm(h, wd);
}

struct FfnCall {
  FfnWeights w;
  int64_t D, F;
};

// Checks and normalisation of each op's arguments (shared by the CPU and CUDA glue).
inline FfnCall prepare_sparse_ffn(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                          const at::Tensor& w_down_t, double threshold,
                          const c10::optional<at::Tensor>& predicted) {
  constexpr const char* op = "sparse_ffn";
  const auto st = ffn_dtype(w_gate, op, "w_gate");
  TORCH_CHECK(w_gate.dim() == 2, op, ": w_gate must be 2-D [d_ff, d_model], got shape ", w_gate.sizes());
  const int64_t F = w_gate.size(0), D = w_gate.size(1);
  TORCH_CHECK(F > 0 && D > 0, op, ": the weights must be non-empty, got w_gate shape ", w_gate.sizes());
  check_ffn_dense(w_up, "w_up", F, D, st, w_gate.device(), op);
  check_ffn_dense(w_down_t, "w_down_t", F, D, st, w_gate.device(), op);
  check_ffn_x(x, st, w_gate.device(), D, op);
  check_threshold(threshold, op);
  FfnWeights w{w_gate.contiguous(), {}, {}, w_up.contiguous(), {}, w_down_t.contiguous(), {}, {}};
  w.pred = check_predicted(predicted, x, F, w_gate.device(), op);
  return {w, D, F};
}

inline FfnCall prepare_sparse_mlp(const at::Tensor& x, const at::Tensor& w1,
                          const c10::optional<at::Tensor>& b1, const at::Tensor& w2_t,
                          const c10::optional<at::Tensor>& b2, double threshold,
                          const c10::optional<at::Tensor>& predicted) {
  constexpr const char* op = "sparse_mlp";
  const auto st = ffn_dtype(w1, op, "w1");
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D [d_ff, d_model], got shape ", w1.sizes());
  const int64_t F = w1.size(0), D = w1.size(1);
  TORCH_CHECK(F > 0 && D > 0, op, ": the weights must be non-empty, got w1 shape ", w1.sizes());
  check_ffn_dense(w2_t, "w2_t", F, D, st, w1.device(), op);
  check_ffn_bias(b1, "b1", F, st, w1.device(), op);
  check_ffn_bias(b2, "b2", D, st, w1.device(), op);
  check_ffn_x(x, st, w1.device(), D, op);
  check_threshold(threshold, op);
  FfnWeights w{w1.contiguous(), {}, opt(b1), {}, {}, w2_t.contiguous(), {}, opt(b2)};
  w.pred = check_predicted(predicted, x, F, w1.device(), op);
  return {w, D, F};
}

inline FfnCall prepare_sparse_ffn24(const at::Tensor& x, const at::Tensor& gate_values,
                            const at::Tensor& gate_meta, const at::Tensor& up_values,
                            const at::Tensor& up_meta, const at::Tensor& down_values,
                            const at::Tensor& down_meta, double threshold,
                            const c10::optional<at::Tensor>& predicted) {
  constexpr const char* op = "sparse_ffn24";
  const auto st = ffn_dtype(gate_values, op, "gate_values");
  TORCH_CHECK(gate_values.dim() == 2, op, ": gate_values must be 2-D [d_ff, d_model/2], got shape ",
              gate_values.sizes());
  const int64_t F = gate_values.size(0), D = gate_values.size(1) * 2;
  const auto dev = gate_values.device();
  check_ffn_packed(gate_values, gate_meta, "gate_values", F, D, st, dev, op);
  check_ffn_packed(up_values, up_meta, "up_values", F, D, st, dev, op);
  const bool by_row = check_ffn_down24(down_values, down_meta, F, D, st, dev, op);
  check_ffn_x(x, st, dev, D, op);
  check_threshold(threshold, op);
  FfnWeights w{gate_values.contiguous(), gate_meta.contiguous(), {}, up_values.contiguous(),
            up_meta.contiguous(), down_values.contiguous(), down_meta.contiguous(), {}, by_row};
  w.pred = check_predicted(predicted, x, F, dev, op);
  return {w, D, F};
}

inline FfnCall prepare_sparse_mlp24(const at::Tensor& x, const at::Tensor& w1_values,
                            const at::Tensor& w1_meta, const c10::optional<at::Tensor>& b1,
                            const at::Tensor& w2_values, const at::Tensor& w2_meta,
                            const c10::optional<at::Tensor>& b2, double threshold,
                            const c10::optional<at::Tensor>& predicted) {
  constexpr const char* op = "sparse_mlp24";
  const auto st = ffn_dtype(w1_values, op, "w1_values");
  TORCH_CHECK(w1_values.dim() == 2, op, ": w1_values must be 2-D [d_ff, d_model/2], got shape ",
              w1_values.sizes());
  const int64_t F = w1_values.size(0), D = w1_values.size(1) * 2;
  const auto dev = w1_values.device();
  check_ffn_packed(w1_values, w1_meta, "w1_values", F, D, st, dev, op);
  const bool by_row = check_ffn_down24(w2_values, w2_meta, F, D, st, dev, op);
  check_ffn_bias(b1, "b1", F, st, dev, op);
  check_ffn_bias(b2, "b2", D, st, dev, op);
  check_ffn_x(x, st, dev, D, op);
  check_threshold(threshold, op);
  FfnWeights w{w1_values.contiguous(), w1_meta.contiguous(), opt(b1), {}, {},
            w2_values.contiguous(), w2_meta.contiguous(), opt(b2), by_row};
  w.pred = check_predicted(predicted, x, F, dev, op);
  return {w, D, F};
}

// The four op entry points for one device: check and normalise the arguments, then run that
// device's implementation on the normalised weights.
// ffn_predict's arguments (activation predictors' logits (x a^T) b^T + c > 0): x [..., D],
// a [r, D], b [F, r], c [F] or none, one dtype (fp32 or bf16) on one device; contiguous.
struct PredictorWeights {
  at::Tensor a, b, c;
  int64_t D, r, F;
};
inline PredictorWeights prepare_ffn_predict(const at::Tensor& x, const at::Tensor& a,
                                            const at::Tensor& b,
                                            const c10::optional<at::Tensor>& c) {
  constexpr const char* op = "ffn_predict";
  const auto st = ffn_dtype(a, op, "a");
  TORCH_CHECK(a.dim() == 2 && a.size(0) > 0 && a.size(1) > 0, op,
              ": a must be [rank, d_model] and non-empty, got shape ", a.sizes());
  const int64_t r = a.size(0), D = a.size(1);
  TORCH_CHECK(b.dim() == 2 && b.size(1) == r && b.size(0) > 0, op, ": b must be [d_ff, rank] = [d_ff, ",
              r, "] (the rank of a [", r, ", ", D, "]), got shape ", b.sizes());
  TORCH_CHECK(b.scalar_type() == st, op, ": b is ", b.scalar_type(), " but a is ", st,
              "; give the predictor's weights one dtype");
  TORCH_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  const int64_t F = b.size(0);
  check_ffn_bias(c, "c", F, st, a.device(), op);
  check_ffn_x(x, st, a.device(), D, op);
  return {a.contiguous(), b.contiguous(),
          c.has_value() && c->defined() ? c->contiguous() : at::Tensor(), D, r, F};
}

// ffn_predict's batch cap: with max_rows >= 0 and more rows of x than that, the op predicts
// every neuron (an all-true mask, the predictor not run), so the FFN runs exact. Past a few rows
// the union of the rows' predicted sets is nearly every neuron and the FFN kernels fall back to
// the exact route, where a predictor is pure cost; the cap keeps that cost off prefill and large
// batches. Returns the all-true mask, or an undefined tensor when the predictor runs.
inline at::Tensor ffn_predict_capped(const at::Tensor& x, const PredictorWeights& p,
                                     int64_t max_rows) {
  TORCH_CHECK(max_rows >= -1, "ffn_predict: max_rows must be -1 (no cap) or >= 0, got ", max_rows);
  // batch-invariant mode: the cap applies as it would to each row alone
  const int64_t rows = routes::batch_invariant() ? std::min<int64_t>(1, x.numel() / p.D) : x.numel() / p.D;
  if (max_rows < 0 || rows <= max_rows) return at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.F;
  return at::ones(shape, x.options().dtype(at::kBool));
}

// Torch's kernels for ffn_predict: bool [..., F].
inline at::Tensor ffn_predict_dense(const at::Tensor& x, const PredictorWeights& p) {
  at::Tensor low = at::linear(x, p.a);
  return at::linear(low, p.b, p.c.defined() ? c10::optional<at::Tensor>(p.c) : c10::nullopt).gt(0);
}

using FfnImpl = at::Tensor (*)(const at::Tensor& x, const FfnWeights& w, double threshold,
                               int64_t D, int64_t F);

template <FfnImpl Impl>
struct FfnEntryPoints {
  using Pred = c10::optional<at::Tensor>;
  static at::Tensor ffn(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                        const at::Tensor& w_down_t, double t, const Pred& pred) {
    const FfnCall c = prepare_sparse_ffn(x, w_gate, w_up, w_down_t, t, pred);
    return Impl(x, c.w, t, c.D, c.F);
  }
  static at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1,
                        const c10::optional<at::Tensor>& b1, const at::Tensor& w2_t,
                        const c10::optional<at::Tensor>& b2, double t, const Pred& pred) {
    const FfnCall c = prepare_sparse_mlp(x, w1, b1, w2_t, b2, t, pred);
    return Impl(x, c.w, t, c.D, c.F);
  }
  static at::Tensor ffn24(const at::Tensor& x, const at::Tensor& gv, const at::Tensor& gm,
                          const at::Tensor& uv, const at::Tensor& um, const at::Tensor& dv,
                          const at::Tensor& dm, double t, const Pred& pred) {
    const FfnCall c = prepare_sparse_ffn24(x, gv, gm, uv, um, dv, dm, t, pred);
    return Impl(x, c.w, t, c.D, c.F);
  }
  static at::Tensor mlp24(const at::Tensor& x, const at::Tensor& w1v, const at::Tensor& w1m,
                          const c10::optional<at::Tensor>& b1, const at::Tensor& w2v,
                          const at::Tensor& w2m, const c10::optional<at::Tensor>& b2, double t,
                          const Pred& pred) {
    const FfnCall c = prepare_sparse_mlp24(x, w1v, w1m, b1, w2v, w2m, b2, t, pred);
    return Impl(x, c.w, t, c.D, c.F);
  }
};

template <FfnImpl Impl>
void register_ffn_ops(torch::Library& m) {
  m.impl("sparse_ffn", &FfnEntryPoints<Impl>::ffn);
  m.impl("sparse_mlp", &FfnEntryPoints<Impl>::mlp);
  m.impl("sparse_ffn24", &FfnEntryPoints<Impl>::ffn24);
  m.impl("sparse_mlp24", &FfnEntryPoints<Impl>::mlp24);
}

}  // namespace pysparse::aten
