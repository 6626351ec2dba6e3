// The proximal operator of lam * Reg on one group of 4 weights (ProxSparse, arXiv 2502.00258):
//
//   prox(z) = argmin_w  1/2 ||w - z||^2 + lam * Reg(w),
//   Reg(w)  = |w1 w2 w3| + |w2 w3 w4| + |w3 w4 w1| + |w4 w1 w2|   (0 iff at most 2 nonzeros).
//
// With a = |z| sorted descending (signs and positions restored at the end) the minimiser keeps
// the signs of z and is one of three candidates:
//   (a) the top 2 kept as they are, the rest 0           (Reg = 0);
//   (b) the top 3 by coordinate descent on 1/2||w-a||^2 + lam w1 w2 w3:
//         w_i <- max(a_i - lam * w_j * w_k, 0), i = 1, 2, 3 in turn, from w = a;
//   (c) all 4 by coordinate descent on the full objective:
//         w_i <- max(a_i - lam * (w_j w_k + w_j w_l + w_k w_l), 0), i = 1..4 in turn, from w = a;
// and the one with the least objective is returned (ties prefer (a), then (b)).
// Each coordinate step minimises the objective exactly in that coordinate (it is quadratic with
// unit curvature there), so the objective never rises; a candidate's sweeps stop when no
// coordinate moved more than tol * (1 + a_1) in a sweep, or after max_iters sweeps. This
// sequential (Gauss-Seidel) form is our choice over a simultaneous (Jacobi) update: it is the
// textbook alternating minimisation and cannot oscillate. pysparse/kernels/reference.py implements the
// same iteration in float64 and bench/prox24.py vectorises it over the whole matrix.
//
// Plain C++ usable from CUDA (__host__ __device__ when compiled by nvcc); no torch.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PYSPARSE_HD __host__ __device__ __forceinline__
#else
#define PYSPARSE_HD inline
#endif

namespace pysparse::core {

template <typename T>
PYSPARSE_HD T prox24_max0(T v) {
  return v > T(0) ? v : T(0);
}

// In place on g[0..3]; T is float or double. Returns the sweeps used by the costlier candidate.
template <typename T>
PYSPARSE_HD int prox24_group(T* g, T lam, int max_iters, T tol) {
  // Rank the magnitudes, descending; ties keep the lower index first (stable).
  int idx[4] = {0, 1, 2, 3};
  T a[4];
  for (int i = 0; i < 4; ++i) a[i] = g[i] < T(0) ? -g[i] : g[i];
  for (int i = 1; i < 4; ++i) {  // insertion sort of 4
    int j = i;
    const int cur = idx[i];
    while (j > 0 && a[idx[j - 1]] < a[cur]) {
      idx[j] = idx[j - 1];
      --j;
    }
    idx[j] = cur;
  }
  const T s0 = a[idx[0]], s1 = a[idx[1]], s2 = a[idx[2]], s3 = a[idx[3]];
  const T stop = tol * (T(1) + s0);

  // (a) top 2.
  T best = T(0.5) * (s2 * s2 + s3 * s3);
  T w0 = s0, w1 = s1, w2 = T(0), w3 = T(0);
  int sweeps = 0;
  if (lam > T(0) && s2 > T(0)) {
    // (b) top 3.
    T b0 = s0, b1 = s1, b2 = s2;
    int it = 0;
    for (; it < max_iters; ++it) {
      const T n0 = prox24_max0(s0 - lam * b1 * b2);
      const T n1 = prox24_max0(s1 - lam * n0 * b2);
      const T n2 = prox24_max0(s2 - lam * n0 * n1);
      const T moved = fmax(fabs(n0 - b0), fmax(fabs(n1 - b1), fabs(n2 - b2)));
      b0 = n0, b1 = n1, b2 = n2;
      if (moved <= stop) {
        ++it;
        break;
      }
    }
    sweeps = it;
    const T ob = T(0.5) * ((b0 - s0) * (b0 - s0) + (b1 - s1) * (b1 - s1) + (b2 - s2) * (b2 - s2) +
                           s3 * s3) +
                 lam * b0 * b1 * b2;
    if (ob < best) {
      best = ob;
      w0 = b0, w1 = b1, w2 = b2, w3 = T(0);
    }
    if (s3 > T(0)) {
      // (c) all 4.
      T c0 = s0, c1 = s1, c2 = s2, c3 = s3;
      it = 0;
      for (; it < max_iters; ++it) {
        const T n0 = prox24_max0(s0 - lam * (c1 * c2 + c1 * c3 + c2 * c3));
        const T n1 = prox24_max0(s1 - lam * (n0 * c2 + n0 * c3 + c2 * c3));
        const T n2 = prox24_max0(s2 - lam * (n0 * n1 + n0 * c3 + n1 * c3));
        const T n3 = prox24_max0(s3 - lam * (n0 * n1 + n0 * n2 + n1 * n2));
        const T moved = fmax(fmax(fabs(n0 - c0), fabs(n1 - c1)), fmax(fabs(n2 - c2), fabs(n3 - c3)));
        c0 = n0, c1 = n1, c2 = n2, c3 = n3;
        if (moved <= stop) {
          ++it;
          break;
        }
      }
      sweeps = it > sweeps ? it : sweeps;
      const T oc = T(0.5) * ((c0 - s0) * (c0 - s0) + (c1 - s1) * (c1 - s1) +
                             (c2 - s2) * (c2 - s2) + (c3 - s3) * (c3 - s3)) +
                   lam * (c0 * c1 * c2 + c1 * c2 * c3 + c2 * c3 * c0 + c3 * c0 * c1);
      if (oc < best) {
        best = oc;
        w0 = c0, w1 = c1, w2 = c2, w3 = c3;
      }
    }
  } else if (lam <= T(0)) {
    // lam = 0: the prox is the identity.
    w2 = s2, w3 = s3;
  }
  const T w[4] = {w0, w1, w2, w3};
  for (int r = 0; r < 4; ++r) {
    const int i = idx[r];
    g[i] = g[i] < T(0) ? -w[r] : w[r];
  }
  return sweeps;
}

}  // namespace pysparse::core
