// C entry points for the ops a compiled graph runs, in the calling convention AOTInductor's
// generated C++ uses for operators with a C shim (AtenTensorHandle per tensor, a pointer for an
// optional one, int32 for bool, double for float, a pointer to double for float?, int64 for int,
// the result through an AtenTensorHandle*), named as it names them: aoti_torch_cpu_<op>.
//
// Without them AOTInductor calls a custom op through its proxy executor: arguments boxed into
// IValues, the schema walked, the op looked up and called boxed, every call. On SmolLM2's decode
// step (121 op calls a token) that cost ~3.5-4 us a call: a tiny 2:4 linear plus a multiply took
// 5.9 us through the proxy where torch.mm plus the multiply, which has a shim, took 1.9 us
// (AOTInductor, 100 calls in one graph, AMD EPYC, 2 threads). Here each call is one unboxed call
// through the dispatcher (so devices, the profiler and the ops' own checks behave as anywhere).
//
// The native route (pysparse/runtime/native.py) asks aoti_shim_table() which shims exist, tells
// AOTInductor their declarations, and makes this library's symbols visible to the generated code
// (the extension is loaded RTLD_LOCAL; it is promoted to global scope first). A shim whose name
// resolves to another library's symbol is left out (the proxy then calls that op).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "aoti_shims.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;

const Tensor& T(AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); }
OptTensor opt(const AtenTensorHandle* h) {
  return h ? OptTensor(*tensor_handle_to_tensor_pointer(*h)) : std::nullopt;
}
std::optional<double> opt(const double* v) { return v ? std::optional<double>(*v) : std::nullopt; }

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

#define PYSPARSE_SHIM extern "C" __attribute__((visibility("default"))) AOTITorchError

