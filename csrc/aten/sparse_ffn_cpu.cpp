// CPU glue of the activation-sparse FFN ops: checks, then the core kernels (csrc/core/sparse_ffn.h)
// at decode batch sizes, or torch's dense kernels where they are faster.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "../core/sparse24.h"
#include "../core/sparse_ffn.h"
#include "ffn_common.h"

namespace pysparse::aten {
namespace {

// Above this many rows of x the union of active neurons is nearly everything (independent tokens
// at 90% sparsity: 16 rows leave 81% of neurons active) and the sparse kernels, which vectorise over
// columns rather than rows, lose to a GEMM: the op runs on torch's dense kernels (2:4 weights:
// the 2:4 linear layer for gate/up and a dense down rebuilt from the packed one).
constexpr int64_t kSparseMaxRows = 16;

// Measured with bench/ffn.py (LLaMA-7B shape, fp32, 2 threads; bench/RESULTS.md has the table): up to 4
// rows the sparse kernels beat torch's dense FFN at every sparsity (M=4, all neurons active: 1.3x),
// at 1 row they tie with every neuron active (0.99x); at 16 rows, computing per row of x, they lose
// once most neurons are active (union 100%: 0.6x). So from 9 rows the gate is torch's GEMM, and
// the up/down projections go to torch's GEMM too when more than this share of neurons is active:
// bf16 on a CPU with AMX-BF16 is another matter: torch's dense bf16 GEMM runs on the AMX tiles and
// costs the same at 4 or 16 rows as at 1 (LLaMA-7B shape: ~20 ms), while our kernels widen bf16 to
// fp32 and compute per row (M=4, every neuron active: 0.56x). There only one row runs wholly on
// our kernels; from 2 rows the gate is torch's, and the rest is ours only while few neurons fire
// (M=4 at 35% active: 1.0x with our gate); from 9 rows torch's kernels outright (see ffn_cpu).
struct Crossover {
  int64_t own_gate_max_rows;
  double dense_tail_above;
};
// Small FFNs (MiniLM's 384x1536) stay in cache, where torch's small GEMM beats our per-row kernels
// from 2 rows (M=4, all active: 0.75x): with dense weights they go to torch outright from 2 rows
// (see ffn_cpu); with 2:4 weights the up projection moves to the 2:4 GEMV once half the neurons
// fire.
Crossover crossover(int64_t M, at::ScalarType st, int64_t weights) {
  if (st == at::kBFloat16 && bf16_matmul_has_amx()) return {1, M <= 1 ? 1.01 : (M <= 4 ? 0.35 : 0.2)};
  if (weights <= (int64_t(1) << 20)) return {1, M <= 1 ? 1.01 : 0.5};
  return {8, M <= 4 ? 1.01 : (M <= 8 ? 0.9 : 0.6)};
}

using Weights = FfnWeights;

// The activation predictors' [M, F] bytes (check_predicted made them contiguous), or null.
const uint8_t* pred_ptr(const Weights& w) {
  return w.pred.defined() ? reinterpret_cast<const uint8_t*>(w.pred.data_ptr<bool>()) : nullptr;
}


// torch's bf16 GEMM (oneDNN on AMX) runs h @ W at half speed when W is W_down^T [F, D] row-major
// rather than the W_down [D, F] nn.Linear keeps (LLaMA-7B shape, 4 rows: 8.7 vs 4.1 ms; fp32 is
// indifferent). So the bf16 dense fallback keeps, per down weight, a W_down copy made on first use
// (the op is only given W_down^T): a third more FFN memory, paid only by models that take that
// route. Entries die with their weight and are rebuilt if it is modified in place.
class DownLayoutCache {
 public:
  at::Tensor get(const at::Tensor& wdt) {
    if (wdt.is_inference()) return wdt.t().contiguous();
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) { return e.weight.expired(); }),
                   entries_.end());
    for (Entry& e : entries_) {
      if (e.weight._unsafe_get_target() != wdt.unsafeGetTensorImpl()) continue;
      if (e.data != wdt.data_ptr() || e.version != static_cast<int64_t>(wdt._version()))
        e = Entry(wdt);
      return e.w_down;
    }
    entries_.emplace_back(wdt);
    return entries_.back().w_down;
  }

 private:
  struct Entry {
    explicit Entry(const at::Tensor& wdt)
        : weight(wdt.getIntrusivePtr()),
          data(wdt.data_ptr()),
          version(wdt._version()),
          w_down(wdt.t().contiguous()) {}
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> weight;
    const void* data;
    int64_t version;
    at::Tensor w_down;
  };
  std::mutex mu_;
  std::vector<Entry> entries_;
};

