// AVX2/FMA kernels for y = x @ W^T with W in the packed 2:4 layout (see sparse24.h).
//
// GEMV (few rows of x; batch-1 decode): memory-bound, so the goal is to stream values+meta once at
// full bandwidth. For 16 columns of x (4 groups, 2 meta bytes, 8 kept weights) we load x twice,
// pick the 4+4 needed elements with vpermps driven by a 256-entry table indexed by the meta byte,
// blend, and do one 8-wide FMA against the 8 packed weights. Four rows of W are in flight at once:
// they share the x loads and give the core four independent streams and FMA chains.
//
// GEMM (many rows of x): compute-bound. x is packed transposed in panels of 32 rows
// (xp[k][32], zero-padded), so each kept weight w[n,k] becomes a broadcast and four 8-wide FMAs
// against xp[k][0:32]; two rows of W at a time keep 8 accumulators (enough chains to cover the FMA
// latency). Only the kept half of the multiply-adds is done, so at equal FMA throughput this is up
// to 2x a dense GEMM. W is walked in chunks of rows that stay in L2 while every x panel passes over
// them, so W is read from memory once per call.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"

namespace pysparse::core::detail {

// Crossover between the GEMV and GEMM kernels, measured with bench/linear24.py (fp32 and bf16,
// 4096x4096 and 11008x4096) on the 2-core AVX2 dev machine: the GEMV kernel pays vpermps per row
// of x, the GEMM kernel wastes lanes when M is far below its 8-row granularity.
const int kGemvMaxRows = 4;

namespace {

int resolve_threads(int nthreads) {
#ifdef _OPENMP
  return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
  (void)nthreads;
  return 1;
#endif
}

// kPerm[b]: vpermps indices for meta byte b: lanes {i0, i1, 4+i2, 4+i3} twice, so the same entry
// serves the low half (first 8 columns) and the high half (next 8 columns after the blend).
// kOff[b]: the column offsets of the four kept weights of the two groups of byte b.
struct Tables {
  alignas(64) uint8_t perm[256][8];
  alignas(64) uint8_t off[256][4];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      const uint8_t o[4] = {uint8_t(b & 3), uint8_t((b >> 2) & 3), uint8_t(4 + ((b >> 4) & 3)),
                            uint8_t(4 + ((b >> 6) & 3))};
      for (int i = 0; i < 4; ++i) {
        perm[b][i] = o[i];
        perm[b][i + 4] = o[i];
        off[b][i] = o[i];
      }
    }
  }
};
const Tables kTables;

inline __m256i perm_index(uint8_t b) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTables.perm[b])));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 8 packed weights as fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = float_to_bf16(v); }