PYSPARSE_SHIM aoti_torch_cpu_sparse24_linear(AtenTensorHandle x, AtenTensorHandle values,
                                             AtenTensorHandle meta, AtenTensorHandle* bias,
                                             AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                         const OptTensor&)>("pysparse::sparse24_linear");
    *ret0 = new_tensor_handle(op.call(T(x), T(values), T(meta), opt(bias)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_dense_linear(AtenTensorHandle x, AtenTensorHandle weight,
                                          AtenTensorHandle* bias, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, const OptTensor&)>("pysparse::dense_linear");
    *ret0 = new_tensor_handle(op.call(T(x), T(weight), opt(bias)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_attention(AtenTensorHandle q, AtenTensorHandle k, AtenTensorHandle v,
                                       AtenTensorHandle* attn_mask, int32_t is_causal,
                                       double* scale, int32_t enable_gqa,
                                       AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool,
                      std::optional<double>, bool)>("pysparse::attention");
    *ret0 = new_tensor_handle(op.call(T(q), T(k), T(v), opt(attn_mask), is_causal != 0,
                                      opt(scale), enable_gqa != 0));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_sparse_ffn(AtenTensorHandle x, AtenTensorHandle w_gate,
                                        AtenTensorHandle w_up, AtenTensorHandle w_down_t,
                                        double threshold, AtenTensorHandle* predicted,
                                        AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, double, const OptTensor&)>(
        "pysparse::sparse_ffn");
    *ret0 = new_tensor_handle(
        op.call(T(x), T(w_gate), T(w_up), T(w_down_t), threshold, opt(predicted)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_sparse_mlp(AtenTensorHandle x, AtenTensorHandle w1,
                                        AtenTensorHandle* b1, AtenTensorHandle w2_t,
                                        AtenTensorHandle* b2, double threshold,
                                        AtenTensorHandle* predicted, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const OptTensor&,
                                         const Tensor&, const OptTensor&, double,
                                         const OptTensor&)>("pysparse::sparse_mlp");
    *ret0 = new_tensor_handle(
        op.call(T(x), T(w1), opt(b1), T(w2_t), opt(b2), threshold, opt(predicted)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_sparse_ffn24(AtenTensorHandle x, AtenTensorHandle gate_values,
                                          AtenTensorHandle gate_meta, AtenTensorHandle up_values,
                                          AtenTensorHandle up_meta, AtenTensorHandle down_values,
                                          AtenTensorHandle down_meta, double threshold,
                                          AtenTensorHandle* predicted, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                      const Tensor&, const Tensor&, double, const OptTensor&)>(
            "pysparse::sparse_ffn24");
    *ret0 = new_tensor_handle(op.call(T(x), T(gate_values), T(gate_meta), T(up_values),
                                      T(up_meta), T(down_values), T(down_meta), threshold,
                                      opt(predicted)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_sparse_mlp24(AtenTensorHandle x, AtenTensorHandle w1_values,
                                          AtenTensorHandle w1_meta, AtenTensorHandle* b1,
                                          AtenTensorHandle w2_values, AtenTensorHandle w2_meta,
                                          AtenTensorHandle* b2, double threshold,
                                          AtenTensorHandle* predicted, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op =
        handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                      const Tensor&, const Tensor&, const OptTensor&, double, const OptTensor&)>(
            "pysparse::sparse_mlp24");
    *ret0 = new_tensor_handle(op.call(T(x), T(w1_values), T(w1_meta), opt(b1), T(w2_values),
                                      T(w2_meta), opt(b2), threshold, opt(predicted)));
  });
}

PYSPARSE_SHIM aoti_torch_cpu_ffn_predict(AtenTensorHandle x, AtenTensorHandle a,
                                         AtenTensorHandle b, AtenTensorHandle* c,
                                         int64_t max_rows, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    static const auto op = handle<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                         const OptTensor&, int64_t)>("pysparse::ffn_predict");
    *ret0 = new_tensor_handle(op.call(T(x), T(a), T(b), opt(c), max_rows));
  });
}

namespace pysparse::aten {

// The declaration AOTInductor is given for each shim must be the definition's signature above.
std::vector<AotiShim> aoti_shim_table() {
  auto addr = [](auto fn) { return reinterpret_cast<std::uintptr_t>(fn); };
  return {
      {"sparse24_linear",
       "AOTITorchError aoti_torch_cpu_sparse24_linear(AtenTensorHandle x, AtenTensorHandle "
       "values, AtenTensorHandle meta, AtenTensorHandle* bias, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_sparse24_linear)},
      {"dense_linear",
       "AOTITorchError aoti_torch_cpu_dense_linear(AtenTensorHandle x, AtenTensorHandle weight, "
       "AtenTensorHandle* bias, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_dense_linear)},
      {"attention",
       "AOTITorchError aoti_torch_cpu_attention(AtenTensorHandle q, AtenTensorHandle k, "
       "AtenTensorHandle v, AtenTensorHandle* attn_mask, int32_t is_causal, double* scale, "
       "int32_t enable_gqa, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_attention)},
      {"sparse_ffn",
       "AOTITorchError aoti_torch_cpu_sparse_ffn(AtenTensorHandle x, AtenTensorHandle w_gate, "
       "AtenTensorHandle w_up, AtenTensorHandle w_down_t, double threshold, AtenTensorHandle* "
       "predicted, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_sparse_ffn)},
      {"sparse_mlp",
       "AOTITorchError aoti_torch_cpu_sparse_mlp(AtenTensorHandle x, AtenTensorHandle w1, "
       "AtenTensorHandle* b1, AtenTensorHandle w2_t, AtenTensorHandle* b2, double threshold, "
       "AtenTensorHandle* predicted, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_sparse_mlp)},
      {"sparse_ffn24",
       "AOTITorchError aoti_torch_cpu_sparse_ffn24(AtenTensorHandle x, AtenTensorHandle "
       "gate_values, AtenTensorHandle gate_meta, AtenTensorHandle up_values, AtenTensorHandle "
       "up_meta, AtenTensorHandle down_values, AtenTensorHandle down_meta, double threshold, "
       "AtenTensorHandle* predicted, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_sparse_ffn24)},
      {"sparse_mlp24",
       "AOTITorchError aoti_torch_cpu_sparse_mlp24(AtenTensorHandle x, AtenTensorHandle "
       "w1_values, AtenTensorHandle w1_meta, AtenTensorHandle* b1, AtenTensorHandle w2_values, "
       "AtenTensorHandle w2_meta, AtenTensorHandle* b2, double threshold, AtenTensorHandle* "
       "predicted, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_sparse_mlp24)},
      {"ffn_predict",
       "AOTITorchError aoti_torch_cpu_ffn_predict(AtenTensorHandle x, AtenTensorHandle a, "
       "AtenTensorHandle b, AtenTensorHandle* c, int64_t max_rows, AtenTensorHandle* ret0)",
       addr(&aoti_torch_cpu_ffn_predict)},
  };
}

}  // namespace pysparse::aten
