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
  const float* block;  // the per-block scales themselves (the int4 kernels' lanes)
  int64_t K, nlanes, nblocks;
  QuantRows at(int64_t m) const {
    return {q + m * K, lane + m * nlanes, block + m * nblocks, K, nlanes, nblocks};
  }
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

// lanes: the int8 kernels' per-lane scale table (the int4 kernels read the block scales).
QuantRows quantize_rows(const float* x, int64_t M, int64_t K, bool packed, bool lanes = true) {
  thread_local QuantBuffer b;
  const int64_t nblocks = (K + kQBlock - 1) / kQBlock;
  const int64_t chunk = packed ? 128 : 64;
  const int64_t nlanes = lanes ? (K + chunk - 1) / chunk * 16 : 0;  // last chunk may be partial
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
  return {b.q.data(), b.lane.data(), b.block.data(), K, nlanes, nblocks};
}

// -128 * sum(w) per lane of 4 bytes: what xq + 128 adds to every lane's dot product.
inline __m512i minus_offset(__m512i w) {
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  return _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, w));
}

// Bytes [0, n) of a 64-byte load (n <= 64), zeros past them: a chunk's part inside the row.
inline __mmask64 first_bytes(int64_t n) { return n >= 64 ? ~0ULL : ((1ULL << n) - 1); }

// Both int8 layouts in one body: a chunk is 64 columns (dense) or 128 (2:4: 64 kept weights),
// 64 stored values in either case, the last chunk partial: its loads
// masked to the row (values zero past it, so those lanes add exact zeros: 0 * x, and no offset
// since w = 0; in 2:4 whatever index a zero meta nibble points at).
template <int RB, int MT, bool kPacked>
inline void q_vnni(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  constexpr int64_t kCols = kPacked ? 128 : 64;
  constexpr int64_t kBytes = 64;  // of W per row and chunk
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
      const __m512i wv =
          _mm512_maskz_loadu_epi8(first_bytes(kPacked ? cols / 2 : cols), wr + 64 * j);
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
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), ls[m], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int RB, int MT>
inline void q_dense(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  q_vnni<RB, MT, false>(x, K, w, out);
}

template <int RB, int MT>
inline void q_packed(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  q_vnni<RB, MT, true>(x, K, w, out);
}

// ---- int4 ----
// A chunk is 128 stored values: 64 bytes of nibbles a row, four blocks of 32 (qlinear.h's
// layout: byte i of a block holds values i and i + 16). One load gives two vectors with no
// shuffle: the low nibbles, values 0-15 of each block, and the high ones, values 16-31; x is
// arranged to match once per chunk and row of x (shared by the RB rows of W). Dense: 128
// columns; 2:4: 256 columns, the kept values' x bytes picked per row as in q_vnni. Each dword lane
// of either vector holds 4 values of one block, so one block scale of x (dense: the same for the
// low and high vector; 2:4: the block of 32 columns of each) and one group scale of W apply.
// 2:4: the weights enter vpdpbusd signed (nibble - 8), x unsigned (xq + 128), as for int8; dense:
// the nibbles unsigned as they are (value + 8) and x signed, the + 8 taken back once per row of x
// (-8 * the lane's sum of xq), which saves each row of W its subtractions and offset sums.

// The group scales of chunk j's 4 blocks of one int4 row, one per dword lane (4 lanes a block).
inline __m512 int4_group_lanes(const QWeight& w, int64_t j) {
  const int per = 128 / w.group;  // groups in a chunk: 4 (g32) or 2 (g64)
  const int64_t g0 = j * per;
  const int64_t n = std::min<int64_t>(per, w.sstride - g0);
  const __m128i h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1u), w.gscale + g0);
  const __m512 f = _mm512_cvtph_ps(_mm256_zextsi128_si256(h));
  const __m512i by32 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i by64 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_permutexvar_ps(w.group == 32 ? by32 : by64, f);
}

