// AMX-BF16 build of the bf16 2:4 linear layer for a few to a few dozen rows of x. Only this file is
// compiled with -mamx-tile -mamx-bf16; sparse24_linear.cpp calls it only after amx_bf16_ready()
// said yes (CPU flags and the kernel's permission to use the tile registers).
//
// Why: from two rows of x on, a bf16 GEMM on FMA units is compute-bound here (the 2:4 GEMM decodes
// every weight once per pair of rows), while torch's dense bf16 GEMM runs on the AMX tiles and
// reads twice our bytes. Decompressing W into a tile in L1 and multiplying there keeps both
// advantages: W is read from memory once, in its packed ~half-size form, and the arithmetic is one
// TDPBF16PS (16x16x32 multiply-adds) per 16 rows x 32 columns of W.
//
// The product is computed transposed, y^T = W x^T, so the decompressed W rows are the A tile as
// they come (16 rows of 32 bf16, three shuffles each); x^T is packed once per call into the
// pair-interleaved B layout the instruction wants. A thread owns 16 rows of W at a time and walks
// all of K, splitting it over independent accumulator tiles by k-block (kb % 4, or kb % 2 when two
// 16-row slices of x share the A tile), which are added at the end in a fixed order: results do
// not depend on the thread count, and a row of x gets the same bits in any batch of up to 16 rows
// (in larger batches its slice may be paired, which changes the summation order).
#include "sparse24_internal.h"

