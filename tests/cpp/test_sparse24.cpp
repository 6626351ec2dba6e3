// googletests for the torch-free 2:4 core: packing round trips, pruning rules and the linear
// kernels (both the AVX2 and the scalar implementation) against a float64 host reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "sparse24.h"

namespace core = pysparse::core;

namespace {

// ---- testbed -------------------------------------------------------------------------------------
struct Problem {
  int64_t M, N, K;
};

// A random 2:4 weight (random pattern per group, including groups with 0 or 1 nonzeros).
std::vector<float> random_24(int64_t N, int64_t K, std::mt19937& rng) {
  std::uniform_real_distribution<float> val(-1.f, 1.f);
  std::uniform_int_distribution<int> pick(0, 3), count(0, 9);
  std::vector<float> w(N * K, 0.f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < K / 4; ++g) {
      const int c = count(rng);
      const int nz = c == 0 ? 0 : (c == 1 ? 1 : 2);
      for (int i = 0; i < nz; ++i) w[n * K + 4 * g + pick(rng)] = val(rng);
    }
  return w;
}

std::vector<float> random_vec(int64_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> val(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& e : v) e = val(rng);
  return v;
}

// float64 reference y = x W^T + b, and sum |x||w| per output for the error bound.
void reference(const std::vector<double>& x, const std::vector<double>& w, const double* bias,
               int64_t M, int64_t N, int64_t K, std::vector<double>& y, std::vector<double>& mag) {
  y.assign(M * N, 0.0);
  mag.assign(M * N, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = bias ? bias[n] : 0.0, a = bias ? std::fabs(bias[n]) : 0.0;
      for (int64_t k = 0; k < K; ++k) {
        s += x[m * K + k] * w[n * K + k];
        a += std::fabs(x[m * K + k] * w[n * K + k]);
      }
      y[m * N + n] = s;
      mag[m * N + n] = a;
    }
}

// Selects a kernel level for the duration of a test through the dispatcher's environment switches.
// Native includes the AMX tile kernel (bf16, from kAmxMinRows rows) where the CPU and kernel offer
// it; NoAmx is the AVX-512 (or AVX2) code on the same CPU, the bf16 GEMV on AVX512-BF16 dot
// products where the CPU has them; NoDot the same with the widening AVX-512 GEMV for bf16.
enum class Impl { Native, NoAmx, NoDot, Avx2, Scalar };
class ScopedImpl {
 public:
  explicit ScopedImpl(Impl impl) {
    unsetenv("PYSPARSE_DISABLE_AMX");
    unsetenv("PYSPARSE_DISABLE_AVX512");
    unsetenv("PYSPARSE_DISABLE_AVX2");
    unsetenv("PYSPARSE_DISABLE_BF16_DOT");
    if (impl == Impl::NoAmx || impl == Impl::NoDot) setenv("PYSPARSE_DISABLE_AMX", "1", 1);
    if (impl == Impl::NoDot) setenv("PYSPARSE_DISABLE_BF16_DOT", "1", 1);
    if (impl == Impl::Avx2) setenv("PYSPARSE_DISABLE_AVX512", "1", 1);
    if (impl == Impl::Scalar) setenv("PYSPARSE_DISABLE_AVX2", "1", 1);
  }
  ~ScopedImpl() {
    unsetenv("PYSPARSE_DISABLE_BF16_DOT");
    unsetenv("PYSPARSE_DISABLE_AMX");
    unsetenv("PYSPARSE_DISABLE_AVX512");
    unsetenv("PYSPARSE_DISABLE_AVX2");
  }
};

const Problem kProblems[] = {{1, 1, 4},    {1, 7, 12},    {3, 5, 12},    {1, 33, 388},
                             {4, 9, 100},  {5, 17, 388},  {17, 3, 4100}, {64, 31, 4100},
                             {33, 64, 64}, {2, 130, 4096}, {40, 2, 20},   {70, 67, 520},
                             {129, 5, 268}, {8, 19, 36},   {16, 48, 96}};

}  // namespace

// ---- packing -------------------------------------------------------------------------------------
class Compress24Impl : public ::testing::TestWithParam<Impl> {};

// Decompression has AVX-512 versions (16- and 32-bit) and the portable one: all must agree.
TEST_P(Compress24Impl, RoundTripOddShapes) {
  ScopedImpl impl(GetParam());
  std::mt19937 rng(1);
  for (auto [M, N, K] : kProblems) {
    (void)M;
    auto w = random_24(N, K, rng);
    std::vector<float> values(N * K / 2);
    std::vector<uint8_t> meta(N * core::meta_cols(K));
    auto st = core::compress24(w.data(), N, K, K, 4, values.data(), meta.data());
    ASSERT_TRUE(st.ok()) << "N=" << N << " K=" << K;
    std::vector<float> back(N * K, -1.f);
    core::decompress24(values.data(), meta.data(), N, K, 4, back.data());
    for (int64_t i = 0; i < N * K; ++i) ASSERT_EQ(back[i], w[i]) << "N=" << N << " K=" << K << " i=" << i;
  }
}

