// Run-time route selection for the int8 linears (qlinear.h), and the portable scalar route: the
// simplest statement of what the vector kernels compute, used where the CPU lacks AVX2/FMA.
#include "qlinear.h"

#include <cstdlib>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core {
namespace {

template <bool kPacked>
void qlinear_scalar(const float* x, int64_t M, const int8_t* w, const uint8_t* meta,
                    const float* scale, const float* bias, int64_t N, int64_t K, float* y,
                    int nt) {
  const int64_t wstride = kPacked ? K / 2 : K;
  const int64_t mstride = meta_cols(K);
  RegionTrace trace(nt);
#pragma omp parallel num_threads(nt)
  {
    trace.mark();
#pragma omp for schedule(static) collapse(2)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = x + m * K;
        const int8_t* wr = w + n * wstride;
        float s = 0.f;
        if constexpr (kPacked) {
          s = detail::q_packed_tail(0.f, xr, wr, meta + n * mstride, 0, K);
        } else {
          for (int64_t k = 0; k < K; ++k) s = std::fma(static_cast<float>(wr[k]), xr[k], s);
        }
        y[m * N + n] = s * scale[n] + (bias ? bias[n] : 0.f);
      }
  }
  trace.finish(Route::kInt8Linear);
}

bool use_vnni() {
  static const CpuFeatures f = cpu_features();
  const char* off = std::getenv("PYSPARSE_DISABLE_VNNI");
  return detail::sparse24_use_avx512() && f.avx512bw && f.avx512vbmi && f.avx512vnni &&
         detail::qlinear_vnni_built() && !(off && off[0] != '\0' && off[0] != '0');
}

}  // namespace

const char* int8_linear_impl() {
  if (use_vnni()) return "avx512_vnni";
  return detail::sparse24_use_avx512() ? "avx512"
                                       : (detail::sparse24_use_avx2() ? "avx2" : "scalar");
}

void int8_linear(const float* x, int64_t M, const int8_t* q, const float* scale,
                 const float* bias, int64_t N, int64_t K, float* y, int nthreads) {
  if (M <= 0 || N <= 0) return;
  const int nt = resolve_threads(nthreads);
  if (use_vnni())
    detail::int8_linear_vnni(x, M, q, scale, bias, N, K, y, nt);
  else if (detail::sparse24_use_avx512())
    detail::int8_linear_avx512(x, M, q, scale, bias, N, K, y, nt);
  else if (detail::sparse24_use_avx2())
    detail::int8_linear_avx2(x, M, q, scale, bias, N, K, y, nt);
  else
    qlinear_scalar<false>(x, M, q, nullptr, scale, bias, N, K, y, nt);
}

void sparse24_int8_linear(const float* x, int64_t M, const int8_t* values, const uint8_t* meta,
                          const float* scale, const float* bias, int64_t N, int64_t K, float* y,
                          int nthreads) {
  if (M <= 0 || N <= 0) return;
  const int nt = resolve_threads(nthreads);
  if (use_vnni())
    detail::sparse24_int8_linear_vnni(x, M, values, meta, scale, bias, N, K, y, nt);
  else if (detail::sparse24_use_avx512())
    detail::sparse24_int8_linear_avx512(x, M, values, meta, scale, bias, N, K, y, nt);
  else if (detail::sparse24_use_avx2())
    detail::sparse24_int8_linear_avx2(x, M, values, meta, scale, bias, N, K, y, nt);
  else
    qlinear_scalar<true>(x, M, values, meta, scale, bias, N, K, y, nt);
}

}  // namespace pysparse::core