#ifdef PYSPARSE_NO_AMX
// Built without a compiler that knows AMX: the route reports itself unavailable.
namespace pysparse::core::detail {
bool amx_bf16_ready() { return false; }
void sparse24_linear_bf16_amx(const uint16_t*, int64_t, int64_t, const uint16_t*, const uint8_t*,
                              int64_t, int64_t, const uint16_t*, uint16_t*, int64_t, int) {}
void sparse24_linear_bf16_amx_f32out(const uint16_t*, int64_t, int64_t, const uint16_t*,
                                     const uint8_t*, int64_t, int64_t, const uint16_t*, float*,
                                     int64_t, int) {}
void ffn_down24_groups_amx(const float*, int64_t, int64_t, const uint16_t*, const uint8_t*, int64_t,
                           int64_t, const uint16_t*, uint16_t*, int64_t, int) {}
}  // namespace pysparse::core::detail
#else

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pysparse::core::detail {
namespace {

constexpr int kTileRows = 16;  // rows of W per A tile, rows of x per B tile
constexpr int kTileK = 32;     // bf16 elements of K per tile (64 bytes)

// The tile registers are used through inline asm (GCC's intrinsics have no memory clobber, so a
// store to the staging buffer could be moved past the tile load that reads it): these barriers
// keep the compiler from doing that.
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

// A per-thread staging buffer of 64-byte aligned bf16 (a tile row that straddles two cache lines
// costs the tile load twice), grown on demand and kept between calls: a fresh multi-100 KB buffer
// would be page-faulted in on every call.
struct TileBuffer {
  uint16_t* data = nullptr;
  size_t size = 0;
  uint16_t* get(size_t n) {
    if (n > size) {
      std::free(data);
      const size_t bytes = (n * sizeof(uint16_t) + 63) / 64 * 64;
      data = static_cast<uint16_t*>(std::aligned_alloc(64, bytes));
      if (data == nullptr) throw std::bad_alloc();
      size = n;
    }
    return data;
  }
  ~TileBuffer() { std::free(data); }
};

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: fp32 accumulators (16 rows of W x 16 rows of x); 4-5: A (decompressed W); 6-7: B
// (packed x^T).
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTileRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// 8 groups (16 packed values, 4 meta bytes) -> 32 dense bf16 with three shuffle-port uops:
// VPMULTISHIFTQB puts group j's meta nibble in every byte of qword j (= the 4 outputs of group j);
// a 64-entry byte table (VPERMB on nibble | position << 4) turns it into the source of each output
// (0 or 1 = first or second kept value, 32 = a zero); the group base 2j is added, and one VPERMT2W
// over (values, zeros) writes the 32 outputs. Measured against the VPERMW decompression of
// sparse24_linear_avx512.cpp (index vector from variable shifts and two mask compares) and against
// VPEXPANDW with a table-built mask: ~20-25% faster than either as the AMX kernel's front end.
struct Decompressor {
  __m512i ctrl, c0f, ppos, table, vbase;
  Decompressor() {
    alignas(64) uint8_t c[64], pp[64], tb[64];
    alignas(64) uint16_t b[32];
    for (int i = 0; i < 64; ++i) {
      c[i] = static_cast<uint8_t>(4 * (i / 8));
      pp[i] = static_cast<uint8_t>(((i / 2) % 4) << 4);
      const int nib = i & 0xF, pos = i >> 4;
      tb[i] = static_cast<uint8_t>(pos == (nib & 3) ? 0 : pos == (nib >> 2) ? 1 : 32);
    }
    for (int o = 0; o < 32; ++o) b[o] = static_cast<uint16_t>(2 * (o / 4));
    ctrl = _mm512_load_si512(c);
    ppos = _mm512_load_si512(pp);
    table = _mm512_load_si512(tb);
    vbase = _mm512_load_si512(b);
    c0f = _mm512_set1_epi8(0x0F);
  }
};

// The source indices of one VPERMT2W decompression step, from `sh` (VPMULTISHIFTQB has put each
// output's meta nibble in its bytes): (nibble | position << 4) through a 64-entry byte table
// (VPERMB), plus the output's base. Shared by the A-side (row) and B-side (group) expansions.
inline __m512i nibble_sources(__m512i sh, __m512i c0f, __m512i pos, __m512i table, __m512i base) {
  const __m512i idx = _mm512_ternarylogic_epi32(sh, c0f, pos, 0xEA);  // (sh & 0xF) | pos
  return _mm512_add_epi16(_mm512_permutexvar_epi8(idx, table), base);
}

struct Problem {
  const uint16_t* values;
  const uint8_t* meta;
  int64_t N, K, mcols, kb_full, kb_total;
};

// Writes rows [n0, n0 + 16) x k-block kb of W, decompressed, to a (16 x 32 bf16, 64-byte rows);
// rows past N and columns past K are zero.
inline void decompress_tile(const Decompressor& d, const Problem& p, int64_t n0, int64_t kb,
                            uint16_t* a) {
  const int64_t rows = std::min<int64_t>(kTileRows, p.N - n0);
  if (kb < p.kb_full) {
    // Local copies: the stores below may alias anything (vector types do), which would make the
    // compiler reload every constant from `d` for each row.
    const __m512i ctrl = d.ctrl, c0f = d.c0f, ppos = d.ppos, table = d.table, vbase = d.vbase;
    const __m512i zero = _mm512_setzero_si512();
    const uint16_t* vrow = p.values + n0 * (p.K / 2) + kb * 16;
    const uint8_t* mrow = p.meta + n0 * p.mcols + kb * 4;
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t m32;
      std::memcpy(&m32, mrow + r * p.mcols, 4);
      const __m512i sh =
          _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi32(static_cast<int>(m32)));
      const __m512i src = nibble_sources(sh, c0f, ppos, table, vbase);
      const __m512i v = _mm512_castsi256_si512(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow + r * (p.K / 2))));
      _mm512_store_si512(a + r * kTileK, _mm512_permutex2var_epi16(v, src, zero));
    }
  } else {  // the K tail: fewer than 8 groups left
    const int64_t g0 = kb * 8, groups = p.K / 4 - g0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = n0 + r;
      uint16_t* out = a + r * kTileK;
      std::memset(out, 0, kTileK * sizeof(uint16_t));
      const uint16_t* vrow = p.values + n * (p.K / 2);
      const uint8_t* mrow = p.meta + n * p.mcols;
      for (int64_t g = 0; g < groups; ++g) {
        const unsigned nib = (mrow[(g0 + g) / 2] >> (((g0 + g) & 1) * 4)) & 0xFu;
        out[4 * g + (nib & 3u)] = vrow[2 * (g0 + g)];
        out[4 * g + (nib >> 2)] = vrow[2 * (g0 + g) + 1];
      }
    }
  }
  for (int64_t r = rows; r < kTileRows; ++r)
    _mm512_store_si512(a + r * kTileK, _mm512_setzero_si512());
}

