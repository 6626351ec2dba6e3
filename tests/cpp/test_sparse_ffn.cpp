// googletests for the activation-sparse FFN kernels (sparse_ffn.h): ffn_gate (threshold, the list of
// active neurons) then ffn_tail (up and down over those neurons), in the gated and the plain form,
// with dense weights and with 2:4-packed ones (both down layouts), fp32 and bf16 weights, on the
// AVX2 and the scalar build, against a float64 host reference on odd shapes. Thresholds are picked
// from the data so that all, about half, about a tenth, and none of the activations survive, and
// never within rounding distance of a pre-activation (so the expected active set is unambiguous).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "sparse24.h"
#include "sparse_ffn.h"

namespace core = pysparse::core;

namespace {

// ---- testbed -------------------------------------------------------------------------------------
// Kernel selection for the duration of a test, through the dispatcher's environment switches (read
// at call time). Native: AVX2 where the CPU has it, with the AVX-512 GEMV for a 2:4 gate where the
// CPU has that; Avx2: the same without AVX-512; Scalar: the portable build.
enum class Impl { Native, Avx2, Scalar };
class ScopedFfnImpl {
 public:
  explicit ScopedFfnImpl(Impl impl) {
    clear();
    if (impl == Impl::Avx2) setenv("PYSPARSE_DISABLE_AVX512", "1", 1);
    if (impl == Impl::Scalar) setenv("PYSPARSE_DISABLE_AVX2", "1", 1);
  }
  ~ScopedFfnImpl() { clear(); }

 private:
  static void clear() {
    unsetenv("PYSPARSE_DISABLE_AVX512");
    unsetenv("PYSPARSE_DISABLE_AVX2");
  }
};

enum class Form { Gated, Plain };
// Dense: every weight dense (down as W_down^T [F, D]). Packed24*: gate and up (plain: w1) 2:4 along
// d_model, the down projection 2:4 in the neuron-group layout or the neuron-row layout.
enum class Layout { Dense, Packed24GroupDown, Packed24RowDown };

constexpr double kEps = 0x1p-23;  // fp32 machine epsilon

// Error bound of an fp32 sum of `terms` products whose absolute values add up to `mag`:
// ~sqrt(terms) * eps * mag for rounding errors of random sign, x4 margin, as test_sparse24.cpp.
double sum_tol(int64_t terms, double mag) {
  return 4.0 * std::sqrt(static_cast<double>(terms) + 1.0) * kEps * mag + 1e-6;
}

// One weight tensor as the kernel reads it (fp32, or bf16 bit patterns). set() stores a value and
// returns it as stored, so the float64 reference uses exactly the weights the kernel sees.
class WeightBuf {
 public:
  void init(core::FfnDtype dt, int64_t n) {
    dt_ = dt;
    f32_.assign(dt == core::FfnDtype::f32 ? n : 0, 0.f);
    bf16_.assign(dt == core::FfnDtype::bf16 ? n : 0, 0);
  }
  double set(int64_t i, float v) {
    if (dt_ == core::FfnDtype::f32) return f32_[i] = v;
    bf16_[i] = core::float_to_bf16(v);
    return core::bf16_to_float(bf16_[i]);
  }
  const void* data() const {
    if (dt_ == core::FfnDtype::f32) return f32_.empty() ? nullptr : f32_.data();
    return bf16_.empty() ? nullptr : bf16_.data();
  }

 private:
  core::FfnDtype dt_ = core::FfnDtype::f32;
  std::vector<float> f32_;
  std::vector<uint16_t> bf16_;
};

// A random FFN problem: x, the weights in the kernel's storage, and float64 copies of them as dense
// [F, D] matrices (down as W_down^T).
struct Ffn {
  Form form = Form::Gated;
  Layout layout = Layout::Dense;
  core::FfnDtype dtype = core::FfnDtype::f32;
  int64_t M = 0, D = 0, F = 0;
  std::vector<float> x;
  std::vector<double> gate, up, down_t, b1, b2;  // b1 / b2 empty: no bias
  WeightBuf gate_v, up_v, down_v, b1_v, b2_v;
  std::vector<uint8_t> gate_m, up_m, down_m;

