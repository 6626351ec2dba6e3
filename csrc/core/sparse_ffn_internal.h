// The AVX2 build of the FFN kernels (sparse_ffn_avx2.cpp, the only FFN file compiled with -mavx2).
#pragma once

#include "sparse_ffn.h"

namespace pysparse::core::detail {

int64_t ffn_gate_avx2(const FfnProblem& p, float* a, int32_t* active);
void ffn_tail_avx2(const FfnProblem& p, const float* a, const int32_t* active, int64_t nactive,
                   void* y, int64_t ldy);

}  // namespace pysparse::core::detail
