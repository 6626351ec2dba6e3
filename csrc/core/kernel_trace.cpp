// Counters behind kernel_trace.h.
#include "kernel_trace.h"

#include <sched.h>

#include <algorithm>
#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pysparse::core {
namespace {

constexpr int kRoutes = static_cast<int>(Route::kCount);

struct Counters {
  std::atomic<uint64_t> calls{0}, requested{0}, used{0}, one_cpu{0};
  std::atomic<int> min_allowed{0};
};

Counters& counters(Route r) {
  static Counters c[kRoutes];
  return c[static_cast<int>(r)];
}

// The CPUs this thread may run on; read once per thread (an affinity change after a thread's
// first kernel region is not seen).
int allowed_cpus() {
  thread_local int n = [] {
    cpu_set_t set;
    CPU_ZERO(&set);
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 0;
  }();
  return n;
}

}  // namespace

const char* route_name(Route r) {
  switch (r) {
    case Route::kGemvAvx512: return "gemv_avx512";
    case Route::kGemvAvx2: return "gemv_avx2";
    case Route::kGemmAvx512: return "gemm_avx512";
    case Route::kGemmAvx2: return "gemm_avx2";
    case Route::kLinearScalar: return "linear_scalar";
    case Route::kLinearAmx: return "linear_amx";
    case Route::kLinearDense: return "linear_dense_chunks";
    case Route::kFfnGate: return "ffn_gate";
    case Route::kFfnTail: return "ffn_tail";
    case Route::kDenseGemv: return "dense_gemv";
    case Route::kAttention: return "attention";
    case Route::kInt8Linear: return "int8_linear";
    case Route::kCount: break;
  }
  return "?";
}

RouteStats route_stats(Route r) {
  const Counters& c = counters(r);
  RouteStats s;
  s.calls = c.calls.load(std::memory_order_relaxed);
  s.threads_requested = c.requested.load(std::memory_order_relaxed);
  s.threads_used = c.used.load(std::memory_order_relaxed);
  s.one_cpu_calls = c.one_cpu.load(std::memory_order_relaxed);
  s.min_allowed_cpus = c.min_allowed.load(std::memory_order_relaxed);
  return s;
}

void reset_route_stats() {
  for (int i = 0; i < kRoutes; ++i) {
    Counters& c = counters(static_cast<Route>(i));
    c.calls = 0;
    c.requested = 0;
    c.used = 0;
    c.one_cpu = 0;
    c.min_allowed = 0;
  }
}

std::vector<int> pin_team_threads(int nthreads) {
#ifdef _OPENMP
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (nthreads < 1 || sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return {};
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  if (static_cast<int>(cpus.size()) < nthreads) return {};
  std::vector<int> pinned(nthreads, -1);
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num();
    if (t < nthreads) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpus[t], &one);
      if (sched_setaffinity(0, sizeof(one), &one) == 0) pinned[t] = cpus[t];
    }
  }
  for (int c : pinned)
    if (c < 0) return {};
  return pinned;
#else
  (void)nthreads;
  return {};
#endif
}

RegionTrace::RegionTrace(int requested) : requested_(std::clamp(requested, 1, kMaxThreads)) {
  std::fill(cpu_, cpu_ + requested_, -1);
}

void RegionTrace::mark() {
#ifdef _OPENMP
  const int t = omp_get_thread_num();
#else
  const int t = 0;
#endif
  if (t >= requested_) return;  // a larger team than asked for: counted as asked
  cpu_[t] = sched_getcpu();
  allowed_[t] = allowed_cpus();
}

void RegionTrace::finish(Route r) const {
  int used = 0, first_cpu = -1, min_allowed = 0;
  bool one_cpu = true;
  for (int t = 0; t < requested_; ++t) {
    if (cpu_[t] < 0) continue;
    ++used;
    if (first_cpu < 0) first_cpu = cpu_[t];
    one_cpu &= cpu_[t] == first_cpu;
    min_allowed = min_allowed == 0 ? allowed_[t] : std::min(min_allowed, allowed_[t]);
  }
  Counters& c = counters(r);
  c.calls.fetch_add(1, std::memory_order_relaxed);
  c.requested.fetch_add(requested_, std::memory_order_relaxed);
  c.used.fetch_add(used, std::memory_order_relaxed);
  if (used >= 2 && one_cpu) c.one_cpu.fetch_add(1, std::memory_order_relaxed);
  int seen = c.min_allowed.load(std::memory_order_relaxed);
  while (min_allowed > 0 && (seen == 0 || min_allowed < seen) &&
         !c.min_allowed.compare_exchange_weak(seen, min_allowed, std::memory_order_relaxed)) {
  }
}

}  // namespace pysparse::core
