// Autograd for the linear ops (sparse24_linear, dense_linear), in C++. A Python autograd registration (torch.library's
// register_autograd) puts a Python call on every invocation of the op outside inference mode,
// no_grad included: ~9 us of a ~15 us call on a small weight. Here the Autograd kernel is a C++
// autograd::Function, so eager no_grad decode pays about what inference mode does.
//
// d/dx = grad @ W (W decompressed), d/dbias = sum of grad over rows; values/meta get no gradient
// (the packed weight is fixed; learning passes train dense weights before compression).
// dense_linear: d/dx = grad @ W, d/dW = grad^T x, d/dbias = sum of grad over rows (the weight of
// a lowered dense linear is the model's own parameter).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace pysparse::aten {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                       const c10::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pysparse::sparse24_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const c10::optional<at::Tensor>&)>();
  return op.call(x, values, meta, bias);
}

class Sparse24LinearFn : public torch::autograd::Function<Sparse24LinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& meta, const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({values, meta});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_linear(x, values, meta, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& values = saved[0];
    const at::Tensor& meta = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      static const auto decompress = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow("pysparse::decompress24", "")
                                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
      const at::Tensor w = decompress.call(values, meta, values.size(1) * 2);
      grad_x = at::matmul(grad, w);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3))
      grad_bias = grad.reshape({-1, grad.size(-1)}).sum(0);
    return {grad_x, at::Tensor(), at::Tensor(), grad_bias};
  }
};

at::Tensor sparse24_linear_autograd(const at::Tensor& x, const at::Tensor& values,
                                    const at::Tensor& meta, const c10::optional<at::Tensor>& bias) {
  return Sparse24LinearFn::apply(x, values, meta, bias);
}

class DenseLinearFn : public torch::autograd::Function<DenseLinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("pysparse::dense_linear", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                 const c10::optional<at::Tensor>&)>();
    return op.call(x, w, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_w, grad_bias;
    if (ctx->needs_input_grad(0)) grad_x = at::matmul(grad, w);
    const at::Tensor g2 = grad.reshape({-1, grad.size(-1)});
    if (ctx->needs_input_grad(1)) grad_w = g2.t().mm(x.reshape({-1, x.size(-1)}));
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = g2.sum(0);
    return {grad_x, grad_w, grad_bias};
  }
};

at::Tensor dense_linear_autograd(const at::Tensor& x, const at::Tensor& w,
                                 const c10::optional<at::Tensor>& bias) {
  return DenseLinearFn::apply(x, w, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, Autograd, m) {
  m.impl("sparse24_linear", &sparse24_linear_autograd);
  m.impl("dense_linear", &dense_linear_autograd);
}

}  // namespace pysparse::aten
