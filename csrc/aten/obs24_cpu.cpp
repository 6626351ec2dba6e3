// obs24_sweep_: the column sweep of SparseGPT at 2:4 (the OBS update of one layer), in place, on
// the CPU, float64. The sweep is thousands of tiny sequential steps (one per input feature): in
// Python each step cost ~10 torch calls (~120 us at SmolLM2's sizes, 22 of SparseGPT's 81 s); here
// a step is two loops over the output features. The semantics are those of
// pysparse.kernels.reference.obs24_sweep (the float64 reference the tests compare with).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace pysparse::aten {
namespace {

// Keeps the 2 smallest of s[0..3]: prune[j] = true for them (ties: the lower index is smaller).
inline void two_smallest4(const double s[4], bool out[4]) {
  for (int j = 0; j < 4; ++j) {
    int rank = 0;
    for (int k = 0; k < 4; ++k) rank += (s[k] < s[j]) || (s[k] == s[j] && k < j);
    out[j] = rank < 2;
  }
}

// wt [K, N] float64: the weight transposed (row r = input feature r), updated in place (rows end
// as the pruned-and-updated weights, up to rounding residue at pruned entries that the caller
// zeroes). prune [K, N] bool: choose 2 reads it (a fixed mask); choose 0/1 write it. hinv [K, K]:
// the upper Cholesky factor of H^-1. choose 0: groups of 4 input features, chosen at the first row
// of each group by w^2 / [H^-1]_rr^2; choose 1: groups of 4 output features within each row, by |w|.
void obs24_sweep_cpu(at::Tensor& wt, at::Tensor& prune, const at::Tensor& hinv_in,
                     int64_t block, int64_t choose) {
  constexpr const char* op = "obs24_sweep_";
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == at::kDouble && wt.is_contiguous(), op,
              ": wt must be a contiguous float64 [K, N] tensor, got ", wt.scalar_type(), " ",
              wt.sizes());
  const int64_t K = wt.size(0), N = wt.size(1);
  TORCH_CHECK(prune.scalar_type() == at::kBool && prune.is_contiguous() &&
                  prune.sizes() == wt.sizes(),
              op, ": prune must be a contiguous bool tensor shaped like wt ", wt.sizes(), ", got ",
              prune.scalar_type(), " ", prune.sizes());
  TORCH_CHECK(hinv_in.scalar_type() == at::kDouble && hinv_in.dim() == 2 &&
                  hinv_in.size(0) == K && hinv_in.size(1) == K,
              op, ": hinv must be a float64 [", K, ", ", K, "] tensor, got ",
              hinv_in.scalar_type(), " ", hinv_in.sizes());
  const at::Tensor hinv = hinv_in.contiguous();
  TORCH_CHECK(choose >= 0 && choose <= 2, op, ": choose must be 0 (choose along K), 1 (along N) or 2 "
              "(fixed mask), got ", choose);
  TORCH_CHECK(block > 0 && block % 4 == 0, op, ": block must be a positive multiple of 4, got ",
              block);
  TORCH_CHECK(choose != 0 || K % 4 == 0, op, ": choosing along K needs K % 4 == 0, got K=", K);
  TORCH_CHECK(choose != 1 || N % 4 == 0, op, ": choosing along N needs N % 4 == 0, got N=", N);
  TORCH_CHECK(wt.device().is_cpu() && prune.device().is_cpu() && hinv_in.device().is_cpu(), op,
              ": CPU tensors only");
  if (K == 0 || N == 0) return;
  double* W = wt.data_ptr<double>();
  bool* P = prune.data_ptr<bool>();
  const double* Hi = hinv.data_ptr<double>();
  at::Tensor err = at::empty({std::min(block, K), N}, wt.options());
  double* E = err.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(64, 32768 / std::max<int64_t>(block, 1));
  for (int64_t i1 = 0; i1 < K; i1 += block) {
    const int64_t i2 = std::min(i1 + block, K);
    for (int64_t r = i1; r < i2; ++r) {
      const double d = Hi[r * K + r];
      double* wr = W + r * N;
      bool* pr = P + r * N;
      if (choose == 0 && (r - i1) % 4 == 0) {
        double d2[4];
        for (int j = 0; j < 4; ++j) {
          const double dj = Hi[(r + j) * K + (r + j)];
          d2[j] = dj * dj;
        }
        at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
          for (int64_t n = b; n < e; ++n) {
            double s[4];
            bool out[4];
            for (int j = 0; j < 4; ++j) {
              const double w = W[(r + j) * N + n];
              s[j] = w * w / d2[j];
            }
            two_smallest4(s, out);
            for (int j = 0; j < 4; ++j) P[(r + j) * N + n] = out[j];
          }
        });
      } else if (choose == 1) {
        at::parallel_for(0, N / 4, grain, [&](int64_t b, int64_t e) {
          for (int64_t g = b; g < e; ++g) {
            double s[4];
            bool out[4];
            for (int j = 0; j < 4; ++j) s[j] = std::abs(wr[4 * g + j]);
            two_smallest4(s, out);
            for (int j = 0; j < 4; ++j) pr[4 * g + j] = out[j];
          }
        });
      }
      // The column's error (w - q) / [H^-1]_rr (q: w with the pruned entries zeroed) spread over
      // the rows of this block not yet visited: w_j -= [H^-1]_rj * err.
      double* er = E + (r - i1) * N;
      const double* hr = Hi + r * K;
      at::parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
        for (int64_t n = b; n < e; ++n) er[n] = pr[n] ? wr[n] / d : 0.0;
        for (int64_t j = r; j < i2; ++j) {
          const double h = hr[j];
          double* wj = W + j * N;
          for (int64_t n = b; n < e; ++n) wj[n] -= h * er[n];
        }
      });
    }
    if (i2 < K) {  // the rows after the block, in one product: W[i2:] -= Hinv[i1:i2, i2:]^T Err
      at::Tensor rest = wt.narrow(0, i2, K - i2);
      rest.addmm_(hinv.narrow(0, i1, i2 - i1).narrow(1, i2, K - i2).t(),
                  err.narrow(0, 0, i2 - i1), 1.0, -1.0);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("obs24_sweep_", &obs24_sweep_cpu); }

}  // namespace pysparse::aten
