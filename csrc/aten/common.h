// Argument checks shared by the CPU and CUDA glue. Every message names the op, the problem and
// what to do about it.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "../core/launch_rules.h"
#include "../core/sparse24.h"
#include "routes.h"

namespace pysparse::aten {

// `t` itself when its data starts at a multiple of `bytes` (what a vectorised CUDA load of it
// needs), else a contiguous copy: a fresh allocation, which the caching allocator aligns to 512
// bytes. A contiguous view can start at any element (w.flatten()[1:].view(...)).
inline at::Tensor aligned_or_copy(const at::Tensor& t, std::size_t bytes) {
  if (!t.defined() || core::is_aligned(t.data_ptr(), bytes)) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

inline int elem_size_for(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op,
              ": ", name, " must be float32, bfloat16, float16 or float64, got ", st);
  return static_cast<int>(t.element_size());
}

inline void check_2d_weight(const at::Tensor& w, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 2, op, ": ", name, " must be 2-D [out_features, in_features], got shape ",
              w.sizes());
  TORCH_CHECK(w.size(1) % 4 == 0, op, ": in_features (", name, ".size(1)) must be a multiple of 4 for 2:4, got ",
              w.size(1), "; pad the weight with zero columns (and x with zeros) to the next multiple of 4");
}

// values [N, K/2] and meta uint8 [N, ceil(K/8)] describing a K-column weight.
inline void check_packed(const at::Tensor& values, const at::Tensor& meta, int64_t K,
                         const char* op) {
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [out_features, in_features/2], got shape ",
              values.sizes());
  TORCH_CHECK(meta.dim() == 2, op, ": meta must be 2-D [out_features, ceil(in_features/8)], got shape ",
              meta.sizes());
  TORCH_CHECK(meta.scalar_type() == at::kByte, op, ": meta must be uint8 (as made by compress24), got ",
              meta.scalar_type());
  TORCH_CHECK(K % 4 == 0 && K > 0, op, ": in_features must be a positive multiple of 4 for 2:4, got ",
              K, "; pad the weight to the next multiple of 4");
  TORCH_CHECK(values.size(1) * 2 == K, op, ": values has ", values.size(1),
              " columns, which packs in_features=", values.size(1) * 2, ", not ", K,
              "; values must be [out_features, in_features/2] as made by compress24");
  TORCH_CHECK(meta.size(0) == values.size(0), op, ": meta has ", meta.size(0),
              " rows but values has ", values.size(0), "; they must come from the same compress24 call");
  TORCH_CHECK(meta.size(1) == core::meta_cols(K), op, ": meta has ", meta.size(1),
              " columns but in_features=", K, " needs ceil(K/8)=", core::meta_cols(K),
              "; pass the meta made by compress24 for this weight");
  TORCH_CHECK(values.device() == meta.device(), op, ": values is on ", values.device(),
              " but meta is on ", meta.device(), "; move both with Sparse24Weight.to(device)");
}

// Checks for sparse24_linear; returns K.
inline int64_t check_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                            const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_linear";
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [out_features, in_features/2], got shape ",
              values.sizes());
  const int64_t K = values.size(1) * 2;
  check_packed(values, meta, K, op);
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16, op,
              ": weights must be float32 or bfloat16, got ", st,
              "; convert the dense weight before compress24");
  TORCH_CHECK(x.scalar_type() == st, op, ": x is ", x.scalar_type(), " but the weight is ", st,
              "; cast x with x.to(", st, ")");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == K, op, ": x.shape[-1] is ", x.size(-1), " but the weight has in_features=",
              K, " (x shape ", x.sizes(), ")");
  TORCH_CHECK(x.device() == values.device(), op, ": x is on ", x.device(), " but the weight is on ",
              values.device(), "; move one of them");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0), op, ": bias must be [",
                values.size(0), "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == st, op, ": bias is ", bias->scalar_type(),
                " but the weight is ", st, "; cast the bias");
    TORCH_CHECK(bias->device() == values.device(), op, ": bias is on ", bias->device(),
                " but the weight is on ", values.device());
  }
  return K;
}

inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// x as a 2-D [M, K] matrix whose rows have unit stride (a view when possible).
inline at::Tensor as_rows(const at::Tensor& x, int64_t K) {
  at::Tensor x2 = x.reshape({-1, K});
  if (x2.size(0) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (x2.size(0) <= 1 && !x2.is_contiguous()) x2 = x2.contiguous();
  return x2;
}

// Batch-invariant mode (routes.h): op(chunk) over consecutive chunks of at most `rows` rows of
// x [..., K] (each chunk a [m, K] view), the results [m, N] concatenated into [..., N]. An op
// whose one-row route is row-invariant up to `rows` rows calls itself this way past them.
template <typename Op>
at::Tensor by_row_chunks(const at::Tensor& x, int64_t K, int64_t rows, Op op) {
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < M; i += rows) parts.push_back(op(x2.narrow(0, i, std::min(rows, M - i))));
  at::Tensor y = at::cat(parts, 0);
  return y.view(linear_out_shape(x, y.size(1)));
}

// The float32 contiguous score prune24 ranks by: the caller's (checked against w) or |w|.
inline at::Tensor prune_score(const at::Tensor& w, const c10::optional<at::Tensor>& score) {
  constexpr const char* op = "prune24";
  if (!(score.has_value() && score->defined())) return w.abs().to(at::kFloat).contiguous();
  TORCH_CHECK(score->sizes() == w.sizes(), op, ": score must have the shape of w ", w.sizes(),
              ", got ", score->sizes());
  TORCH_CHECK(at::isFloatingType(score->scalar_type()), op,
              ": score must be a floating tensor, got ", score->scalar_type());
  TORCH_CHECK(score->device() == w.device(), op, ": score is on ", score->device(),
              " but w is on ", w.device());
  return score->to(at::kFloat).contiguous();
}

inline std::string compress_error(const core::Compress24Status& st) {
  std::ostringstream os;
  os << "compress24: row " << st.row << ", group " << st.group << " (columns " << 4 * st.group
     << ".." << 4 * st.group + 3 << ") has " << st.nonzeros
     << " nonzeros; a 2:4 weight has at most 2 in every group of 4 along in_features. Prune it "
        "first, e.g. w = torch.ops.pysparse.prune24(w) (or a mask pass), then compress";
  return os.str();
}

// Checks for prox24 / prox24_ (groups of 4 along the last dim).
inline void check_prox24(const at::Tensor& w, double lam, int64_t max_iters, double tol) {
  constexpr const char* op = "prox24";
  const auto st = w.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": w must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK(w.dim() >= 1 && w.size(-1) % 4 == 0, op,
              ": the last dim (in_features) must be a multiple of 4 (groups of 4 along it), got "
              "shape ", w.sizes(), "; pad the weight with zero columns or skip this layer");
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, op, ": lam must be finite and >= 0, got ", lam);
  TORCH_CHECK(max_iters >= 1, op, ": max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0, op, ": tol must be finite and >= 0, got ", tol);
}

// An integer setting from the environment (read per call, so tests can move a crossover), else
// `fallback`.
inline int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : fallback;
}

// Whether torch's bf16 matmul runs on AMX tiles on this CPU (then torch's dense bf16 GEMM is hard
// to beat from a few rows on; both the 2:4 linear layer and the FFN ops dispatch on it).
bool bf16_matmul_has_amx();
// Whether torch's bf16 matmul has native bf16 dot products here: AMX tiles or AVX512-BF16
// (oneDNN's vdpbf16ps kernels). Without either it widens to fp32 as our FMA kernels do.
bool bf16_matmul_native();

// y[M, N] = x2 @ W^T (+ b) on torch's GEMM, with W [N, K] (dtype `wtype`) never held whole:
// fill(n0, rows, dst) writes rows [n0, n0 + rows) of W into dst, as [rows, K] (or, with
// `transposed`, columns of W^T as a [K, rows] slab), both contiguous: a per-thread scratch of
// ~8 MB that stays cache-resident between the fill and the GEMM and is kept between calls (a fresh
// multi-MB buffer costs ~3 ms of first-touch page faults here). Each chunk's GEMM sums over the
// whole of K, so bf16 outputs are rounded once.
using FillRows = std::function<void(int64_t n0, int64_t rows, void* dst)>;
at::Tensor linear_by_dense_chunks(const at::Tensor& x2, int64_t N, int64_t K, at::ScalarType wtype,
                                  const at::Tensor& b, const FillRows& fill, bool transposed = false);

// The CPU sparse24_linear kernel (sparse24_cpu.cpp), also used by the FFN ops' large-batch route.
at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& meta, const c10::optional<at::Tensor>& bias);

}  // namespace pysparse::aten
