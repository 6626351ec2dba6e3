// Declarations shared by the int8 linear translation units (not part of the public header).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_trace.h"
#include "qlinear.h"
#include "sparse24.h"

namespace pysparse::core::detail {

// x as fp32 rows of K (the weight-only kernels' form of x; qlinear_driver.inc).
struct FloatRows {
  const float* p;
  int64_t K;
  FloatRows at(int64_t m) const { return {p + m * K, K}; }
};

// s plus the kept weights of groups [g0, K/4) of one 2:4 int8 row against x, in ascending k:
// the remainder after a kernel's full chunks (and, from g0 = 0, the whole scalar route).
inline float q_packed_tail(float s, const float* x, const int8_t* v, const uint8_t* meta,
                           int64_t g0, int64_t K) {
  for (int64_t g = g0; g < K / 4; ++g) {
    const unsigned nib = (meta[g / 2] >> ((g & 1) * 4)) & 0xFu;
    s = std::fma(static_cast<float>(v[2 * g]), x[4 * g + (nib & 3u)], s);
    s = std::fma(static_cast<float>(v[2 * g + 1]), x[4 * g + (nib >> 2)], s);
  }
  return s;
}

// IEEE half to float (subnormals, infinities and NaN included): the scalar routes' reading of
// the int4 scales (the vector routes convert with vcvtph2ps, which agrees).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113u;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Value i (of V stored values) of one packed int4 row (qlinear.h's layout), as an integer.
inline int int4_value(const uint8_t* row, int64_t i) {
  const int64_t t = i & 31;
  const uint8_t byte = row[(i >> 5) * 16 + (t & 15)];
  return static_cast<int>(t < 16 ? (byte & 0xFu) : (byte >> 4)) - 8;
}

// One quantised weight as the kernels read it, from its first row on.
//   int8: w = int8 values (dense [N, K] or 2:4 [N, K/2]), scale = one fp32 per row;
//   int4: w = packed nibbles (int4_row_bytes per row), gscale = fp16 [N, groups], group = 32/64.
// meta: the 2:4 metadata (meta_cols(K) bytes per row), null for a dense weight.
struct QWeight {
  const uint8_t* w = nullptr;
  const uint8_t* meta = nullptr;
  const float* scale = nullptr;
  const uint16_t* gscale = nullptr;
  int64_t wstride = 0, mstride = 0, sstride = 0;
  int group = 0;
  QWeight row(int64_t n) const {
    QWeight r = *this;
    r.w += n * wstride;
    if (meta) r.meta += n * mstride;
    if (scale) r.scale += n;
    if (gscale) r.gscale += n * sstride;
    return r;
  }
};

// The QWeight of an int8 weight (meta null: dense [N, K]; else 2:4 [N, K/2] + meta) and of an
// int4 one (qlinear.h's packed layout, fp16 scales per group of stored values).
inline QWeight int8_weight(const int8_t* q, const uint8_t* meta, const float* scale, int64_t K) {
  QWeight w;
  w.w = reinterpret_cast<const uint8_t*>(q);
  w.meta = meta;
  w.scale = scale;
  w.wstride = meta ? K / 2 : K;
  w.mstride = meta ? meta_cols(K) : 0;
  return w;
}

inline QWeight int4_weight(const uint8_t* q, const uint8_t* meta, const uint16_t* scale,
                           int group, int64_t K) {
  const int64_t V = meta ? K / 2 : K;
  QWeight w;
  w.w = q;
  w.meta = meta;
  w.gscale = scale;
  w.group = group;
  w.wstride = int4_row_bytes(V);
  w.mstride = meta ? meta_cols(K) : 0;
  w.sstride = int4_row_groups(V, group);
  return w;
}

// What the driver's blocks run (qlinear_driver.inc).
enum QLayout { kDense8, kPacked8, kDense4, kPacked4 };

// s plus the stored values [32 * b0, V) of one int4 row (dense: V = K; 2:4: V = K / 2 kept
// values) against x, in ascending order, each value dequantised (q * its group's scale, exact in
// fp32): the remainder after a kernel's whole blocks and, from b0 = 0, the whole scalar route.
inline float q4_tail(float s, const float* x, const QWeight& w, int64_t K, bool packed,
                     int64_t b0) {
  const int64_t V = packed ? K / 2 : K;
  for (int64_t i = b0 * 32; i < V; ++i) {
    const float wi = static_cast<float>(int4_value(w.w, i)) * half_to_float(w.gscale[i / w.group]);
    int64_t col = i;
    if (packed) {
      const int64_t g = i / 2;
      const unsigned nib = (w.meta[g / 2] >> ((g & 1) * 4)) & 0xFu;
      col = 4 * g + ((i & 1) ? (nib >> 2) : (nib & 3u));
    }
    s = std::fma(wi, x[col], s);
  }
  return s;
}

// ---- the VNNI route (qlinear_vnni.cpp): x quantised per row and per block of kQBlock columns ----
constexpr int64_t kQBlock = 32;

bool qlinear_vnni_built();
void int8_linear_vnni(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_vnni(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt);
// int4 (qlinear.h): w describes the whole weight (QWeight above).
void int4_linear_vnni(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                      int64_t K, float* y, int nt);
void int4_linear_avx2(const float* x, int64_t M, const QWeight& w, const float* bias, int64_t N,
                      int64_t K, float* y, int nt);
// One dense int4 row (w from its row) dequantised into out [K] (the prefill route's chunks).
void int4_dequantize_row_avx2(const QWeight& w, int64_t K, float* out);

// In qlinear_avx2.cpp / qlinear_avx512.cpp (compiled for those ISAs; called only where the CPU
// has them). nt: resolved thread count.
void int8_linear_avx2(const float* x, int64_t M, const int8_t* q, const float* scale,
                      const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_avx2(const float* x, int64_t M, const int8_t* values,
                               const uint8_t* meta, const float* scale, const float* bias,
                               int64_t N, int64_t K, float* y, int nt);
void int8_linear_avx512(const float* x, int64_t M, const int8_t* q, const float* scale,
                        const float* bias, int64_t N, int64_t K, float* y, int nt);
void sparse24_int8_linear_avx512(const float* x, int64_t M, const int8_t* values,
                                 const uint8_t* meta, const float* scale, const float* bias,
                                 int64_t N, int64_t K, float* y, int nt);

}  // namespace pysparse::core::detail
