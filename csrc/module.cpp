// The Python module pysparse._C. Loading it registers every op (static initialisers in the
// TORCH_LIBRARY blocks); the functions here only describe the build and the machine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "aten/routes.h"
#include "core/kernel_trace.h"
#include "core/launch_rules.h"
#include "core/qlinear.h"
#include "core/sparse24.h"
#include "core/sparse_ffn.h"
#ifdef PYSPARSE_WITH_CUDA
#include "aten/cuda_linear.h"
#include "cuda/sparse24_cuda.h"
#endif

namespace py = pybind11;

#ifndef PYSPARSE_VERSION
#define PYSPARSE_VERSION "unknown"
#endif
#ifndef PYSPARSE_TORCH_VERSION
#define PYSPARSE_TORCH_VERSION "unknown"
#endif
#ifndef PYSPARSE_CUDA_ARCHS
#define PYSPARSE_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "pysparse compiled kernels (ops are registered under torch.ops.pysparse)";

  m.def("build_info", []() {
    py::dict d;
    d["version"] = PYSPARSE_VERSION;
    d["torch_version"] = PYSPARSE_TORCH_VERSION;
#ifdef _OPENMP
    d["openmp"] = true;
#else
    d["openmp"] = false;
#endif
#ifdef PYSPARSE_WITH_CUDA
    d["cuda"] = true;
    d["cuda_archs"] = PYSPARSE_CUDA_ARCHS;
    d["cusparselt_header_version"] = pysparse::cuda::cslt_header_version();
    d["cuda_gemv_max_rows"] = pysparse::cuda::kGemvMaxRows;
#else
    d["cuda"] = false;
#endif
    return d;
  }, "How this extension was built (torch it was built against, CUDA, cuSPARSELt).");

  m.def("cpu_info", []() {
    const auto f = pysparse::core::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512_bf16"] = f.avx512bf16;
    d["avx512_vbmi"] = f.avx512vbmi;
    d["avx512_vnni"] = f.avx512vnni;
    d["linear_impl"] = pysparse::core::sparse24_linear_impl();
    d["gemv_max_rows"] = pysparse::core::sparse24_gemv_max_rows();
    d["bf16_amx"] = pysparse::core::sparse24_bf16_amx();
    d["bf16_dot"] = pysparse::core::sparse24_bf16_dot();
    d["amx_min_rows"] = pysparse::core::kAmxMinRows;
    d["ffn_impl"] = pysparse::core::sparse_ffn_impl();
    d["int8_impl"] = pysparse::core::int8_linear_impl();
    d["int4_impl"] = pysparse::core::int4_linear_impl();
    return d;
  }, "CPU features seen at run time and the 2:4 linear kernel that will be used.");

  m.def("kernel_stats", [](bool reset) {
    namespace core = pysparse::core;
    py::dict out;
    for (int i = 0; i < static_cast<int>(core::Route::kCount); ++i) {
      const auto r = static_cast<core::Route>(i);
      const core::RouteStats s = core::route_stats(r);
      if (s.calls == 0) continue;
      py::dict d;
      d["calls"] = s.calls;
      d["threads_requested"] = s.threads_requested;
      d["threads_used"] = s.threads_used;
      d["one_cpu_calls"] = s.one_cpu_calls;
      d["min_allowed_cpus"] = s.min_allowed_cpus;
      out[core::route_name(r)] = d;
    }
    if (reset) core::reset_route_stats();
    return out;
  }, py::arg("reset") = false,
     "Per CPU route since the last reset: calls, threads asked for and threads that ran part of "
     "each parallel region (summed over calls), calls whose threads all shared one CPU, and the "
     "smallest CPU affinity any team thread had (csrc/core/kernel_trace.h).");

  m.def("pin_threads", [](int nthreads) { return pysparse::core::pin_team_threads(nthreads); },
        py::arg("nthreads"),
        "Pins an OpenMP team of `nthreads` (this thread + pool threads) one per allowed CPU; "
        "returns the CPU of each thread, or [] when it cannot.");

  m.def("cusparselt_info", [](int device) {
    py::dict d;
#ifdef PYSPARSE_WITH_CUDA
    const auto info = pysparse::cuda::cslt_info(device);
    d["available"] = info.available;
    d["version"] = info.version;
    d["status"] = info.available ? std::string("ok")
                                 : std::string(pysparse::cuda::cslt_error_string(info.status));
#else
    (void)device;
    d["available"] = false;
    d["version"] = 0;
    d["status"] = "pysparse was built without CUDA";
#endif
    return d;
  }, py::arg("device") = 0,
     "Whether cuSPARSELt can be initialised on `device` (it cannot without a GPU: reported, never fatal).");

  // ---- what ran: the route each CUDA op call took (csrc/aten/routes.h) --------------------------
  m.def("last_cuda_route", [](const std::string& op) {
    namespace r = pysparse::routes;
    if (op == "sparse24_linear") return std::string(r::name(r::last(r::Family::Linear)));
    if (op == "sparse_ffn") return std::string(r::name(r::last(r::Family::Ffn)));
    throw py::value_error("last_cuda_route: op must be 'sparse24_linear' or 'sparse_ffn' (the four "
                          "FFN ops share one), got '" + op + "'");
  }, py::arg("op") = "sparse24_linear",
     "The route the calling thread's last CUDA call of `op` took ('none' before any): for "
     "sparse24_linear 'gemv', 'cusparselt', 'cublas' (cuSPARSELt does not apply: fp32 or N/K not "
     "multiples of 16) or 'cublas_fallback' (cuSPARSELt applied and failed); for the FFN ops "
     "'ffn_kernel' or 'ffn_dense'.");
  m.def("cuda_route_counts", []() {
    namespace r = pysparse::routes;
    py::dict d;
    for (int i = 1; i < static_cast<int>(r::Route::kCount); ++i)
      d[r::name(static_cast<r::Route>(i))] = r::count(static_cast<r::Route>(i));
    return d;
  }, "Process-wide number of CUDA op calls per route since the start (or the last reset).");
  m.def("reset_cuda_route_counts", []() { pysparse::routes::reset_counts(); });
  m.def("batch_invariant", []() { return pysparse::routes::batch_invariant(); },
        "Whether batch-invariant mode is on (pysparse.kernels.batch_invariant).");
  m.def("set_batch_invariant", [](bool on) { pysparse::routes::set_batch_invariant(on); },
        py::arg("on"),
        "Turns batch-invariant mode on or off, process-wide: while on, each row of a CPU op's x is "
        "computed the same whatever the other rows (pysparse.kernels.batch_invariant).");
  m.def("strict_cusparselt", []() { return pysparse::routes::strict_cusparselt(); },
        "Whether PYSPARSE_STRICT_CUSPARSELT is set: a failed cuSPARSELt call then raises instead of "
        "falling back to decompress + cuBLAS.");
  m.def("cusparselt_cache_info", []() {
    py::dict d;
#ifdef PYSPARSE_WITH_CUDA
    const auto s = pysparse::cuda::cslt_stats();
    d["plans_cached"] = s.plans_cached;
    d["plans_built"] = s.plans_built;
    d["searches_run"] = s.searches_run;
    d["weights"] = pysparse::aten::cusparselt_cached_weights();
    d["bytes"] = pysparse::aten::cusparselt_cached_bytes();
#else
    for (const char* k : {"plans_cached", "plans_built", "searches_run", "weights", "bytes"}) d[k] = 0;
#endif
    return d;
  }, "cuSPARSELt plans (cached now, built and searched since the start) and the compressed weight "
     "buffers alive now (each is freed with its weight).");

  // ---- host-side launch rules (csrc/core/launch_rules.h), exposed so CPU tests check them -------
  m.def("_is_aligned", [](std::uintptr_t address, std::size_t bytes) {
    return pysparse::core::is_aligned(address, bytes);
  });
  m.def("_vec4_bytes", [](int elem_size) { return pysparse::core::vec4_bytes(elem_size); });
  m.def("_cusparselt_rows", [](std::int64_t M) { return pysparse::core::cusparselt_rows(M); });
}
