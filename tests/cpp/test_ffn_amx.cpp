// googletests for the FFN's AMX tile entry points (sparse_ffn.h): the 2:4 projection with fp32
// output and the down projection from the neuron-group layout, against a float64 reference on odd
// shapes. Skipped (with the reason) on CPUs or kernels without AMX-BF16 tiles.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "sparse24.h"
#include "sparse_ffn.h"

namespace core = pysparse::core;

namespace {

uint16_t bf16(float v) { return core::float_to_bf16(v); }
double val(uint16_t h) { return core::bf16_to_float(h); }

struct Shape {
  int64_t M, D, F;
};
// rows: one 16-row slice, 17+ (paired slices, an odd last one); d_model % 16 and d_ff % 32 both
// nonzero somewhere (partial column tiles, partial k-blocks)
const Shape kShapes[] = {{7, 64, 128}, {16, 36, 100}, {17, 40, 68}, {33, 80, 260}, {9, 16, 4}};

class FfnAmx : public ::testing::Test {
 protected:
  void SetUp() override {
    unsetenv("PYSPARSE_DISABLE_AMX");
    if (!core::sparse24_bf16_amx()) GTEST_SKIP() << "no AMX-BF16 tiles on this CPU/kernel";
  }
};

TEST_F(FfnAmx, DownFromGroupLayoutMatchesReference) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<int> pos(0, 3), silent(0, 4);
  for (auto [M, D, F] : kShapes) {
    const int64_t G = F / 4, mc = (D + 1) / 2;
    // W_down [D, F], 2:4 along F, stored as values [G, 2, D], meta [G, ceil(D/2)]
    std::vector<uint16_t> values(G * 2 * D);
    std::vector<uint8_t> meta(G * mc, 0);
    std::vector<double> w(D * F, 0.0);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) {
        int i0 = pos(rng), i1 = pos(rng);
        while (i1 == i0) i1 = pos(rng);
        if (i0 > i1) std::swap(i0, i1);
        const uint16_t v0 = bf16(u(rng)), v1 = bf16(u(rng));
        values[(g * 2) * D + d] = v0;
        values[(g * 2 + 1) * D + d] = v1;
        meta[g * mc + d / 2] |= static_cast<uint8_t>((i0 | i1 << 2) << ((d & 1) * 4));
        w[d * F + 4 * g + i0] = val(v0);
        w[d * F + 4 * g + i1] = val(v1);
      }
    // h with whole 32-neuron blocks silent now and then (the kernel skips those)
    std::vector<float> h(M * F);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t f = 0; f < F; ++f) h[m * F + f] = silent(rng) == 0 && f >= 32 && f < 64 ? 0.f : u(rng);
    std::vector<uint16_t> bias(D), y(M * D);
    for (auto& b : bias) b = bf16(u(rng));
    core::ffn_down24_amx(h.data(), M, values.data(), meta.data(), F, D, bias.data(), y.data(), 2);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t d = 0; d < D; ++d) {
        double ref = val(bias[d]), mag = std::fabs(ref);
        for (int64_t f = 0; f < F; ++f) {
          const double hv = val(bf16(h[m * F + f]));  // the tiles take h rounded to bf16
          ref += hv * w[d * F + f];
          mag += std::fabs(hv * w[d * F + f]);
        }
        const double tol = 4.0 * std::sqrt(F + 1.0) * 1.2e-7 * mag + std::fabs(ref) * 0x1p-8 + 1e-6;
        ASSERT_NEAR(val(y[m * D + d]), ref, tol) << "M=" << M << " D=" << D << " F=" << F;
      }
  }
}

TEST_F(FfnAmx, LinearWithFp32OutputMatchesReference) {
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (auto [M, K, N] : kShapes) {
    std::vector<uint16_t> w(N * K, 0), x(M * K), bias(N);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t g = 0; g < K / 4; ++g) {
        w[n * K + 4 * g + 1] = bf16(u(rng));
        w[n * K + 4 * g + 3] = bf16(u(rng));
      }
    for (auto& e : x) e = bf16(u(rng));
    for (auto& e : bias) e = bf16(u(rng));
    std::vector<uint16_t> values(N * K / 2);
    std::vector<uint8_t> meta(N * core::meta_cols(K));
    ASSERT_TRUE(core::compress24(w.data(), N, K, K, 2, values.data(), meta.data()).ok());
    std::vector<float> y(M * N);
    core::ffn_linear24_amx(x.data(), M, K, values.data(), meta.data(), N, K, bias.data(), y.data(), 2);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double ref = val(bias[n]), mag = std::fabs(ref);
        for (int64_t k = 0; k < K; ++k) {
          ref += val(x[m * K + k]) * val(w[n * K + k]);
          mag += std::fabs(val(x[m * K + k]) * val(w[n * K + k]));
        }
        ASSERT_NEAR(y[m * N + n], ref, 4.0 * std::sqrt(K + 1.0) * 1.2e-7 * mag + 1e-6)
            << "M=" << M << " K=" << K << " N=" << N;  // fp32 out: no final rounding
      }
  }
}

}  // namespace