// The four accumulator tiles (0-3): cleared, or written to / read from c (4 x 16 x 16 fp32).
inline void zero_accumulators() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
inline void store_accumulators(float* c) {
  _tile_stored(0, c, 64);
  _tile_stored(1, c + 256, 64);
  _tile_stored(2, c + 512, 64);
  _tile_stored(3, c + 768, 64);
  compiler_barrier();
}
inline void load_accumulators(const float* c) {
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c + 256, 64);
  _tile_loadd(2, c + 512, 64);
  _tile_loadd(3, c + 768, 64);
}

// x [M, K] (row stride ldx) -> B tiles: for every 16-row slice s of x and k-block kb, a 16 x 16
// array of bf16 pairs, [pair r][row m] = (x[m, 32 kb + 2r], x[m, 32 kb + 2r + 1]); zero padded.
void pack_x(const uint16_t* x, int64_t M, int64_t ldx, int64_t K, int64_t kbs, int64_t slices,
            uint16_t* out) {
  std::memset(out, 0, static_cast<size_t>(slices * kbs * 512) * sizeof(uint16_t));
  // In 32-bit units a B tile is [pair r][row m]: pair j of row m goes to tile j / 16, row j % 16.
  const int64_t pairs = K / 2;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * ldx;
    uint32_t* base = reinterpret_cast<uint32_t*>(out + (m / kTileRows) * kbs * 512) + m % kTileRows;
    for (int64_t j = 0; j < pairs; ++j) {
      uint32_t pair;
      std::memcpy(&pair, xr + 2 * j, 4);
      base[(j / 16) * 256 + (j % 16) * 16] = pair;
    }
  }
}

template <typename Out>
inline void store_out(Out* y, float v);
template <>
inline void store_out<uint16_t>(uint16_t* y, float v) {
  *y = float_to_bf16(v);
}
template <>
inline void store_out<float>(float* y, float v) {
  *y = v;
}

// c: accumulator tiles as stored ([tile][16 rows of W][16 rows of x] fp32). For one slice of x:
// out[m, n] = (the sum of its `tiles` tiles, in tile order) + bias[n], rounded once.
template <typename Out>
void write_out(const float* c, int tiles, int64_t n0, int64_t m0, int64_t N, int64_t M,
               const uint16_t* bias, Out* y, int64_t ldy) {
  const int64_t rows = std::min<int64_t>(kTileRows, N - n0);
  const int64_t cols = std::min<int64_t>(kTileRows, M - m0);
  for (int64_t r = 0; r < rows; ++r) {
    const float b = bias ? bf16_to_float(bias[n0 + r]) : 0.0f;
    for (int64_t m = 0; m < cols; ++m) {
      float acc = c[r * kTileRows + m];
      for (int t = 1; t < tiles; ++t) acc += c[t * 256 + r * kTileRows + m];
      store_out(y + (m0 + m) * ldy + n0 + r, acc + b);
    }
  }
}

// Both kernels below are software pipelined: the A tile of k-block kb+1 is decompressed before the
// tile of kb is loaded, so the tile load (which cannot take data from the store buffer) finds its
// stores already committed (~7% in the same-run A/B against decompress-then-load).

// One 16-row slice of x: four accumulators, k-block kb goes to tile kb % 4.
#define PYSPARSE_AMX_STEP1(C, ACUR, ANEXT, KB)                                \
  do {                                                                       \
    if ((KB) + 1 < p.kb_total) decompress_tile(d, p, n0, (KB) + 1, ANEXT);  \
    compiler_barrier();                                                      \
    _tile_loadd(4, ACUR, 64);                                                \
    _tile_loadd(6, xb + (KB) * 512, 64);                                     \
    _tile_dpbf16ps(C, 4, 6);                                                 \
  } while (0)

