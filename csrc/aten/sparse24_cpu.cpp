// CPU implementations of the pysparse ops: argument checks, then the torch-free core kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sstream>

#include "../core/sparse24.h"
#include "common.h"

namespace pysparse::aten {
namespace {

std::tuple<at::Tensor, at::Tensor> compress24_cpu(const at::Tensor& dense) {
  constexpr const char* op = "compress24";
  check_2d_weight(dense, op, "dense");
  const int es = elem_size_for(dense, op, "dense");
  at::Tensor d = dense.stride(1) == 1 ? dense : dense.contiguous();
  const int64_t N = d.size(0), K = d.size(1);
  at::Tensor values = at::empty({N, K / 2}, d.options());
  at::Tensor meta = at::empty({N, core::meta_cols(K)}, d.options().dtype(at::kByte));
  const auto st = core::compress24(d.data_ptr(), N, K, N > 1 ? d.stride(0) : K, es,
                                   values.data_ptr(), meta.data_ptr<uint8_t>());
  TORCH_CHECK(st.ok(), compress_error(st));
  return {values, meta};
}

at::Tensor decompress24_cpu(const at::Tensor& values, const at::Tensor& meta, int64_t K) {
  constexpr const char* op = "decompress24";
  check_packed(values, meta, K, op);
  const int es = elem_size_for(values, op, "values");
  at::Tensor v = values.contiguous();
  at::Tensor m = meta.contiguous();
  at::Tensor dense = at::empty({v.size(0), K}, v.options());
  core::decompress24(v.data_ptr(), m.data_ptr<uint8_t>(), v.size(0), K, es, dense.data_ptr());
  return dense;
}

at::Tensor prune24_cpu(const at::Tensor& w, const c10::optional<at::Tensor>& score) {
  constexpr const char* op = "prune24";
  check_2d_weight(w, op, "w");
  const int es = elem_size_for(w, op, "w");
  at::Tensor wc = w.contiguous();
  const at::Tensor s = prune_score(wc, score);
  at::Tensor out = at::empty_like(wc);
  core::prune24(wc.data_ptr(), s.data_ptr<float>(), wc.size(0), wc.size(1), es, out.data_ptr());
  return out;
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& meta, const c10::optional<at::Tensor>& bias) {
  const int64_t K = check_linear(x, values, meta, bias);
  const int64_t N = values.size(0);
  at::Tensor v = values.contiguous();
  at::Tensor m = meta.contiguous();
  at::Tensor x2 = as_rows(x, K);
  const int64_t M = x2.size(0);
  const int64_t ldx = M > 1 ? x2.stride(0) : K;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const int nt = at::get_num_threads();
  if (v.scalar_type() == at::kFloat) {
    core::sparse24_linear_f32(x2.data_ptr<float>(), M, ldx, v.data_ptr<float>(),
                              m.data_ptr<uint8_t>(), N, K, b.defined() ? b.data_ptr<float>() : nullptr,
                              y.data_ptr<float>(), N, nt);
  } else {
    auto p = [](const at::Tensor& t) {
      return t.defined() ? reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()) : nullptr;
    };
    core::sparse24_linear_bf16(p(x2), M, ldx, p(v), m.data_ptr<uint8_t>(), N, K, p(b),
                               reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N, nt);
  }
  return y.view(linear_out_shape(x, N));
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("compress24", &compress24_cpu);
  m.impl("decompress24", &decompress24_cpu);
  m.impl("prune24", &prune24_cpu);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
}

}  // namespace pysparse::aten