// ---- GEMV -------------------------------------------------------------------------------------
// RB rows of W (starting at n) against one fp32 row of x; returns the RB dot products.
template <int RB, typename W>
inline void gemv_rows(const float* x, const W* values, const uint8_t* meta, int64_t n, int64_t K,
                      float* out) {
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 16;  // 4 groups each
  __m256 acc[RB];
  const W* v[RB];
  const uint8_t* mt[RB];
  for (int r = 0; r < RB; ++r) {
    acc[r] = _mm256_setzero_ps();
    v[r] = values + (n + r) * half;
    mt[r] = meta + (n + r) * mcols;
  }
  for (int64_t j = 0; j < chunks; ++j) {
    const __m256 xa = _mm256_loadu_ps(x + 16 * j);
    const __m256 xb = _mm256_loadu_ps(x + 16 * j + 8);
    for (int r = 0; r < RB; ++r) {
      const __m256 pa = _mm256_permutevar8x32_ps(xa, perm_index(mt[r][2 * j]));
      const __m256 pb = _mm256_permutevar8x32_ps(xb, perm_index(mt[r][2 * j + 1]));
      const __m256 xs = _mm256_blend_ps(pa, pb, 0xF0);
      acc[r] = _mm256_fmadd_ps(load8(v[r] + 8 * j), xs, acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    float s = hsum(acc[r]);
    for (int64_t g = chunks * 4; g < K / 4; ++g) {
      const unsigned nib = (mt[r][g / 2] >> ((g & 1) * 4)) & 0xFu;
      s += load1(v[r] + 2 * g) * x[4 * g + (nib & 3u)];
      s += load1(v[r] + 2 * g + 1) * x[4 * g + (nib >> 2)];
    }
    out[r] = s;
  }
}

template <typename W, typename Y>
void gemv(const float* xf, int64_t M, const W* values, const uint8_t* meta, int64_t N, int64_t K,
          const W* bias, Y* y, int64_t ldy, int nt) {
  constexpr int RB = 4;
  const int64_t blocks = (N + RB - 1) / RB;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * RB;
    const int rows = static_cast<int>(std::min<int64_t>(RB, N - n0));
    for (int64_t m = 0; m < M; ++m) {
      float out[RB];
      const float* xr = xf + m * K;
      if (rows == RB) {
        gemv_rows<RB>(xr, values, meta, n0, K, out);
      } else {
        for (int r = 0; r < rows; ++r) gemv_rows<1>(xr, values, meta, n0 + r, K, out + r);
      }
      for (int r = 0; r < rows; ++r)
        store1(y + m * ldy + n0 + r, out[r] + (bias ? load1(bias + n0 + r) : 0.f));
    }
  }
}

// ---- GEMM -------------------------------------------------------------------------------------
constexpr int kPanel = 32;  // rows of x per packed panel (4 ymm)

// Accumulates rows n and n+1 of W against one panel of R*8 rows of x (xp: [K][32]).
template <int R, typename W>
inline void gemm_pair(const float* xp, const W* v0, const uint8_t* m0, const W* v1,
                      const uint8_t* m1, int64_t K, float* out0, float* out1) {
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  const int64_t groups = K / 4;
  const int64_t full_bytes = groups / 2;
  alignas(32) float w0[8], w1[8];
  auto step = [&](const float* xk, const uint8_t* off, const float* w, __m256* acc, int count) {
    for (int i = 0; i < count; ++i) {
      const __m256 s = _mm256_broadcast_ss(w + i);
      const float* xr = xk + off[i] * kPanel;
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(s, _mm256_load_ps(xr + 8 * r), acc[r]);
    }
  };
  int64_t j = 0;
  for (; j + 1 < full_bytes; j += 2) {  // two meta bytes = 8 kept weights per row
    _mm256_store_ps(w0, load8(v0 + 4 * j));
    _mm256_store_ps(w1, load8(v1 + 4 * j));
    const float* xk = xp + 8 * j * kPanel;
    step(xk, kTables.off[m0[j]], w0, a, 4);
    step(xk, kTables.off[m1[j]], w1, b, 4);
    step(xk + 8 * kPanel, kTables.off[m0[j + 1]], w0 + 4, a, 4);
    step(xk + 8 * kPanel, kTables.off[m1[j + 1]], w1 + 4, b, 4);
  }
  for (; j < full_bytes; ++j) {
    for (int i = 0; i < 4; ++i) {
      w0[i] = load1(v0 + 4 * j + i);
      w1[i] = load1(v1 + 4 * j + i);
    }
    const float* xk = xp + 8 * j * kPanel;
    step(xk, kTables.off[m0[j]], w0, a, 4);
    step(xk, kTables.off[m1[j]], w1, b, 4);
  }
  if (groups & 1) {  // the last byte holds a single group (low nibble)
    for (int i = 0; i < 2; ++i) {
      w0[i] = load1(v0 + 4 * j + i);
      w1[i] = load1(v1 + 4 * j + i);
    }
    const float* xk = xp + 8 * j * kPanel;
    step(xk, kTables.off[m0[j]], w0, a, 2);
    step(xk, kTables.off[m1[j]], w1, b, 2);
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out0 + 8 * r, a[r]);
    _mm256_storeu_ps(out1 + 8 * r, b[r]);
  }
}

template <typename X>
inline float xval(const X* x, int64_t i) {
  return load1(x + i);
}

