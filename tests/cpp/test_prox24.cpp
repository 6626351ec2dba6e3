// googletests for the prox24 core: known closed-form cases, optimality against a grid search,
// invariants (signs, 2:4 fixed points, identity at lam = 0), float vs double agreement.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "prox24_group.h"
#include "sparse24.h"

namespace {

using pysparse::core::prox24;
using pysparse::core::prox24_group;

double objective(const double* w, const double* z, double lam) {
  double q = 0, reg = 0;
  for (int i = 0; i < 4; ++i) q += (w[i] - z[i]) * (w[i] - z[i]);
  for (int i = 0; i < 4; ++i)
    reg += std::fabs(w[i] * w[(i + 1) % 4] * w[(i + 2) % 4]);
  return 0.5 * q + lam * reg;
}

// The least objective over a grid of w_i = t_i * z_i, t_i in {0, 1/16, ..., 1} (the minimiser keeps
// z's signs and never exceeds |z_i|).
double grid_min(const double* z, double lam) {
  double lo = 1e300;
  const int steps = 16;
  for (int a = 0; a <= steps; ++a)
    for (int b = 0; b <= steps; ++b)
      for (int c = 0; c <= steps; ++c)
        for (int d = 0; d <= steps; ++d) {
          const double p[4] = {z[0] * a / steps, z[1] * b / steps, z[2] * c / steps,
                               z[3] * d / steps};
          lo = std::fmin(lo, objective(p, z, lam));
        }
  return lo;
}

TEST(Prox24, TwoOrFewerNonzerosAreFixedPoints) {
  double g[4] = {0.0, -1.5, 0.0, 0.25};
  const double z[4] = {0.0, -1.5, 0.0, 0.25};
  prox24_group<double>(g, 3.0, 100, 1e-12);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(g[i], z[i]);
}

TEST(Prox24, LamZeroIsIdentity) {
  double g[4] = {0.3, -0.2, 0.1, -0.4};
  prox24_group<double>(g, 0.0, 100, 1e-12);
  EXPECT_EQ(g[0], 0.3);
  EXPECT_EQ(g[3], -0.4);
}

TEST(Prox24, HugeLamKeepsTopTwoWithSigns) {
  double g[4] = {0.3, -0.2, 0.1, -0.4};
  prox24_group<double>(g, 1e6, 100, 1e-12);
  EXPECT_EQ(g[0], 0.3);
  EXPECT_EQ(g[1], 0.0);
  EXPECT_EQ(g[2], 0.0);
  EXPECT_EQ(g[3], -0.4);
}

TEST(Prox24, NeverWorseThanAGridSearch) {
  std::mt19937 rng(7);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (double lam : {0.1, 0.7, 2.5}) {
    for (int trial = 0; trial < 40; ++trial) {
      double z[4], w[4];
      for (int i = 0; i < 4; ++i) w[i] = z[i] = nd(rng);
      prox24_group<double>(w, lam, 200, 1e-12);
      EXPECT_LE(objective(w, z, lam), grid_min(z, lam) + 1e-9) << "lam " << lam << " trial " << trial;
      for (int i = 0; i < 4; ++i) EXPECT_TRUE(w[i] == 0 || (w[i] > 0) == (z[i] > 0));
    }
  }
}

TEST(Prox24, FloatAndDoubleAgreeOverAMatrix) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t groups = 20000;  // above the OpenMP threshold
  std::vector<float> wf(4 * groups);
  for (auto& v : wf) v = nd(rng);
  const std::vector<double> z(wf.begin(), wf.end());
  std::vector<double> wd = z;
  prox24(wf.data(), groups, 0.8f, 100, 1e-7f);
  prox24(wd.data(), groups, 0.8, 100, 1e-7);
  // Compared by objective: in the rare slowly converging groups the two precisions can stop at
  // slightly different points of an almost flat valley, with (almost) the same objective.
  for (int64_t g = 0; g < groups; ++g) {
    const double f[4] = {wf[4 * g], wf[4 * g + 1], wf[4 * g + 2], wf[4 * g + 3]};
    const double of = objective(f, &z[4 * g], 0.8), od = objective(&wd[4 * g], &z[4 * g], 0.8);
    ASSERT_NEAR(of, od, 1e-5 * (1 + od)) << "group " << g;
  }
}

// The fp32 matrix kernel on each CPU path (PYSPARSE_DISABLE_* read per call: lanes with AVX-512,
// the AVX2 build, the scalar loop): never worse than the grid search on any group, and every path
// bit-identical to the scalar one. 67 groups: full blocks of 32 and 16 lanes plus a scalar tail.
TEST(Prox24, EveryCpuPathIsOptimalAndBitIdentical) {
  std::mt19937 rng(23);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t groups = 67;
  std::vector<float> z(4 * groups);
  for (auto& v : z) v = nd(rng);
  for (float lam : {0.1f, 0.7f, 2.5f}) {
    std::vector<std::vector<float>> results;
    for (int path = 0; path < 3; ++path) {
      unsetenv("PYSPARSE_DISABLE_AVX512");
      unsetenv("PYSPARSE_DISABLE_AVX2");
      if (path == 1) setenv("PYSPARSE_DISABLE_AVX512", "1", 1);
      if (path == 2) setenv("PYSPARSE_DISABLE_AVX2", "1", 1);
      std::vector<float> w = z;
      prox24(w.data(), groups, lam, 200, 1e-7f);
      results.push_back(w);
    }
    unsetenv("PYSPARSE_DISABLE_AVX512");
    unsetenv("PYSPARSE_DISABLE_AVX2");
    for (int path = 0; path < 2; ++path)
      for (size_t i = 0; i < z.size(); ++i)
        ASSERT_EQ(results[path][i], results[2][i]) << "lam " << lam << " path " << path << " i " << i;
    for (int64_t g = 0; g < groups; ++g) {
      const double zg[4] = {z[4 * g], z[4 * g + 1], z[4 * g + 2], z[4 * g + 3]};
      const double wg[4] = {results[0][4 * g], results[0][4 * g + 1], results[0][4 * g + 2],
                            results[0][4 * g + 3]};
      const double lo = grid_min(zg, lam);
      // fp32 rounding of the result: a relative 1e-6 of the objective's scale
      EXPECT_LE(objective(wg, zg, lam), lo + 1e-5 * (1 + lo)) << "lam " << lam << " group " << g;
    }
  }
}

}  // namespace
