// cuSPARSELt for the large-M 2:4 GEMM (prefill / batched), bf16 and fp16.
//
// Layout (no transposes needed): the weight is the structured operand A, [N, K] row-major, op N,
// so its 2:4 groups run along K; x is B, [M, K] row-major with op T; y is C/D described as a
// column-major [N, M] matrix with ld N, which is exactly row-major y[M, N].
// The compressed weight is made with the plan-free Compress2 API so one buffer serves every M;
// plans depend on M and are cached per (device, dtype, M, N, K) under a mutex, LRU-bounded. The
// glue asks for bucketed M (core::cusparselt_rows), so varying prefill lengths share plans. Each
// plan's algorithm is chosen once, by cusparseLtMatmulSearch on the first problem that uses it
// (cslt_search); later calls run the chosen algorithm without searching again.
// fp32 is not offered: cuSPARSELt's 50% pattern for fp32 is 1:2, which a 2:4 mask does not meet.
// Plain C++ (cuda_runtime + cusparseLt headers only): compiles in seconds.
#include <cuda_runtime.h>
#include <cusparseLt.h>

#include <list>
#include <map>
#include <mutex>
#include <tuple>

#include "sparse24_cuda.h"

namespace pysparse::cuda {
namespace {

constexpr uint32_t kAlign = 16;
constexpr size_t kMaxPlans = 256;  // a few hundred bytes of host state each

cudaDataType to_cuda(DType d) { return d == DType::F16 ? CUDA_R_16F : CUDA_R_16BF; }

struct DeviceGuard {
  int prev = -1;
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev);
    if (prev != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int cur = -1;
    cudaGetDevice(&cur);
    if (prev >= 0 && cur != prev) cudaSetDevice(prev);
  }
};

struct Plan {
  cusparseLtMatDescriptor_t a, b, c;
  cusparseLtMatmulDescriptor_t mm;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0;
  bool searched = false;  // cusparseLtMatmulSearch has run (or failed and was not retried)
};

using Key = std::tuple<int, int, int64_t, int64_t, int64_t>;

struct State {
  std::mutex mu;
  std::map<int, cusparseLtHandle_t> handles;
  std::map<int, int> failed;  // device -> status of the failed init
  std::map<Key, Plan*> plans;
  std::list<Key> lru;  // front = most recent
  int64_t plans_built = 0, searches_run = 0;
};

State& state() {
  static State* s = new State();  // never destroyed: the driver may be gone at exit
  return *s;
}

// Returns the handle for `device`, creating it once; status != 0 when cuSPARSELt is unusable.
int handle_for(int device, cusparseLtHandle_t** out) {
  State& st = state();
  auto it = st.handles.find(device);
  if (it != st.handles.end()) {
    *out = &it->second;
    return 0;
  }
  auto bad = st.failed.find(device);
  if (bad != st.failed.end()) return bad->second;
  DeviceGuard g(device);
  // Initialised in place: the handle is opaque and is never copied.
  cusparseLtHandle_t& h = st.handles[device];
  const cusparseStatus_t s = cusparseLtInit(&h);
  if (s != CUSPARSE_STATUS_SUCCESS) {
    st.handles.erase(device);
    st.failed[device] = static_cast<int>(s);
    return static_cast<int>(s);
  }
  *out = &h;
  return 0;
}

void destroy_plan(Plan* p) {
  cusparseLtMatmulPlanDestroy(&p->plan);
  cusparseLtMatmulAlgSelectionDestroy(&p->alg);
  cusparseLtMatDescriptorDestroy(&p->a);
  cusparseLtMatDescriptorDestroy(&p->b);
  cusparseLtMatDescriptorDestroy(&p->c);
  delete p;
}

#define PS_CSLT(expr)                                              \
  do {                                                             \
    const cusparseStatus_t _s = (expr);                            \
    if (_s != CUSPARSE_STATUS_SUCCESS) return static_cast<int>(_s); \
  } while (0)

int init_structured(cusparseLtHandle_t* h, cusparseLtMatDescriptor_t* d, DType dtype, int64_t N,
                    int64_t K) {
  PS_CSLT(cusparseLtStructuredDescriptorInit(h, d, N, K, K, kAlign, to_cuda(dtype),
                                             CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT));
  return 0;
}

// Builds every piece of a plan; on failure destroys what was made (no leaked descriptors).
int build_plan(cusparseLtHandle_t* h, DType dtype, int64_t M, int64_t N, int64_t K, Plan* p) {
  int made = 0;  // 1: a, 2: +b, 3: +c, 4: +alg, 5: +plan
  auto fail = [&](cusparseStatus_t st) {
    if (made >= 5) cusparseLtMatmulPlanDestroy(&p->plan);
    if (made >= 4) cusparseLtMatmulAlgSelectionDestroy(&p->alg);
    if (made >= 3) cusparseLtMatDescriptorDestroy(&p->c);
    if (made >= 2) cusparseLtMatDescriptorDestroy(&p->b);
    if (made >= 1) cusparseLtMatDescriptorDestroy(&p->a);
    return static_cast<int>(st);
  };
  cusparseStatus_t st = cusparseLtStructuredDescriptorInit(
      h, &p->a, N, K, K, kAlign, to_cuda(dtype), CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  made = 1;
  st = cusparseLtDenseDescriptorInit(h, &p->b, M, K, K, kAlign, to_cuda(dtype), CUSPARSE_ORDER_ROW);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  made = 2;
  st = cusparseLtDenseDescriptorInit(h, &p->c, N, M, N, kAlign, to_cuda(dtype), CUSPARSE_ORDER_COL);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  made = 3;
  st = cusparseLtMatmulDescriptorInit(h, &p->mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                      CUSPARSE_OPERATION_TRANSPOSE, &p->a, &p->b, &p->c, &p->c,
                                      CUSPARSE_COMPUTE_32F);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  st = cusparseLtMatmulAlgSelectionInit(h, &p->alg, &p->mm, CUSPARSELT_MATMUL_ALG_DEFAULT);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  made = 4;
  st = cusparseLtMatmulPlanInit(h, &p->plan, &p->mm, &p->alg);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  made = 5;
  st = cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace);
  if (st != CUSPARSE_STATUS_SUCCESS) return fail(st);
  return 0;
}

// Looks up or builds the plan; caller holds the mutex.
int plan_for(int device, DType dtype, int64_t M, int64_t N, int64_t K, cusparseLtHandle_t** h,
             Plan** out) {
  State& st = state();
  if (int s = handle_for(device, h)) return s;
  const Key key{device, static_cast<int>(dtype), M, N, K};
  auto it = st.plans.find(key);
  if (it != st.plans.end()) {
    st.lru.remove(key);
    st.lru.push_front(key);
    *out = it->second;
    return 0;
  }
  DeviceGuard g(device);
  Plan* p = new Plan();
  if (int s = build_plan(*h, dtype, M, N, K, p)) {
    delete p;
    return s;
  }
  ++st.plans_built;
  if (st.plans.size() >= kMaxPlans) {
    const Key old = st.lru.back();
    st.lru.pop_back();
    destroy_plan(st.plans[old]);
    st.plans.erase(old);
  }
  st.plans[key] = p;
  st.lru.push_front(key);
  *out = p;
  return 0;
}

}  // namespace

