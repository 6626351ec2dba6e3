// Which implementation a CUDA op call actually ran ("route"), so benchmarks and tests can say what
// they measured instead of assuming it: the calling thread's last route per op family, and
// process-wide counters per route. Also the strict switch that turns an unexpected cuSPARSELt
// fallback into an error. Plain C++ (no torch): module.cpp exposes it in every build.
#pragma once

#include <cstdint>

namespace pysparse::routes {

enum class Family : int { Linear = 0, Ffn = 1, kCount = 2 };

enum class Route : int {
  None = 0,
  Gemv,            // sparse24_linear: our 2:4 GEMV kernel (M <= 16)
  Cusparselt,      // sparse24_linear: cuSPARSELt
  Cublas,          // sparse24_linear: decompress + cuBLAS because cuSPARSELt does not apply
                   // (fp32: its 50% pattern is 1:2; N or K not a multiple of 16)
  CublasFallback,  // sparse24_linear: cuSPARSELt applied but failed or is unavailable
  FfnKernel,       // FFN ops: the sparse CUDA kernels (<= 8 rows)
  FfnDense,        // FFN ops: torch's dense kernels (more rows, or d_model % 4 != 0)
  kCount,
};

const char* name(Route r);
void record(Family f, Route r);
Route last(Family f);  // on the calling thread; None before any call
std::int64_t count(Route r);
void reset_counts();

// True when PYSPARSE_STRICT_CUSPARSELT is set to anything but "", "0", "false" or "off" (read on
// each call, so tests can switch it): a sparse24_linear call that cuSPARSELt should run and
// cannot then raises instead of falling back to decompress + cuBLAS.
bool strict_cusparselt();

// Batch-invariant mode: while on, every CPU op a decode step runs computes each row of x with the
// same arithmetic whatever the other rows are and however many (the route one row alone takes,
// over row chunks of at most its rows; no switch to torch's GEMM or the AMX tiles by batch size,
// no FFN route chosen by how many neurons fire across rows). The serving scheduler turns it on
// for its batched decode steps, so that a request's greedy tokens do not depend on what else is
// served. One row alone runs the same routes either way. Process-wide; starts on when
// PYSPARSE_BATCH_INVARIANT is set to anything but "", "0", "false" or "off".
bool batch_invariant();
void set_batch_invariant(bool on);

}  // namespace pysparse::routes
