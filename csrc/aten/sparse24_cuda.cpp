// CUDA implementations of the pysparse ops. Host-only C++ (ATen + c10/cuda headers); the device
// code lives in csrc/cuda/ behind plain launchers.
//
// sparse24_linear on CUDA:
//   M <= 16                       -> our 2:4 GEMV kernel (reads values+meta once)
//   bf16, N % 16 == 0, K % 16 == 0 -> cuSPARSELt; the weight's cuSPARSELt form is built on first
//                                    use and cached (see CsltCache), M padded to a multiple of 8
//   otherwise (fp32, odd dims)    -> decompress to dense + cuBLAS (cuSPARSELt's fp32 pattern is
//                                    1:2, so a 2:4 fp32 weight cannot use it)
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <sstream>
#include <vector>

#include "../cuda/sparse24_cuda.h"
#include "common.h"

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

// The cuSPARSELt form of packed weights, keyed by the identity of the values/meta tensors.
// Entries hold weak references to the TensorImpls, so an entry neither keeps a weight alive nor can
// be matched by a different tensor that reuses the address. An in-place change of the weight bumps
// its version counter: the entry for those tensors is then rebuilt in place (never duplicated).
// Dead entries are dropped on every lookup. Inference tensors have no version counter, so an
// in-place update inside inference_mode would go unseen: they are never cached (compressed per call).
class CsltCache {
 public:
  at::Tensor lookup_or_build(const at::Tensor& values, const at::Tensor& meta) {
    if (values.is_inference() || meta.is_inference()) return build(values, meta);
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) { return e.values.expired() || e.meta.expired(); }),
                   entries_.end());
    for (Entry& e : entries_) {
      if (!e.same_tensors(values, meta)) continue;
      if (!e.current(values, meta)) e = Entry(values, meta, build(values, meta));
      return e.compressed;
    }
    entries_.emplace_back(values, meta, build(values, meta));
    return entries_.back().compressed;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Entry(const at::Tensor& v, const at::Tensor& m, at::Tensor c)
        : values(v.getIntrusivePtr()),
          meta(m.getIntrusivePtr()),
          values_ptr(v.data_ptr()),
          meta_ptr(m.data_ptr()),
          values_version(v._version()),
          meta_version(m._version()),
          compressed(std::move(c)) {}
    WeakImpl values, meta;
    const void* values_ptr;
    const void* meta_ptr;
    int64_t values_version, meta_version;
    at::Tensor compressed;
    bool same_tensors(const at::Tensor& v, const at::Tensor& m) const {
      return values._unsafe_get_target() == v.unsafeGetTensorImpl() &&
             meta._unsafe_get_target() == m.unsafeGetTensorImpl();
    }
    bool current(const at::Tensor& v, const at::Tensor& m) const {
      return values_ptr == v.data_ptr() && meta_ptr == m.data_ptr() &&
             values_version == static_cast<int64_t>(v._version()) &&
             meta_version == static_cast<int64_t>(m._version());
    }
  };
  static at::Tensor build(const at::Tensor& values, const at::Tensor& meta) {
    const int64_t N = values.size(0), K = values.size(1) * 2;
    const int dev = values.device().index();
    at::Tensor dense = decompress24_cuda(values, meta, K);
    size_t size = 0, tmp_size = 0;
    int st = pc::cslt_compressed_size(dev, dtype_of(values), N, K, &size, &tmp_size);
    TORCH_CHECK(st == 0, "sparse24_linear: cuSPARSELt compressed-size query failed: ",
                pc::cslt_error_string(st));
    at::Tensor out = at::empty({static_cast<int64_t>(size)}, values.options().dtype(at::kByte));
    at::Tensor tmp =
        at::empty({static_cast<int64_t>(std::max<size_t>(tmp_size, 1))}, values.options().dtype(at::kByte));
    st = pc::cslt_compress(dev, dtype_of(values), dense.data_ptr(), N, K, out.data_ptr(),
                           tmp.data_ptr(), stream_of(values));
    TORCH_CHECK(st == 0, "sparse24_linear: cuSPARSELt compression failed: ", pc::cslt_error_string(st));
    return out;
  }
  std::mutex mu_;
  std::vector<Entry> entries_;
};

CsltCache& cslt_cache() {
  static CsltCache* c = new CsltCache();
  return *c;
}

bool cslt_usable(int device) {
  static std::mutex mu;
  static std::vector<int> state(64, -1);  // -1 unknown, 0 no, 1 yes
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) return false;
  if (state[device] < 0) state[device] = pc::cslt_info(device).available ? 1 : 0;
  return state[device] == 1;
}

// cuSPARSELt route; nullopt (after a one-time warning) when cuSPARSELt refuses the problem, so the
// caller falls back to decompress + cuBLAS instead of failing.
c10::optional<at::Tensor> linear_cusparselt(const at::Tensor& x2, const at::Tensor& values,
                                            const at::Tensor& meta, const at::Tensor& v,
                                            const at::Tensor& m, const at::Tensor& b, int dev) {
  const int64_t M = x2.size(0), K = x2.size(1), N = v.size(0);
  // The cache is keyed on the caller's tensors when they are already contiguous.
  at::Tensor compressed = (v.is_same(values) && m.is_same(meta))
                              ? cslt_cache().lookup_or_build(values, meta)
                              : cslt_cache().lookup_or_build(v, m);
  // M padded to a multiple of 8 (cuSPARSELt's dense-operand rule); operands 16-byte aligned, as
  // the descriptors promise (a contiguous view can start at any element).
  const int64_t Mp = (M + 7) / 8 * 8;
  at::Tensor xp = x2;
  if (Mp != M) xp = at::cat({x2, at::zeros({Mp - M, K}, x2.options())}, 0);
  else if (reinterpret_cast<uintptr_t>(xp.data_ptr()) % 16 != 0) xp = x2.clone();
  // With a bias, C = D = y starts as the broadcast bias and beta = 1: the bias joins the fp32
  // accumulation and the result is rounded to bf16 once.
  at::Tensor y = b.defined() ? b.expand({Mp, N}).contiguous() : at::empty({Mp, N}, x2.options());
  size_t ws = 0;
  int st = pc::cslt_workspace(dev, dtype_of(v), Mp, N, K, &ws);
  if (st == 0) {
    at::Tensor work = at::empty({static_cast<int64_t>(std::max<size_t>(ws, 1))}, x2.options().dtype(at::kByte));
    st = pc::cslt_matmul(dev, dtype_of(v), compressed.data_ptr(), xp.data_ptr(), Mp, N, K,
                         b.defined() ? 1.f : 0.f, y.data_ptr(), work.data_ptr(), ws, stream_of(x2));
  }
  if (st != 0) {
    TORCH_WARN_ONCE("sparse24_linear: cuSPARSELt failed (", pc::cslt_error_string(st),
                    "); using decompress + cuBLAS for such shapes instead");
    return c10::nullopt;
  }
  return Mp != M ? y.narrow(0, 0, M) : y;
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
    return y.view(out_shape);
  }
  const int dev = x.device().index();
  if (v.scalar_type() == at::kBFloat16 && N % 16 == 0 && K % 16 == 0 && cslt_usable(dev)) {
    if (auto y = linear_cusparselt(x2, values, meta, v, m, b, dev)) return y->reshape(out_shape);
  }
  at::Tensor dense = decompress24_cuda(v, m, K);
  at::Tensor y = b.defined() ? at::addmm(b, x2, dense.t()) : at::mm(x2, dense.t());
  return y.view(out_shape);
}

}  // namespace

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
