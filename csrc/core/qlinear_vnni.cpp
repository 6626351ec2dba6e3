// The int8 linears on AVX512-VNNI dot products (qlinear.h, route "avx512_vnni"). Only this file is
// compiled with -mavx512vnni -mavx512vbmi; the dispatcher (qlinear.cpp) calls it only on CPUs
// that report AVX512-VNNI and VBMI, unless PYSPARSE_DISABLE_VNNI=1.
//
// Why: widening int8 weights to fp32 costs ~3 instructions per 16 weights (dense) and ~6 per 16
// kept weights (2:4), which left the 2:4 int8 GEMV compute-bound (~32 GB/s on Zen 4, no faster
// than bf16 2:4). vpdpbusd does 64 int8 products in one instruction, but both operands must be
// integers: x is quantised on the fly, per row and per block of 32 columns (kQBlock; symmetric,
// round to nearest even: xq = rint(x * (127 / amax)), x ~ xq * amax / 127). Blocks of 32 are
// what llama.cpp quantises activations to for its Q8_0 dot products; one scale per whole row
// cost SmolLM2 3.6% perplexity against 0.2% for blocks of 32 (bench/llm_quality.py notes).
// vpdpbusd multiplies unsigned by signed bytes, so x goes in as xq + 128 and each lane's
// 128 * sum(w) is taken back (a second vpdpbusd on the weights alone, shared by every row of x).
// Each 32-bit lane holds one block's integer partial sum exactly; it is converted and scaled by
// its block's scale into an fp32 accumulator. 2:4: per 128 columns the 64 kept weights' x bytes
// are picked by one vpermt2b, with byte indices from the 16 meta bytes by one vpmultishiftqb and
// one vpternlogd. A row's last, partial chunk takes masked loads: no scalar remainder (one for
// SmolLM2's K = 576, 4.5 chunks of 128, made the VNNI gate slower than widening).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qlinear_internal.h"
#include "sparse24_internal.h"

namespace pysparse::core::detail {

#ifdef PYSPARSE_NO_VNNI

bool qlinear_vnni_built() { return false; }
void int8_linear_vnni(const float*, int64_t, const int8_t*, const float*, const float*, int64_t,
                      int64_t, float*, int) {}
void sparse24_int8_linear_vnni(const float*, int64_t, const int8_t*, const uint8_t*, const float*,
                               const float*, int64_t, int64_t, float*, int) {}
void int4_linear_vnni(const float*, int64_t, const QWeight&, const float*, int64_t, int64_t,
                      float*, int) {}

#else

namespace {

constexpr Route kQRoute = Route::kInt8Linear;

// x quantised per row: q [M, K] (xq + 128), and per chunk the 16 lanes' block scales (dense: 64
// columns a chunk, 8 lanes a block; 2:4: 128 columns, 4 lanes a block), so that a chunk's scales
// are one load.
struct QuantRows {
  const uint8_t* q;
  const float* lane;
  int64_t K, nlanes;
  QuantRows at(int64_t m) const { return {q + m * K, lane + m * nlanes, K, nlanes}; }
};

// The calling thread's buffers for x quantised (grown, never shrunk: a decode step calls these
// kernels ~200 times with the same few shapes, and three allocations each were measurable).
struct QuantBuffer {
  std::vector<uint8_t> q;
  std::vector<float> block, lane;
};

// One block of n <= 32 values: xq + 128 into q, the block's scale (max |x| / 127) returned, with
// xq = x * (127 / max |x|) in fp32 rounded to nearest even (vcvtps2dq under the default rounding
// mode) and clamped to +-127; 0 for an all-zero block. The tests' reference
// (pysparse.kernels.reference.quantize_activations_a8, the gtests' quantised_x) does the same
// fp32 operations.
inline float quantize_block(const float* x, int64_t n, uint8_t* q) {
  const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  const __mmask16 m1 = static_cast<__mmask16>(n >= 32 ? 0xFFFF : (n > 16 ? (1u << (n - 16)) - 1 : 0));
  const __m512 a = _mm512_maskz_loadu_ps(m0, x), b = _mm512_maskz_loadu_ps(m1, x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
  auto quant = [&](__m512 v) {
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
    return _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi), off);
  };
  _mm512_mask_cvtepi32_storeu_epi8(q, m0, quant(a));
  _mm512_mask_cvtepi32_storeu_epi8(q + 16, m1, quant(b));
  return amax / 127.f;
}

QuantRows quantize_rows(const float* x, int64_t M, int64_t K, bool packed) {
  thread_local QuantBuffer b;
  const int64_t nblocks = (K + kQBlock - 1) / kQBlock;
  const int64_t chunk = packed ? 128 : 64;
  const int64_t nlanes = (K + chunk - 1) / chunk * 16;  // the last chunk may be partial
  auto grow = [](auto& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  };
  grow(b.q, M * K);
  grow(b.block, M * nblocks);
  grow(b.lane, std::max<int64_t>(M * nlanes, 1));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t k0 = blk * kQBlock, k1 = std::min(K, k0 + kQBlock);
      b.block[m * nblocks + blk] = quantize_block(xr + k0, k1 - k0, b.q.data() + m * K + k0);
    }
    for (int64_t l = 0; l < nlanes; ++l) {
      // lane l of chunk j covers columns chunk*j + (chunk/16)*(l%16) onward, all in one block
      const int64_t col = std::min((l / 16) * chunk + (l % 16) * (chunk / 16), K - 1);
      b.lane[m * nlanes + l] = b.block[m * nblocks + col / kQBlock];
    }
  }
  return {b.q.data(), b.lane.data(), K, nlanes};
}