TEST_P(Compress24Impl, RoundTripKeepsBitPatterns16) {
  ScopedImpl impl(GetParam());
  // 16-bit payloads are copied bitwise (bf16 and fp16 alike); -0 counts as zero.
  const int64_t N = 3, K = 12;
  std::vector<uint16_t> w(N * K, 0);
  w[0] = 0x3f80;   // 1.0 bf16
  w[3] = 0x8001;   // tiny negative: nonzero
  w[6] = 0x8000;   // -0 outside the kept pair (4, 5): zero, comes back as +0
  w[14] = 0x7fc0;  // NaN: nonzero
  std::vector<uint16_t> values(N * K / 2);
  std::vector<uint8_t> meta(N * core::meta_cols(K));
  ASSERT_TRUE(core::compress24(w.data(), N, K, K, 2, values.data(), meta.data()).ok());
  std::vector<uint16_t> back(N * K, 0xffff);
  core::decompress24(values.data(), meta.data(), N, K, 2, back.data());
  for (int64_t i = 0; i < N * K; ++i) EXPECT_EQ(back[i], i == 6 ? 0 : w[i]) << i;
}

TEST(Compress24_f32, RejectsThreeNonzerosAndNamesFirstGroup) {
  const int64_t N = 4, K = 8;
  std::vector<float> w(N * K, 0.f);
  w[2 * K + 4] = w[2 * K + 5] = w[2 * K + 7] = 1.f;  // row 2, group 1
  w[3 * K + 0] = w[3 * K + 1] = w[3 * K + 2] = 1.f;  // row 3, group 0 (later row)
  std::vector<float> values(N * K / 2);
  std::vector<uint8_t> meta(N * core::meta_cols(K));
  auto st = core::compress24(w.data(), N, K, K, 4, values.data(), meta.data());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.row, 2);
  EXPECT_EQ(st.group, 1);
  EXPECT_EQ(st.nonzeros, 3);
}

TEST(Compress24_f32, CanonicalIndicesForSparseGroups) {
  // One nonzero at index 3 -> pair (0, 3); none -> (0, 1); one at 1 -> (0, 1); odd group count
  // leaves the last high nibble 0.
  const int64_t N = 1, K = 12;
  std::vector<float> w(K, 0.f);
  w[3] = 2.f;
  w[9] = 5.f;
  std::vector<float> values(K / 2);
  std::vector<uint8_t> meta(core::meta_cols(K));
  ASSERT_TRUE(core::compress24(w.data(), N, K, K, 4, values.data(), meta.data()).ok());
  EXPECT_EQ(meta[0], (0 | 3 << 2) | ((0 | 1 << 2) << 4));
  EXPECT_EQ(meta[1], (0 | 1 << 2));
  EXPECT_EQ(values[1], 2.f);
  EXPECT_EQ(values[5], 5.f);
  EXPECT_EQ(values[0], 0.f);
}

TEST(Prune24, TiesGoToLowerIndexAndNaNRanksLowest) {
  const int64_t N = 1, K = 12;
  const float w[K] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  const float score[K] = {1, 1, 1, 1,  // all tied: keep 0, 1
                          NAN, 3, NAN, 2,  // NaN lowest: keep 5, 7
                          -1, 0, 5, 5};    // keep 10, 11
  float out[K];
  core::prune24(w, score, N, K, 4, out);
  const float expect[K] = {1, 2, 0, 0, 0, 6, 0, 8, 0, 0, 11, 12};
  for (int i = 0; i < K; ++i) EXPECT_EQ(out[i], expect[i]) << i;
}

INSTANTIATE_TEST_SUITE_P(Impl, Compress24Impl,
                         ::testing::Values(Impl::Native, Impl::Avx2, Impl::Scalar),
                         [](const auto& info) {
                           return info.param == Impl::Native ? "Native"
                                  : info.param == Impl::Avx2 ? "Avx2"
                                                             : "Scalar";
                         });

// ---- linear --------------------------------------------------------------------------------------
class Sparse24Linear : public ::testing::TestWithParam<Impl> {};

