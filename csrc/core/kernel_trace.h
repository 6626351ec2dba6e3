// What the CPU kernels really did, counted per route: calls, the threads each parallel region
// asked for, the threads that executed part of it, how many CPUs those threads ran on, and the
// smallest CPU set any of them was allowed to run on. These are the observables that tell a
// kernel running at its designed width from one that silently runs narrower — fewer threads than
// asked (nested or exhausted OpenMP teams), or all of a team's threads sharing one CPU (an
// inherited one-CPU affinity mask) — which a timing alone cannot tell from a slow machine.
//
// Cost: one sched_getcpu (vDSO) per thread per region, plus four relaxed atomic adds per call
// (the affinity is read once per thread and cached). Counters are process-wide.
#pragma once

#include <cstdint>
#include <vector>

namespace pysparse::core {

enum class Route : int {
  kGemvAvx512 = 0,  // 2:4 GEMV (linear, and the FFN's 2:4 gate), AVX-512 build
  kGemvAvx2,        // the same, AVX2 build
  kGemmAvx512,      // 2:4 GEMM (many rows of x), AVX-512 build
  kGemmAvx2,        // the same, AVX2 build
  kLinearScalar,    // portable fallback
  kLinearAmx,       // bf16 2:4 linear on the AMX tiles
  kLinearDense,     // chunked decompression + torch's GEMM (threads are torch's; not traced)
  kFfnGate,         // activation-sparse FFN: dense gate pass
  kFfnTail,         // activation-sparse FFN: up rows of the active neurons + down
  kDenseGemv,       // dense GEMV of a few rows of x (dense_gemv: the lm_head, dense linears)
  kAttention,       // decode attention over the KV cache (attention.h)
  kInt8Linear,      // int8 weight-only linears, dense and 2:4 (qlinear.h)
  kCount
};

const char* route_name(Route r);

struct RouteStats {
  uint64_t calls = 0;
  uint64_t threads_requested = 0;  // summed over calls
  uint64_t threads_used = 0;       // summed over calls: threads that ran part of the region
  uint64_t one_cpu_calls = 0;      // calls with >= 2 threads whose threads all ran on one CPU
  int min_allowed_cpus = 0;        // the smallest affinity mask seen in a team (0: none seen)
};

RouteStats route_stats(Route r);
void reset_route_stats();

// Pins the threads of an OpenMP team of `nthreads` (the calling thread is thread 0) one per CPU of
// the calling thread's affinity mask, in order; OpenMP reuses the same pool threads for later
// regions of that size (torch's among them), so they stay apart. Returns the CPUs the team's
// threads are now pinned to (thread t -> result[t]); empty when not possible (fewer allowed CPUs
// than threads, or no OpenMP).
std::vector<int> pin_team_threads(int nthreads);

// One per parallel region, on the caller's stack: construct with the team size asked for, call
// mark() from every thread inside the region, finish() after it.
class RegionTrace {
 public:
  static constexpr int kMaxThreads = 256;
  explicit RegionTrace(int requested);
  void mark();
  void finish(Route r) const;

 private:
  int requested_;
  int cpu_[kMaxThreads];
  int allowed_[kMaxThreads];
};

}  // namespace pysparse::core
