// AVX-512 builds of the 2:4 kernels. Only this file is compiled with -mavx512f; the dispatcher
// (sparse24_linear.cpp) calls it only on CPUs that report AVX-512F.
//
// GEMM (sparse24_gemm.inc): 16-wide FMAs double the work per instruction over AVX2.
// GEMV: for 32 columns of x (8 groups, 4 meta bytes, 16 kept weights) one vpermt2ps picks the 16
// needed x values out of two registers, with indices computed from the 32-bit meta word by a
// per-lane variable shift (no table): one port-5 uop per 16 weights, against four per 16 with
// AVX2's permute + blend. That is what keeps the decode GEMV at memory speed.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sparse24_internal.h"

namespace pysparse::core::detail {
namespace {

#include "sparse24_simd_common.inc"

constexpr Route kGemvRoute = Route::kGemvAvx512;
constexpr Route kGemmRoute = Route::kGemmAvx512;

struct Vec {
  using T = __m512;
  static constexpr int kRowsPerPass = 4;  // accumulators: 4 rows x 4 vectors
  static constexpr int kWidth = 16;
  static T load(const float* p) { return _mm512_load_ps(p); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};

#include "sparse24_gemm.inc"

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// RB rows of W (starting at n) against MT rows of x (stride K): out[m][r]. The permute indices and
// the widened weights of each 32-column chunk are made once and used for all MT rows of x, so
// small-batch decode costs one vpermt2ps + one FMA per 16 weights per row of x.
constexpr int kGemvXRows = 4;

template <int RB, int MT, typename W>
inline void gemv_rows(const float* x, const W* values, const uint8_t* meta, int64_t n, int64_t K,
                      float (*out)[RB]) {
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 32;  // 8 groups each
  // Lane t takes weight t: group t/2, slot t%2, whose index sits at bits 2t..2t+1 of the meta word.
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[MT][RB];
  const W* v[RB];
  const uint8_t* mt[RB];
  PS_UNROLL
  for (int r = 0; r < RB; ++r) {
    v[r] = values + (n + r) * half;
    mt[r] = meta + (n + r) * mcols;
    PS_UNROLL
    for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < chunks; ++j) {
    __m512 xa[MT], xb[MT];
    PS_UNROLL
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_loadu_ps(x + m * K + 32 * j);
      xb[m] = _mm512_loadu_ps(x + m * K + 32 * j + 16);
    }
    // The next block's rows, one line ahead per row per step: the 8 row streams of a block are
    // only K/2 values long, too short for the hardware prefetcher to ramp up on each; fetching
    // the next block's while this one is decoded keeps the loads in flight (a prefetch past the
    // end of the weight is a no-op hint).
    PS_UNROLL
    for (int r = 0; r < RB; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(v[r] + RB * half + 16 * j), _MM_HINT_T0);
    PS_UNROLL
    for (int r = 0; r < RB; ++r) {
      int32_t word;
      std::memcpy(&word, mt[r] + 4 * j, sizeof(word));
      // idx = base | ((word >> 2t) & 3) in one vpternlogd (0xEA = (A & B) | C): base has no bits
      // below 4, so OR is the add. 512-bit ALU work only issues on ports 0 and 5 here.
      const __m512i idx = _mm512_ternarylogic_epi32(
          _mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three, base, 0xEA);
      const __m512 w = load16(v[r] + 16 * j);
      PS_UNROLL
      for (int m = 0; m < MT; ++m)
        acc[m][r] = _mm512_fmadd_ps(w, _mm512_permutex2var_ps(xa[m], idx, xb[m]), acc[m][r]);
    }
  }
  PS_UNROLL
  for (int m = 0; m < MT; ++m) {
    const float* xr = x + m * K;
    PS_UNROLL
    for (int r = 0; r < RB; ++r) {
      float s = hsum512(acc[m][r]);
      for (int64_t g = chunks * 8; g < K / 4; ++g) {
        const unsigned nib = (mt[r][g / 2] >> ((g & 1) * 4)) & 0xFu;
        s += load1(v[r] + 2 * g) * xr[4 * g + (nib & 3u)];
        s += load1(v[r] + 2 * g + 1) * xr[4 * g + (nib >> 2)];
      }
      out[m][r] = s;
    }
  }
}

// One row of W (row n) against one fp32 row of x, for the M = 1 decode GEMV: each thread walks its
// rows one after another, so its loads are one sequential stream (values, and meta beside it),
// and asks for the bytes kStreamAheadBytes ahead explicitly (rows are contiguous, so that runs
// into the next rows). Against the 8-rows-in-flight gemv_rows, whose 8 interleaved streams are
// each too short (K/2 values) for the hardware prefetcher on SmolLM2's weights: a 2:4 + act-sparse
// fp32 decode step 14.1-14.4 ms -> 12.7 ms (AMD EPYC AVX-512, 2 threads, same build, env A/B).
// One accumulator chain, the order gemv_rows uses for each of its rows: a row's result is the same
// bits whichever kernel computes it, so a row of x gets the same output alone or in a batch.
constexpr bool kGemvRowStream = true;

template <typename W>
inline float gemv_row_stream(const float* x, const W* values, const uint8_t* meta, int64_t n,
                             int64_t K) {
  const int64_t half = K / 2;
  const int64_t mcols = meta_cols(K);
  const int64_t chunks = K / 32;
  const W* v = values + n * half;
  const uint8_t* mt = meta + n * mcols;
  const char* ahead = reinterpret_cast<const char*>(v) + kStreamAheadBytes;
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < chunks; ++j) {
    _mm_prefetch(ahead + 16 * j * sizeof(W), _MM_HINT_T0);
    int32_t word;
    std::memcpy(&word, mt + 4 * j, sizeof(word));
    const __m512i idx = _mm512_ternarylogic_epi32(
        _mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), three, base, 0xEA);
    const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(x + 32 * j), idx,
                                             _mm512_loadu_ps(x + 32 * j + 16));
    acc = _mm512_fmadd_ps(load16(v + 16 * j), xs, acc);
  }
  float s = hsum512(acc);
  for (int64_t g = chunks * 8; g < K / 4; ++g) {
    const unsigned nib = (mt[g / 2] >> ((g & 1) * 4)) & 0xFu;
    s += load1(v + 2 * g) * x[4 * g + (nib & 3u)];
    s += load1(v + 2 * g + 1) * x[4 * g + (nib >> 2)];
  }
  return s;
}