// y = h @ W_down^T + b2 on torch's kernels, h in the weights' dtype.
at::Tensor dense_down(const at::Tensor& h, const Weights& w) {
  if (h.scalar_type() == at::kBFloat16) {
    static DownLayoutCache cache;
    return at::linear(h, cache.get(w.dv), w.b2.defined() ? c10::optional<at::Tensor>(w.b2) : c10::nullopt);
  }
  return w.b2.defined() ? at::addmm(w.b2, h, w.dv) : at::mm(h, w.dv);
}

// bf16 2:4 weights (down in the neuron-group layout) on a CPU with AMX tiles, from
// core::kAmxMinRows rows: the gate on the tile kernel; then, while few neurons fire, the FFN
// kernels for the firing neurons; once many fire, the up and down projections on the tiles too.
// Without them the FMA kernels compute per row of x (LLaMA-7B shape, 16 rows: 0.28-0.53x torch's
// dense bf16 FFN, bench/RESULTS.md). Up to kAmxMaxRows rows: bench/ffn.py measured it to 16; the 2:4 linear
// alone stays on the tiles to 191 rows (its crossover to torch's GEMM, sparse24_cpu.cpp).
constexpr int64_t kAmxMaxRows = 127;

bool amx_route(const Weights& w, at::ScalarType st, int64_t M) {
  return st == at::kBFloat16 && w.gm.defined() && !w.down_by_row && M >= core::kAmxMinRows &&
         M <= kAmxMaxRows && core::sparse24_bf16_amx();
}

// When the FFN kernels take over after the tile gate: their cost grows with the (row, neuron)
// pairs that fire (each firing pair is an up-row dot and a down-row axpy for that row), the tiles'
// does not. So the rule is on nnz(h) / d_ff, the mean number of rows a neuron fires for: the FFN
// kernels while it is at most 1.6. Measured with bench/ffn.py, bf16, FFN kernels vs tiles (x torch
// dense): LLaMA-7B 16 rows, 5% per row (0.8 per neuron) 1.09x vs ~0.8x; 10% per row (1.6) 0.78x
// vs 0.68x (independent) and 0.85x vs 0.80x (clustered); 20% per row (3.2) 0.55x vs 0.80x;
// 8 rows at 20% (1.6) 0.82x vs ~0.8x; 1B shape 16 rows at 10% (1.6) 0.62x vs 0.69x, at 5% 1.00x
// vs 0.70x. Above 16 rows only the tiles. PYSPARSE_FFN_AMX_TAIL_MAX overrides the 1.6 (read per
// call, for tests and measurements).
double amx_tail_max() {
  const char* v = std::getenv("PYSPARSE_FFN_AMX_TAIL_MAX");
  return v && *v ? std::atof(v) : 1.6;
}

// FATReLU in place on g [M, F] (contiguous, fp32 or bf16: v >= t ? v : 0, NaN -> 0) in one pass,
// restricted to the predicted (row, neuron) pairs when pred ([M, F] bytes) is given, counting what
// fires: the firing neurons (live[f] = fires for some row) and (row, neuron) pairs.
// torch's where / != / any / sum / item for the same took 0.2-0.45 ms on [8, 5632] .. [8, 11008]
// bf16 here (against ~10 us for a relu): 5-10% of a 1B-shape FFN at 8 rows.
struct Firing {
  int64_t neurons = 0;
  int64_t pairs = 0;
  std::vector<uint8_t> live;
  // The firing neurons, ascending, as the FFN kernels want them.
  at::Tensor active() const {
    at::Tensor out = at::empty({neurons}, at::TensorOptions().dtype(at::kInt));
    int32_t* o = out.data_ptr<int32_t>();
    for (size_t f = 0; f < live.size(); ++f)
      if (live[f]) *o++ = static_cast<int32_t>(f);
    return out;
  }
};

