// pysparse::sparse_ffn24_int8: the gated activation-sparse FFN over 2:4 int8 weights (ProSparse
// and ProxSparse with the quantize pass: what a 2:4 + act-sparse + int8 decode step runs). The
// layouts are sparse_ffn24's with int8 values (gate/up packed along d_model, the down projection
// regrouped by groups of 4 neurons) and fp32 scales: per neuron for the gate and the up weights,
// per output column for the down projection (csrc/core/sparse_ffn.h, int8). Up to kMaxRows rows of
// x run the core's FFN kernels; more rows (a prefill) dequantise the weights into x's dtype once
// per call and take sparse_ffn24, whose large-batch routes are torch's GEMMs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "../core/sparse_ffn.h"
#include "common.h"
#include "ffn_common.h"

namespace pysparse::aten {
namespace {

constexpr const char* kOp = "sparse_ffn24_int8";
constexpr int64_t kMaxRows = 16;  // the FFN kernels' limit (sparse_ffn_cpu.cpp kSparseMaxRows)

struct QFfn {
  at::Tensor gv, gm, gs, uv, um, us, dv, dm, ds, pred;
  int64_t D, F;
};

void check_scale(const at::Tensor& s, const char* name, int64_t n, const at::Device& dev) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == n && s.scalar_type() == at::kFloat, kOp, ": ", name,
              " must be float32 [", n, "], got ", s.scalar_type(), " ", s.sizes(),
              "; pass the scales of the quantize pass");
  TORCH_CHECK(s.device() == dev, kOp, ": ", name, " is on ", s.device(),
              " but the weights are on ", dev);
}

QFfn prepare(const at::Tensor& x, const at::Tensor& gv, const at::Tensor& gm, const at::Tensor& gs,
             const at::Tensor& uv, const at::Tensor& um, const at::Tensor& us,
             const at::Tensor& dv, const at::Tensor& dm, const at::Tensor& ds, double t,
             const c10::optional<at::Tensor>& predicted) {
  TORCH_CHECK(gv.dim() == 2 && gv.scalar_type() == at::kChar, kOp,
              ": gate_values must be int8 [d_ff, d_model/2], got ", gv.scalar_type(), " ",
              gv.sizes(), "; compress the int8 weight (Quantize before Compress24)");
  const int64_t F = gv.size(0), D = gv.size(1) * 2;
  const auto dev = gv.device();
  check_ffn_packed(gv, gm, "gate_values", F, D, at::kChar, dev, kOp);
  check_ffn_packed(uv, um, "up_values", F, D, at::kChar, dev, kOp);
  const bool by_row = check_ffn_down24(dv, dm, F, D, at::kChar, dev, kOp);
  TORCH_CHECK(!by_row, kOp, ": the down projection must be in the neuron-group layout "
              "[d_ff/4, 2, d_model] (pack_down24); the by-row layout has no int8 form");
  check_scale(gs, "gate_scale", F, dev);
  check_scale(us, "up_scale", F, dev);
  check_scale(ds, "down_scale", D, dev);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, kOp, ": x must be float32 or bfloat16, got ",
              st);
  check_ffn_x(x, st, dev, D, kOp);
  check_threshold(t, kOp);
  return {gv.contiguous(), gm.contiguous(), gs.contiguous(), uv.contiguous(), um.contiguous(),
          us.contiguous(), dv.contiguous(), dm.contiguous(), ds.contiguous(),
          check_predicted(predicted, x, F, dev, kOp), D, F};
}