template <typename Out>
void rows16_one_slice(const Decompressor& d, const Problem& p, int64_t n0, const uint16_t* xb,
                      int64_t m0, int64_t M, const uint16_t* bias, Out* y, int64_t ldy,
                      uint16_t* abuf, float* cbuf) {
  zero_accumulators();
  uint16_t* a0 = abuf;
  uint16_t* a1 = abuf + 512;
  decompress_tile(d, p, n0, 0, a0);
  int64_t kb = 0;
  for (; kb + 4 <= p.kb_total; kb += 4) {
    PYSPARSE_AMX_STEP1(0, a0, a1, kb);
    PYSPARSE_AMX_STEP1(1, a1, a0, kb + 1);
    PYSPARSE_AMX_STEP1(2, a0, a1, kb + 2);
    PYSPARSE_AMX_STEP1(3, a1, a0, kb + 3);
  }
  // At most 3 k-blocks left (tiles 0, 1, 2 in turn); the next one is already in a0.
  if (kb < p.kb_total) PYSPARSE_AMX_STEP1(0, a0, a1, kb);
  if (kb + 1 < p.kb_total) PYSPARSE_AMX_STEP1(1, a1, a0, kb + 1);
  if (kb + 2 < p.kb_total) PYSPARSE_AMX_STEP1(2, a0, a1, kb + 2);
  store_accumulators(cbuf);
  write_out(cbuf, 4, n0, m0, p.N, M, bias, y, ldy);
}
#undef PYSPARSE_AMX_STEP1

// Two 16-row slices of x share each decompressed A tile; two accumulators per slice (kb % 2).
#define PYSPARSE_AMX_STEP2(C0, C1, ACUR, ANEXT, KB)                           \
  do {                                                                       \
    if ((KB) + 1 < p.kb_total) decompress_tile(d, p, n0, (KB) + 1, ANEXT);  \
    compiler_barrier();                                                      \
    _tile_loadd(4, ACUR, 64);                                                \
    _tile_loadd(6, xb0 + (KB) * 512, 64);                                    \
    _tile_loadd(7, xb1 + (KB) * 512, 64);                                    \
    _tile_dpbf16ps(C0, 4, 6);                                                \
    _tile_dpbf16ps(C1, 4, 7);                                                \
  } while (0)

template <typename Out>
void rows16_two_slices(const Decompressor& d, const Problem& p, int64_t n0, const uint16_t* xb0,
                       const uint16_t* xb1, int64_t m0, int64_t M, const uint16_t* bias, Out* y,
                       int64_t ldy, uint16_t* abuf, float* cbuf) {
  zero_accumulators();
  uint16_t* a0 = abuf;
  uint16_t* a1 = abuf + 512;
  decompress_tile(d, p, n0, 0, a0);
  int64_t kb = 0;
  for (; kb + 2 <= p.kb_total; kb += 2) {
    PYSPARSE_AMX_STEP2(0, 2, a0, a1, kb);
    PYSPARSE_AMX_STEP2(1, 3, a1, a0, kb + 1);
  }
  if (kb < p.kb_total) PYSPARSE_AMX_STEP2(0, 2, a0, a1, kb);
  store_accumulators(cbuf);
  write_out(cbuf, 2, n0, m0, p.N, M, bias, y, ldy);
  write_out(cbuf + 512, 2, n0, m0 + kTileRows, p.N, M, bias, y, ldy);
}
#undef PYSPARSE_AMX_STEP2

// ---- the FFN down projection in the neuron-group layout ----------------------------------------
// y[M, D] = h[M, F] @ W_down^T with W_down [D, F] 2:4 along F, stored by groups of 4 neurons
// (values [F/4, 2, D], meta [F/4, ceil(D/2)], see sparse_ffn.h). Here the weight is the B side of
// the tile product, y = h W_down^T directly: A = 16 rows of h x 32 neurons (a plain row-major copy),
// B = W_down^T for those 32 neurons (8 groups) x 16 outputs, in the pair-interleaved layout, which
// the group layout gives almost for free: B rows 2g and 2g+1 hold, for each output d, the dense
// weights of positions (0, 1) and (2, 3) of group g. Each such row is one VPERMT2W over the group's
// two value planes (16 outputs each, contiguous) with indices from the meta nibbles as above.
// A block of 32 neurons that is silent for every row of the slice is skipped (its h is zero).

