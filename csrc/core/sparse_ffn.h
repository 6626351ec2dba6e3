// Torch-free activation-sparse FFN kernels (ProSparse inference): the gated form
//   y = down(fatrelu_t(gate(x)) * up(x))
// and the plain (BERT) form
//   y = down(fatrelu_t(up(x) + b1)) + b2
// where fatrelu_t(v) = v if v >= t else 0 (t = 0 is ReLU). Exact: the gate (plain: up) is computed
// for every neuron; the up row and the down row are read only for neurons that are active for at
// least one row of x.
//
// Two phases, each one OpenMP region:
//   ffn_gate  a[m][f] = fatrelu_t(x_m . gate_f + b1_f) for every neuron; returns the list of
//             neurons active for some row (ascending).
//   ffn_tail  for the active neurons h = a * (x . up_f) (plain: h = a), then
//             y[m][n] = sum over active f, ascending, of h[m][f] * down_t[f][n] (+ b2[n]).
// The down sum is split across threads by output column, not by neuron, so every output is summed
// in the same order whatever the thread count: results are bit-identical for 1, 2 or 8 threads and
// no per-thread partial outputs need reducing. (A one-pass design that also splits the down
// projection by neuron needs a buffer per thread and a reduction whose order follows the thread
// count.) Bytes read are the same as the one-pass design.
//
// Weights (all rows over d_model D, fp32 or bf16 bit patterns; math in fp32):
//   gate / up (plain: w1)  dense [F, D], or 2:4 packed along D: values [F, D/2], meta [F, ceil(D/8)]
//                          (the layout of sparse24.h)
//   down                   dense: W_down^T [F, D];
//                          2:4 packed "by neuron group": the down weight W_down [D, F] pruned 2:4
//                          along F (what every mask pass produces) and regrouped so that one group
//                          of 4 neurons owns a contiguous block: values [F/4, 2, D] (plane 0 the
//                          lower kept index of each output's group, plane 1 the higher), meta
//                          [F/4, ceil(D/2)] one nibble idx0 | idx1 << 2 per output n, n even in the
//                          low nibble. A group is read when any of its 4 neurons is active.
//                          Or 2:4 packed "by neuron row" (down_by_row): W_down^T [F, D] pruned 2:4
//                          along D and packed as compress24 does (values [F, D/2], meta
//                          [F, ceil(D/8)]): each active neuron's half-size row is read, nothing
//                          else; but the mask is then along d_model, which the mask passes do not
//                          make and cuSPARSELt cannot run (its 2:4 is along the GEMM's K = d_ff).
#pragma once

#include <cstdint>