// -128 * sum(w) per lane of 4 bytes: what xq + 128 adds to every lane's dot product.
inline __m512i minus_offset(__m512i w) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, w));
}

// Bytes [0, n) of a 64-byte load (n <= 64), zeros past them: a chunk's part inside the row.
inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

// 64 stored int4 values (32 bytes, of which `bytes` lie inside the row) as signed bytes, in the
// order of the columns they multiply: the two blocks of 32 as [lo A, hi A, lo B, hi B] (qlinear.h's
// layout), values past the row zero.
inline __m512i int4_chunk(const uint8_t* p, int64_t bytes) {
  const __mmask32 in_row = bytes >= 32 ? ~0u : ((1u << bytes) - 1u);
  const __m512i z = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(in_row, p));
  const __m512i d = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(1, 1, 0, 0));
  const __m512i nib = _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, d, _mm512_srli_epi16(d, 4)),
                                       _mm512_set1_epi8(0x0F));
  return _mm512_maskz_sub_epi8(first_bytes(2 * bytes), nib, _mm512_set1_epi8(8));
}

// The scales of chunk j's stored values 0-31 (lanes 0-7) and 32-63 (lanes 8-15) of one int4 row.
inline __m512 int4_scale_lanes(const QWeight& w, int64_t j) {
  const int64_t g0 = j * 64 / w.group;
  const int64_t n = std::min<int64_t>(64 / w.group, w.sstride - g0);
  const __m128i h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1u), w.gscale + g0);
  const __m512 f = _mm512_cvtph_ps(_mm256_zextsi128_si256(h));
  const __m512i two = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(w.group == 32 ? two : _mm512_setzero_si512(), f);
}

