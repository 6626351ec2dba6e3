// CUDA glue of the activation-sparse FFN ops: the same checks as on the CPU (ffn_common.h), then
// the kernels of csrc/cuda/sparse_ffn.cu at decode sizes (up to 8 rows of x, d_model % 4 == 0),
// torch's dense kernels (cuBLAS; 2:4 weights through sparse24_linear) otherwise.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cuda/sparse24_cuda.h"
#include "ffn_common.h"

namespace pysparse::aten {
namespace {

namespace pc = pysparse::cuda;


at::Tensor ffn_cuda(const at::Tensor& x, const FfnWeights& w, double t, int64_t D, int64_t F) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x2 = as_rows(x, D);
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  if (M > pc::kFfnMaxRows || D % 4 != 0) return ffn_dense_route(x2, w, t, D).view(x.sizes());
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  const int64_t chunks = pc::ffn_down_chunks(F);
  at::Tensor h = at::empty({M, F}, xf.options());
  at::Tensor partial = at::empty({chunks, M, D}, xf.options());
  at::Tensor y = at::empty({M, D}, x.options());
  pc::FfnLaunch a;
  a.dtype = w.gv.scalar_type() == at::kFloat ? pc::DType::F32 : pc::DType::BF16;
  a.M = M;
  a.D = D;
  a.F = F;
  a.x = xf.data_ptr<float>();
  a.gate_values = ptr(w.gv);
  a.gate_meta = mptr(w.gm);
  a.gate_bias = ptr(w.b1);
  a.up_values = ptr(w.uv);
  a.up_meta = mptr(w.um);
  a.down_values = ptr(w.dv);
  a.down_meta = mptr(w.dm);
  a.down_by_row = w.down_by_row;
  a.down_bias = ptr(w.b2);
  a.threshold = static_cast<float>(t);
  a.h = h.data_ptr<float>();
  a.partial = partial.data_ptr<float>();
  a.y = y.data_ptr();
  const int err = pc::sparse_ffn(a, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == 0, "sparse_ffn (CUDA): ", pc::cuda_error_string(err));
  return y.view(x.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { register_ffn_ops<&ffn_cuda>(m); }

}  // namespace pysparse::aten
