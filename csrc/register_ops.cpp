// Every pysparse op schema, in one place. Kernels register themselves beside their code with
// TORCH_LIBRARY_IMPL (csrc/aten/*_cpu.cpp, *_cuda.cpp); fakes/autograd live in pysparse/kernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pysparse, m) {
  // dense [N, K] (K % 4 == 0, <= 2 nonzeros per group of 4 along K) ->
  //   values [N, K/2] (same dtype), meta uint8 [N, ceil(K/8)] (see csrc/core/sparse24.h)
  m.def("compress24(Tensor dense) -> (Tensor values, Tensor meta)");
  // Exact inverse of compress24.
  m.def("decompress24(Tensor values, Tensor meta, int K) -> Tensor");
  // Keeps the 2 largest score (default |w|) per group of 4 along K; ties -> lower index.
  m.def("prune24(Tensor w, Tensor? score=None) -> Tensor");
  // y = x @ W^T + bias with W packed 2:4; x [..., K]; fp32 or bf16 (fp32 accumulation).
  m.def("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // y = x @ W^T + bias with a dense W [N, K]; x [..., K]; the decode-step GEMV of every linear a
  // model leaves dense (the lm_head): fp32 or bf16 on the core's kernel up to a few rows of x,
  // torch's linear otherwise (other dtypes, devices, more rows).
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // Weight-only int8 (the quantize pass): y = (x @ qweight^T) * scale + bias, qweight int8
  // [N, K], scale fp32 [N] (one per output row), x and bias fp32/bf16/fp16, y in x's dtype; fp32
  // accumulation on the int8 values widened in registers (csrc/core/qlinear.h).
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor");
  // The same over a 2:4 int8 weight: values int8 [N, K/2] and meta uint8 [N, ceil(K/8)], the
  // layout compress24 makes of the int8 weight.
  m.def("sparse24_int8_linear(Tensor x, Tensor values, Tensor meta, Tensor scale, "
        "Tensor? bias=None) -> Tensor");
  // Weight-only int4 (the quantize pass's bits=4): qweight uint8 [N, ceil(K/32)*16], two values a
  // byte per block of 32 (csrc/core/qlinear.h), scale float16 [N, ceil(K/group)], group 32 or 64.
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, int group, Tensor? bias=None) -> Tensor");
  // The same over a 2:4 int4 weight: the K/2 kept values packed so, compress24's meta.
  m.def("sparse24_int4_linear(Tensor x, Tensor values, Tensor meta, Tensor scale, int group, "
        "Tensor? bias=None) -> Tensor");
  // Scaled dot-product attention (torch's arguments, no dropout): q [B, H, T, D], k/v [B, Hkv, L,
  // D(v)], attn_mask bool broadcastable to [B, H, T, L] (true: attend); grouped KV heads with
  // enable_gqa. On the CPU up to 4 query rows run the core's decode kernel (fp32/bf16), the rest
  // torch's scaled_dot_product_attention.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, bool is_causal=False, "
        "float? scale=None, bool enable_gqa=False) -> Tensor");
  // ProxSparse's proximal operator of lam * Reg over every group of 4 along the last dim (see
  // csrc/core/prox24_group.h); per-group coordinate descent until it moves less than
  // tol * (1 + max|group|) or max_iters sweeps. Functional and in-place forms (the in-place one
  // returns nothing, as functionalization requires of custom mutating ops).
  m.def("prox24(Tensor w, float lam, int max_iters=100, float tol=1e-6) -> Tensor");
  m.def("prox24_(Tensor(a!) w, float lam, int max_iters=100, float tol=1e-6) -> ()");
  // SparseGPT's 2:4 column sweep (the OBS update of one layer), in place, CPU float64: wt [K, N]
  // (the weight transposed), prune [K, N] bool (written; read when mode=2), hinv [K, K] upper
  // Cholesky factor of H^-1; choose 0 chooses along K, 1 along N, 2 keeps prune as given. See
  // pysparse.kernels.reference.obs24_sweep for the exact steps.
  m.def("obs24_sweep_(Tensor(a!) wt, Tensor(b!) prune, Tensor hinv, int block=32, int choose=0) -> ()");
  // Activation-sparse FFNs (ProSparse inference), exact: fatrelu_t(v) = v if v >= t else 0.
  // Gated: y = (fatrelu_t(x @ w_gate^T) * (x @ w_up^T)) @ w_down_t, weights [d_ff, d_model]
  // (w_down_t = W_down^T). Plain: y = fatrelu_t(x @ w1^T + b1) @ w2_t + b2. fp32 or bf16.
  // predicted (activation predictors): bool [..., d_ff], true where the neuron is computed for that
  // row; the result is the exact FFN restricted to those (row, neuron) pairs. None: exact.
  m.def("sparse_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, float threshold=0.0, "
        "Tensor? predicted=None) -> Tensor");
  m.def("sparse_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2_t, Tensor? b2, float threshold=0.0, "
        "Tensor? predicted=None) -> Tensor");
  // The same over 2:4 weights: gate/up/w1 packed along d_model (compress24's layout), the down
  // projection pruned along d_ff and regrouped by groups of 4 neurons: values [d_ff/4, 2, d_model],
  // meta uint8 [d_ff/4, ceil(d_model/2)] (csrc/core/sparse_ffn.h; pysparse.kernels.formats.pack_down24).
  m.def("sparse_ffn24(Tensor x, Tensor gate_values, Tensor gate_meta, Tensor up_values, Tensor up_meta, "
        "Tensor down_values, Tensor down_meta, float threshold=0.0, Tensor? predicted=None) -> Tensor");
  // sparse_ffn24 over int8 weights (the quantize pass): the same layouts with int8 values, fp32
  // scales per neuron for the gate and up weights [d_ff] and per output for the down projection
  // [d_model] (neuron-group layout only); x fp32 or bf16, y in x's dtype (csrc/core/sparse_ffn.h).
  m.def("sparse_ffn24_int8(Tensor x, Tensor gate_values, Tensor gate_meta, Tensor gate_scale, "
        "Tensor up_values, Tensor up_meta, Tensor up_scale, Tensor down_values, Tensor down_meta, "
        "Tensor down_scale, float threshold=0.0, Tensor? predicted=None) -> Tensor");
  // Activation predictors: predicted = (x @ a^T) @ b^T + c > 0, bool [..., d_ff]; a [rank, d_model],
  // b [d_ff, rank], c [d_ff] (the predictor pass's weights), fp32 or bf16 like x. The CPU computes
  // both products on the FFN kernels' streaming gate (x @ a^T kept in fp32).
  m.def("ffn_predict(Tensor x, Tensor a, Tensor b, Tensor? c=None, int max_rows=-1) -> Tensor");
  m.def("sparse_mlp24(Tensor x, Tensor w1_values, Tensor w1_meta, Tensor? b1, Tensor w2_values, "
        "Tensor w2_meta, Tensor? b2, float threshold=0.0, Tensor? predicted=None) -> Tensor");
}