Firing fatrelu_count_(at::Tensor& g, double t, const uint8_t* pred = nullptr) {
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && g.dim() == 2);
  const int64_t M = g.size(0), F = g.size(1);
  const float tf = static_cast<float>(t);
  Firing r;
  r.live.assign(static_cast<size_t>(F), 0);
  uint8_t* live = r.live.data();
  int64_t pairs = 0;
  if (g.scalar_type() == at::kFloat) {
    float* v = g.data_ptr<float>();
    for (int64_t i = 0; i < M * F; i += F)
      for (int64_t f = 0; f < F; ++f) {
        const bool on = v[i + f] >= tf && (!pred || pred[i + f]);
        v[i + f] = on ? v[i + f] : 0.0f;
        live[f] |= on;
        pairs += on;
      }
  } else {
    TORCH_INTERNAL_ASSERT(g.scalar_type() == at::kBFloat16);
    uint16_t* v = reinterpret_cast<uint16_t*>(g.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < M * F; i += F)
      for (int64_t f = 0; f < F; ++f) {
        const bool on = core::bf16_to_float(v[i + f]) >= tf && (!pred || pred[i + f]);
        v[i + f] = on ? v[i + f] : uint16_t(0);
        live[f] |= on;
        pairs += on;
      }
  }
  for (int64_t f = 0; f < F; ++f) r.neurons += live[f];
  r.pairs = pairs;
  return r;
}

// The FFN kernels' problem for x2 (the op's rows) and xf, x2 widened to fp32 ([M, D]
// contiguous); x2 itself rides along when it is bf16 and contiguous (FfnProblem::x_bf16).
core::FfnProblem ffn_problem(const Weights& w, const at::Tensor& x2, const at::Tensor& xf, double t,
                             int64_t D, int64_t F) {
  core::FfnProblem p;
  if (x2.scalar_type() == at::kBFloat16 && x2.is_contiguous())
    p.x_bf16 = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  p.dtype = w.gv.scalar_type() == at::kFloat ? core::FfnDtype::f32 : core::FfnDtype::bf16;
  p.M = xf.size(0);
  p.D = D;
  p.F = F;
  p.x = xf.data_ptr<float>();
  p.gate = {ptr(w.gv), mptr(w.gm)};
  p.gate_bias = ptr(w.b1);
  p.up = {ptr(w.uv), mptr(w.um)};
  p.down = {ptr(w.dv), mptr(w.dm)};
  p.down_by_row = w.down_by_row;
  p.down_bias = ptr(w.b2);
  p.threshold = static_cast<float>(t);
  p.nthreads = at::get_num_threads();
  return p;
}