// Rows 2g, 2g+1 of a B tile from group g: 16 outputs starting at d0 (all within D).
struct GroupExpander {
  __m512i ctrl, c0f, pos01, pos23, table, dbase;
  GroupExpander() {
    alignas(64) uint8_t c[64], p01[64], p23[64], tb[64];
    alignas(64) uint16_t db[32];
    for (int b = 0; b < 64; ++b) {
      const int w = b / 2, d = w / 2, q = w % 2;  // byte b is in word w = (output d, pair half q)
      c[b] = static_cast<uint8_t>(4 * d);         // nibble d of the 64-bit meta word
      p01[b] = static_cast<uint8_t>(q << 4);
      p23[b] = static_cast<uint8_t>((2 + q) << 4);
      const int nib = b & 0xF, pos = b >> 4;
      tb[b] = static_cast<uint8_t>(pos == (nib & 3) ? 0 : pos == (nib >> 2) ? 16 : 32);
    }
    for (int w = 0; w < 32; ++w) db[w] = static_cast<uint16_t>(w / 2);
    ctrl = _mm512_load_si512(c);
    pos01 = _mm512_load_si512(p01);
    pos23 = _mm512_load_si512(p23);
    table = _mm512_load_si512(tb);
    dbase = _mm512_load_si512(db);
    c0f = _mm512_set1_epi8(0x0F);
  }
};

struct DownProblem {
  const uint16_t* values;  // [F/4, 2, D]
  const uint8_t* meta;     // [F/4, ceil(D/2)]
  int64_t F, D, mcols, groups, kb_total;
};

// B tiles for neurons [32 kb, 32 kb + 32) x outputs [d0, d0 + 16 tiles): per tile 16 rows of 16
// bf16 pairs (rows 2i, 2i+1 from group i; rows past the last group zero). All column tiles of the
// k-block at once, group by group: each group's value rows are read whole (up to 64 outputs = 128
// bytes per plane) while they are in L1. Tile by tile, the 16 rows of a k-block (all in the same L1
// set: they lie a multiple of 4 KB apart) were evicted between tiles (same-run A/B, 16 rows, tiles
// forced: 1B-shape FFN 2.85 -> 2.61 ms, LLaMA-7B 15.97 -> 15.56 ms). A tile past the end of
// d_model (the last, partial one) is filled by scalar code, zero beyond D.
inline void expand_down_tiles(const GroupExpander& e, const DownProblem& p, int64_t kb, int64_t d0,
                              int64_t tiles, uint16_t* b) {
  const int64_t g0 = kb * 8;
  const int64_t ng = std::min<int64_t>(8, p.groups - g0);
  const int64_t full = std::min<int64_t>(tiles, (p.D - d0) / kTileRows);
  const __m512i ctrl = e.ctrl, c0f = e.c0f, pos01 = e.pos01, pos23 = e.pos23;
  const __m512i table = e.table, dbase = e.dbase, zero = _mm512_setzero_si512();
  for (int64_t t = full; t < tiles; ++t)
    std::memset(b + t * 512, 0, static_cast<size_t>(2 * ng) * 32 * sizeof(uint16_t));
  for (int64_t i = 0; i < ng; ++i) {
    const uint16_t* v = p.values + (g0 + i) * 2 * p.D;
    const uint8_t* m = p.meta + (g0 + i) * p.mcols;
    for (int64_t t = 0; t < full; ++t) {
      const int64_t dt = d0 + t * kTileRows;
      uint64_t m64;
      std::memcpy(&m64, m + dt / 2, 8);
      const __m512i planes = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + dt))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + p.D + dt)), 1);
      const __m512i sh =
          _mm512_multishift_epi64_epi8(ctrl, _mm512_set1_epi64(static_cast<long long>(m64)));
      uint16_t* bt = b + t * 512;
      _mm512_store_si512(bt + (2 * i) * 32, _mm512_permutex2var_epi16(
                                                 planes, nibble_sources(sh, c0f, pos01, table, dbase), zero));
      _mm512_store_si512(bt + (2 * i + 1) * 32, _mm512_permutex2var_epi16(
                                                     planes, nibble_sources(sh, c0f, pos23, table, dbase), zero));
    }
    for (int64_t t = full; t < tiles; ++t) {  // partial tile: outputs [dt, D)
      const int64_t dt = d0 + t * kTileRows;
      uint16_t* bt = b + t * 512;
      for (int64_t d = dt; d < p.D; ++d) {
        const unsigned nib = (m[d / 2] >> ((d & 1) * 4)) & 0xFu;
        const unsigned i0 = nib & 3u, i1 = nib >> 2;
        // position q of the group lands in row 2i + q / 2, word 2 (d - dt) + q % 2
        bt[(2 * i + i0 / 2) * 32 + 2 * (d - dt) + i0 % 2] = v[d];
        bt[(2 * i + i1 / 2) * 32 + 2 * (d - dt) + i1 % 2] = v[p.D + d];
      }
    }
  }
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t r = 2 * ng; r < kTileRows; ++r)
      _mm512_store_si512(b + t * 512 + r * 32, _mm512_setzero_si512());
}

