// googletests for the int8 and int4 linears of the core (qlinear.h): dense and 2:4, every route
// (VNNI, AVX-512, AVX2, scalar), against a float64 host reference on odd shapes, and a row's bits
// the same alone, batched and at any thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <random>
#include <vector>

#include "qlinear.h"
#include "sparse24.h"

namespace core = pysparse::core;

namespace {

// Native: the VNNI route where the CPU has it (x quantised per block of 32); NoVnni the
// weight-only AVX-512 kernels on the same CPU.
enum class QImpl { Native, NoVnni, Avx2, Scalar };

class ScopedQImpl {
 public:
  explicit ScopedQImpl(QImpl impl) {
    clear();
    if (impl == QImpl::NoVnni) setenv("PYSPARSE_DISABLE_VNNI", "1", 1);
    if (impl == QImpl::Avx2) setenv("PYSPARSE_DISABLE_AVX512", "1", 1);
    if (impl == QImpl::Scalar) setenv("PYSPARSE_DISABLE_AVX2", "1", 1);
  }
  ~ScopedQImpl() { clear(); }

 private:
  static void clear() {
    unsetenv("PYSPARSE_DISABLE_VNNI");
    unsetenv("PYSPARSE_DISABLE_AVX512");
    unsetenv("PYSPARSE_DISABLE_AVX2");
  }
};

// x as the VNNI route sees it: per block of 32 columns, rint(x * (127 / amax)) * (amax / 127),
// in the same fp32 operations.
std::vector<float> quantised_x(const std::vector<float>& x, int64_t M, int64_t K) {
  std::vector<float> out(x.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K; b += 32) {
      const int64_t e = std::min(K, b + 32);
      float amax = 0.f;
      for (int64_t k = b; k < e; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f, scale = amax / 127.f;
      for (int64_t k = b; k < e; ++k)
        out[m * K + k] = std::nearbyint(x[m * K + k] * inv) * scale;
    }
  return out;
}

// A random int8 weight, its 2:4 packing (values, meta: two kept indices per group, ascending)
// and the dense int8 matrix both stand for; scales and x random.
struct QCase {
  int64_t M, N, K;
  std::vector<int8_t> dense, values;
  std::vector<uint8_t> meta;
  std::vector<float> scale, bias, x;
};

QCase make_case(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  QCase c{M, N, K, {}, {}, {}, {}, {}, {}};
  std::uniform_int_distribution<int> q(-127, 127), slot(0, 3);
  std::uniform_real_distribution<float> u(-1.f, 1.f), s(0.001f, 0.1f);
  c.dense.assign(N * K, 0);
  c.values.assign(N * K / 2, 0);
  c.meta.assign(N * core::meta_cols(K), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < K / 4; ++g) {
      int i0 = slot(rng), i1 = slot(rng);
      while (i1 == i0) i1 = slot(rng);
      if (i1 < i0) std::swap(i0, i1);
      const int8_t v0 = static_cast<int8_t>(q(rng)), v1 = static_cast<int8_t>(q(rng));
      c.values[n * K / 2 + 2 * g] = v0;
      c.values[n * K / 2 + 2 * g + 1] = v1;
      c.dense[n * K + 4 * g + i0] = v0;
      c.dense[n * K + 4 * g + i1] = v1;
      c.meta[n * core::meta_cols(K) + g / 2] |= static_cast<uint8_t>((i0 | (i1 << 2)) << ((g & 1) * 4));
    }
  for (int64_t n = 0; n < N; ++n) {
    c.scale.push_back(s(rng));
    c.bias.push_back(u(rng));
  }
  for (int64_t i = 0; i < M * K; ++i) c.x.push_back(u(rng));
  return c;
}

std::vector<float> run(const QCase& c, bool packed, int64_t M, const float* x, int nthreads) {
  std::vector<float> y(M * c.N, -1.f);
  if (packed)
    core::sparse24_int8_linear(x, M, c.values.data(), c.meta.data(), c.scale.data(),
                               c.bias.data(), c.N, c.K, y.data(), nthreads);
  else
    core::int8_linear(x, M, c.dense.data(), c.scale.data(), c.bias.data(), c.N, c.K, y.data(),
                      nthreads);
  return y;
}

struct Shape {
  int64_t M, N, K;
};
const Shape kShapes[] = {{1, 1, 4},   {1, 7, 12},  {3, 5, 36},   {4, 9, 100}, {5, 17, 388},
                         {16, 13, 68}, {2, 130, 576}, {1, 67, 580}, {9, 3, 4100}};

class QLinear : public ::testing::TestWithParam<std::tuple<QImpl, bool>> {};

TEST_P(QLinear, MatchesFloat64ReferenceOnOddShapes) {
  auto [impl, packed] = GetParam();
  ScopedQImpl scoped(impl);
  std::mt19937 rng(3);
  for (auto [M, N, K] : kShapes) {
    const QCase c = make_case(M, N, K, rng);
    const auto y = run(c, packed, M, c.x.data(), 2);
    const bool a8 = std::string(core::int8_linear_impl()) == "avx512_vnni";
    const std::vector<float> xr = a8 ? quantised_x(c.x, M, K) : c.x;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double p = double(xr[m * K + k]) * double(c.dense[n * K + k]);
          s += p;
          mag += std::fabs(p);
        }
        const double want = s * c.scale[n] + c.bias[n];
        const double tol = (4 * std::sqrt(double(K) + 2) * 1.2e-7) * (mag * c.scale[n] + 1) + 1e-6;
        ASSERT_NEAR(y[m * N + n], want, tol) << "M=" << M << " N=" << N << " K=" << K << " m=" << m
                                              << " n=" << n;
      }
  }
}