template <typename X, typename W, typename Y>
void gemm(const X* x, int64_t M, int64_t ldx, const W* values, const uint8_t* meta, int64_t N,
          int64_t K, const W* bias, Y* y, int64_t ldy, int nt) {
  const int64_t panels = (M + kPanel - 1) / kPanel;
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  // Packed x: panels * K * 32 floats, 32-byte aligned for the aligned panel loads.
  const size_t xp_elems = static_cast<size_t>(panels * K * kPanel);
  float* xp = static_cast<float*>(std::aligned_alloc(64, ((xp_elems * 4 + 63) / 64) * 64));
#pragma omp parallel for schedule(static) num_threads(nt) collapse(2)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t k = 0; k < K; ++k) {
      float* dst = xp + (p * K + k) * kPanel;
      for (int i = 0; i < kPanel; ++i) {
        const int64_t m = p * kPanel + i;
        dst[i] = m < M ? xval(x + m * ldx, k) : 0.f;
      }
    }
  }
  // Rows of W per chunk: keep the chunk (values+meta) within ~256 KB of L2 while all x panels
  // stream past it.
  const int64_t bytes_per_row = half * static_cast<int64_t>(sizeof(W)) + mcols;
  int64_t chunk = std::max<int64_t>(2, (256 * 1024) / std::max<int64_t>(1, bytes_per_row));
  chunk = std::min<int64_t>(chunk & ~int64_t(1), 256);
  const int64_t nchunks = (N + chunk - 1) / chunk;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n_begin = c * chunk;
    const int64_t n_end = std::min(N, n_begin + chunk);
    alignas(32) float o0[kPanel], o1[kPanel];
    for (int64_t p = 0; p < panels; ++p) {
      const float* xpp = xp + p * K * kPanel;
      const int64_t m0 = p * kPanel;
      const int rows = static_cast<int>(std::min<int64_t>(kPanel, M - m0));
      const int R = (rows + 7) / 8;
      for (int64_t n = n_begin; n < n_end; n += 2) {
        const int64_t n1 = std::min(n + 1, n_end - 1);  // odd tail: compute row n twice
        const W* v0 = values + n * half;
        const W* v1 = values + n1 * half;
        const uint8_t* mt0 = meta + n * mcols;
        const uint8_t* mt1 = meta + n1 * mcols;
        switch (R) {
          case 1: gemm_pair<1>(xpp, v0, mt0, v1, mt1, K, o0, o1); break;
          case 2: gemm_pair<2>(xpp, v0, mt0, v1, mt1, K, o0, o1); break;
          case 3: gemm_pair<3>(xpp, v0, mt0, v1, mt1, K, o0, o1); break;
          default: gemm_pair<4>(xpp, v0, mt0, v1, mt1, K, o0, o1); break;
        }
        const float b0 = bias ? load1(bias + n) : 0.f;
        const float b1 = bias ? load1(bias + n1) : 0.f;
        for (int i = 0; i < rows; ++i) {
          store1(y + (m0 + i) * ldy + n, o0[i] + b0);
          if (n1 != n) store1(y + (m0 + i) * ldy + n1, o1[i] + b1);
        }
      }
    }
  }
  std::free(xp);
}

template <typename X>
std::vector<float> to_f32_rows(const X* x, int64_t M, int64_t ldx, int64_t K) {
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = load1(x + m * ldx + k);
  return xf;
}

}  // namespace

void sparse24_linear_f32_avx2(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  const int nt = resolve_threads(nthreads);
  if (M <= kGemvMaxRows) {
    if (ldx == K) {
      gemv(x, M, values, meta, N, K, bias, y, ldy, nt);
    } else {
      const std::vector<float> xf = to_f32_rows(x, M, ldx, K);
      gemv(xf.data(), M, values, meta, N, K, bias, y, ldy, nt);
    }
  } else {
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, nt);
  }
}

void sparse24_linear_bf16_avx2(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  const int nt = resolve_threads(nthreads);
  if (M <= kGemvMaxRows) {
    // x is tiny next to W; widening it once keeps the inner loop identical to fp32.
    const std::vector<float> xf = to_f32_rows(x, M, ldx, K);
    gemv(xf.data(), M, values, meta, N, K, bias, y, ldy, nt);
  } else {
    gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, nt);
  }
}

}  // namespace pysparse::core::detail
