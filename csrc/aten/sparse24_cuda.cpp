// CUDA implementations of the pysparse ops. Host-only C++ (ATen + c10/cuda headers); the device
// code lives in csrc/cuda/ behind plain launchers.
//
// sparse24_linear on CUDA:
//   M <= 16                       -> our 2:4 GEMV kernel (reads values+meta once)       "gemv"
//   bf16, N % 16 == 0, K % 16 == 0 -> cuSPARSELt; the weight's cuSPARSELt form is built on first
//                                    use and lives as long as the weight (see CsltWeight), M
//                                    padded to its bucket (core::cusparselt_rows)       "cusparselt"
//   otherwise (fp32, odd dims)    -> decompress to dense + cuBLAS (cuSPARSELt's fp32 pattern is
//                                    1:2, so a 2:4 fp32 weight cannot use it)          "cublas"
// When cuSPARSELt should run but cannot (no handle, a failed plan, search, compression or
// matmul), the call falls back to decompress + cuBLAS with a one-time warning ("cublas_fallback"),
// or raises when PYSPARSE_STRICT_CUSPARSELT is set. Each call records its route (routes.h), which
// pysparse.ops.last_cuda_route() and cuda_route_counts() report.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "../cuda/sparse24_cuda.h"
#include "common.h"
#include "cuda_linear.h"
#include "routes.h"

namespace pysparse::aten {
namespace {

namespace pc = pysparse::cuda;

void check_cuda(int err, const char* op) {
  TORCH_CHECK(err == 0, op, ": CUDA error: ", pc::cuda_error_string(err));
}

void* stream_of(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

pc::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return pc::DType::F32;
    case at::kBFloat16: return pc::DType::BF16;
    case at::kHalf: return pc::DType::F16;
    default: return pc::DType::F64;
  }
}

std::tuple<at::Tensor, at::Tensor> compress24_cuda(const at::Tensor& dense) {
  constexpr const char* op = "compress24";
  check_2d_weight(dense, op, "dense");
  const int es = elem_size_for(dense, op, "dense");
  const c10::cuda::CUDAGuard guard(dense.device());
  at::Tensor d = dense.contiguous();
  const int64_t N = d.size(0), K = d.size(1);
  at::Tensor values = at::empty({N, K / 2}, d.options());
  at::Tensor meta = at::empty({N, core::meta_cols(K)}, d.options().dtype(at::kByte));
  at::Tensor bad = at::full({1}, std::numeric_limits<int64_t>::max(), d.options().dtype(at::kLong));
  check_cuda(pc::compress24(d.data_ptr(), N, K, es, values.data_ptr(), meta.data_ptr<uint8_t>(),
                            bad.data_ptr<int64_t>(), stream_of(d)),
             op);
  const int64_t first_bad = bad.item<int64_t>();  // synchronises: errors must surface here
  if (first_bad != std::numeric_limits<int64_t>::max()) {
    core::Compress24Status st;
    st.row = first_bad / (K / 4);
    st.group = first_bad % (K / 4);
    st.nonzeros = (d[st.row].narrow(0, 4 * st.group, 4) != 0).sum().item<int>();
    TORCH_CHECK(false, compress_error(st));
  }
  return {values, meta};
}

at::Tensor decompress24_cuda(const at::Tensor& values, const at::Tensor& meta, int64_t K) {
  constexpr const char* op = "decompress24";
  check_packed(values, meta, K, op);
  const int es = elem_size_for(values, op, "values");
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor v = values.contiguous();
  at::Tensor m = meta.contiguous();
  at::Tensor dense = at::empty({v.size(0), K}, v.options());
  check_cuda(pc::decompress24(v.data_ptr(), m.data_ptr<uint8_t>(), v.size(0), K, es,
                              dense.data_ptr(), stream_of(v)),
             op);
  return dense;
}

at::Tensor prune24_cuda(const at::Tensor& w, const c10::optional<at::Tensor>& score) {
  constexpr const char* op = "prune24";
  check_2d_weight(w, op, "w");
  const int es = elem_size_for(w, op, "w");
  const c10::cuda::CUDAGuard guard(w.device());
  at::Tensor wc = w.contiguous();
  const at::Tensor s = prune_score(wc, score);
  at::Tensor out = at::empty_like(wc);
  check_cuda(pc::prune24(wc.data_ptr(), s.data_ptr<float>(), wc.size(0), wc.size(1), es,
                         out.data_ptr(), stream_of(wc)),
             op);
  return out;
}

// ---- the cuSPARSELt form of packed weights ----------------------------------------------------
// Lifetime: the compressed buffer is attached to the weight's own `values` TensorImpl as its
// BackendMeta (c10's slot for per-tensor backend data, unused for CUDA tensors), so it is freed
// exactly when that TensorImpl is: deleting the module or the tensor releases it, with no global
// table to sweep and no reference that keeps a dead weight's buffer alive. Tensors that share the
// TensorImpl's metadata (detach(), nn.Parameter) share the entry. The entry records the data
// pointers and version counters of values and meta, and a weak reference to meta's TensorImpl (so
// a new meta tensor at a reused address is not mistaken for the old one): an in-place update, a
// swapped meta or a `.data =` assignment rebuilds it. Inference tensors have no version counter,
// so an update inside inference_mode would go unseen: they are compressed per call, never cached.
std::atomic<int64_t> g_cslt_bytes{0};
std::atomic<int64_t> g_cslt_entries{0};

class CsltWeight final : public c10::BackendMeta {
 public:
  CsltWeight(const at::Tensor& v, const at::Tensor& m, at::Tensor compressed)
      : meta_(m.getIntrusivePtr()),
        values_ptr_(v.data_ptr()),
        meta_ptr_(m.data_ptr()),
        values_version_(v._version()),
        meta_version_(m._version()),
        compressed_(std::move(compressed)),
        bytes_(static_cast<int64_t>(compressed_.nbytes())) {
    g_cslt_bytes += bytes_;
    ++g_cslt_entries;
  }
  ~CsltWeight() override {
    g_cslt_bytes -= bytes_;
    --g_cslt_entries;
  }
  bool current(const at::Tensor& v, const at::Tensor& m) const {
    return meta_._unsafe_get_target() == m.unsafeGetTensorImpl() && !meta_.expired() &&
           values_ptr_ == v.data_ptr() && meta_ptr_ == m.data_ptr() &&
           values_version_ == static_cast<int64_t>(v._version()) &&
           meta_version_ == static_cast<int64_t>(m._version());
  }
  const at::Tensor& compressed() const { return compressed_; }

