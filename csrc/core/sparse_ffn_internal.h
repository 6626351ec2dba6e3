// The AVX2 build of the FFN kernels (sparse_ffn_avx2.cpp, the only FFN file compiled with -mavx2).
#pragma once

#include "sparse_ffn.h"

namespace pysparse::core::detail {

// fn(const float*) or fn(const uint16_t*) for a dense weight of `dtype` (fp32 or bf16 bits): the
// one place the dense kernels turn an FfnDtype into a weight type.
template <typename Fn>
inline void by_weight_type(FfnDtype dtype, const void* w, Fn&& fn) {
  if (dtype == FfnDtype::f32)
    fn(static_cast<const float*>(w));
  else
    fn(static_cast<const uint16_t*>(w));
}

int64_t ffn_gate_avx2(const FfnProblem& p, float* a, int32_t* active);
void ffn_tail_avx2(const FfnProblem& p, const float* a, const int32_t* active, int64_t nactive,
                   void* y, int64_t ldy);
void dense_gemv_avx2(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N,
                     int64_t K, float* y, int nthreads);
// M >= 2 rows of x with AVX-512 (dense_rows_avx512.cpp: zmm, 4 rows of x a pass): the same bits.
void dense_gemm_rows_avx512(const float* x, int64_t M, const void* w, FfnDtype dtype, int64_t N,
                            int64_t K, float* y, int nthreads);
void unpack_down24_avx2(const void* values, const uint8_t* meta, int64_t F, int64_t D, int64_t n0,
                        int64_t cols, int elem_size, void* dense, int nthreads);

}  // namespace pysparse::core::detail