// The float FFN over the dequantised weights, in x's dtype (a prefill; other devices).
at::Tensor dequantised(const at::Tensor& x, const QFfn& w, double t) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pysparse::sparse_ffn24", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, const c10::optional<at::Tensor>&)>();
  const auto st = x.scalar_type();
  auto rows = [&](const at::Tensor& v, const at::Tensor& s) {
    return (v.to(at::kFloat) * s.unsqueeze(1)).to(st);
  };
  at::Tensor down = (w.dv.to(at::kFloat) * w.ds.view({1, 1, -1})).to(st);
  c10::optional<at::Tensor> pred;
  if (w.pred.defined()) pred = w.pred;
  return op.call(x, rows(w.gv, w.gs), w.gm, rows(w.uv, w.us), w.um, down, w.dm, t, pred);
}

at::Tensor sparse_ffn24_int8_cpu(const at::Tensor& x, const at::Tensor& gv, const at::Tensor& gm,
                                 const at::Tensor& gs, const at::Tensor& uv, const at::Tensor& um,
                                 const at::Tensor& us, const at::Tensor& dv, const at::Tensor& dm,
                                 const at::Tensor& ds, double t,
                                 const c10::optional<at::Tensor>& predicted) {
  const QFfn w = prepare(x, gv, gm, gs, uv, um, us, dv, dm, ds, t, predicted);
  at::Tensor x2 = as_rows(x, w.D);
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  if (M > kMaxRows && routes::batch_invariant()) {  // the kernels, kMaxRows rows at a time
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < M; i += kMaxRows) {
      const int64_t m = std::min(kMaxRows, M - i);
      c10::optional<at::Tensor> pred;
      if (w.pred.defined()) pred = w.pred.view({M, w.F}).narrow(0, i, m);
      parts.push_back(sparse_ffn24_int8_cpu(x2.narrow(0, i, m), gv, gm, gs, uv, um, us, dv, dm, ds,
                                            t, pred));
    }
    return at::cat(parts, 0).view(x.sizes());
  }
  if (M > kMaxRows) return dequantised(x, w, t);
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  core::FfnProblem p;
  p.dtype = x.scalar_type() == at::kFloat ? core::FfnDtype::f32 : core::FfnDtype::bf16;
  p.M = M;
  p.D = w.D;
  p.F = w.F;
  p.x = xf.data_ptr<float>();
  p.gate = {ptr(w.gv), mptr(w.gm)};
  p.up = {ptr(w.uv), mptr(w.um)};
  p.down = {ptr(w.dv), mptr(w.dm)};
  p.threshold = static_cast<float>(t);
  p.int8 = true;
  p.gate_scale = w.gs.data_ptr<float>();
  p.up_scale = w.us.data_ptr<float>();
  p.down_scale = w.ds.data_ptr<float>();
  p.nthreads = at::get_num_threads();
  if (w.pred.defined()) {  // applied after the exact gate
    p.predicted = reinterpret_cast<const uint8_t*>(w.pred.data_ptr<bool>());
    p.predicted_after_gate = true;
  }
  at::Tensor a = at::empty({M, w.F}, xf.options());
  at::Tensor active = at::empty({w.F}, xf.options().dtype(at::kInt));
  const int64_t n = core::ffn_gate(p, a.data_ptr<float>(), active.data_ptr<int32_t>());
  at::Tensor y = at::empty({M, w.D}, x.options());
  core::ffn_tail(p, a.data_ptr<float>(), active.data_ptr<int32_t>(), n, y.data_ptr(), w.D);
  return y.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("sparse_ffn24_int8", &sparse_ffn24_int8_cpu); }

// Other devices: the float op over the dequantised weights (CUDA kernels of its own are to come).
TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("sparse_ffn24_int8",
         [](const at::Tensor& x, const at::Tensor& gv, const at::Tensor& gm, const at::Tensor& gs,
            const at::Tensor& uv, const at::Tensor& um, const at::Tensor& us,
            const at::Tensor& dv, const at::Tensor& dm, const at::Tensor& ds, double t,
            const c10::optional<at::Tensor>& predicted) {
           return dequantised(x, prepare(x, gv, gm, gs, uv, um, us, dv, dm, ds, t, predicted), t);
         });
}

}  // namespace pysparse::aten
