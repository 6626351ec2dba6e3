// The C entry points AOTInductor's generated code calls for pysparse's ops (aoti_shims.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace pysparse::aten {

struct AotiShim {
  const char* op;           // pysparse::<op>
  const char* declaration;  // the C declaration, as AOTInductor is to be given it
  std::uintptr_t address;   // where this library defines it (to check what the name resolves to)
};

std::vector<AotiShim> aoti_shim_table();

}  // namespace pysparse::aten