  core::FfnProblem problem(float threshold, int nthreads) const {
    core::FfnProblem p;
    p.dtype = dtype;
    p.M = M;
    p.D = D;
    p.F = F;
    p.x = x.data();
    const bool packed = layout != Layout::Dense;
    p.gate = {gate_v.data(), packed ? gate_m.data() : nullptr};
    p.gate_bias = b1_v.data();
    p.up = {up_v.data(), packed && form == Form::Gated ? up_m.data() : nullptr};
    p.down = {down_v.data(), packed ? down_m.data() : nullptr};
    p.down_by_row = layout == Layout::Packed24RowDown;
    p.down_bias = b2_v.data();
    p.threshold = threshold;
    p.nthreads = nthreads;
    return p;
  }
};

// Dense rows [rows, D].
void fill_dense(int64_t rows, int64_t D, std::mt19937& rng, WeightBuf& v, std::vector<double>& dense) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  dense.assign(rows * D, 0.0);
  for (int64_t i = 0; i < rows * D; ++i) dense[i] = v.set(i, u(rng));
}

// Two distinct indices of a group of 4, ascending; first0: the lower one is 0.
void pick_pair(std::mt19937& rng, bool first0, int& i0, int& i1) {
  std::uniform_int_distribution<int> pos(0, 3);
  i0 = first0 ? 0 : pos(rng);
  do i1 = pos(rng); while (i1 == i0);
  if (i0 > i1) std::swap(i0, i1);
}

// Rows [rows, D] 2:4 along D in the sparse24.h layout: values [rows, D/2], meta [rows, ceil(D/8)],
// packed here by hand (not by compress24). keep_col0: index 0 is kept in each row's first group.
void fill_packed_rows(int64_t rows, int64_t D, std::mt19937& rng, bool keep_col0, WeightBuf& v,
                      std::vector<uint8_t>& meta, std::vector<double>& dense) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t half = D / 2, mc = core::meta_cols(D);
  meta.assign(rows * mc, 0);
  dense.assign(rows * D, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < D / 4; ++g) {
      int i0, i1;
      pick_pair(rng, keep_col0 && g == 0, i0, i1);
      dense[r * D + 4 * g + i0] = v.set(r * half + 2 * g, u(rng));
      dense[r * D + 4 * g + i1] = v.set(r * half + 2 * g + 1, u(rng));
      meta[r * mc + g / 2] |= static_cast<uint8_t>((i0 | i1 << 2) << (4 * (g & 1)));
    }
}

// W_down [D, F] 2:4 along F in the neuron-group layout (sparse_ffn.h): values [F/4, 2, D], meta
// [F/4, ceil(D/2)], one nibble per output n, n even in the low nibble. dense_t: W_down^T [F, D].
void fill_group_down(int64_t F, int64_t D, std::mt19937& rng, WeightBuf& v,
                     std::vector<uint8_t>& meta, std::vector<double>& dense_t) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int64_t mc = (D + 1) / 2;
  meta.assign(F / 4 * mc, 0);
  dense_t.assign(F * D, 0.0);
  for (int64_t g = 0; g < F / 4; ++g)
    for (int64_t n = 0; n < D; ++n) {
      int i0, i1;
      pick_pair(rng, false, i0, i1);
      dense_t[(4 * g + i0) * D + n] = v.set((2 * g) * D + n, u(rng));
      dense_t[(4 * g + i1) * D + n] = v.set((2 * g + 1) * D + n, u(rng));
      meta[g * mc + n / 2] |= static_cast<uint8_t>((i0 | i1 << 2) << (4 * (n & 1)));
    }
}