CsltInfo cslt_info(int device) {
  CsltInfo info;
  std::lock_guard<std::mutex> lock(state().mu);
  cusparseLtHandle_t* h = nullptr;
  info.status = handle_for(device, &h);
  info.available = info.status == 0;
  if (info.available) cusparseLtGetVersion(h, &info.version);
  return info;
}

int cslt_header_version() { return CUSPARSELT_VERSION; }

int cslt_compressed_size(int device, DType dtype, int64_t N, int64_t K, size_t* size,
                         size_t* buffer_size) {
  std::lock_guard<std::mutex> lock(state().mu);
  cusparseLtHandle_t* h = nullptr;
  if (int s = handle_for(device, &h)) return s;
  DeviceGuard g(device);
  cusparseLtMatDescriptor_t a;
  if (int s = init_structured(h, &a, dtype, N, K)) return s;
  const cusparseStatus_t s = cusparseLtSpMMACompressedSize2(h, &a, size, buffer_size);
  cusparseLtMatDescriptorDestroy(&a);
  return static_cast<int>(s);
}

int cslt_compress(int device, DType dtype, const void* dense, int64_t N, int64_t K, void* out,
                  void* tmp, void* stream) {
  std::lock_guard<std::mutex> lock(state().mu);
  cusparseLtHandle_t* h = nullptr;
  if (int s = handle_for(device, &h)) return s;
  DeviceGuard g(device);
  cusparseLtMatDescriptor_t a;
  if (int s = init_structured(h, &a, dtype, N, K)) return s;
  const cusparseStatus_t s =
      cusparseLtSpMMACompress2(h, &a, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, dense, out, tmp,
                               static_cast<cudaStream_t>(stream));
  cusparseLtMatDescriptorDestroy(&a);
  return static_cast<int>(s);
}