#include "sparse24_gemv.inc"

}  // namespace

// 16-bit decompression, 8 groups (32 outputs) per step: each output lane works out from the meta
// nibbles which packed value it takes (2g, or 2g+1 when its position is idx1) and whether it takes
// one at all, then one masked vpermw writes all 32 lanes (zeros included) in a single 64 B store.
void decompress16_avx512(const uint16_t* values, const uint8_t* meta, int64_t N, int64_t K,
                         uint16_t* dense) {
  const int64_t groups = K / 4;
  const int64_t mcols = meta_cols(K);
  const int64_t steps = groups / 8;
  alignas(64) uint16_t shift[32], pos[32], base[32];
  for (int o = 0; o < 32; ++o) {
    shift[o] = static_cast<uint16_t>(4 * ((o / 4) % 4));
    pos[o] = static_cast<uint16_t>(o % 4);
    base[o] = static_cast<uint16_t>(2 * (o / 4));
  }
  const __m512i vshift = _mm512_load_si512(shift), vpos = _mm512_load_si512(pos);
  const __m512i vbase = _mm512_load_si512(base);
  const __m512i f = _mm512_set1_epi16(0xF), three = _mm512_set1_epi16(3), one = _mm512_set1_epi16(1);
#pragma omp parallel for schedule(static) if (N * K > 65536)
  for (int64_t n = 0; n < N; ++n) {
    const uint16_t* vrow = values + n * (K / 2);
    const uint8_t* mrow = meta + n * mcols;
    uint16_t* out = dense + n * K;
    for (int64_t j = 0; j < steps; ++j) {
      uint16_t lo, hi;  // meta of groups 8j..8j+3 and 8j+4..8j+7
      std::memcpy(&lo, mrow + 4 * j, 2);
      std::memcpy(&hi, mrow + 4 * j + 2, 2);
      const __m512i word = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(lo)),
                                              _mm256_set1_epi16(hi), 1);
      const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(word, vshift), f);
      const __mmask32 first = _mm512_cmpeq_epi16_mask(_mm512_and_si512(nib, three), vpos);
      const __mmask32 second = _mm512_cmpeq_epi16_mask(_mm512_srli_epi16(nib, 2), vpos);
      const __m512i src = _mm512_mask_add_epi16(vbase, second, vbase, one);
      const __m512i vals =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + 16 * j)));
      _mm512_storeu_si512(out + 32 * j, _mm512_maskz_permutexvar_epi16(first | second, src, vals));
    }
    for (int64_t g = steps * 8; g < groups; ++g) {
      const unsigned nib = (mrow[g / 2] >> ((g & 1) * 4)) & 0xFu;
      uint16_t* d = out + 4 * g;
      d[0] = d[1] = d[2] = d[3] = 0;
      d[nib & 3u] = vrow[2 * g];
      d[nib >> 2] = vrow[2 * g + 1];
    }
  }
}

