// CUDA glue of the activation-sparse FFN ops: the same checks as on the CPU (ffn_common.h), then
// the kernels of csrc/cuda/sparse_ffn.cu at decode sizes (up to 8 rows of x, d_model % 4 == 0),
// torch's dense kernels (cuBLAS; 2:4 weights through sparse24_linear) otherwise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/sparse24_cuda.h"
#include "ffn_common.h"
#include "routes.h"

namespace pysparse::aten {
namespace {

namespace pc = pysparse::cuda;

// A weight the kernels read 4 elements at a time, copied when it starts misaligned (see
// aligned_or_copy). That copy costs a full weight read per call, so it is said once.
at::Tensor aligned_weight(const at::Tensor& w, std::size_t bytes) {
  at::Tensor out = aligned_or_copy(w, bytes);
  if (out.defined() && !out.is_same(w)) {
    TORCH_WARN_ONCE("sparse_ffn (CUDA): a weight does not start at a multiple of ", bytes,
                    " bytes (an offset view?), so it is copied on every call; pass weights that "
                    "own their storage (w.clone()) to avoid the copy");
  }
  return out;
}

at::Tensor ffn_cuda(const at::Tensor& x, const FfnWeights& w, double t, int64_t D, int64_t F) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x2 = as_rows(x, D);
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  // Past the kernels' sizes, torch's dense route (with a prediction, applied after the gate).
  if (M > pc::kFfnMaxRows || D % 4 != 0) {
    routes::record(routes::Family::Ffn, routes::Route::FfnDense);
    return ffn_dense_route(x2, w, t, D).view(x.sizes());
  }
  // The kernels load x as float4 and 4 weights at a time from the dense gate/up rows and the
  // dense or neuron-group down rows (csrc/cuda/sparse_ffn.cu): each must start 16-byte (fp32) /
  // 8-byte (bf16) aligned, which a contiguous view at an odd offset does not.
  at::Tensor xf = aligned_or_copy(x2.to(at::kFloat).contiguous(), 16);
  const std::size_t wb = core::vec4_bytes(static_cast<int>(w.gv.element_size()));
  const at::Tensor gv = w.gm.defined() ? w.gv : aligned_weight(w.gv, wb);
  const at::Tensor uv = w.um.defined() ? w.uv : aligned_weight(w.uv, wb);
  const at::Tensor dv = (w.dm.defined() && w.down_by_row) ? w.dv : aligned_weight(w.dv, wb);
  const int64_t chunks = pc::ffn_down_chunks(F);
  at::Tensor h = at::empty({M, F}, xf.options());
  at::Tensor partial = at::empty({chunks, M, D}, xf.options());
  at::Tensor y = at::empty({M, D}, x.options());
  pc::FfnLaunch a;
  a.dtype = gv.scalar_type() == at::kFloat ? pc::DType::F32 : pc::DType::BF16;
  a.M = M;
  a.D = D;
  a.F = F;
  a.x = xf.data_ptr<float>();
  a.gate_values = ptr(gv);
  a.gate_meta = mptr(w.gm);
  a.gate_bias = ptr(w.b1);
  a.up_values = ptr(uv);
  a.up_meta = mptr(w.um);
  a.down_values = ptr(dv);
  a.down_meta = mptr(w.dm);
  a.down_by_row = w.down_by_row;
  a.down_bias = ptr(w.b2);
  a.threshold = static_cast<float>(t);
  a.predicted = w.pred.defined() ? reinterpret_cast<const uint8_t*>(w.pred.data_ptr<bool>()) : nullptr;
  a.h = h.data_ptr<float>();
  a.partial = partial.data_ptr<float>();
  a.y = y.data_ptr();
  const int err = pc::sparse_ffn(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == 0, "sparse_ffn (CUDA): ", pc::cuda_error_string(err));
  routes::record(routes::Family::Ffn, routes::Route::FfnKernel);
  return y.view(x.sizes());
}

// Activation predictors' logits on torch's kernels (cuBLAS: two small GEMMs).
at::Tensor ffn_predict_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                            const c10::optional<at::Tensor>& c, int64_t max_rows) {
  const c10::cuda::CUDAGuard guard(x.device());
  const PredictorWeights w = prepare_ffn_predict(x, a, b, c);
  at::Tensor all = ffn_predict_capped(x, w, max_rows);
  return all.defined() ? all : ffn_predict_dense(x, w);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  register_ffn_ops<&ffn_cuda>(m);
  m.impl("ffn_predict", &ffn_predict_cuda);
}

}  // namespace pysparse::aten