// offset > 0: x[m][0] = 1 and every gate (plain: w1) row carries `offset` at column 0, which lifts
// all pre-activations above zero (for a threshold that keeps every activation).
Ffn make_ffn(Form form, Layout layout, core::FfnDtype dt, int64_t M, int64_t D, int64_t F,
             bool biases, float offset, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Ffn f;
  f.form = form;
  f.layout = layout;
  f.dtype = dt;
  f.M = M;
  f.D = D;
  f.F = F;
  f.x.resize(M * D);
  for (auto& e : f.x) e = u(rng);
  const bool packed = layout != Layout::Dense;
  const int64_t row_elems = packed ? D / 2 : D;
  f.gate_v.init(dt, F * row_elems);
  if (packed)
    fill_packed_rows(F, D, rng, offset > 0, f.gate_v, f.gate_m, f.gate);
  else
    fill_dense(F, D, rng, f.gate_v, f.gate);
  if (offset > 0) {
    for (int64_t m = 0; m < M; ++m) f.x[m * D] = 1.f;
    for (int64_t r = 0; r < F; ++r) f.gate[r * D] = f.gate_v.set(r * row_elems, offset);
  }
  if (form == Form::Gated) {
    f.up_v.init(dt, F * row_elems);
    if (packed)
      fill_packed_rows(F, D, rng, false, f.up_v, f.up_m, f.up);
    else
      fill_dense(F, D, rng, f.up_v, f.up);
  }
  if (layout == Layout::Packed24GroupDown) {
    f.down_v.init(dt, F / 4 * 2 * D);
    fill_group_down(F, D, rng, f.down_v, f.down_m, f.down_t);
  } else {
    f.down_v.init(dt, F * row_elems);
    if (packed)
      fill_packed_rows(F, D, rng, false, f.down_v, f.down_m, f.down_t);
    else
      fill_dense(F, D, rng, f.down_v, f.down_t);
  }
  if (biases) {
    f.b1_v.init(dt, F);
    f.b2_v.init(dt, D);
    f.b1.resize(F);
    f.b2.resize(D);
    for (int64_t i = 0; i < F; ++i) f.b1[i] = f.b1_v.set(i, u(rng));
    for (int64_t i = 0; i < D; ++i) f.b2[i] = f.b2_v.set(i, u(rng));
  }
  return f;
}

// float64 phase 1: z[m][f] = x_m . gate_f (+ b1_f), u[m][f] = x_m . up_f (gated), and the error
// bound of each as the kernel computes it in fp32.
struct Reference {
  std::vector<double> z, z_tol, u, u_tol;
};

Reference reference_gate_up(const Ffn& f) {
  const int64_t M = f.M, D = f.D, F = f.F;
  // a 2:4 row has D/2 products, a dense one D; a bias adds one more term
  const int64_t terms = (f.layout == Layout::Dense ? D : D / 2) + 1;
  Reference r;
  r.z.resize(M * F);
  r.z_tol.resize(M * F);
  if (f.form == Form::Gated) {
    r.u.resize(M * F);
    r.u_tol.resize(M * F);
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < F; ++n) {
      double s = f.b1.empty() ? 0.0 : f.b1[n], mag = std::fabs(s);
      double su = 0.0, magu = 0.0;
      for (int64_t k = 0; k < D; ++k) {
        const double xk = f.x[m * D + k];
        s += xk * f.gate[n * D + k];
        mag += std::fabs(xk * f.gate[n * D + k]);
        if (f.form == Form::Gated) {
          su += xk * f.up[n * D + k];
          magu += std::fabs(xk * f.up[n * D + k]);
        }
      }
      r.z[m * F + n] = s;
      r.z_tol[m * F + n] = sum_tol(terms, mag);
      if (f.form == Form::Gated) {
        r.u[m * F + n] = su;
        r.u_tol[m * F + n] = sum_tol(terms, magu);
      }
    }
  return r;
}

// What fraction of the activations the threshold should leave at zero.
enum class Off { None, Relu, Most, All };

// A threshold for `off` that no pre-activation lies within rounding distance of. None needs data
// with an offset (all z > 0). Relu: t = 0, about half off. Most: in a gap of the sorted z near the
// 90% point (above every z should no gap there be wide enough). All: above every z.
float pick_threshold(const Reference& r, Off off) {
  std::vector<double> z = r.z;
  std::sort(z.begin(), z.end());
  const double tol = *std::max_element(r.z_tol.begin(), r.z_tol.end());
  switch (off) {
    case Off::None:
      return static_cast<float>(z.front() / 2);
    case Off::Relu:
      return 0.f;
    case Off::Most: {
      const size_t n = z.size();
      if (n < 2) return static_cast<float>(z.back() + 1.0);
      // the widest gap among the few around the 90th percentile
      const size_t at = std::min(n - 2, static_cast<size_t>(0.9 * static_cast<double>(n)));
      size_t best = at;
      for (size_t j = at > 3 ? at - 3 : 0; j <= std::min(n - 2, at + 3); ++j)
        if (z[j + 1] - z[j] > z[best + 1] - z[best]) best = j;
      if (z[best + 1] - z[best] < 4 * tol) return static_cast<float>(z.back() + 1.0);
      return static_cast<float>((z[best] + z[best + 1]) / 2);
    }
    case Off::All:
      return static_cast<float>(z.back() + 1.0);
  }
  return 0.f;
}

const char* name(Off off) {
  return off == Off::None ? "none" : off == Off::Relu ? "relu" : off == Off::Most ? "most" : "all";
}