TEST_P(QLinear, ARowIsTheSameBitsAloneBatchedAndAtAnyThreadCount) {
  auto [impl, packed] = GetParam();
  ScopedQImpl scoped(impl);
  std::mt19937 rng(4);
  for (int64_t K : {576, 580}) {
    const QCase c = make_case(16, 261, K, rng);
    const auto all = run(c, packed, 16, c.x.data(), 2);
    EXPECT_EQ(run(c, packed, 16, c.x.data(), 1), all);
    for (int64_t m0 : {0, 5, 15}) {  // (K = 576, 580: a partial last chunk on every route)
      const auto one = run(c, packed, 1, c.x.data() + m0 * K, 2);
      for (int64_t n = 0; n < c.N; ++n) ASSERT_EQ(one[n], all[m0 * c.N + n]) << "K=" << K << " m=" << m0;
    }
  }
}

// ---- int4 ----

// A random int4 weight (values in [-8, 7], group scales as float16 bits), packed as qlinear.h
// describes, dense or 2:4 (the kept values packed, compress24's meta), and the float64 dense
// weight it stands for.
struct Q4Case {
  int64_t M, N, K;
  int group;
  std::vector<uint8_t> packed, meta;
  std::vector<uint16_t> scale;
  std::vector<double> dense;
  std::vector<float> bias, x;
};