at::Tensor ffn24_amx(const at::Tensor& x, const at::Tensor& x2, const Weights& w, double t,
                     int64_t D, int64_t F) {
  const int64_t M = x2.size(0);
  const int nt = at::get_num_threads();
  at::Tensor xb = x2.contiguous();
  auto bp = [](const at::Tensor& b) {
    return b.defined() ? reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()) : nullptr;
  };
  at::Tensor a = at::empty({M, F}, xb.options().dtype(at::kFloat));
  core::ffn_linear24_amx(bp(xb), M, D, bp(w.gv), mptr(w.gm), F, D, bp(w.b1), a.data_ptr<float>(), nt);
  const Firing fires = fatrelu_count_(a, t, pred_ptr(w));
  at::Tensor y = at::empty({M, D}, x.options());
  if (M > kSparseMaxRows ||
      static_cast<double>(fires.pairs) > amx_tail_max() * static_cast<double>(F)) {
    if (w.uv.defined()) {
      at::Tensor u = at::empty({M, F}, a.options());
      core::ffn_linear24_amx(bp(xb), M, D, bp(w.uv), mptr(w.um), F, D, nullptr, u.data_ptr<float>(), nt);
      a.mul_(u);
    }
    core::ffn_down24_amx(a.data_ptr<float>(), M, bp(w.dv), mptr(w.dm), F, D, bp(w.b2),
                         reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), nt);
    return y.view(x.sizes());
  }
  at::Tensor xf = xb.to(at::kFloat).contiguous();
  at::Tensor active = fires.active();
  const int64_t n = fires.neurons;
  const core::FfnProblem p = ffn_problem(w, x2, xf, t, D, F);
  core::ffn_tail(p, a.data_ptr<float>(), active.data_ptr<int32_t>(), n, y.data_ptr(), D);
  return y.view(x.sizes());
}

// The large-batch route on the CPU: ffn_dense_route, except that a neuron-group 2:4 down weight is
// unpacked by the core a cache-sized chunk of outputs at a time for torch's GEMM (the torch-op
// unpacking of ffn_dense_route builds index tensors and a zeroed [F, D] per call: SmolLM2's
// 1536x576 down weight, 0.9 ms fp32 / 1.3 ms bf16 per call, as long as a 512-row bf16 GEMM).
at::Tensor ffn_dense_route_cpu(const at::Tensor& x2, const Weights& w, double t, int64_t D,
                               int64_t F) {
  if (!w.dm.defined() || w.down_by_row) return ffn_dense_route(x2, w, t, D);
  // FATReLU in place by fatrelu_count_ (torch's where + ge took 0.5 ms of a 2 ms bf16 FFN at
  // SmolLM2's shape, 128 rows) and the up product in place.
  at::Tensor h = linear_any(x2, w.gv, w.gm, w.b1).contiguous();
  fatrelu_count_(h, t, pred_ptr(w));
  if (w.uv.defined()) h.mul_(linear_any(x2, w.uv, w.um, at::Tensor()));
  const void* values = w.dv.data_ptr();
  const uint8_t* meta = mptr(w.dm);
  const int es = static_cast<int>(w.dv.element_size());
  const int nt = at::get_num_threads();
  return linear_by_dense_chunks(h, D, F, w.dv.scalar_type(), w.b2,
                                [&](int64_t n0, int64_t cols, void* dst) {
                                  core::unpack_down24(values, meta, F, D, n0, cols, es, dst, nt);
                                },
                                /*transposed=*/true);
}

// The most rows of x the predicted kernels take with 2:4 weights. The predicted gate decodes each
// predicted row once per row of x (AVX2 code), the exact gate each row once for all rows.
// Measured with bench/ffn.py --predictor 0.125 (7B shape, 90% off): on AVX2 the predicted kernels
// win at 2, 4 and 8 rows (AMD EPYC, fp32 5.35x / 9.05x / 4.91x torch dense against 3.43x / 6.81x /
// 3.99x exact) and lose at 16 (the union of 16 rows' predicted sets is nearly every neuron: 2:4
// fp32 14-18% slower than exact); where the exact gate is the AVX-512 GEMV (one decode serves 4
// rows of x) they win at 2 rows (AMD EPYC with AVX-512, fp32 5.99 vs 6.79 ms exact) and lose from
// 4 (Intel Xeon, fp32 3.00x vs 3.88x, bf16 0.45x vs 1.79x; AMD 9.87 vs 9.26 ms), so there 2 rows.
int64_t predicted_packed_max_rows() {
  return std::strcmp(core::sparse24_linear_impl(), "avx512") == 0 ? 2 : 8;
}