// Runs ffn_gate and ffn_tail on `f` with `threshold` and checks both phases against the float64
// reference: the active list exactly, a exactly 0 where the reference is below the threshold and
// within the fp32 bound elsewhere, y within the bound propagated through h and the down sum.
// Output rows have a stride of D + 3; the padding must be left alone.
void check_ffn(const Ffn& f, float threshold, int nthreads) {
  const int64_t M = f.M, D = f.D, F = f.F, ldy = D + 3;
  const Reference r = reference_gate_up(f);
  const double t = threshold;
  for (int64_t i = 0; i < M * F; ++i)
    ASSERT_GT(std::fabs(r.z[i] - t), r.z_tol[i])
        << "test data: a pre-activation is within rounding of the threshold; change the seed";

  // ---- phase 1
  const core::FfnProblem p = f.problem(threshold, nthreads);
  std::vector<float> a(M * F, NAN);
  std::vector<int32_t> active(F, -1);
  const int64_t nactive = core::ffn_gate(p, a.data(), active.data());
  std::vector<int32_t> want;
  for (int64_t n = 0; n < F; ++n) {
    bool any = false;
    for (int64_t m = 0; m < M; ++m) any |= r.z[m * F + n] >= t;
    if (any) want.push_back(static_cast<int32_t>(n));
  }
  ASSERT_EQ(nactive, static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(active[i], want[i]) << "active[" << i << "]";
  for (int64_t i = 0; i < M * F; ++i) {
    if (r.z[i] < t)
      ASSERT_EQ(a[i], 0.f) << "m=" << i / F << " f=" << i % F << " is below the threshold";
    else
      ASSERT_NEAR(a[i], r.z[i], r.z_tol[i]) << "m=" << i / F << " f=" << i % F;
  }

  // ---- phase 2
  const bool bf16 = f.dtype == core::FfnDtype::bf16;
  const float kPadF = 123.f;
  const uint16_t kPadB = core::float_to_bf16(123.f);
  std::vector<float> y32(bf16 ? 0 : M * ldy, kPadF);
  std::vector<uint16_t> y16(bf16 ? M * ldy : 0, kPadB);
  void* y = bf16 ? static_cast<void*>(y16.data()) : static_cast<void*>(y32.data());
  core::ffn_tail(p, a.data(), active.data(), nactive, y, ldy);
  auto out = [&](int64_t i) { return bf16 ? double(core::bf16_to_float(y16[i])) : double(y32[i]); };
  // h = fatrelu(z) * u (plain: fatrelu(z)) and its error bound from the bounds of z and u
  std::vector<double> h(M * F, 0.0), h_tol(M * F, 0.0);
  for (int64_t i = 0; i < M * F; ++i) {
    if (r.z[i] < t) continue;
    if (f.form == Form::Gated) {
      h[i] = r.z[i] * r.u[i];
      h_tol[i] = std::fabs(r.u[i]) * r.z_tol[i] + std::fabs(r.z[i]) * r.u_tol[i] +
                 r.z_tol[i] * r.u_tol[i] + kEps * std::fabs(h[i]);
    } else {
      h[i] = r.z[i];
      h_tol[i] = r.z_tol[i];
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < D; ++n) {
      double s = f.b2.empty() ? 0.0 : f.b2[n], mag = std::fabs(s), carried = 0.0;
      for (int64_t k = 0; k < F; ++k) {
        const double w = f.down_t[k * D + n];
        s += h[m * F + k] * w;
        mag += std::fabs(h[m * F + k] * w);
        carried += h_tol[m * F + k] * std::fabs(w);
      }
      // bf16 output: one rounding of the fp32 sum (half an ulp, 2^-9 relative; 2^-8 for margin)
      const double tol = carried + sum_tol(F + 1, mag) + (bf16 ? std::fabs(s) * 0x1p-8 : 0.0);
      ASSERT_NEAR(out(m * ldy + n), s, tol) << "m=" << m << " n=" << n;
    }
    for (int64_t n = D; n < ldy; ++n)
      ASSERT_EQ(out(m * ldy + n), 123.0) << "m=" << m << ": padding past d_model overwritten";
  }
}

struct Shape {
  int64_t D, F;
};
// d_model and d_ff off the multiples of 8 and 16 (and 4 where the layout allows); the largest of
// each list is big enough for the kernels' OpenMP regions to run multithreaded.
const Shape kDenseShapes[] = {{5, 3}, {37, 53}, {84, 131}};
const Shape kGroupDownShapes[] = {{4, 4}, {12, 20}, {36, 44}, {100, 132}};  // d_ff % 4 == 0
const Shape kRowDownShapes[] = {{4, 3}, {12, 21}, {36, 45}, {100, 131}};
const int64_t kRows[] = {1, 3, 17};
const Off kOff[] = {Off::None, Off::Relu, Off::Most, Off::All};

template <size_t N>
void check_all(Impl impl, Form form, Layout layout, const Shape (&shapes)[N]) {
  ScopedFfnImpl scoped(impl);
  if (impl == Impl::Scalar) ASSERT_STREQ(core::sparse_ffn_impl(), "scalar");
  if (impl != Impl::Scalar && core::cpu_features().avx2 && core::cpu_features().fma)
    ASSERT_STREQ(core::sparse_ffn_impl(), "avx2");
  uint32_t seed = 1;
  for (auto dt : {core::FfnDtype::f32, core::FfnDtype::bf16})
    for (int64_t M : kRows)
      for (size_t s = 0; s < N; ++s)
        for (Off off : kOff) {
          const auto [D, F] = shapes[s];
          // plain form: biases on all but the first shape (which runs without)
          const bool biases = form == Form::Plain && s > 0;
          // None: lift every pre-activation well above 0 (~6 std of a sum of D terms in [-1, 1])
          const float offset = off == Off::None ? 2.f * std::sqrt(static_cast<float>(D)) + 1.f : 0.f;
          const Ffn f = make_ffn(form, layout, dt, M, D, F, biases, offset, seed++);
          const float t = pick_threshold(reference_gate_up(f), off);
          SCOPED_TRACE(::testing::Message()
                       << (dt == core::FfnDtype::f32 ? "f32" : "bf16") << " M=" << M << " D=" << D
                       << " F=" << F << " off=" << name(off) << " t=" << t);
          check_ffn(f, t, 2);
          if (::testing::Test::HasFatalFailure()) return;
        }
}

class SparseFfn : public ::testing::TestWithParam<Impl> {};

}  // namespace