// h [M, F] fp32 (row stride ldh) -> bf16 A tiles [slice][kb][16 rows][32], rounded to nearest even
// (VCVTNE2PS2BF16, as torch rounds), zero padded; live[slice * kbs + kb]: whether any h of that
// tile is nonzero.
void pack_h(const float* h, int64_t M, int64_t ldh, int64_t F, int64_t kbs, int64_t slices,
            uint16_t* out, uint8_t* live) {
  std::memset(out, 0, static_cast<size_t>(slices * kbs * 512) * sizeof(uint16_t));
  std::memset(live, 0, static_cast<size_t>(slices * kbs));
  const int64_t full = F / kTileK;
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  for (int64_t m = 0; m < M; ++m) {
    const float* hr = h + m * ldh;
    uint16_t* base = out + (m / kTileRows) * kbs * 512 + (m % kTileRows) * kTileK;
    uint8_t* lv = live + (m / kTileRows) * kbs;
    for (int64_t kb = 0; kb < full; ++kb) {
      const __m512 lo = _mm512_loadu_ps(hr + kb * kTileK);
      const __m512 hi = _mm512_loadu_ps(hr + kb * kTileK + 16);
      const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
      _mm512_store_si512(base + kb * 512, v);
      lv[kb] |= _mm512_test_epi16_mask(v, magnitude) != 0;
    }
    for (int64_t f = full * kTileK; f < F; ++f) {
      const uint16_t v = float_to_bf16(hr[f]);
      base[full * 512 + f % kTileK] = v;
      lv[full] |= (v & 0x7fffu) != 0;
    }
  }
}

// The group layout puts a k-block's 16 value rows 2*D bytes apart (8 KB for D = 4096): a fresh
// 4 KB page each, so a pass over all of d_ff for one column chunk touches ~20 pages per k-block,
// more than the TLB holds (and these weights get no huge pages here). So the work goes by panels
// of kDownPanel k-blocks: every column chunk of the thread runs through the panel, while the
// panel's pages stay in the TLB, keeping its accumulators in memory between panels (a tile load and
// store of 1 KB each per panel, against 32 k-blocks of work). Within a panel a pass reads whole
// cache lines per value row: 64 outputs (4 column tiles) for one slice of h, 32 (2 tiles) for two.
// Each output has one accumulator, filled in k-block order (the same order for any batch size or
// thread count). Measured on one thread, LLaMA-7B down (4096 x 11008): 193 ns per B tile without
// panels, 138 with (the row-layout A-side decompression: 117); software prefetch a few k-blocks
// ahead changed nothing. Still, in the op the down projection costs about twice the same weight on
// the row-layout kernel (16 rows: ~11-12 vs ~6 ms): the price of the layout that lets batch-1
// decode skip silent groups.
constexpr int64_t kDownPanel = 32;

