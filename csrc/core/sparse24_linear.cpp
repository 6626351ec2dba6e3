// Run-time kernel selection for the 2:4 linear layer, and the portable scalar fallback used when
// the CPU lacks AVX2/FMA (or PYSPARSE_DISABLE_AVX2=1). The scalar code is also the simplest
// statement of what the vector kernels compute.
#include <cstdlib>
#include <vector>

#include "sparse24_internal.h"

namespace pysparse::core {
namespace {

bool disabled_by_env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

const CpuFeatures& features() {
  static const CpuFeatures f = cpu_features();
  return f;
}

bool use_avx2() { return features().avx2 && features().fma && !disabled_by_env("PYSPARSE_DISABLE_AVX2"); }

bool use_avx512() {
  return use_avx2() && features().avx512f && !disabled_by_env("PYSPARSE_DISABLE_AVX512");
}

// The AMX tile route for bf16 (sparse24_amx.cpp); PYSPARSE_DISABLE_AMX=1 turns it off, and
// so does turning off AVX-512 (its decompression is AVX-512BW code).
bool use_amx() {
  return use_avx512() && features().avx512bw && !disabled_by_env("PYSPARSE_DISABLE_AMX") &&
         detail::amx_bf16_ready();
}

bool use_bf16_dot() {
  return use_avx512() && features().avx512bw && features().avx512bf16 && features().avx512vbmi &&
         detail::bf16_dot_built() && !disabled_by_env("PYSPARSE_DISABLE_BF16_DOT");
}

// acc += sum over the kept weights of row `n` of W times x, in fp32.
template <typename LoadW, typename LoadX>
float row_dot(LoadW wv, LoadX xv, const uint8_t* mrow, int64_t K) {
  float acc = 0.f;
  const int64_t groups = K / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const unsigned nibble = (mrow[g / 2] >> ((g & 1) * 4)) & 0xFu;
    acc += wv(2 * g) * xv(4 * g + (nibble & 3u));
    acc += wv(2 * g + 1) * xv(4 * g + (nibble >> 2));
  }
  return acc;
}

void linear_f32_scalar(const float* x, int64_t M, int64_t ldx, const float* values,
                       const uint8_t* meta, int64_t N, int64_t K, const float* bias, float* y,
                       int64_t ldy, int nthreads) {
  const int64_t mcols = meta_cols(K);
  const int nt = nthreads > 0 ? nthreads : 1;
  RegionTrace trace(nt);
#pragma omp parallel num_threads(nt)
  {
  trace.mark();
#pragma omp for schedule(static) collapse(2)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const float* vrow = values + n * (K / 2);
      const float* xrow = x + m * ldx;
      float acc = row_dot([&](int64_t i) { return vrow[i]; }, [&](int64_t k) { return xrow[k]; },
                          meta + n * mcols, K);
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
  }
  trace.finish(Route::kLinearScalar);
}

void linear_bf16_scalar(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                        const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                        uint16_t* y, int64_t ldy, int nthreads) {
  const int64_t mcols = meta_cols(K);
  const int nt = nthreads > 0 ? nthreads : 1;
  RegionTrace trace(nt);
#pragma omp parallel num_threads(nt)
  {
  trace.mark();
#pragma omp for schedule(static) collapse(2)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t* vrow = values + n * (K / 2);
      const uint16_t* xrow = x + m * ldx;
      float acc = row_dot([&](int64_t i) { return bf16_to_float(vrow[i]); },
                          [&](int64_t k) { return bf16_to_float(xrow[k]); }, meta + n * mcols, K);
      if (bias) acc += bf16_to_float(bias[n]);
      y[m * ldy + n] = float_to_bf16(acc);
    }
  }
  }
  trace.finish(Route::kLinearScalar);
}

}  // namespace

namespace detail {
bool sparse24_use_avx512() { return use_avx512(); }
bool sparse24_use_avx2() { return use_avx2(); }
bool sparse24_use_amx() { return use_amx(); }
bool sparse24_use_bf16_dot() { return use_bf16_dot(); }
}  // namespace detail

CpuFeatures cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512vbmi = __builtin_cpu_supports("avx512vbmi");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#endif
  return f;
}

bool sparse24_bf16_amx() { return use_amx(); }
bool sparse24_bf16_dot() { return use_bf16_dot(); }

const char* sparse24_linear_impl() {
  return use_avx512() ? "avx512" : (use_avx2() ? "avx2" : "scalar");
}

int sparse24_gemv_max_rows() {
  return use_avx512() ? detail::kGemvMaxRowsAvx512 : (use_avx2() ? detail::kGemvMaxRowsAvx2 : 0);
}

void sparse24_linear_f32(const float* x, int64_t M, int64_t ldx, const float* values,
                         const uint8_t* meta, int64_t N, int64_t K, const float* bias, float* y,
                         int64_t ldy, int nthreads) {
  if (M == 0 || N == 0) return;
  if (use_avx512())
    (M <= detail::kGemvMaxRowsAvx512 ? detail::sparse24_gemv_f32_avx512 : detail::sparse24_gemm_f32_avx512)(
        x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else if (use_avx2())
    detail::sparse24_linear_f32_avx2(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else
    linear_f32_scalar(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_linear_bf16(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                          const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                          uint16_t* y, int64_t ldy, int nthreads) {
  if (M == 0 || N == 0) return;
  if (M >= kAmxMinRows && use_amx())
    detail::sparse24_linear_bf16_amx(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else if (M <= detail::kGemvMaxRowsAvx512 && use_bf16_dot())
    detail::sparse24_gemv_bf16dot(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else if (use_avx512())
    (M <= detail::kGemvMaxRowsAvx512 ? detail::sparse24_gemv_bf16_avx512
                               : detail::sparse24_gemm_bf16_avx512)(x, M, ldx, values, meta, N, K,
                                                                    bias, y, ldy, nthreads);
  else if (use_avx2())
    detail::sparse24_linear_bf16_avx2(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
  else
    linear_bf16_scalar(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

bool decompress_fast(const void* values, const uint8_t* meta, int64_t N, int64_t K, int elem_size,
                     void* dense) {
  if (!use_avx512()) return false;
  if (elem_size == 4) {
    detail::decompress32_avx512(static_cast<const uint32_t*>(values), meta, N, K,
                                static_cast<uint32_t*>(dense));
    return true;
  }
  if (elem_size == 2 && features().avx512bw) {
    detail::decompress16_avx512(static_cast<const uint16_t*>(values), meta, N, K,
                                static_cast<uint16_t*>(dense));
    return true;
  }
  return false;
}

}  // namespace pysparse::core
