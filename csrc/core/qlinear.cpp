// Run-time route selection for the int8 linears (qlinear.h), and the portable scalar route: the
// simplest statement of what the vector kernels compute, used where the CPU lacks AVX2/FMA.
#include "qlinear.h"

#include <algorithm>
#include <cstdlib>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core {
namespace {

using detail::QWeight;
using detail::int4_weight;
using detail::int8_weight;

template <int kL>
void qlinear_scalar(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                    int64_t K, float* y, int nt) {
  RegionTrace trace(nt);
#pragma omp parallel num_threads(nt)
  {
    trace.mark();
#pragma omp for schedule(static) collapse(2)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = x + m * K;
        const QWeight wn = w.row(n);
        const int8_t* w8 = reinterpret_cast<const int8_t*>(wn.w);
        float s = 0.f;
        if constexpr (kL == detail::kDense8) {
          for (int64_t k = 0; k < K; ++k) s = std::fma(static_cast<float>(w8[k]), xr[k], s);
        } else if constexpr (kL == detail::kPacked8) {
          s = detail::q_packed_tail(0.f, xr, w8, wn.meta, 0, K);
        } else {
          s = detail::q4_tail(0.f, xr, wn, K, kL == detail::kPacked4, 0);
        }
        y[m * N + n] = s * (w.scale ? w.scale[n] : 1.f) + (bias ? bias[n] : 0.f);
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
    qlinear_scalar<detail::kDense8>(x, M, int8_weight(q, nullptr, scale, K), bias, N, K, y, nt);
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
    qlinear_scalar<detail::kPacked8>(x, M, int8_weight(values, meta, scale, K), bias, N, K, y, nt);
}

namespace {

void int4_run(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
              int64_t K, float* y, int nthreads) {
  if (M <= 0 || N <= 0) return;
  const int nt = resolve_threads(nthreads);
  if (use_vnni())
    detail::int4_linear_vnni(x, M, w, bias, N, K, y, nt);
  else if (detail::sparse24_use_avx2())
    detail::int4_linear_avx2(x, M, w, bias, N, K, y, nt);
  else if (w.meta)
    qlinear_scalar<detail::kPacked4>(x, M, w, bias, N, K, y, nt);
  else
    qlinear_scalar<detail::kDense4>(x, M, w, bias, N, K, y, nt);
}

}  // namespace

const char* int4_linear_impl() {
  if (use_vnni()) return "avx512_vnni";
  return detail::sparse24_use_avx2() ? "avx2" : "scalar";
}

void int4_linear(const float* x, int64_t M, const uint8_t* q, const uint16_t* scale, int group,
                 const float* bias, int64_t N, int64_t K, float* y, int nthreads) {
  int4_run(x, M, int4_weight(q, nullptr, scale, group, K), bias, N, K, y, nthreads);
}

void sparse24_int4_linear(const float* x, int64_t M, const uint8_t* values, const uint8_t* meta,
                          const uint16_t* scale, int group, const float* bias, int64_t N,
                          int64_t K, float* y, int nthreads) {
  int4_run(x, M, int4_weight(values, meta, scale, group, K), bias, N, K, y, nthreads);
}

void int4_dequantize_rows(const uint8_t* q, const uint16_t* scale, int group, int64_t K,
                          int64_t n0, int64_t rows, float* dst) {
  const QWeight w = int4_weight(q, nullptr, scale, group, K);
  if (detail::sparse24_use_avx2()) {
    for (int64_t r = 0; r < rows; ++r) detail::int4_dequantize_row_avx2(w.row(n0 + r), K, dst + r * K);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const QWeight wr = w.row(n0 + r);
    float* out = dst + r * K;
    // a block of 32 values at a time, under one scale (a group of 64 is two blocks): a loop the
    // compiler vectorises, where a value-by-value decode was the prefill's bottleneck
    for (int64_t b = 0; b * 32 < K; ++b) {
      const float s = detail::half_to_float(wr.gscale[b * 32 / group]);
      const uint8_t* blk = wr.w + b * 16;
      if (K - b * 32 >= 32) {
        float* o = out + b * 32;
        for (int i = 0; i < 16; ++i) {
          o[i] = static_cast<float>(static_cast<int>(blk[i] & 0xFu) - 8) * s;
          o[i + 16] = static_cast<float>(static_cast<int>(blk[i] >> 4) - 8) * s;
        }
      } else {  // the row's partial last block
        for (int64_t i = 0; b * 32 + i < K; ++i)
          out[b * 32 + i] = static_cast<float>(detail::int4_value(wr.w, b * 32 + i)) * s;
      }
    }
  }
}

}  // namespace pysparse::core