// acc: 4 accumulator tiles [16 rows][16 outputs] fp32 (one slice: column tiles 0-3; two slices:
// slice 0 tiles 0-1, slice 1 tiles 0-1). Runs k-blocks [kb0, kb1) for the chunk at d0.
void down_panel(const GroupExpander& e, const DownProblem& p, int64_t d0, int64_t kb0, int64_t kb1,
                const uint16_t* a0, const uint16_t* a1, const uint8_t* l0, const uint8_t* l1,
                float* acc, uint16_t* bbuf) {
  const bool two = a1 != nullptr;
  const int64_t tiles = std::min<int64_t>(two ? 2 : 4, (p.D - d0 + kTileRows - 1) / kTileRows);
  load_accumulators(acc);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    if (!(l0[kb] | (two ? l1[kb] : 0))) continue;
    expand_down_tiles(e, p, kb, d0, tiles, bbuf);
    compiler_barrier();
    _tile_loadd(4, a0 + kb * 512, 64);
    _tile_loadd(6, bbuf, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (two) {
      _tile_loadd(5, a1 + kb * 512, 64);
      _tile_dpbf16ps(2, 5, 6);
      if (tiles > 1) {
        _tile_loadd(7, bbuf + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    } else {
      if (tiles > 1) {
        _tile_loadd(7, bbuf + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if (tiles > 2) {
        _tile_loadd(6, bbuf + 1024, 64);
        _tile_dpbf16ps(2, 4, 6);
      }
      if (tiles > 3) {
        _tile_loadd(7, bbuf + 1536, 64);
        _tile_dpbf16ps(3, 4, 7);
      }
    }
  }
  store_accumulators(acc);
}

// Accumulator tile [row m][output d] -> y (+ bias), rounded once.
template <typename Out>
void write_down(const float* c, int64_t m0, int64_t M, int64_t d0, int64_t D, const uint16_t* bias,
                Out* y, int64_t ldy) {
  const int64_t rows = std::min<int64_t>(kTileRows, M - m0);
  const int64_t cols = std::min<int64_t>(kTileRows, D - d0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; ++j)
      store_out(y + (m0 + r) * ldy + d0 + j,
                c[r * kTileRows + j] + (bias ? bf16_to_float(bias[d0 + j]) : 0.0f));
}

template <typename Out>
void linear_amx(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias, Out* y,
                int64_t ldy, int nthreads) {
  Problem p{values, meta, N, K, meta_cols(K), K / kTileK, (K + kTileK - 1) / kTileK};
  const int64_t slices = (M + kTileRows - 1) / kTileRows;
  // The packed x is reused across calls by the calling thread (a fresh multi-100 KB buffer would
  // be page-faulted in on every call).
  thread_local TileBuffer xpack;
  pack_x(x, M, ldx, K, p.kb_total, slices, xpack.get(static_cast<size_t>(slices * p.kb_total * 512)));
  const uint16_t* xp = xpack.data;
  const int64_t nblocks = (N + kTileRows - 1) / kTileRows;
  const int nt = static_cast<int>(std::min<int64_t>(resolve_threads(nthreads), nblocks));
  RegionTrace trace(nt);
#pragma omp parallel num_threads(nt)
  {
    trace.mark();
    configure_tiles();
    const Decompressor d;
    alignas(64) uint16_t abuf[2 * 512];
    alignas(64) float cbuf[4 * 256];
#pragma omp for schedule(static)
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      const int64_t n0 = nb * kTileRows;
      int64_t s = 0;
      for (; s + 2 <= slices; s += 2)
        rows16_two_slices(d, p, n0, xp + s * p.kb_total * 512, xp + (s + 1) * p.kb_total * 512,
                          s * kTileRows, M, bias, y, ldy, abuf, cbuf);
      if (s < slices)
        rows16_one_slice(d, p, n0, xp + s * p.kb_total * 512, s * kTileRows, M, bias, y, ldy,
                         abuf, cbuf);
    }
    _tile_release();
  }
  trace.finish(Route::kLinearAmx);
}

bool request_tile_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
  unsigned a, b, c, dx;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, a, b, c, dx);
  const bool tile = dx & (1u << 24), bf16 = dx & (1u << 22);
  const bool avx512bw = b & (1u << 30), avx512vbmi = c & (1u << 1);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool avx512bf16 = a1 & (1u << 5);
  return tile && bf16 && avx512bw && avx512vbmi && avx512bf16;
}

}  // namespace

bool amx_bf16_ready() {
  static const bool ready = cpu_has_amx_bf16() && request_tile_permission();
  return ready;
}