TEST_P(SparseFfn, GatedDenseMatchesReference) {
  check_all(GetParam(), Form::Gated, Layout::Dense, kDenseShapes);
}

TEST_P(SparseFfn, GatedPacked24GroupDownMatchesReference) {
  check_all(GetParam(), Form::Gated, Layout::Packed24GroupDown, kGroupDownShapes);
}

TEST_P(SparseFfn, GatedPacked24RowDownMatchesReference) {
  check_all(GetParam(), Form::Gated, Layout::Packed24RowDown, kRowDownShapes);
}

TEST_P(SparseFfn, PlainDenseMatchesReference) {
  check_all(GetParam(), Form::Plain, Layout::Dense, kDenseShapes);
}

TEST_P(SparseFfn, PlainPacked24GroupDownMatchesReference) {
  check_all(GetParam(), Form::Plain, Layout::Packed24GroupDown, kGroupDownShapes);
}

TEST_P(SparseFfn, PlainPacked24RowDownMatchesReference) {
  check_all(GetParam(), Form::Plain, Layout::Packed24RowDown, kRowDownShapes);
}

// sparse_ffn.h: the down sum is split by output column, so every output is summed in the same order
// whatever the thread count. 1 and 3 threads (3 splits d_model unevenly) must agree bit for bit.
TEST_P(SparseFfn, ThreadCountDoesNotChangeABit) {
  ScopedFfnImpl scoped(GetParam());
  uint32_t seed = 100;
  for (Form form : {Form::Gated, Form::Plain})
    for (auto [layout, D, F] : {std::tuple{Layout::Dense, int64_t{84}, int64_t{131}},
                                std::tuple{Layout::Packed24GroupDown, int64_t{100}, int64_t{132}},
                                std::tuple{Layout::Packed24RowDown, int64_t{100}, int64_t{131}}})
      for (auto dt : {core::FfnDtype::f32, core::FfnDtype::bf16}) {
        const Ffn f = make_ffn(form, layout, dt, 17, D, F, form == Form::Plain, 0.f, seed++);
        const float t = pick_threshold(reference_gate_up(f), Off::Most);
        std::vector<float> a1(17 * F), a3(17 * F);
        std::vector<int32_t> act1(F), act3(F);
        const int64_t n1 = core::ffn_gate(f.problem(t, 1), a1.data(), act1.data());
        const int64_t n3 = core::ffn_gate(f.problem(t, 3), a3.data(), act3.data());
        ASSERT_EQ(n1, n3);
        ASSERT_EQ(0, std::memcmp(a1.data(), a3.data(), a1.size() * sizeof(float)));
        ASSERT_EQ(0, std::memcmp(act1.data(), act3.data(), n1 * sizeof(int32_t)));
        const size_t ybytes = 17 * D * (dt == core::FfnDtype::f32 ? 4 : 2);
        std::vector<uint8_t> y1(ybytes, 0), y3(ybytes, 0xff);
        core::ffn_tail(f.problem(t, 1), a1.data(), act1.data(), n1, y1.data(), D);
        core::ffn_tail(f.problem(t, 3), a3.data(), act3.data(), n3, y3.data(), D);
        ASSERT_EQ(0, std::memcmp(y1.data(), y3.data(), ybytes))
            << "layout " << static_cast<int>(layout) << " form " << static_cast<int>(form);
      }
}

