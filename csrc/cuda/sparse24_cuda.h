// Plain-C++ interface to the CUDA kernels (no torch headers on either side, so the .cu files
// compile in seconds). All launchers are asynchronous on `stream` and return a cudaError_t as int
// (0 = success); the ATen glue turns a failure into a Python error.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pysparse::cuda {

// dtype codes shared with the glue.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

// Packed layout as on the CPU (see csrc/core/sparse24.h). `bad_group` (device int64, preset to
// INT64_MAX by the caller) receives the lowest flat group index (row * K/4 + group) that has more
// than two nonzeros; nothing is written for such a row.
int compress24(const void* dense, int64_t N, int64_t K, int elem_size, void* values, uint8_t* meta,
               int64_t* bad_group, void* stream);
int decompress24(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                 void* dense, void* stream);
int prune24(const void* w, const float* score, int64_t N, int64_t K, int elem_size, void* out,
            void* stream);

// The ProxSparse proximal operator in place on `groups` contiguous groups of 4 (see
// csrc/core/prox24_group.h); fp32 weights must be 16-byte aligned (one float4 per group).
int prox24(DType dtype, void* w, int64_t groups, double lam, int max_iters, double tol,
           void* stream);

// Hand-written 2:4 GEMV/skinny GEMM, y[M,N] = x[M,K] W^T (+ bias), for M <= kGemvMaxRows.
// fp32 or bf16 (x, W, bias, y share the dtype); fp32 accumulation.
constexpr int kGemvMaxRows = 16;
int sparse24_gemv(DType dtype, const void* x, int64_t M, const void* values, const uint8_t* meta,
                  int64_t N, int64_t K, const void* bias, void* y, void* stream);

// ---- activation-sparse FFN (csrc/cuda/sparse_ffn.cu; layouts as in csrc/core/sparse_ffn.h) ----
constexpr int kFfnMaxRows = 8;
struct FfnLaunch {
  DType dtype = DType::F32;  // of the weights, biases and y
  int64_t M = 0, D = 0, F = 0;  // M <= kFfnMaxRows, D % 4 == 0 (2:4 down: F % 4 == 0)
  const float* x = nullptr;     // [M, D] fp32 contiguous
  const void* gate_values = nullptr;  // plain FFN: w1
  const uint8_t* gate_meta = nullptr;  // null: dense
  const void* gate_bias = nullptr;     // plain FFN: b1
  const void* up_values = nullptr;     // null: plain FFN
  const uint8_t* up_meta = nullptr;
  const void* down_values = nullptr;   // W_down^T [F, D], or [F/4, 2, D] when down_meta is set
  const uint8_t* down_meta = nullptr;
  bool down_by_row = false;            // down_meta set: W_down^T packed 2:4 along D (compress24)
  const void* down_bias = nullptr;
  float threshold = 0.f;
  // Activation predictors: [M, F] bytes (nonzero: compute neuron f for row m) or null (exact). A
  // neuron predicted for no row is not read at all; h[m][f] is 0 where not predicted.
  const uint8_t* predicted = nullptr;
  float* h = nullptr;        // scratch, M * F floats
  float* partial = nullptr;  // scratch, ffn_down_chunks(F) * M * D floats
  void* y = nullptr;         // [M, D]
};
int64_t ffn_down_chunks(int64_t F);
// The kernels load 4 elements at once (float4 / uint2) from x and partial (fp32, 16 bytes), the
// dense gate/up rows and the dense or neuron-group down rows (4 weights): whether every such
// operand starts at a multiple of that size. sparse_ffn returns cudaErrorMisalignedAddress if not.
bool ffn_vector_operands_aligned(const FfnLaunch& args);
int sparse_ffn(const FfnLaunch& args, void* stream);

// ---- cuSPARSELt (bf16/fp16 only: for fp32 its 50% pattern is 1:2, not 2:4) -------------------
struct CsltInfo {
  bool available = false;  // a handle could be created (needs a GPU)
  int version = 0;         // library version as major*1000 + minor*100 + patch
  int status = 0;          // cusparseStatus_t of the failed init when !available
};
CsltInfo cslt_info(int device);
int cslt_header_version();

// Size in bytes of the compressed form of a dense [N, K] row-major structured matrix.
int cslt_compressed_size(int device, DType dtype, int64_t N, int64_t K, size_t* size,
                         size_t* buffer_size);
// dense: [N, K] row-major 2:4 along K. out: cslt_compressed_size bytes; tmp: buffer_size bytes.
int cslt_compress(int device, DType dtype, const void* dense, int64_t N, int64_t K, void* out,
                  void* tmp, void* stream);
// Looks up or builds the plan for this problem (cached per device/dtype/M/N/K; pass M bucketed by
// core::cusparselt_rows so prefill lengths share plans): the workspace cslt_matmul needs, and
// whether its algorithm has been searched yet. If not, call cslt_search once before cslt_matmul.
int cslt_plan(int device, DType dtype, int64_t M, int64_t N, int64_t K, size_t* workspace,
              bool* searched);
// Runs cusparseLtMatmulSearch for the plan (a no-op once done): times the candidate algorithms on
// these operands, writing only `scratch` (M x N elements, beta 0). Afterwards the plan's workspace
// may differ: ask cslt_plan again. A failed search is not retried; the plan keeps the default
// algorithm and the status is returned so the caller can report it.
int cslt_search(int device, DType dtype, const void* compressed, const void* x, int64_t M,
                int64_t N, int64_t K, void* scratch, void* workspace, size_t workspace_size,
                void* stream);
// D = W x^T + beta * C with C = D = y, i.e. y[M, N] = x[M, K] @ W^T + beta * y (beta 0 or 1: the
// glue pre-fills y with the bias so it is added before the single rounding). M a multiple of 8,
// N and K multiples of 16, pointers 16-byte aligned. `workspace_size` is what the caller
// allocated; an error is returned if the plan needs more.
int cslt_matmul(int device, DType dtype, const void* compressed, const void* x, int64_t M,
                int64_t N, int64_t K, float beta, void* y, void* workspace, size_t workspace_size,
                void* stream);
// Plan cache figures since the process started (tests check that plans are reused).
struct CsltStats {
  int64_t plans_cached = 0;  // now in the cache
  int64_t plans_built = 0;   // ever built (evictions and rebuilds included)
  int64_t searches_run = 0;  // cusparseLtMatmulSearch calls
};
CsltStats cslt_stats();
const char* cslt_error_string(int status);
const char* cuda_error_string(int err);

}  // namespace pysparse::cuda