// Every layout in one body: a chunk is 64 columns (dense) or 128 (2:4: 64 kept weights), 64
// stored values in either case (int8: 64 bytes; int4: 32), the last chunk partial: its loads
// masked to the row (values zero past it, so those lanes add exact zeros: 0 * x, and no offset
// since w = 0; in 2:4 whatever index a zero meta nibble points at).
template <int RB, int MT, bool kPacked, bool kInt4>
inline void q_vnni(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  constexpr int64_t kCols = kPacked ? 128 : 64;
  constexpr int64_t kBytes = kInt4 ? 32 : 64;  // of W per row and chunk
  const int64_t chunks = (K + kCols - 1) / kCols;
  // 2:4: kept weight t of a chunk (group t/2) has its index at bits 2t..2t+1 of the chunk's 128
  // meta bits: byte t of the selection takes bits from offset 2t mod 64 of meta qword t/32 (the
  // meta spread so that output qword q reads meta qword q/4), then idx = (bits & 3) | 4 * (t / 2).
  alignas(64) static constexpr struct Consts {
    uint8_t shift[64], base[64];
    constexpr Consts() : shift(), base() {
      for (int t = 0; t < 64; ++t) {
        shift[t] = static_cast<uint8_t>((2 * t) & 63);
        base[t] = static_cast<uint8_t>(4 * (t / 2));
      }
    }
  } kC{};
  const __m512i shift = _mm512_load_si512(kC.shift);
  const __m512i base = _mm512_load_si512(kC.base);
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i spread = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w.w) + kStreamAheadBytes;
  const char* mahead = reinterpret_cast<const char*>(w.meta) + kStreamAheadBytes / 4;
  for (int64_t j = 0; j < chunks; ++j) {
    // The RB rows are contiguous: RB * kBytes bytes of one stream per chunk.
    for (int l = 0; l < (RB * kBytes + 63) / 64; ++l)
      _mm_prefetch(ahead + RB * kBytes * j + 64 * l, _MM_HINT_T0);
    if (kPacked && (j & 3) == 0) _mm_prefetch(mahead + RB * 16 * j, _MM_HINT_T0);
    const int64_t cols = K - kCols * j;  // >= kCols but in the last chunk
    __m512i xa[MT], xb[MT];
    __m512 ls[MT];
    for (int m = 0; m < MT; ++m) {
      xa[m] = _mm512_maskz_loadu_epi8(first_bytes(cols), x.q + m * x.K + kCols * j);
      if constexpr (kPacked)
        xb[m] = _mm512_maskz_loadu_epi8(first_bytes(std::max<int64_t>(cols - 64, 0)),
                                        x.q + m * x.K + kCols * j + 64);
      ls[m] = _mm512_loadu_ps(x.lane + m * x.nlanes + 16 * j);
    }
    __mmask16 m_live = 0;
    if constexpr (kPacked) m_live = static_cast<__mmask16>(first_bytes((cols + 7) / 8));
    for (int r = 0; r < RB; ++r) {
      const uint8_t* wr = w.w + r * w.wstride;
      __m512i wv;
      __m512 sc;
      if constexpr (kInt4) {
        wv = int4_chunk(wr + 32 * j, std::min<int64_t>(32, w.wstride - 32 * j));
        sc = int4_scale_lanes(w.row(r), j);
      } else {
        wv = _mm512_maskz_loadu_epi8(first_bytes(kPacked ? cols / 2 : cols), wr + 64 * j);
      }
      const __m512i off = minus_offset(wv);
      __m512i idx = _mm512_setzero_si512();
      if constexpr (kPacked) {
        const __m128i m16 = _mm_maskz_loadu_epi8(m_live, w.meta + r * w.mstride + 16 * j);
        const __m512i bits = _mm512_multishift_epi64_epi8(
            shift, _mm512_permutexvar_epi64(spread, _mm512_castsi128_si512(m16)));
        idx = _mm512_ternarylogic_epi32(bits, three, base, 0xEA);  // (a & b) | c
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i xs = kPacked ? _mm512_permutex2var_epi8(xa[m], idx, xb[m]) : xa[m];
        const __m512i d = _mm512_dpbusd_epi32(off, xs, wv);
        const __m512 s = kInt4 ? _mm512_mul_ps(ls[m], sc) : ls[m];
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int RB, int MT>
inline void q_dense(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  q_vnni<RB, MT, false, false>(x, K, w, out);
}

template <int RB, int MT>
inline void q_packed(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  q_vnni<RB, MT, true, false>(x, K, w, out);
}

template <int RB, int MT, bool kPacked>
inline void q_int4(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  q_vnni<RB, MT, kPacked, true>(x, K, w, out);
}

#include "qlinear_driver.inc"

}  // namespace

bool qlinear_vnni_built() { return true; }

void int8_linear_vnni(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kDense8>(quantize_rows(x, M, K, false), M, int8_weight(q, nullptr, scale, K), bias,
                       N, K, y, nt);
}

void sparse24_int8_linear_vnni(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt) {
  qlinear_run<kPacked8>(quantize_rows(x, M, K, true), M, int8_weight(values, meta, scale, K),
                        bias, N, K, y, nt);
}

void int4_linear_vnni(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                      int64_t K, float* y, int nt) {
  if (w.meta)
    qlinear_run<kPacked4>(quantize_rows(x, M, K, true), M, w, bias, N, K, y, nt);
  else
    qlinear_run<kDense4>(quantize_rows(x, M, K, false), M, w, bias, N, K, y, nt);
}

#endif  // PYSPARSE_NO_VNNI

}  // namespace pysparse::core::detail