// The same for 32-bit elements: 4 groups (16 outputs) per step, one masked vpermps.
void decompress32_avx512(const uint32_t* values, const uint8_t* meta, int64_t N, int64_t K,
                         uint32_t* dense) {
  const int64_t groups = K / 4;
  const int64_t mcols = meta_cols(K);
  const int64_t steps = groups / 4;
  const __m512i vshift = _mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m512i vpos = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512i vbase = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i f = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
#pragma omp parallel for schedule(static) if (N * K > 65536)
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* vrow = values + n * (K / 2);
    const uint8_t* mrow = meta + n * mcols;
    uint32_t* out = dense + n * K;
    for (int64_t j = 0; j < steps; ++j) {
      uint16_t word;  // meta of groups 4j..4j+3
      std::memcpy(&word, mrow + 2 * j, 2);
      const __m512i nib = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), vshift), f);
      const __mmask16 first = _mm512_cmpeq_epi32_mask(_mm512_and_si512(nib, three), vpos);
      const __mmask16 second = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(nib, 2), vpos);
      const __m512i src = _mm512_mask_add_epi32(vbase, second, vbase, one);
      const __m512i vals =
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + 8 * j)));
      _mm512_storeu_si512(out + 16 * j, _mm512_maskz_permutexvar_epi32(first | second, src, vals));
    }
    for (int64_t g = steps * 4; g < groups; ++g) {
      const unsigned nib = (mrow[g / 2] >> ((g & 1) * 4)) & 0xFu;
      uint32_t* d = out + 4 * g;
      d[0] = d[1] = d[2] = d[3] = 0;
      d[nib & 3u] = vrow[2 * g];
      d[nib >> 2] = vrow[2 * g + 1];
    }
  }
}

void sparse24_gemv_f32_avx512(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  gemv_entry(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_gemv_bf16_avx512(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  gemv_entry(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_gemv_f32out_avx512(const float* x, int64_t M, const float* values, const uint8_t* meta,
                                 int64_t N, int64_t K, const float* bias, float* y, int64_t ldy,
                                 int nthreads) {
  gemv_entry(x, M, K, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_gemv_f32out_avx512(const float* x, int64_t M, const uint16_t* values,
                                 const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                                 float* y, int64_t ldy, int nthreads) {
  gemv_entry(x, M, K, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_gemm_f32_avx512(const float* x, int64_t M, int64_t ldx, const float* values,
                              const uint8_t* meta, int64_t N, int64_t K, const float* bias,
                              float* y, int64_t ldy, int nthreads) {
  gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

void sparse24_gemm_bf16_avx512(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                               const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                               uint16_t* y, int64_t ldy, int nthreads) {
  gemm(x, M, ldx, values, meta, N, K, bias, y, ldy, resolve_threads(nthreads));
}

}  // namespace pysparse::core::detail