void sparse24_linear_bf16_amx(const uint16_t* x, int64_t M, int64_t ldx, const uint16_t* values,
                              const uint8_t* meta, int64_t N, int64_t K, const uint16_t* bias,
                              uint16_t* y, int64_t ldy, int nthreads) {
  linear_amx(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void sparse24_linear_bf16_amx_f32out(const uint16_t* x, int64_t M, int64_t ldx,
                                     const uint16_t* values, const uint8_t* meta, int64_t N,
                                     int64_t K, const uint16_t* bias, float* y, int64_t ldy,
                                     int nthreads) {
  linear_amx(x, M, ldx, values, meta, N, K, bias, y, ldy, nthreads);
}

void ffn_down24_groups_amx(const float* h, int64_t M, int64_t ldh, const uint16_t* values,
                           const uint8_t* meta, int64_t F, int64_t D, const uint16_t* bias,
                           uint16_t* y, int64_t ldy, int nthreads) {
  if (M == 0 || D == 0) return;
  DownProblem p{values, meta, F, D, (D + 1) / 2, F / 4, (F + kTileK - 1) / kTileK};
  const int64_t slices = (M + kTileRows - 1) / kTileRows;
  thread_local TileBuffer hpack;
  thread_local std::vector<uint8_t> live;
  if (live.size() < static_cast<size_t>(slices * p.kb_total)) live.resize(slices * p.kb_total);
  uint16_t* hp = hpack.get(static_cast<size_t>(slices * p.kb_total * 512));
  pack_h(h, M, ldh, F, p.kb_total, slices, hp, live.data());
  const uint8_t* lv = live.data();
  const int64_t kbs = p.kb_total;
  // One pass over W per pair of 16-row slices (chunks of 32 outputs) and one for an odd last slice
  // (chunks of 64); threads take contiguous ranges of chunks.
  for (int64_t s = 0; s < slices; s += 2) {
    const bool two = s + 1 < slices;
    const int64_t width = (two ? 2 : 4) * kTileRows;
    const int64_t chunks = (D + width - 1) / width;
    const int nt = static_cast<int>(std::min<int64_t>(resolve_threads(nthreads), chunks));
    const uint16_t* a0 = hp + s * kbs * 512;
    const uint16_t* a1 = two ? a0 + kbs * 512 : nullptr;
    const uint8_t* l0 = lv + s * kbs;
    const uint8_t* l1 = two ? l0 + kbs : nullptr;
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
      const int tid = omp_get_thread_num(), nteam = omp_get_num_threads();
#else
      const int tid = 0, nteam = 1;
#endif
      const int64_t c0 = chunks * tid / nteam, c1 = chunks * (tid + 1) / nteam;
      thread_local TileBuffer accbuf;  // [chunk][4 tiles][256] fp32, as bf16 pairs
      float* acc = reinterpret_cast<float*>(accbuf.get(static_cast<size_t>((c1 - c0) * 4 * 256 * 2)));
      std::memset(acc, 0, static_cast<size_t>((c1 - c0) * 4 * 256) * sizeof(float));
      configure_tiles();
      const GroupExpander e;
      alignas(64) uint16_t bbuf[4 * 512];
      for (int64_t kb0 = 0; kb0 < kbs; kb0 += kDownPanel)
        for (int64_t c = c0; c < c1; ++c)
          down_panel(e, p, c * width, kb0, std::min(kb0 + kDownPanel, kbs), a0, a1, l0, l1,
                     acc + (c - c0) * 1024, bbuf);
      _tile_release();
      for (int64_t c = c0; c < c1; ++c) {
        const float* ac = acc + (c - c0) * 1024;
        const int64_t d0 = c * width;
        if (two) {
          for (int64_t t = 0; t < 2 && d0 + t * kTileRows < D; ++t) {
            write_down(ac + t * 256, s * kTileRows, M, d0 + t * kTileRows, D, bias, y, ldy);
            write_down(ac + 512 + t * 256, (s + 1) * kTileRows, M, d0 + t * kTileRows, D, bias, y, ldy);
          }
        } else {
          for (int64_t t = 0; t < 4 && d0 + t * kTileRows < D; ++t)
            write_down(ac + t * 256, s * kTileRows, M, d0 + t * kTileRows, D, bias, y, ldy);
        }
      }
    }
  }
}

}  // namespace pysparse::core::detail

#endif  // PYSPARSE_NO_AMX