INSTANTIATE_TEST_SUITE_P(Impl, SparseFfn,
                         ::testing::Values(Impl::Native, Impl::Avx2, Impl::Scalar),
                         [](const auto& info) {
                           return info.param == Impl::Native ? "Native"
                                  : info.param == Impl::Avx2 ? "Avx2"
                                                             : "Scalar";
                         });

// unpack_down24 (the large-batch route's slabs of W_down^T): every column range of a random
// neuron-group weight, odd D (a last half-filled meta byte), odd n0 (the high nibble first), both
// element widths, 1 and 3 threads, against the layout read element by element.
TEST_P(SparseFfn, UnpackDownSlabsMatchLayout) {
  ScopedFfnImpl scoped(GetParam());
  std::mt19937 rng(7);
  for (int es : {2, 4})
    for (auto [F, D] : {std::pair{int64_t{4}, int64_t{1}}, std::pair{int64_t{12}, int64_t{37}},
                        std::pair{int64_t{132}, int64_t{100}}}) {
      const int64_t G = F / 4, mcols = (D + 1) / 2;
      std::vector<uint32_t> v(static_cast<size_t>(G * 2 * D));
      std::vector<uint8_t> meta(static_cast<size_t>(G * mcols));
      for (auto& x : v) x = rng() | 1u;  // never zero: a misplaced value cannot pass for a zero
      if (es == 2)
        for (auto& x : v) x &= 0xffffu;
      // valid nibbles only: idx0 < idx1
      const uint8_t pairs[6] = {0x4, 0x8, 0xc, 0x9, 0xd, 0xe};
      for (int64_t g = 0; g < G; ++g)
        for (int64_t n = 0; n < D; ++n)
          meta[g * mcols + n / 2] |= pairs[rng() % 6] << ((n & 1) * 4);
      std::vector<uint16_t> v16(v.begin(), v.end());
      const void* vp = es == 2 ? static_cast<const void*>(v16.data()) : v.data();
      for (int64_t n0 : {int64_t{0}, int64_t{1}, D / 2})
        for (int64_t cols : {D - n0, std::min<int64_t>(3, D - n0)})
          for (int nt : {1, 3}) {
            if (cols <= 0) continue;
            std::vector<uint32_t> out32(static_cast<size_t>(F * cols), 0xdeadbeefu);
            std::vector<uint16_t> out16(static_cast<size_t>(F * cols), 0xdeadu);
            void* op = es == 2 ? static_cast<void*>(out16.data()) : out32.data();
            core::unpack_down24(vp, meta.data(), F, D, n0, cols, es, op, nt);
            for (int64_t f = 0; f < F; ++f)
              for (int64_t c = 0; c < cols; ++c) {
                const int64_t g = f / 4, r = f % 4, n = n0 + c;
                const unsigned nib = (meta[g * mcols + n / 2] >> ((n & 1) * 4)) & 0xFu;
                const uint32_t want = (nib & 3u) == r   ? v[g * 2 * D + n]
                                      : (nib >> 2) == r ? v[g * 2 * D + D + n]
                                                        : 0u;
                const uint32_t got = es == 2 ? out16[f * cols + c] : out32[f * cols + c];
                ASSERT_EQ(want, got) << "es " << es << " F " << F << " D " << D << " n0 " << n0
                                     << " cols " << cols << " f " << f << " c " << c;
              }
          }
    }
}
