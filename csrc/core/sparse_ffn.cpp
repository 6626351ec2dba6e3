// Activation-sparse FFN: dispatch, and the portable build used when the CPU lacks AVX2/FMA (or
// PYSPARSE_DISABLE_AVX2=1). The portable kernels are also the plainest statement of what the AVX2
// ones compute; both run the driver in sparse_ffn_driver.inc.
#include "sparse_ffn.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "qlinear.h"
#include "sparse24_internal.h"
#include "sparse_ffn_internal.h"

namespace pysparse::core {
namespace {

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }

#include "sparse_ffn_groups_scalar.inc"
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }

template <int RB, typename W>
void dense_pairs_dot(const float* const* x, const W* const* rows, int64_t D, float* out) {
  for (int r = 0; r < RB; ++r) {
    float s = 0.f;
    for (int64_t k = 0; k < D; ++k) s = std::fma(load1(rows[r] + k), x[r][k], s);
    out[r] = s;
  }
}

template <int RB, typename W>
void dense_dot_rows(const float* x, const W* const* rows, int64_t D, float* out) {
  const float* xs[RB];
  for (int r = 0; r < RB; ++r) xs[r] = x;
  dense_pairs_dot<RB>(xs, rows, D, out);
}

// The dense GEMV's dot (see sparse_ffn_avx2.cpp): the same four chains of 8 lanes, in scalar.
template <typename W>
float dense_dot_stream(const float* x, const W* row, int64_t D) {
  const int64_t body = D / 32 * 32;
  float acc[4][8] = {};
  for (int64_t k = 0; k < body; k += 32)
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 8; ++l)
        acc[c][l] = std::fma(load1(row + k + 8 * c + l), x[k + 8 * c + l], acc[c][l]);
  int64_t k = body;
  for (; k + 8 <= D; k += 8)
    for (int l = 0; l < 8; ++l) acc[0][l] = std::fma(load1(row + k + l), x[k + l], acc[0][l]);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
  for (; k < D; ++k) s = std::fma(load1(row + k), x[k], s);
  return s;
}

template <int RB, typename W>
void packed_pairs_dot(const float* const* x, const W* const* v, const uint8_t* const* mt,
                      int64_t D, float* out) {
  for (int r = 0; r < RB; ++r) {
    float s = 0.f;
    for (int64_t g = 0; g < D / 4; ++g) {
      const unsigned nib = (mt[r][g / 2] >> ((g & 1) * 4)) & 0xFu;
      s = std::fma(load1(v[r] + 2 * g), x[r][4 * g + (nib & 3u)], s);
      s = std::fma(load1(v[r] + 2 * g + 1), x[r][4 * g + (nib >> 2)], s);
    }
    out[r] = s;
  }
}

template <int RB, typename W>
void packed_rows_dot(const float* x, const W* const* v, const uint8_t* const* mt, int64_t D,
                     float* out) {
  const float* xs[RB];
  for (int r = 0; r < RB; ++r) xs[r] = x;
  packed_pairs_dot<RB>(xs, v, mt, D, out);
}

template <typename W>
void packed_gate(const float* x, const uint16_t* /*xb*/, int64_t M, const W* values,
                 const uint8_t* meta, const W* bias, int64_t F, int64_t D, float* a, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (F * D * M >= (1 << 16))
  for (int64_t f = 0; f < F; ++f) {
    const W* v = values + f * (D / 2);
    const uint8_t* mt = meta + f * meta_cols(D);
    for (int64_t m = 0; m < M; ++m) {
      float s;
      packed_rows_dot<1>(x + m * D, &v, &mt, D, &s);
      a[m * F + f] = s + (bias ? load1(bias + f) : 0.f);
    }
  }
}

template <int R, typename W>
void axpy_dense_rows(const float* h, const W* const* rows, float* acc, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float s = acc[i];
    for (int r = 0; r < R; ++r) s = std::fma(h[r], load1(rows[r] + i), s);
    acc[i] = s;
  }
}

template <int R, typename W>
void axpy_packed_rows(const float* h, const W* const* v, const uint8_t* const* meta, float* acc,
                      int64_t len) {
  axpy_packed_groups_scalar<R>(h, v, meta, acc, 0, len / 4);
}

template <int R, typename W>
void axpy_group_rows(int n, const float* const* h4, float* const* acc, const W* const* v0,
                     const W* const* v1, const uint8_t* const* meta, int64_t len) {
  axpy_group_rows_scalar<R>(n, h4, acc, v0, v1, meta, 0, len);
}

#include "sparse_ffn_driver.inc"

bool use_avx2() { return detail::sparse24_use_avx2(); }

}  // namespace

const char* sparse_ffn_impl() { return use_avx2() ? "avx2" : "scalar"; }

int64_t ffn_gate(const FfnProblem& p, float* a, int32_t* active) {
  if (p.M == 0 || p.F == 0) return 0;
  if (use_avx2()) return detail::ffn_gate_avx2(p, a, active);
  return ffn_gate_entry(p, a, active);
}

void ffn_tail(const FfnProblem& p, const float* a, const int32_t* active, int64_t nactive, void* y,
              int64_t ldy) {
  if (p.M == 0 || p.D == 0) return;
  if (use_avx2()) return detail::ffn_tail_avx2(p, a, active, nactive, y, ldy);
  ffn_tail_entry(p, a, active, nactive, y, ldy);
}

void dense_gemv(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N, int64_t K,
                float* y, int nthreads) {
  if (M == 0 || N == 0) return;
  // (2+ rows with AVX-512: the AVX2 kernel's ymm code in twice the registers, the same bits)
  if (M > 1 && detail::sparse24_use_avx512())
    return detail::dense_gemm_rows_avx512(x, M, w, dtype, N, K, y, nthreads);
  if (use_avx2()) return detail::dense_gemv_avx2(x, M, w, dtype, N, K, y, nthreads);
  dense_gemv_entry(x, M, w, dtype, N, K, y, nthreads);
}

void ffn_linear24_amx(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                      const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias, float* y,
                      int nthreads) {
  if (M == 0 || N == 0) return;
  detail::sparse24_linear_bf16_amx_f32out(x, M, ldx, values, meta, N, K, bias, y, N, nthreads);
}

void ffn_down24_amx(const float* h, int64_t M, const uint16_t* values, const uint8_t* meta,
                    int64_t F, int64_t D, const uint16_t* bias, uint16_t* y, int nthreads) {
  detail::ffn_down24_groups_amx(h, M, F, values, meta, F, D, bias, y, D, nthreads);
}

namespace {

#include "sparse_ffn_unpack_down.inc"

}  // namespace

void unpack_down24(const void* values, const uint8_t* meta, int64_t F, int64_t D, int64_t n0,
                   int64_t cols, int elem_size, void* dense, int nthreads) {
  if (F == 0 || cols == 0) return;
  if (use_avx2()) return detail::unpack_down24_avx2(values, meta, F, D, n0, cols, elem_size, dense, nthreads);
  unpack_down_bits(values, meta, F, D, n0, cols, elem_size, dense, resolve_threads(nthreads));
}

}  // namespace pysparse::core