int cslt_plan(int device, DType dtype, int64_t M, int64_t N, int64_t K, size_t* workspace,
              bool* searched) {
  std::lock_guard<std::mutex> lock(state().mu);
  cusparseLtHandle_t* h = nullptr;
  Plan* p = nullptr;
  if (int s = plan_for(device, dtype, M, N, K, &h, &p)) return s;
  *workspace = p->workspace;
  *searched = p->searched;
  return 0;
}

int cslt_search(int device, DType dtype, const void* compressed, const void* x, int64_t M,
                int64_t N, int64_t K, void* scratch, void* workspace, size_t workspace_size,
                void* stream) {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  cusparseLtHandle_t* h = nullptr;
  Plan* p = nullptr;
  if (int s = plan_for(device, dtype, M, N, K, &h, &p)) return s;
  if (p->searched) return 0;  // another caller searched it first
  if (p->workspace > workspace_size) return static_cast<int>(CUSPARSE_STATUS_INSUFFICIENT_RESOURCES);
  DeviceGuard g(device);
  const float alpha = 1.f, beta = 0.f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // The search runs the product several times per candidate: C = D = scratch with beta 0, so no
  // caller's output (or a bias pre-filled in it) is read or accumulated into.
  cusparseStatus_t status = cusparseLtMatmulSearch(h, &p->plan, &alpha, compressed, x, &beta,
                                                   scratch, scratch, workspace, &s, 1);
  ++st.searches_run;
  p->searched = true;  // not retried on failure: every call would pay for it again
  if (status == CUSPARSE_STATUS_SUCCESS) {
    // The chosen algorithm (split-K included) can need a different workspace.
    status = cusparseLtMatmulGetWorkspace(h, &p->plan, &p->workspace);
    if (status == CUSPARSE_STATUS_SUCCESS) return 0;
  }
  // A failed search leaves the plan in an unknown state: rebuild it with the default algorithm,
  // which keeps working, and report the failure so the caller can say so (or refuse, if strict).
  Plan* fresh = new Plan();
  if (build_plan(h, dtype, M, N, K, fresh) == 0) {
    fresh->searched = true;
    destroy_plan(p);
    st.plans[Key{device, static_cast<int>(dtype), M, N, K}] = fresh;
  } else {
    delete fresh;
  }
  return static_cast<int>(status);
}

int cslt_matmul(int device, DType dtype, const void* compressed, const void* x, int64_t M,
                int64_t N, int64_t K, float beta, void* y, void* workspace, size_t workspace_size,
                void* stream) {
  std::lock_guard<std::mutex> lock(state().mu);
  cusparseLtHandle_t* h = nullptr;
  Plan* p = nullptr;
  if (int s = plan_for(device, dtype, M, N, K, &h, &p)) return s;
  // The plan may have been evicted and rebuilt since the caller sized the workspace.
  if (p->workspace > workspace_size) return static_cast<int>(CUSPARSE_STATUS_INSUFFICIENT_RESOURCES);
  DeviceGuard g(device);
  const float alpha = 1.f;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return static_cast<int>(
      cusparseLtMatmul(h, &p->plan, &alpha, compressed, x, &beta, y, y, workspace, &s, 1));
}

CsltStats cslt_stats() {
  State& st = state();
  std::lock_guard<std::mutex> lock(st.mu);
  CsltStats out;
  out.plans_cached = static_cast<int64_t>(st.plans.size());
  out.plans_built = st.plans_built;
  out.searches_run = st.searches_run;
  return out;
}

const char* cslt_error_string(int status) {
  return cusparseLtGetErrorString(static_cast<cusparseStatus_t>(status));
}

}  // namespace pysparse::cuda