 private:
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> meta_;
  const void* values_ptr_;
  const void* meta_ptr_;
  int64_t values_version_, meta_version_;
  at::Tensor compressed_;
  int64_t bytes_;
};

// A status from cuSPARSELt and the step that returned it; status 0 = success.
struct CsltStatus {
  int status = 0;
  const char* step = "";
  explicit operator bool() const { return status != 0; }
};

CsltStatus cslt_build(const at::Tensor& values, const at::Tensor& meta, at::Tensor* out) {
  const int64_t N = values.size(0), K = values.size(1) * 2;
  const int dev = values.device().index();
  at::Tensor dense = decompress24_cuda(values, meta, K);
  size_t size = 0, tmp_size = 0;
  int st = pc::cslt_compressed_size(dev, dtype_of(values), N, K, &size, &tmp_size);
  if (st != 0) return {st, "compressed-size query"};
  at::Tensor buf = at::empty({static_cast<int64_t>(size)}, values.options().dtype(at::kByte));
  at::Tensor tmp = at::empty({static_cast<int64_t>(std::max<size_t>(tmp_size, 1))},
                             values.options().dtype(at::kByte));
  st = pc::cslt_compress(dev, dtype_of(values), dense.data_ptr(), N, K, buf.data_ptr(),
                         tmp.data_ptr(), stream_of(values));
  if (st != 0) return {st, "compression"};
  *out = std::move(buf);
  return {};
}

// The compressed form of (values, meta): the one attached to values when it is current, else
// built (and attached, unless values is an inference tensor or carries someone else's BackendMeta).
CsltStatus cslt_compressed(const at::Tensor& values, const at::Tensor& meta, at::Tensor* out) {
  if (values.is_inference() || meta.is_inference()) return cslt_build(values, meta, out);
  static std::mutex mu;  // guards the BackendMeta slot of the weights we touch
  std::lock_guard<std::mutex> lock(mu);
  c10::TensorImpl* impl = values.unsafeGetTensorImpl();
  c10::BackendMeta* held = impl->get_backend_meta();
  auto* entry = dynamic_cast<CsltWeight*>(held);
  if (entry && entry->current(values, meta)) {
    *out = entry->compressed();
    return {};
  }
  if (CsltStatus st = cslt_build(values, meta, out)) return st;
  if (held == nullptr || entry != nullptr)
    impl->set_backend_meta(c10::make_intrusive<CsltWeight>(values, meta, *out));
  return {};
}

// -1 unknown, else the cusparseLtInit status on that device (0: usable).
int cslt_init_status(int device) {
  static std::mutex mu;
  static std::vector<int> state(64, -1);
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) return -2;
  if (state[device] < 0) state[device] = pc::cslt_info(device).status;
  return state[device];
}