// With activation predictors (w.pred), the FFN kernels over the predicted neurons alone (each
// predicted gate row read once, computed per row of x), where that beats the exact route: one row
// (always), or a few rows where the exact route's gate is our per-row kernel too (fp32, non-AMX
// bf16) and, with 2:4 weights, at most predicted_packed_max_rows() rows, and no more neurons
// predicted than the exact route's dense-tail crossover allows. Elsewhere (the AMX tiles, torch's
// GEMMs, a small FFN) returns an undefined tensor: the exact route then runs with the prediction
// applied after the gate, so a prediction never makes the op slower than the exact FFN. Either
// way the result is the exact FFN restricted to the predicted (row, neuron) pairs.
at::Tensor ffn_predicted_kernels(const at::Tensor& x, const at::Tensor& x2, const Weights& w,
                                 double t, int64_t D, int64_t F) {
  const int64_t M = x2.size(0);
  const auto st = w.gv.scalar_type();
  const bool packed = w.gm.defined();
  const Crossover cross = crossover(M, st, F * D);
  // (batch-invariant mode: always these kernels, which take each row alike; ffn_cpu chunks past
  // kSparseMaxRows rows)
  const bool invariant = routes::batch_invariant();
  if (M > 1 && !invariant &&
      (M > kSparseMaxRows || amx_route(w, st, M) ||
       (packed ? M > predicted_packed_max_rows() : M > cross.own_gate_max_rows)))
    return at::Tensor();
  const uint8_t* pred = pred_ptr(w);
  std::vector<int32_t> cand;
  if (M == 1) {
    for (int64_t f = 0; f < F; ++f)
      if (pred[f]) cand.push_back(static_cast<int32_t>(f));
  } else {
    std::vector<uint8_t> any(static_cast<size_t>(F), 0);
    for (int64_t i = 0; i < M * F; i += F)
      for (int64_t f = 0; f < F; ++f) any[f] |= pred[i + f];
    for (int64_t f = 0; f < F; ++f)
      if (any[f]) cand.push_back(static_cast<int32_t>(f));
  }
  const int64_t n = static_cast<int64_t>(cand.size());
  if (M > 1 && !invariant && static_cast<double>(n) > cross.dense_tail_above * static_cast<double>(F))
    return at::Tensor();
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  core::FfnProblem p = ffn_problem(w, x2, xf, t, D, F);
  p.predicted = pred;
  p.predicted_union = cand.data();
  p.npredicted_union = n;
  at::Tensor a = at::empty({M, F}, xf.options());
  at::Tensor active = at::empty({F}, xf.options().dtype(at::kInt));
  const int64_t nact = core::ffn_gate(p, a.data_ptr<float>(), active.data_ptr<int32_t>());
  at::Tensor y = at::empty({M, D}, x.options());
  core::ffn_tail(p, a.data_ptr<float>(), active.data_ptr<int32_t>(), nact, y.data_ptr(), D);
  return y.view(x.sizes());
}