namespace pysparse::core {

enum class FfnDtype { f32, bf16 };

// One FFN matrix with rows over D. meta == nullptr: dense.
struct FfnMatrix {
  const void* values = nullptr;
  const uint8_t* meta = nullptr;
  bool packed() const { return meta != nullptr; }
};

struct FfnProblem {
  FfnDtype dtype = FfnDtype::f32;
  int64_t M = 0;  // rows of x
  int64_t D = 0;  // d_model
  int64_t F = 0;  // d_ff
  const float* x = nullptr;  // [M, D] fp32, contiguous (bf16 inputs are widened by the caller)
  // The same x as the caller's bf16 [M, D] (contiguous) when the input was bf16, else null: the
  // bf16 gate's dot-product GEMV reads it as it is (no rounding x back to bf16 per call).
  const uint16_t* x_bf16 = nullptr;
  FfnMatrix gate;            // gated: gate; plain: w1
  const void* gate_bias = nullptr;  // plain: b1 (weight dtype) or null
  FfnMatrix up;                     // gated: up; plain: values == nullptr
  FfnMatrix down;                   // see the header comment
  bool down_by_row = false;         // down.meta set: the by-row 2:4 layout (else neuron groups)
  const void* down_bias = nullptr;  // plain: b2 or null
  float threshold = 0.f;
  // int8 weights (the quantize pass; qlinear.h): every FFN matrix holds int8 values in the layouts
  // above, with fp32 scales per row of the gate and up weights [F] and per output column of the
  // down projection [D]; x, a, h and y keep `dtype`. No biases. The gate takes the int8 linears'
  // kernels (their VNNI route where the CPU has it: x quantised per block, qlinear.h), up rows and
  // down rows are widened in registers: a = gate . x * gate_scale, h = a * (up . x * up_scale),
  // y = (sum of h * down) * down_scale.
  bool int8 = false;
  const float* gate_scale = nullptr;
  const float* up_scale = nullptr;
  const float* down_scale = nullptr;
  // Activation predictors: [M, F] bytes, nonzero where the predictor says neuron f fires for row m,
  // or null (exact). Given, ffn_gate reads the gate row of a neuron only when it is predicted for
  // some row, and a[m][f] is the exact activation where predicted for row m, else 0: the result is
  // the exact FFN restricted to the predicted (row, neuron) pairs (a firing neuron the predictor
  // misses is lost; a predicted one that does not fire is 0, as in the exact FFN).
  const uint8_t* predicted = nullptr;
  // With predicted: the neurons predicted for some row, ascending (predicted_union entries), when
  // the caller has them already (else ffn_gate collects them).
  const int32_t* predicted_union = nullptr;
  int64_t npredicted_union = 0;
  // With predicted: compute the gate for every neuron on the exact gate kernels (the 2:4 GEMV
  // decodes each packed row once for all rows of x), then apply the prediction: for batches where
  // that beats reading only the predicted rows once per row of x. Same result up to how each dot
  // product is blocked.
  bool predicted_after_gate = false;
  int nthreads = 0;  // <= 0: OpenMP default
};

// Phase 1. a: [M, F] fp32 (written for every neuron; with p.predicted only for the neurons
// predicted for some row: the tail reads no other). active: room for F entries. Returns how many
// neurons are active for at least one row.
int64_t ffn_gate(const FfnProblem& p, float* a, int32_t* active);

// Phase 2. y: [M, ldy] in the weight dtype (fp32 or bf16 bit patterns), rounded once.
void ffn_tail(const FfnProblem& p, const float* a, const int32_t* active, int64_t nactive, void* y,
              int64_t ldy);

// ---- bf16 2:4 FFNs on CPUs with AMX-BF16 tiles (only where sparse24_bf16_amx() says so) ----------
// For batches where many neurons fire, the tile kernels of sparse24_amx.cpp:
//   ffn_linear24_amx  y[M, N] fp32 = x[M, K] @ W^T (+ bias), x/W/bias bf16, W 2:4 (sparse24.h
//                     layout); unrounded, for the threshold and the product with the gate.
//   ffn_down24_amx    y[M, D] bf16 = h[M, F] @ W_down^T (+ bias), W_down in the neuron-group layout
//                     above; h fp32 (contiguous), rounded to bf16 for the tiles (as torch's dense
//                     bf16 FFN holds it); blocks of 32 neurons silent for 16 rows are skipped.
void ffn_linear24_amx(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                      const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias, float* y,
                      int nthreads);
void ffn_down24_amx(const float* h, int64_t M, const uint16_t* values, const uint8_t* meta,
                    int64_t F, int64_t D, const uint16_t* bias, uint16_t* y, int nthreads);

// Columns [n0, n0 + cols) of the dense W_down^T [F, D] as a [F, cols] slab, from the neuron-group
// layout above (values [F/4, 2, D], meta [F/4, ceil(D/2)]); elem_size 2 or 4, bit patterns copied.
// The large-batch route unpacks the down weight a cache-sized slab of outputs at a time for a
// dense GEMM.
void unpack_down24(const void* values, const uint8_t* meta, int64_t F, int64_t D, int64_t n0,
                   int64_t cols, int elem_size, void* dense, int nthreads);

// "avx2" or "scalar": which implementation the FFN kernels use (PYSPARSE_DISABLE_AVX2=1 forces
// the scalar one, as for the linear layer).
const char* sparse_ffn_impl();

// ---- dense GEMV: y[M, N] = x[M, K] @ W^T, for a few rows of x ----------------------------------
// The FFN's dense gate pass as a linear layer of its own (every linear a decode step leaves
// dense: the lm_head, the projections of a model that is not 2:4): W [N, K] contiguous, fp32
// (dtype f32) or bf16 bits (bf16); x fp32 [M, K] contiguous; y fp32 [M, N], no bias. Each output
// is one fused multiply-add chain in ascending k, whatever the thread count or the blocking.
void dense_gemv(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N, int64_t K,
                float* y, int nthreads);

}  // namespace pysparse::core
