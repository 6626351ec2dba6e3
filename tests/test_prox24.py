"""prox24: the ProxSparse proximal operator against its float64 reference, against brute-force
optimality on small groups, its properties (2:4 once lam is large, identity at lam = 0, signs
kept, idempotent on 2:4 groups), opcheck, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import pysparse
from pysparse.kernels import ops
from pysparse.kernels.reference import prox24_objective, reference_prox24


@pytest.mark.parametrize("lam", [0.0, 0.01, 0.3, 1.0, 5.0])
@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (5, 36), (3, 2, 8)])
def test_matches_float64_reference(lam, shape):
    gen = torch.Generator().manual_seed(hash((lam, shape)) % 2**31)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    ref = reference_prox24(w, lam, max_iters=5000, tol=1e-14)
    # same iteration in fp64, run to convergence (at a loose tol a different summation order may
    # stop a slow group one sweep apart)
    torch.testing.assert_close(ops.prox24(w, lam, 5000, 1e-14), ref, atol=1e-9, rtol=0)
    got32 = ops.prox24(w.float(), lam)  # default tol 1e-6
    torch.testing.assert_close(got32.double(), ref, atol=2e-4, rtol=1e-4)


def test_optimal_against_brute_force():
    """No point of a fine grid search beats the operator's choice, group by group. The minimiser
    keeps z's signs and never exceeds |z_i|, so the grid spans w_i = t_i * z_i, t_i in [0, 1]
    (every support of size 0..4 included), 21 steps per coordinate."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(24, 4, generator=gen, dtype=torch.float64)
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    grid = torch.cartesian_prod(t, t, t, t)  # [194481, 4]
    for lam in (0.2, 1.0, 3.0):
        best = prox24_objective(ops.prox24(z, lam), z, lam)
        for g in range(z.shape[0]):
            cands = grid * z[g]
            lo = prox24_objective(cands, z[g].expand_as(cands), lam).min()
            assert float(best[g]) <= float(lo) + 1e-9, (g, lam, float(best[g]), float(lo))


def test_large_lam_gives_24_small_lam_stays_close():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=gen)
    strong = ops.prox24(w, 50.0)
    assert (((strong.reshape(-1, 4) != 0).sum(-1)) <= 2).all()
    weak = ops.prox24(w, 1e-4)
    assert (weak - w).abs().max() < 1e-2
    torch.testing.assert_close(ops.prox24(w, 0.0), w)  # lam = 0: identity


def test_signs_kept_and_24_groups_are_fixed_points():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=gen)
    out = ops.prox24(w, 0.7)
    assert ((out == 0) | (torch.sign(out) == torch.sign(w))).all()
    pruned = ops.prune24(w)
    torch.testing.assert_close(ops.prox24(pruned, 0.7), pruned)  # Reg = 0 already


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_compute_in_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 16, generator=gen).to(dtype)
    got = ops.prox24(w, 0.5)
    assert got.dtype == dtype
    want = ops.prox24(w.float(), 0.5).to(dtype)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_inplace_on_a_noncontiguous_view_and_a_parameter():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(12, 16, generator=gen)
    view = base.t().contiguous().t()  # same values, column-major strides
    want = ops.prox24(base, 0.4)
    assert ops.prox24_(view, 0.4) is view
    torch.testing.assert_close(view, want)
    p = torch.nn.Parameter(base.clone())
    with torch.no_grad():
        ops.prox24_(p, 0.4)
    torch.testing.assert_close(p.detach(), want)


def test_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(256, 512, generator=gen)  # above the OpenMP threshold
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.prox24(w, 0.9)
        torch.set_num_threads(2)
        two = ops.prox24(w, 0.9)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize(
    "args",
    [
        (torch.randn(6, 8), 0.5, 100, 1e-6),
        (torch.randn(3, 4, dtype=torch.float64), 2.0, 5, 0.0),
        (torch.randn(2, 3, 12).to(torch.bfloat16), 0.1, 100, 1e-6),
    ],
)
def test_opcheck(args):
    opcheck(torch.ops.pysparse.prox24.default, args)
    opcheck(torch.ops.pysparse.prox24_.default, (args[0].clone(), *args[1:]))


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: ops.prox24(torch.randn(3, 6), 0.1), "multiple of 4"),
        (lambda: ops.prox24(torch.randint(0, 3, (2, 4)), 0.1), "must be float32"),
        (lambda: ops.prox24(torch.randn(2, 4), -1.0), "lam must be finite and >= 0"),
        (lambda: ops.prox24(torch.randn(2, 4), float("nan")), "lam must be finite"),
        (lambda: ops.prox24(torch.randn(2, 4), 0.1, 0), "max_iters must be >= 1"),
    ],
)
def test_bad_input(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def _paths():
    cpu = pysparse._C.cpu_info()
    return [
        pytest.param(
            {}, id="avx512", marks=pytest.mark.skipif(not cpu["avx512f"], reason="no AVX-512F")
        ),
        pytest.param(
            {"PYSPARSE_DISABLE_AVX512": "1"},
            id="avx2",
            marks=pytest.mark.skipif(not cpu["avx2"], reason="no AVX2"),
        ),
    ]


def _awkward(groups: int, seed: int) -> torch.Tensor:
    """Gaussian groups of every scale, with exact ties, zeros (+0 and -0), groups that are already
    2:4, and a few NaN / infinite entries (whose 16- or 8-group blocks take the scalar code)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, 4, generator=gen) * torch.logspace(-3, 1, groups)[:, None]
    w[::7, 1] = w[::7, 0]  # ties
    w[::11, 2] = -w[::11, 3]  # ties in magnitude, opposite signs
    w[::5, 0] = 0.0
    w[::13, 3] = -0.0
    w[::17, :2] = 0.0  # at most 2 nonzeros
    w[::97, 2] = float("nan")
    w[3::101, 1] = float("inf")
    w[5::103, 0] = float("-inf")
    return w.reshape(-1)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 1.0, 5.0])
@pytest.mark.parametrize("groups", [1, 15, 16, 17, 5003])
def test_lane_parallel_equals_scalar_bit_for_bit(monkeypatch, path, lam, groups):
    """The AVX-512 / AVX2 kernels (groups across SIMD lanes) return exactly the scalar kernel's
    result (same ranking with ties, same sweeps, same rounding), on every group count (tails of
    fewer groups than a vector), NaN and inf included."""
    w = _awkward(groups, seed=groups)
    max_iters = 7 if lam == 1.0 else 100  # a cap that some groups hit
    monkeypatch.setenv("PYSPARSE_DISABLE_AVX2", "1")
    want = ops.prox24(w, lam, max_iters, 1e-6)
    monkeypatch.delenv("PYSPARSE_DISABLE_AVX2")
    for k, v in path.items():
        monkeypatch.setenv(k, v)
    got = ops.prox24(w, lam, max_iters, 1e-6)
    assert torch.equal(got.isnan(), want.isnan())
    same = (got == want) | got.isnan()
    assert bool(same.all()), f"{int((~same).sum())} of {w.numel()} entries differ"
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0 kept as the scalar code does