at::Tensor ffn_cpu(const at::Tensor& x, const Weights& w, double t, int64_t D, int64_t F) {
  const auto st = w.gv.scalar_type();
  at::Tensor x2 = as_rows(x, D);
  const int64_t M = x2.size(0);
  if (M == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);
  // Batch-invariant mode (routes.h): the FFN kernels with their own gate for every row count
  // (kSparseMaxRows rows at a time), whatever fires: a neuron that fires for another row adds an
  // exact zero to this one's down sum. Never torch's GEMMs or the AMX tiles.
  // The same chunks serve fp32 2:4 FFNs from kSparseMaxRows to PYSPARSE_FFN_CHUNK_MAX_ROWS rows
  // (default 48; a short prompt's prefill), where they beat the dense route (2:4 GEMMs for gate
  // and up, the down weight unpacked for torch's): SmolLM2 2:4 + ReLU fp32, a whole native
  // prefill step, dense route -> 16-row chunks (AMD EPYC Zen 4, 2 threads, ms): 17 tokens 87 ->
  // 44, 20 88 -> 49, 24 90 -> 56, 30 95 -> 67, 40 106 -> 87, 60 126 -> 126.
  const bool invariant = routes::batch_invariant();
  const bool chunked =
      invariant || (st == at::kFloat && w.gm.defined() &&
                    M <= env_int("PYSPARSE_FFN_CHUNK_MAX_ROWS", 48));
  if (chunked && M > kSparseMaxRows) {
    std::vector<at::Tensor> parts;
    for (int64_t i = 0; i < M; i += kSparseMaxRows) {
      const int64_t m = std::min(kSparseMaxRows, M - i);
      Weights part = w;
      if (w.pred.defined()) part.pred = w.pred.view({M, F}).narrow(0, i, m).contiguous();
      parts.push_back(ffn_cpu(x2.narrow(0, i, m), part, t, D, F));
    }
    return at::cat(parts, 0).view(x.sizes());
  }
  if (w.pred.defined()) {
    at::Tensor y = ffn_predicted_kernels(x, x2, w, t, D, F);
    if (y.defined()) return y;
  }
  const uint8_t* pred = pred_ptr(w);
  if (!invariant && amx_route(w, st, M)) return ffn24_amx(x, x2, w, t, D, F);
  // A small FFN (up to PYSPARSE_FFN_SMALL_MAX_WEIGHTS weights) from 2 rows: torch's kernels
  // outright. Off by default: measured on Intel Xeon (bench/ffn.py, 384x1536) our route's extra
  // steps cost 10-30% of a 0.3 ms FFN there, but on AMD EPYC torch's BLAS runs MiniLM's 14-row
  // FFN GEMMs at ~20 GFLOP/s (mkl_blas_def path, ~350 us each): the native MiniLM forward at 1x14
  // tokens 7.2 ms with this route, 5.0 ms without (our gate GEMV and FFN tail).
  // bf16 on AMX from 9 rows likewise: torch's tiles cost little more than at 1 row, and the union
  // of 9-16 independent rows is most neurons (1B shape, 16 rows: 0.90-0.93x with the union test).
  const bool small = F * D <= env_int("PYSPARSE_FFN_SMALL_MAX_WEIGHTS", 0);
  const bool amx_rows = st == at::kBFloat16 && M > 8 && bf16_matmul_has_amx();
  if (!invariant && (M > kSparseMaxRows || (small && M > 1) || amx_rows) && !w.gm.defined()) {
    at::Tensor h = linear_any(x2, w.gv, w.gm, w.b1).contiguous();
    fatrelu_count_(h, t, pred);
    if (w.uv.defined()) h = h * call_dense_linear(x2, w.uv, at::Tensor());
    return dense_down(h, w).view(x.sizes());
  }
  if (M > kSparseMaxRows) return ffn_dense_route_cpu(x2, w, t, D, F).view(x.sizes());
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  core::FfnProblem p = ffn_problem(w, x2, xf, t, D, F);
  p.predicted = pred;  // applied after the exact gate (see ffn_predicted_kernels)
  p.predicted_after_gate = true;
  const bool packed = w.gm.defined();
  at::Tensor a, active;
  int64_t n = 0;
  const Crossover cross = crossover(M, st, F * D);
  const double limit = invariant ? std::numeric_limits<double>::infinity()
                                 : cross.dense_tail_above * static_cast<double>(F);
  if (packed || M <= cross.own_gate_max_rows || invariant) {
    a = at::empty({M, F}, xf.options());
    active = at::empty({F}, xf.options().dtype(at::kInt));
    n = core::ffn_gate(p, a.data_ptr<float>(), active.data_ptr<int32_t>());
    if (!packed && static_cast<double>(n) > limit) {  // our gate, torch's up and down
      at::Tensor h = w.uv.defined() ? a * call_dense_linear(x2, w.uv, at::Tensor()).to(at::kFloat) : a;
      return dense_down(h.to(st), w).view(x.sizes());
    }
  } else {
    // torch's gate; while most neurons fire everything stays in the weights' dtype on torch's
    // kernels (the same ops as the dense FFN), else the FFN kernels take the fp32 activations.
    at::Tensor g = linear_any(x2, w.gv, w.gm, w.b1).contiguous();
    const Firing fires = fatrelu_count_(g, t, pred);
    n = fires.neurons;
    if (static_cast<double>(n) > limit) {
      at::Tensor h = w.uv.defined() ? g * call_dense_linear(x2, w.uv, at::Tensor()) : g;
      return dense_down(h, w).view(x.sizes());
    }
    a = g.to(at::kFloat).contiguous();
    active = fires.active();
  }
  const bool crowded = static_cast<double>(n) > limit;
  if (crowded && w.uv.defined()) {
    // 2:4, most neurons active: the up projection for all of them on the 2:4 GEMV (which decodes W
    // once per 4 rows of x), then only the down projection on the FFN kernel (as a plain FFN).
    a = (a * call_sparse24_linear(x2, w.uv, w.um, at::Tensor()).to(at::kFloat)).contiguous();
    p.up = {};
  }
  at::Tensor y = at::empty({M, D}, x.options());
  core::ffn_tail(p, a.data_ptr<float>(), active.data_ptr<int32_t>(), n, y.data_ptr(), D);
  return y.view(x.sizes());
}