TEST_P(Sparse24Linear, F32MatchesReferenceOddShapes) {
  ScopedImpl impl(GetParam());
  if (GetParam() == Impl::Scalar) ASSERT_STREQ(core::sparse24_linear_impl(), "scalar");
  if (GetParam() == Impl::Avx2 && core::cpu_features().avx2)
    ASSERT_STREQ(core::sparse24_linear_impl(), "avx2");
  std::mt19937 rng(7);
  for (auto [M, N, K] : kProblems) {
    auto w = random_24(N, K, rng);
    auto x = random_vec(M * K, rng);
    auto b = random_vec(N, rng);
    std::vector<float> values(N * K / 2);
    std::vector<uint8_t> meta(N * core::meta_cols(K));
    ASSERT_TRUE(core::compress24(w.data(), N, K, K, 4, values.data(), meta.data()).ok());
    std::vector<float> y(M * N, NAN);
    core::sparse24_linear_f32(x.data(), M, K, values.data(), meta.data(), N, K, b.data(), y.data(), N, 2);
    std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), bd(b.begin(), b.end()), ref, mag;
    reference(xd, wd, bd.data(), M, N, K, ref, mag);
    for (int64_t i = 0; i < M * N; ++i) {
      // fp32 accumulation of K/2 products: error <= ~sqrt(K/2) * eps * sum|x w| (x4 margin).
      const double tol = 4.0 * std::sqrt(K / 2.0 + 1) * 1.2e-7 * mag[i] + 1e-6;
      ASSERT_NEAR(y[i], ref[i], tol) << "M=" << M << " N=" << N << " K=" << K << " i=" << i;
    }
  }
}

TEST_P(Sparse24Linear, Bf16MatchesReferenceOddShapes) {
  ScopedImpl impl(GetParam());
  std::mt19937 rng(11);
  for (auto [M, N, K] : kProblems) {
    auto wf = random_24(N, K, rng);
    auto xf = random_vec(M * K, rng);
    auto bf = random_vec(N, rng);
    auto to_bf16 = [](const std::vector<float>& v) {
      std::vector<uint16_t> out(v.size());
      for (size_t i = 0; i < v.size(); ++i) out[i] = core::float_to_bf16(v[i]);
      return out;
    };
    auto w = to_bf16(wf), x = to_bf16(xf), b = to_bf16(bf);
    std::vector<uint16_t> values(N * K / 2);
    std::vector<uint8_t> meta(N * core::meta_cols(K));
    ASSERT_TRUE(core::compress24(w.data(), N, K, K, 2, values.data(), meta.data()).ok());
    std::vector<uint16_t> y(M * N);
    core::sparse24_linear_bf16(x.data(), M, K, values.data(), meta.data(), N, K, b.data(), y.data(), N, 2);
    std::vector<double> xd(M * K), wd(N * K), bd(N), ref, mag;
    for (int64_t i = 0; i < M * K; ++i) xd[i] = core::bf16_to_float(x[i]);
    for (int64_t i = 0; i < N * K; ++i) wd[i] = core::bf16_to_float(w[i]);
    for (int64_t i = 0; i < N; ++i) bd[i] = core::bf16_to_float(b[i]);
    reference(xd, wd, bd.data(), M, N, K, ref, mag);
    for (int64_t i = 0; i < M * N; ++i) {
      // One rounding to bf16 (half an ulp: 2^-9 relative) on top of the fp32 accumulation error.
      const double tol = std::fabs(ref[i]) * std::ldexp(1.0, -8) +
                         4.0 * std::sqrt(K / 2.0 + 1) * 1.2e-7 * mag[i] + 1e-6;
      ASSERT_NEAR(core::bf16_to_float(y[i]), ref[i], tol) << "M=" << M << " N=" << N << " K=" << K;
    }
  }
}

TEST_P(Sparse24Linear, StridedRowsAndNoBias) {
  ScopedImpl impl(GetParam());
  std::mt19937 rng(3);
  for (int64_t M : {1, 2, 9, 40}) {
    const int64_t N = 13, K = 36, ldx = K + 5, ldy = N + 3;
    auto w = random_24(N, K, rng);
    auto x = random_vec(M * ldx, rng);
    std::vector<float> values(N * K / 2);
    std::vector<uint8_t> meta(N * core::meta_cols(K));
    ASSERT_TRUE(core::compress24(w.data(), N, K, K, 4, values.data(), meta.data()).ok());
    std::vector<float> y(M * ldy, 123.f);
    core::sparse24_linear_f32(x.data(), M, ldx, values.data(), meta.data(), N, K, nullptr, y.data(), ldy, 2);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double s = 0, a = 0;
        for (int64_t k = 0; k < K; ++k) {
          s += double(x[m * ldx + k]) * w[n * K + k];
          a += std::fabs(double(x[m * ldx + k]) * w[n * K + k]);
        }
        ASSERT_NEAR(y[m * ldy + n], s, 1e-5 * (a + 1)) << "M=" << M << " m=" << m << " n=" << n;
      }
      for (int64_t n = N; n < ldy; ++n) ASSERT_EQ(y[m * ldy + n], 123.f) << "padding overwritten";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Impl, Sparse24Linear,
                         ::testing::Values(Impl::Native, Impl::NoAmx, Impl::NoDot, Impl::Avx2,
                                           Impl::Scalar),
                         [](const auto& info) {
                           return info.param == Impl::Native  ? "Native"
                                  : info.param == Impl::NoAmx ? "NoAmx"
                                  : info.param == Impl::NoDot ? "NoDot"
                                  : info.param == Impl::Avx2  ? "Avx2"
                                                              : "Scalar";
                         });
