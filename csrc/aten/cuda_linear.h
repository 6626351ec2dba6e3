// Figures of the CUDA linear glue (csrc/aten/sparse24_cuda.cpp) for pysparse._C, without torch
// headers (module.cpp includes this only in CUDA builds).
#pragma once

#include <cstdint>

namespace pysparse::aten {

// cuSPARSELt-compressed weight buffers alive now (each freed with its weight) and their bytes.
int64_t cusparselt_cached_bytes();
int64_t cusparselt_cached_weights();

}  // namespace pysparse::aten