// Activation predictors' logits, (x a^T) b^T + c > 0, on the FFN kernels' dense gate (each
// weight row read once for every row of x, 8 rows in flight; x a^T stays fp32) for the rows where
// the exact FFN runs its gate on that kernel too (crossover(): fp32 up to 8 rows, bf16 on AMX and
// small predictors 1 row); torch's kernels beyond. Measured (7B-shape predictor of rank 512, AMD
// EPYC, AVX2, 2 threads; ms torch -> ours): fp32 1 row 2.9 -> 2.0, 4 rows 34 -> 6.9, 8 rows 43 ->
// 8.3; bf16 1 row 6.0 -> 1.7.
at::Tensor ffn_predict_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                           const c10::optional<at::Tensor>& c, int64_t max_rows) {
  const PredictorWeights w = prepare_ffn_predict(x, a, b, c);
  at::Tensor all = ffn_predict_capped(x, w, max_rows);
  if (all.defined()) return all;
  at::Tensor x2 = as_rows(x, w.D);
  const int64_t M = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.F;
  if (M == 0) return at::empty(shape, x.options().dtype(at::kBool));
  const int64_t own_rows = crossover(M, w.a.scalar_type(), w.r * w.D + w.F * w.r).own_gate_max_rows;
  if (M > own_rows && routes::batch_invariant())  // the kernels, which take each row alike
    return by_row_chunks(x, w.D, own_rows, [&](const at::Tensor& chunk) {
      return ffn_predict_cpu(chunk, a, b, c, max_rows);
    });
  if (M > own_rows) return ffn_predict_dense(x, w);
  at::Tensor xf = x2.to(at::kFloat).contiguous();
  at::Tensor low = at::empty({M, w.r}, xf.options());
  at::Tensor logits = at::empty({M, w.F}, xf.options());
  at::Tensor scratch = at::empty({std::max(w.r, w.F)}, xf.options().dtype(at::kInt));
  core::FfnProblem p;
  p.dtype = w.a.scalar_type() == at::kFloat ? core::FfnDtype::f32 : core::FfnDtype::bf16;
  p.M = M;
  p.threshold = -std::numeric_limits<float>::infinity();  // every value passes (NaN -> 0)
  p.nthreads = at::get_num_threads();
  p.x = xf.data_ptr<float>();
  p.D = w.D;
  p.F = w.r;
  p.gate = {w.a.data_ptr(), nullptr};
  core::ffn_gate(p, low.data_ptr<float>(), scratch.data_ptr<int32_t>());
  p.x = low.data_ptr<float>();
  p.D = w.r;
  p.F = w.F;
  p.gate = {w.b.data_ptr(), nullptr};
  p.gate_bias = ptr(w.c);
  core::ffn_gate(p, logits.data_ptr<float>(), scratch.data_ptr<int32_t>());
  return logits.gt(0).view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  register_ffn_ops<&ffn_cpu>(m);
  m.impl("ffn_predict", &ffn_predict_cpu);
}

}  // namespace pysparse::aten
