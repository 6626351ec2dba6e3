// CPU implementations of the pysparse ops: argument checks, then the torch-free core kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "../core/kernel_trace.h"
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

// The dense route (linear_via_dense_chunks) serves two regimes where torch's own GEMM wins:
// bf16 on a CPU with AMX-BF16: torch's dense bf16 matmul runs on the AMX tiles, far beyond what
// FMA units give, so from a few rows of x on the fastest exact route is to decompress W in chunks
// of rows small enough to stay in cache and hand each chunk to at::mm (W is still read from
// memory in its packed, ~half-size form). Below the crossover the 2:4 GEMV wins (memory-bound).
}  // namespace

bool bf16_matmul_has_amx() {
  static const bool amx = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto it = caps.find("amx_bf16");
    return it != caps.end() && it->second.isBool() && it->second.toBool();
  }();
  return amx;
}

namespace {

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : fallback;
}

at::Tensor linear_via_dense_chunks(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& m,
                                   const at::Tensor& b, int64_t N, int64_t K) {
  const int64_t M = x2.size(0);
  const int64_t mcols = core::meta_cols(K);
  // torch's GEMM runs its own threads: counted as a call of this route, threads not traced.
  core::RegionTrace(at::get_num_threads()).finish(core::Route::kLinearDense);
  const int es = static_cast<int>(v.element_size());
  // 8 MB chunks: fewer, larger GEMM calls (each at::mm call has a fixed cost of ~0.1 ms here) and
  // still cache-resident between decompression and use.
  static const int64_t chunk_bytes = env_int("PYSPARSE_DENSE_CHUNK_KB", 8192) * 1024;
  const int64_t rows = std::clamp<int64_t>(chunk_bytes / std::max<int64_t>(1, K * es), 16, N);
  at::Tensor y = at::empty({M, N}, x2.options());
  // One buffer per thread, kept between calls: a fresh multi-MB allocation costs ~1.5 us per 4 KB
  // page in first-touch faults on this machine (~3 ms per call for 8 MB).
  thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < rows * K || scratch.scalar_type() != v.scalar_type())
    scratch = at::empty({rows * K}, v.options());
  at::Tensor wbuf = scratch.narrow(0, 0, rows * K).view({rows, K});
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    at::Tensor wc = wbuf.narrow(0, 0, nc);
    core::decompress24(static_cast<const char*>(v.data_ptr()) + n0 * (K / 2) * es,
                       m.data_ptr<uint8_t>() + n0 * mcols, nc, K, es, wc.data_ptr());
    // addmm fuses the bias before the single rounding to bf16 (adding it afterwards would round
    // twice, which the fp32-accumulate contract of the op does not allow).
    y.narrow(1, n0, nc).copy_(b.defined() ? at::addmm(b.narrow(0, n0, nc), x2, wc.t())
                                          : at::mm(x2, wc.t()));
  }
  return y;
}

}  // namespace

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
  // Measured (bench/linear24.py, bf16, 4096x4096 and 11008x4096): with only FMA kernels, up to 16
  // rows the 2:4 GEMV is ahead; from 64 rows this route wins (M=64: 0.60-0.65x torch vs 0.49x for
  // the FMA GEMM; M=512: 0.8-0.9x vs 0.28x). With the core's own AMX kernel (decompression into
  // tiles, from core::kAmxMinRows rows) the crossover moves to 192 rows: `bench/linear24.py
  // --routes` (all routes interleaved with torch dense), tiles vs this route x torch: 4096x11008
  // M=64 0.88x vs 0.53x, M=128 0.65x vs 0.56x, M=160 0.60x vs 0.55x, M=192 0.60x vs 0.58x, M=256
  // 0.47x vs 0.58x; 11008x4096 M=160 0.75x vs 0.69x, M=192 0.65x vs 0.70x; 4096x4096 M=160 0.62x
  // vs 0.64x (the tile kernel decompresses W once per 32 rows of x, this route once per call).
  // PYSPARSE_BF16_DENSE_MIN_ROWS overrides it (read per call, so tests can take either route).
  const int64_t amx_min_rows =
      env_int("PYSPARSE_BF16_DENSE_MIN_ROWS", core::sparse24_bf16_amx() ? 192 : 17);
  if (v.scalar_type() == at::kBFloat16 && M >= amx_min_rows && bf16_matmul_has_amx())
    return linear_via_dense_chunks(x2, v, m, b, N, K).view(linear_out_shape(x, N));
  // fp32, small weights (MiniLM-sized, <= 1M elements), many rows: the decompressed weight fits in
  // L2 and MKL's GEMM beats ours there (bench, 1536x384 M=512: 0.83x torch vs 0.59x; 384x1536:
  // 0.90x vs 0.65x; at 64-128 rows ours is ahead or even). Overridable like the bf16 crossover.
  const int64_t f32_dense_max = env_int("PYSPARSE_F32_DENSE_MAX_WEIGHTS", int64_t(1) << 20);
  const int64_t f32_dense_min_rows = env_int("PYSPARSE_F32_DENSE_MIN_ROWS", 256);
  if (v.scalar_type() == at::kFloat && N * K <= f32_dense_max && M >= f32_dense_min_rows)
    return linear_via_dense_chunks(x2, v, m, b, N, K).view(linear_out_shape(x, N));
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

// prox24_: in place. Computes in fp32 (fp64 for fp64 weights) on a contiguous buffer: the weight
// itself when it is contiguous fp32/fp64, else a converted copy written back at the end.
void prox24_inplace_cpu(at::Tensor& w, double lam, int64_t max_iters, double tol) {
  check_prox24(w, lam, max_iters, tol);
  const bool f64 = w.scalar_type() == at::kDouble;
  const bool direct = w.is_contiguous() && (f64 || w.scalar_type() == at::kFloat);
  at::Tensor work = direct ? w : w.to(f64 ? at::kDouble : at::kFloat).contiguous();
  const int64_t groups = work.numel() / 4;
  if (f64) {
    core::prox24(work.data_ptr<double>(), groups, lam, static_cast<int>(max_iters), tol);
  } else {
    core::prox24(work.data_ptr<float>(), groups, static_cast<float>(lam),
                 static_cast<int>(max_iters), static_cast<float>(tol));
  }
  if (!direct) w.copy_(work);
}

at::Tensor prox24_cpu(const at::Tensor& w, double lam, int64_t max_iters, double tol) {
  at::Tensor out = w.clone(at::MemoryFormat::Contiguous);
  prox24_inplace_cpu(out, lam, max_iters, tol);
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("prox24", &prox24_cpu);
  m.impl("prox24_", &prox24_inplace_cpu);
  m.impl("compress24", &compress24_cpu);
  m.impl("decompress24", &decompress24_cpu);
  m.impl("prune24", &prune24_cpu);
  m.impl("sparse24_linear", &sparse24_linear_cpu);
}

}  // namespace pysparse::aten
