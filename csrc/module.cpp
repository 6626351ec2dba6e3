// The Python module pysparse._C. Loading it registers every op (static initialisers in the
// TORCH_LIBRARY blocks); the functions here only describe the build and the machine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/kernel_trace.h"
#include "core/sparse24.h"
#include "core/sparse_ffn.h"
#ifdef PYSPARSE_WITH_CUDA
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
    d["linear_impl"] = pysparse::core::sparse24_linear_impl();
    d["gemv_max_rows"] = pysparse::core::sparse24_gemv_max_rows();
    d["bf16_amx"] = pysparse::core::sparse24_bf16_amx();
    d["amx_min_rows"] = pysparse::core::kAmxMinRows;
    d["ffn_impl"] = pysparse::core::sparse_ffn_impl();
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
}
