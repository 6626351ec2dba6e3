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

bool cpu_capability(const char* name) {
  const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

}  // namespace

bool bf16_matmul_has_amx() {
  static const bool amx = cpu_capability("amx_bf16");
  return amx;
}

bool bf16_matmul_native() {
  static const bool native = bf16_matmul_has_amx() || cpu_capability("avx512_bf16");
  return native;
}

at::Tensor linear_by_dense_chunks(const at::Tensor& x2, int64_t N, int64_t K, at::ScalarType wtype,
                                  const at::Tensor& b, const FillRows& fill, bool transposed) {
  const int64_t M = x2.size(0);
  // torch's GEMM runs its own threads: counted as a call of this route, threads not traced.
  core::RegionTrace(at::get_num_threads()).finish(core::Route::kLinearDense);
  const auto opts = x2.options().dtype(wtype);
  const int64_t es = static_cast<int64_t>(c10::elementSize(wtype));
  // 8 MB chunks: fewer, larger GEMM calls (each at::mm call has a fixed cost of ~0.1 ms here) and
  // still cache-resident between the fill and the GEMM. PYSPARSE_DENSE_CHUNK_KB (read per call, a
  // getenv next to a GEMM) lets tests cut W into many chunks.
  const int64_t chunk_bytes = std::max<int64_t>(1, env_int("PYSPARSE_DENSE_CHUNK_KB", 8192)) * 1024;
  const int64_t rows = std::clamp<int64_t>(chunk_bytes / std::max<int64_t>(1, K * es), 16, N);
  at::Tensor y = at::empty({M, N}, x2.options());
  thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < rows * K || scratch.scalar_type() != wtype)
    scratch = at::empty({rows * K}, opts);
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t nc = std::min(rows, N - n0);
    at::Tensor wc = transposed ? scratch.narrow(0, 0, nc * K).view({K, nc}).t()
                               : scratch.narrow(0, 0, nc * K).view({nc, K});
    fill(n0, nc, wc.data_ptr());
    // addmm fuses the bias before the single rounding to bf16 (adding it afterwards would round
    // twice, which the fp32-accumulate contract of the ops does not allow).
    at::Tensor part = b.defined() ? at::addmm(b.narrow(0, n0, nc), x2, wc.t()) : at::mm(x2, wc.t());
    if (nc == N) return part;
    y.narrow(1, n0, nc).copy_(part);
  }
  return y;
}

namespace {

// The dense route serves the regimes where torch's own GEMM wins: bf16 where torch has native
// bf16 dot products (AMX tiles or AVX512-BF16), from a few rows of x (W is decompressed in
// cache-sized chunks of rows for at::mm, and still read from memory in its packed, ~half-size
// form); small fp32 weights at many rows. Below the crossovers the 2:4 GEMV/GEMM win.
at::Tensor linear_via_dense_chunks(const at::Tensor& x2, const at::Tensor& v, const at::Tensor& m,
                                   const at::Tensor& b, int64_t N, int64_t K) {
  const int64_t mcols = core::meta_cols(K);
  const int es = static_cast<int>(v.element_size());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const uint8_t* mp = m.data_ptr<uint8_t>();
  return linear_by_dense_chunks(x2, N, K, v.scalar_type(), b, [&](int64_t n0, int64_t nc, void* dst) {
    core::decompress24(vp + n0 * (K / 2) * es, mp + n0 * mcols, nc, K, es, dst);
  });
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
  // Batch-invariant mode: the GEMV routes (each row of x on its own against W decoded once per
  // pass) over chunks of the rows they take; never the AMX tiles (bf16 from kAmxMinRows rows,
  // pairwise dot products) nor torch's GEMM.
  const bool invariant = routes::batch_invariant();
  if (invariant) {
    int64_t rows = core::sparse24_gemv_max_rows() > 0 ? core::sparse24_gemv_max_rows() : 16;
    if (v.scalar_type() == at::kBFloat16 && core::sparse24_bf16_amx())
      rows = std::min<int64_t>(rows, core::kAmxMinRows - 1);
    if (M > rows)
      return by_row_chunks(x, K, rows, [&](const at::Tensor& chunk) {
        return sparse24_linear_cpu(chunk, values, meta, bias);
      });
  }
  const int64_t ldx = M > 1 ? x2.stride(0) : K;
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  // bf16 from a few rows, where torch's bf16 GEMM has native dot products. AMX (measured with
  // bench/linear24.py, bf16, 4096x4096 and 11008x4096): with only FMA kernels, up to 16 rows the
  // 2:4 GEMV is ahead; from 64 rows this route wins (M=64: 0.60-0.65x torch vs 0.49x for the FMA
  // GEMM; M=512: 0.8-0.9x vs 0.28x). With the core's own AMX kernel (decompression into tiles,
  // from core::kAmxMinRows rows) the crossover moves to 192 rows: `bench/linear24.py --routes`,
  // tiles vs this route x torch: 4096x11008 M=64 0.88x vs 0.53x, M=128 0.65x vs 0.56x, M=160 0.60x
  // vs 0.55x, M=192 0.60x vs 0.58x, M=256 0.47x vs 0.58x; 11008x4096 M=160 0.75x vs 0.69x, M=192
  // 0.65x vs 0.70x; 4096x4096 M=160 0.62x vs 0.64x (the tile kernel decompresses W once per 32
  // rows of x, this route once per call). AVX512-BF16 without AMX (AMD EPYC, 2 threads; 2:4 FMA
  // kernels vs decompression + torch, x torch dense): M=16 0.71-1.33x vs 0.64-0.75x, M=24
  // 0.28-0.78x vs 0.58-0.77x, M=64 0.34-0.89x vs 0.70-0.87x, M=512 (SmolLM2's 576x576, 1536x576,
  // 576x1536) 0.33-0.47x vs 0.95-1.0x: from 17 rows.
  // PYSPARSE_BF16_DENSE_MIN_ROWS overrides it (read per call, so tests can take either route).
  const int64_t bf16_min_rows =
      env_int("PYSPARSE_BF16_DENSE_MIN_ROWS", core::sparse24_bf16_amx() ? 192 : 17);
  if (!invariant && v.scalar_type() == at::kBFloat16 && M >= bf16_min_rows && bf16_matmul_native())
    return linear_via_dense_chunks(x2, v, m, b, N, K).view(linear_out_shape(x, N));
  // fp32, small weights (MiniLM-sized, <= 1M elements), many rows: the decompressed weight fits in
  // L2 and MKL's GEMM beats ours there (bench, 1536x384 M=512: 0.83x torch vs 0.59x; 384x1536:
  // 0.90x vs 0.65x; at 64-128 rows ours is ahead or even). Overridable like the bf16 crossover.
  const int64_t f32_dense_max = env_int("PYSPARSE_F32_DENSE_MAX_WEIGHTS", int64_t(1) << 20);
  const int64_t f32_dense_min_rows = env_int("PYSPARSE_F32_DENSE_MIN_ROWS", 256);
  if (!invariant && v.scalar_type() == at::kFloat && N * K <= f32_dense_max && M >= f32_dense_min_rows)
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
