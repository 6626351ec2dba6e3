// See routes.h.
#include "routes.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <strings.h>

namespace pysparse::routes {
namespace {

constexpr int kRoutes = static_cast<int>(Route::kCount);
constexpr int kFamilies = static_cast<int>(Family::kCount);

std::atomic<std::int64_t> g_counts[kRoutes];
thread_local Route t_last[kFamilies] = {};

}  // namespace

const char* name(Route r) {
  switch (r) {
    case Route::Gemv: return "gemv";
    case Route::Cusparselt: return "cusparselt";
    case Route::Cublas: return "cublas";
    case Route::CublasFallback: return "cublas_fallback";
    case Route::FfnKernel: return "ffn_kernel";
    case Route::FfnDense: return "ffn_dense";
    default: return "none";
  }
}

void record(Family f, Route r) {
  t_last[static_cast<int>(f)] = r;
  g_counts[static_cast<int>(r)].fetch_add(1, std::memory_order_relaxed);
}

Route last(Family f) { return t_last[static_cast<int>(f)]; }

std::int64_t count(Route r) { return g_counts[static_cast<int>(r)].load(std::memory_order_relaxed); }

void reset_counts() {
  for (auto& c : g_counts) c.store(0, std::memory_order_relaxed);
}

namespace {
bool env_on(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return false;
  return std::strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0 && strcasecmp(v, "off") != 0;
}
std::atomic<bool> g_batch_invariant{env_on("PYSPARSE_BATCH_INVARIANT")};
}  // namespace

bool strict_cusparselt() { return env_on("PYSPARSE_STRICT_CUSPARSELT"); }

bool batch_invariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

void set_batch_invariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }

}  // namespace pysparse::routes