// x's block scales for a chunk's dword lanes, 4 lanes a block: dense, blocks b0 .. b0 + 3;
// 2:4, the low vector's blocks b0, b0 + 2, b0 + 4, b0 + 6 (hi: true, the odd ones). Past the
// row: 0 (those lanes multiply zeros anyway).
template <bool kPacked>
inline __m512 x_block_lanes(const QuantRows& x, int64_t b0, bool hi) {
  constexpr int n = kPacked ? 8 : 4;
  const int64_t left = std::min<int64_t>(n, x.nblocks - b0);
  const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << left) - 1u), x.block + b0);
  const __m512i dense = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i even = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i odd = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  return _mm512_permutexvar_ps(kPacked ? (hi ? odd : even) : dense, b);
}

template <int RB, int MT, bool kPacked>
inline void q_int4(const QuantRows& x, int64_t K, const QWeight& w, float (*out)[RB]) {
  constexpr int64_t kCols = kPacked ? 256 : 128;
  const int64_t chunks = (K + kCols - 1) / kCols;
  const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const __m512i k128 = _mm512_set1_epi8(static_cast<char>(0x80));
  // dense: byte t of the low vector multiplies column 32 (t / 16) + t % 16, of the high one
  // column 32 (t / 16) + 16 + t % 16 (of the chunk's 128, in two 64-byte halves of x).
  // 2:4: kept weight t of either vector (group t / 2 of its 32-column segments) sits at index
  // 4 (t / 2) + its 2-bit slot, read from the meta as in q_vnni.
  alignas(64) static constexpr struct Consts {
    uint8_t lo[64], hi[64], shift[64], base[64];
    constexpr Consts() : lo(), hi(), shift(), base() {
      for (int t = 0; t < 64; ++t) {
        lo[t] = static_cast<uint8_t>(32 * (t / 16) + t % 16);
        hi[t] = static_cast<uint8_t>(32 * (t / 16) + 16 + t % 16);
        shift[t] = static_cast<uint8_t>((2 * t) & 63);
        base[t] = static_cast<uint8_t>(4 * (t / 2));
      }
    }
  } kC{};
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i spread = _mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m512 acc[MT][RB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  const char* ahead = reinterpret_cast<const char*>(w.w) + kStreamAheadBytes;
  const char* mahead = reinterpret_cast<const char*>(w.meta) + kStreamAheadBytes / 4;
  for (int64_t j = 0; j < chunks; ++j) {
    for (int r = 0; r < RB; ++r) _mm_prefetch(ahead + RB * 64 * j + 64 * r, _MM_HINT_T0);
    if (kPacked && (j & 1) == 0) _mm_prefetch(mahead + RB * 32 * j, _MM_HINT_T0);
    const int64_t cols = K - kCols * j;
    // x: dense, the low and high vectors' bytes; 2:4, each vector's 128 candidate bytes (its
    // 32-column segments of the 256) as two halves.
    __m512i xl[MT], xh[MT], xl2[MT], xh2[MT];
    __m512 sl[MT], sh[MT];
    for (int m = 0; m < MT; ++m) {
      const QuantRows xm = x.at(m);
      const uint8_t* xp = xm.q + kCols * j;
      const __m512i xa = _mm512_maskz_loadu_epi8(first_bytes(cols), xp);
      const __m512i xb = _mm512_maskz_loadu_epi8(first_bytes(std::max<int64_t>(cols - 64, 0)), xp + 64);
      if constexpr (kPacked) {
        const __m512i xc = _mm512_maskz_loadu_epi8(first_bytes(std::max<int64_t>(cols - 128, 0)), xp + 128);
        const __m512i xd = _mm512_maskz_loadu_epi8(first_bytes(std::max<int64_t>(cols - 192, 0)), xp + 192);
        xl[m] = _mm512_shuffle_i64x2(xa, xb, _MM_SHUFFLE(1, 0, 1, 0));   // columns 0-31, 64-95
        xl2[m] = _mm512_shuffle_i64x2(xc, xd, _MM_SHUFFLE(1, 0, 1, 0));  // 128-159, 192-223
        xh[m] = _mm512_shuffle_i64x2(xa, xb, _MM_SHUFFLE(3, 2, 3, 2));   // 32-63, 96-127
        xh2[m] = _mm512_shuffle_i64x2(xc, xd, _MM_SHUFFLE(3, 2, 3, 2));  // 160-191, 224-255
        sl[m] = x_block_lanes<true>(xm, 8 * j, false);
        sh[m] = x_block_lanes<true>(xm, 8 * j, true);
      } else {
        // dense: x signed (xq + 128 back to xq; zero past the row) and the weights' nibbles
        // unsigned (0-15, i.e. value + 8): the + 8 is taken back per lane as -8 * sum(xq), once
        // per row of x for all RB rows of W
        const __m512i sa = _mm512_maskz_mov_epi8(first_bytes(cols), _mm512_xor_si512(xa, k128));
        const __m512i sb = _mm512_maskz_mov_epi8(first_bytes(std::max<int64_t>(cols - 64, 0)),
                                                 _mm512_xor_si512(xb, k128));
        xl[m] = _mm512_permutex2var_epi8(sa, _mm512_load_si512(kC.lo), sb);
        xh[m] = _mm512_permutex2var_epi8(sa, _mm512_load_si512(kC.hi), sb);
        const __m512i sum8 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, xl[m]), eight, xh[m]);
        xl2[m] = _mm512_sub_epi32(_mm512_setzero_si512(), sum8);  // -8 * sum(xq) per lane
        sl[m] = x_block_lanes<false>(xm, 4 * j, false);
      }
    }
    const int64_t bytes = std::min<int64_t>(64, w.wstride - 64 * j);  // whole blocks of 16
    const __mmask64 live = first_bytes(bytes);
    for (int r = 0; r < RB; ++r) {
      const QWeight wr = w.row(r);
      const __m512i v = _mm512_maskz_loadu_epi8(live, wr.w + 64 * j);
      const __m512i ul = _mm512_and_si512(v, low4);                         // value + 8
      const __m512i uh = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // (0 past the row)
      const __m512 sw = int4_group_lanes(wr, j);
      if constexpr (kPacked) {
        // the low vector's kept weights have their meta in dwords 0, 2, 4, 6 of the chunk's 32
        // meta bytes, the high vector's in 1, 3, 5, 7
        const __m256i m32 = _mm256_maskz_loadu_epi8(
            static_cast<__mmask32>(first_bytes((cols + 7) / 8)), wr.meta + 32 * j);
        const __m256i mm = _mm256_permutevar8x32_epi32(m32, split);
        auto idx_of = [&](__m128i m16) {
          const __m512i bits = _mm512_multishift_epi64_epi8(
              _mm512_load_si512(kC.shift),
              _mm512_permutexvar_epi64(spread, _mm512_castsi128_si512(m16)));
          return _mm512_ternarylogic_epi32(bits, three, _mm512_load_si512(kC.base), 0xEA);
        };
        const __m512i il = idx_of(_mm256_castsi256_si128(mm));
        const __m512i ih = idx_of(_mm256_extracti128_si256(mm, 1));
        const __m512i wl = _mm512_maskz_sub_epi8(live, ul, eight);  // signed values
        const __m512i wh = _mm512_maskz_sub_epi8(live, uh, eight);
        const __m512i offl = minus_offset(wl), offh = minus_offset(wh);
        for (int m = 0; m < MT; ++m) {
          const __m512i dl = _mm512_dpbusd_epi32(offl, _mm512_permutex2var_epi8(xl[m], il, xl2[m]), wl);
          const __m512i dh = _mm512_dpbusd_epi32(offh, _mm512_permutex2var_epi8(xh[m], ih, xh2[m]), wh);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dl), _mm512_mul_ps(sl[m], sw), acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dh), _mm512_mul_ps(sh[m], sw), acc[m][r]);
        }
      } else {
        for (int m = 0; m < MT; ++m) {  // xl2: the -8 * sum(xq) lanes
          const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(xl2[m], ul, xl[m]), uh, xh[m]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sl[m], sw), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = _mm512_reduce_add_ps(acc[m][r]);
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
    qlinear_run<kPacked4>(quantize_rows(x, M, K, true, false), M, w, bias, N, K, y, nt);
  else
    qlinear_run<kDense4>(quantize_rows(x, M, K, false, false), M, w, bias, N, K, y, nt);
}

#endif  // PYSPARSE_NO_VNNI

}  // namespace pysparse::core::detail
