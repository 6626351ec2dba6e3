"""pysparse::attention, the decode attention Lower puts in the generation step graph: against a
float64 reference on odd shapes (grouped KV heads, masks of every broadcast shape, strided cache
views as the step graph passes them, fp32 and bf16), on the AVX2 kernel, the scalar fallback and
torch's route (more query rows than the kernel takes); bits independent of thread count and
batch; opcheck; clear errors; the step graph of a compiled decoder calls it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import use_route
from torch.library import opcheck

from pysparse.kernels import ops
from pysparse.kernels import reference as R

ROUTES = {
    "avx2": {},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
    "torch": {"PYSPARSE_ATTENTION_MAX_QUERIES": "0"},
}


@pytest.fixture(params=sorted(ROUTES))
def route(request, monkeypatch):
    return use_route(request.param, ROUTES, monkeypatch)


def _inputs(B, H, Hkv, T, L, D, dtype, gen, mask_shape=None, cache=0):
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    # keys/values as the step graph passes them: the first L positions of a longer cache
    k = torch.randn(B, Hkv, L + cache, D, generator=gen).to(dtype)[:, :, :L]
    v = torch.randn(B, Hkv, L + cache, D, generator=gen).to(dtype)[:, :, :L]
    mask = None
    if mask_shape is not None:
        mask = torch.rand(*mask_shape, generator=gen) > 0.3
        mask[..., -1] = True  # no row fully masked (torch's routes disagree there: NaN or not)
    return q, k, v, mask


def _check(y, q, k, v, mask, scale=None):
    ref = R.reference_attention(q, k, v, mask, scale)
    tol = 2e-5 if q.dtype == torch.float32 else 2e-2
    err = (y.double() - ref).abs().max()
    assert float(err) <= tol * (1 + float(ref.abs().max())), f"max err {float(err):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "H", "Hkv", "T", "L", "D"),
    [(1, 9, 3, 1, 129, 64), (2, 4, 4, 1, 7, 13), (3, 6, 2, 3, 1, 8), (1, 2, 1, 4, 33, 70)],
)
@pytest.mark.parametrize("mask", ["none", "full", "rows", "keys"])
def test_matches_float64_reference(route, dtype, B, H, Hkv, T, L, D, mask):
    gen = torch.Generator().manual_seed(B * 100 + H * 10 + L)
    shape = {"none": None, "full": (B, H, T, L), "rows": (B, 1, T, L), "keys": (1, 1, 1, L)}[mask]
    q, k, v, m = _inputs(B, H, Hkv, T, L, D, dtype, gen, shape, cache=5)
    y = ops.attention(q, k, v, m, enable_gqa=Hkv != H)
    assert y.shape == (B, H, T, D) and y.dtype == dtype
    assert y.is_contiguous()  # what the fake declares, on every route (compiled code relies on it)
    _check(y, q, k, v, m)


def test_scale_and_value_width():
    gen = torch.Generator().manual_seed(3)
    q, k, _, m = _inputs(2, 4, 2, 1, 9, 16, torch.float32, gen, (2, 1, 1, 9))
    v = torch.randn(2, 2, 9, 24, generator=gen)
    y = ops.attention(q, k, v, m, scale=0.3, enable_gqa=True)
    assert y.shape == (2, 4, 1, 24)
    _check(y, q, k, v, m, 0.3)


def test_the_kernel_runs_up_to_four_query_rows(monkeypatch):
    monkeypatch.delenv("PYSPARSE_ATTENTION_MAX_QUERIES", raising=False)
    gen = torch.Generator().manual_seed(4)
    ops.kernel_stats(reset=True)
    for t in (1, 4, 5):
        q, k, v, m = _inputs(1, 2, 2, t, 6, 8, torch.float32, gen, (1, 1, t, 6))
        ops.attention(q, k, v, m)
    assert ops.kernel_stats(reset=True)["attention"]["calls"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bits_do_not_depend_on_threads_or_batch(dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v, m = _inputs(3, 8, 2, 1, 200, 64, dtype, gen, (3, 1, 1, 200))
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            outs.append(ops.attention(q, k, v, m, enable_gqa=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    one = ops.attention(q[1:2], k[1:2], v[1:2], m[1:2], enable_gqa=True)
    assert torch.equal(one, outs[0][1:2])


@given(
    B=st.integers(1, 3),
    Hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    T=st.integers(1, 5),
    L=st.integers(1, 40),
    D=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzz_against_reference(B, Hkv, group, T, L, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, m = _inputs(B, Hkv * group, Hkv, T, L, D, dtype, gen, (B, 1, T, L), cache=seed % 3)
    _check(ops.attention(q, k, v, m, enable_gqa=group > 1), q, k, v, m)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(6)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, m = _inputs(2, 4, 2, 1, 7, 8, dtype, gen, (2, 1, 1, 7))
        cases += [((q, k, v, m), {"enable_gqa": True}), ((q, k, v, None), {"enable_gqa": True})]
        q, k, v, m = _inputs(1, 2, 2, 6, 7, 8, dtype, gen, (1, 1, 6, 7))  # torch's route
        cases.append(((q, k, v, m), {"scale": 0.5}))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    args, kwargs = _opcheck_cases()[case]
    opcheck(torch.ops.pysparse.attention.default, args, kwargs)


@pytest.mark.parametrize(
    ("shapes", "kwargs", "pattern"),
    [
        (((1, 4, 1, 8), (1, 2, 5, 8), (1, 2, 5, 8)), {}, r"enable_gqa=True"),
        (((1, 4, 1, 8), (1, 3, 5, 8), (1, 3, 5, 8)), {"enable_gqa": True}, r"multiple"),
        (((1, 4, 1, 8), (1, 4, 5, 6), (1, 4, 5, 8)), {}, r"head_dim 8 differs from k's 6"),
        (((4, 1, 8), (1, 4, 5, 8), (1, 4, 5, 8)), {}, r"must be 4-D"),
    ],
)
def test_bad_input_names_the_problem(shapes, kwargs, pattern):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(RuntimeError, match=pattern):
        ops.attention(q, k, v, **kwargs)