// The cuSPARSELt route: y[M, N], or the failing status (the caller falls back or raises).
CsltStatus linear_cusparselt(const at::Tensor& x2, const at::Tensor& values, const at::Tensor& meta,
                             const at::Tensor& v, const at::Tensor& m, const at::Tensor& b, int dev,
                             at::Tensor* out) {
  const int64_t M = x2.size(0), K = x2.size(1), N = v.size(0);
  const pc::DType dt = dtype_of(v);
  // The entry is attached to the caller's tensors when they are already contiguous (a contiguous
  // copy made for this call dies with it, and its entry with it).
  at::Tensor compressed;
  if (CsltStatus st = (v.is_same(values) && m.is_same(meta)) ? cslt_compressed(values, meta, &compressed)
                                                             : cslt_compressed(v, m, &compressed))
    return st;
  // x padded to the row bucket (plans are per M; cuSPARSELt wants M % 8 == 0) and 16-byte aligned,
  // as the descriptors promise (a contiguous view can start at any element). Rows past M are zero
  // and their outputs are dropped: an output row depends only on its own row of x.
  const int64_t Mb = core::cusparselt_rows(M);
  at::Tensor xp = x2;
  if (Mb != M) {
    xp = at::empty({Mb, K}, x2.options());
    xp.narrow(0, 0, M).copy_(x2);
    xp.narrow(0, M, Mb - M).zero_();
  } else {
    xp = aligned_or_copy(x2, 16);
  }
  size_t ws = 0;
  bool searched = false;
  int st = pc::cslt_plan(dev, dt, Mb, N, K, &ws, &searched);
  if (st != 0) return {st, "plan"};
  if (!searched) {  // once per plan: choose the algorithm on this problem
    at::Tensor scratch = at::empty({Mb, N}, x2.options());
    at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(ws, 1))}, x2.options().dtype(at::kByte));
    const int sst = pc::cslt_search(dev, dt, compressed.data_ptr(), xp.data_ptr(), Mb, N, K,
                                    scratch.data_ptr(), work.data_ptr(), ws, stream_of(x2));
    st = pc::cslt_plan(dev, dt, Mb, N, K, &ws, &searched);
    if (st != 0) return {st, "plan"};
    if (sst != 0) {
      // The plan keeps cuSPARSELt's default algorithm, which still runs; say it, or refuse.
      TORCH_CHECK(!routes::strict_cusparselt(), "sparse24_linear: cusparseLtMatmulSearch failed (",
                  pc::cslt_error_string(sst), ") for M=", Mb, " N=", N, " K=", K,
                  "; PYSPARSE_STRICT_CUSPARSELT is set, so this is an error");
      TORCH_WARN_ONCE("sparse24_linear: cusparseLtMatmulSearch failed (", pc::cslt_error_string(sst),
                      "); such shapes run cuSPARSELt's default algorithm, unsearched");
    }
  }
  // With a bias, C = D = y starts as the broadcast bias and beta = 1: the bias joins the fp32
  // accumulation and the result is rounded to bf16 once.
  at::Tensor y = b.defined() ? b.expand({Mb, N}).contiguous() : at::empty({Mb, N}, x2.options());
  at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(ws, 1))}, x2.options().dtype(at::kByte));
  st = pc::cslt_matmul(dev, dt, compressed.data_ptr(), xp.data_ptr(), Mb, N, K,
                       b.defined() ? 1.f : 0.f, y.data_ptr(), work.data_ptr(), ws, stream_of(x2));
  if (st != 0) return {st, "matmul"};
  *out = Mb != M ? y.narrow(0, 0, M) : y;
  return {};
}