Q4Case make_case4(int64_t M, int64_t N, int64_t K, int group, bool sparse, std::mt19937& rng) {
  Q4Case c{M, N, K, group, {}, {}, {}, {}, {}, {}};
  std::uniform_int_distribution<int> q(-8, 7), slot(0, 3), exp(8, 14), man(0, 1023), sign(0, 1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t V = sparse ? K / 2 : K;
  const int64_t G = core::int4_row_groups(V, group), B = core::int4_row_bytes(V);
  c.packed.assign(N * B, 0x88);  // padding: nibbles of 8, i.e. zeros
  c.meta.assign(sparse ? N * core::meta_cols(K) : 0, 0);
  c.dense.assign(N * K, 0.0);
  std::vector<double> sv(N * G);
  for (int64_t i = 0; i < N * G; ++i) {
    const int e = exp(rng), mt = man(rng), sg = sign(rng);
    c.scale.push_back(static_cast<uint16_t>((sg << 15) | (e << 10) | mt));
    sv[i] = (sg ? -1.0 : 1.0) * (1.0 + mt / 1024.0) * std::ldexp(1.0, e - 15);
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < V; ++i) {
      const int v = q(rng);
      uint8_t& byte = c.packed[n * B + (i / 32) * 16 + (i % 32) % 16];
      byte = (i % 32) < 16 ? static_cast<uint8_t>((byte & 0xF0) | (v + 8))
                           : static_cast<uint8_t>((byte & 0x0F) | ((v + 8) << 4));
      int64_t col = i;
      if (sparse) {  // kept values two a group of 4, at distinct ascending slots
        const int64_t g = i / 2;
        if (i % 2 == 0) {
          int i0 = slot(rng), i1 = slot(rng);
          while (i1 == i0) i1 = slot(rng);
          if (i1 < i0) std::swap(i0, i1);
          c.meta[n * core::meta_cols(K) + g / 2] |= static_cast<uint8_t>((i0 | (i1 << 2)) << ((g & 1) * 4));
        }
        const unsigned nib = (c.meta[n * core::meta_cols(K) + g / 2] >> ((g & 1) * 4)) & 0xFu;
        col = 4 * g + ((i & 1) ? (nib >> 2) : (nib & 3u));
      }
      c.dense[n * K + col] = v * sv[n * G + i / group];
    }
  for (int64_t n = 0; n < N; ++n) c.bias.push_back(u(rng));
  for (int64_t i = 0; i < M * K; ++i) c.x.push_back(u(rng));
  return c;
}

std::vector<float> run4(const Q4Case& c, bool packed, int64_t M, const float* x, int nthreads) {
  std::vector<float> y(M * c.N, -1.f);
  if (packed)
    core::sparse24_int4_linear(x, M, c.packed.data(), c.meta.data(), c.scale.data(), c.group,
                               c.bias.data(), c.N, c.K, y.data(), nthreads);
  else
    core::int4_linear(x, M, c.packed.data(), c.scale.data(), c.group, c.bias.data(), c.N, c.K,
                      y.data(), nthreads);
  return y;
}

class Q4Linear : public ::testing::TestWithParam<std::tuple<QImpl, bool, int>> {};

TEST_P(Q4Linear, MatchesFloat64ReferenceOnOddShapes) {
  auto [impl, packed, group] = GetParam();
  ScopedQImpl scoped(impl);
  const std::string route = core::int4_linear_impl();
  if (impl == QImpl::Scalar) EXPECT_EQ(route, "scalar");
  if (impl == QImpl::NoVnni || impl == QImpl::Avx2) EXPECT_NE(route, "avx512_vnni");
  std::mt19937 rng(5);
  for (auto [M, N, K] : kShapes) {
    const Q4Case c = make_case4(M, N, K, group, packed, rng);
    const auto y = run4(c, packed, M, c.x.data(), 2);
    const std::vector<float> xr = route == "avx512_vnni" ? quantised_x(c.x, M, K) : c.x;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double p = double(xr[m * K + k]) * c.dense[n * K + k];
          s += p;
          mag += std::fabs(p);
        }
        const double tol = (4 * std::sqrt(double(K) + 2) * 1.2e-7) * (mag + 1) + 1e-6;
        ASSERT_NEAR(y[m * N + n], s + c.bias[n], tol)
            << route << " M=" << M << " N=" << N << " K=" << K << " m=" << m << " n=" << n;
      }
  }
}

TEST_P(Q4Linear, ARowIsTheSameBitsAloneBatchedAndAtAnyThreadCount) {
  auto [impl, packed, group] = GetParam();
  ScopedQImpl scoped(impl);
  std::mt19937 rng(6);
  for (int64_t K : {576, 580}) {
    const Q4Case c = make_case4(16, 261, K, group, packed, rng);
    const auto all = run4(c, packed, 16, c.x.data(), 2);
    EXPECT_EQ(run4(c, packed, 16, c.x.data(), 1), all);
    for (int64_t m0 : {0, 5, 15}) {
      const auto one = run4(c, packed, 1, c.x.data() + m0 * K, 2);
      for (int64_t n = 0; n < c.N; ++n) ASSERT_EQ(one[n], all[m0 * c.N + n]) << "K=" << K << " m=" << m0;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Routes, Q4Linear,
                         ::testing::Combine(::testing::Values(QImpl::Native, QImpl::NoVnni,
                                                              QImpl::Avx2, QImpl::Scalar),
                                            ::testing::Bool(), ::testing::Values(32, 64)));

INSTANTIATE_TEST_SUITE_P(Routes, QLinear,
                         ::testing::Combine(::testing::Values(QImpl::Native, QImpl::NoVnni,
                                                              QImpl::Avx2, QImpl::Scalar),
                                            ::testing::Bool()));

}  // namespace