at::Tensor sparse24_linear_cuda(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse24_linear";
  const int64_t K = check_linear(x, values, meta, bias);
  const int64_t N = values.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor v = values.contiguous();
  at::Tensor m = meta.contiguous();
  at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = bias->contiguous();
  const auto out_shape = linear_out_shape(x, N);
  if (M <= pc::kGemvMaxRows) {
    at::Tensor y = at::empty({M, N}, x.options());
    check_cuda(pc::sparse24_gemv(dtype_of(v), x2.data_ptr(), M, v.data_ptr(), m.data_ptr<uint8_t>(),
                                 N, K, b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                                 stream_of(x2)),
               op);
    routes::record(routes::Family::Linear, routes::Route::Gemv);
    return y.view(out_shape);
  }
  const int dev = x.device().index();
  if (v.scalar_type() == at::kBFloat16 && N % 16 == 0 && K % 16 == 0) {
    std::string why;
    const int init = cslt_init_status(dev);
    if (init != 0) {
      why = std::string("cuSPARSELt cannot be initialised on this device (") +
            (init > 0 ? pc::cslt_error_string(init) : "device index out of range") + ")";
    } else {
      at::Tensor y;
      const CsltStatus st = linear_cusparselt(x2, values, meta, v, m, b, dev, &y);
      if (!st) {
        routes::record(routes::Family::Linear, routes::Route::Cusparselt);
        return y.view(out_shape);
      }
      why = std::string("cuSPARSELt's ") + st.step + " failed (" + pc::cslt_error_string(st.status) + ")";
    }
    TORCH_CHECK(!routes::strict_cusparselt(), op, ": cuSPARSELt should run this bf16 problem (M=", M,
                ", N=", N, ", K=", K, ") but ", why,
                "; PYSPARSE_STRICT_CUSPARSELT is set, so this is an error instead of a fallback to "
                "decompress + cuBLAS");
    TORCH_WARN_ONCE(op, ": ", why, "; using decompress + cuBLAS for such shapes instead (set "
                    "PYSPARSE_STRICT_CUSPARSELT=1 to make this an error)");
    routes::record(routes::Family::Linear, routes::Route::CublasFallback);
  } else {
    routes::record(routes::Family::Linear, routes::Route::Cublas);
  }
  at::Tensor dense = decompress24_cuda(v, m, K);
  at::Tensor y = b.defined() ? at::addmm(b, x2, dense.t()) : at::mm(x2, dense.t());
  return y.view(out_shape);
}

}  // namespace

int64_t cusparselt_cached_bytes() { return g_cslt_bytes.load(); }
int64_t cusparselt_cached_weights() { return g_cslt_entries.load(); }

void prox24_inplace_cuda(at::Tensor& w, double lam, int64_t max_iters, double tol) {
  constexpr const char* op = "prox24";
  check_prox24(w, lam, max_iters, tol);
  const c10::cuda::CUDAGuard guard(w.device());
  // The fp32 kernel loads each group as one float4: contiguous and 16-byte aligned.
  const bool direct =
      w.is_contiguous() &&
      (w.scalar_type() != at::kFloat || reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 == 0);
  at::Tensor work = direct ? w : w.contiguous().clone();
  check_cuda(pc::prox24(dtype_of(work), work.data_ptr(), work.numel() / 4, lam,
                        static_cast<int>(max_iters), tol, stream_of(work)),
             op);
  if (!direct) w.copy_(work);
}

at::Tensor prox24_cuda(const at::Tensor& w, double lam, int64_t max_iters, double tol) {
  at::Tensor out = w.clone(at::MemoryFormat::Contiguous);
  prox24_inplace_cuda(out, lam, max_iters, tol);
  return out;
}

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("prox24", &prox24_cuda);
  m.impl("prox24_", &prox24_inplace_cuda);
  m.impl("compress24", &compress24_cuda);
  m.impl("decompress24", &decompress24_cuda);
  m.impl("prune24", &prune24_cuda);
  m.impl("sparse24_linear", &sparse24_linear_cuda);
}

}  // namespace pysparse::aten
