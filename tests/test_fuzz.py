"""Property tests (hypothesis) for the CPU ops: random shapes (K = 4 .. 260, odd N, M = 0 .. 40,
leading batch dims), strided views of x, random sparsity patterns, fp32/bf16, and every kernel
route, each compared with the float64 reference. A fast profile for CI; PYSPARSE_FUZZ=long runs
more examples."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import assert_quantized_close

import pysparse
from pysparse.kernels import formats, ops
from pysparse.kernels import reference as R

EXAMPLES = 1000 if os.environ.get("PYSPARSE_FUZZ") == "long" else 200
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

ROUTES = {
    "native": {},
    "no_amx": {"PYSPARSE_DISABLE_AMX": "1"},
    "no_bf16_dot": {"PYSPARSE_DISABLE_AMX": "1", "PYSPARSE_DISABLE_BF16_DOT": "1"},
    "avx2": {"PYSPARSE_DISABLE_AVX512": "1"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
    "dense": {
        "PYSPARSE_BF16_DENSE_MIN_ROWS": "1",
        "PYSPARSE_F32_DENSE_MAX_WEIGHTS": str(2**62),
        "PYSPARSE_F32_DENSE_MIN_ROWS": "1",
    },
}
KNOBS = [
    "PYSPARSE_DISABLE_AMX",
    "PYSPARSE_DISABLE_BF16_DOT",
    "PYSPARSE_DISABLE_AVX512",
    "PYSPARSE_DISABLE_AVX2",
    "PYSPARSE_BF16_DENSE_MIN_ROWS",
    "PYSPARSE_F32_DENSE_MAX_WEIGHTS",
    "PYSPARSE_F32_DENSE_MIN_ROWS",
]


@pytest.fixture
def set_route(monkeypatch):
    def apply(name: str) -> None:
        for k in KNOBS:
            monkeypatch.delenv(k, raising=False)
        for k, v in ROUTES[name].items():
            monkeypatch.setenv(k, v)

    yield apply


@FUZZ
@given(
    N=st.integers(1, 40),
    groups=st.integers(1, 65),
    M=st.integers(0, 40),
    lead=st.sampled_from([(), (2,), (1, 3)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    density=st.floats(0.0, 1.0),
    strided=st.booleans(),
    bias=st.booleans(),
    route=st.sampled_from(sorted(ROUTES)),
    seed=st.integers(0, 2**31 - 1),
)
def test_sparse24_linear_matches_reference(
    set_route, N, groups, M, lead, dtype, density, strided, bias, route, seed
):
    set_route(route)
    K = 4 * groups
    gen = torch.Generator().manual_seed(seed)
    w = ops.prune24(torch.randn(N, K, generator=gen))
    w = w.masked_fill(torch.rand(N, K, generator=gen) > density, 0.0).to(dtype)
    values, meta = ops.compress24(w)
    torch.testing.assert_close(ops.decompress24(values, meta, K), w, rtol=0, atol=0)
    shape = (*lead, M, K)
    if strided:  # every other column of a wider buffer: a non-contiguous x
        x = torch.randn(*lead, M, 2 * K, generator=gen).to(dtype)[..., ::2]
    else:
        x = torch.randn(*shape, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = ops.sparse24_linear(x, values, meta, b)
    assert y.shape == (*lead, M, N) and y.dtype == dtype
    x2 = x.reshape(-1, K)
    ref = R.reference_sparse24_linear(x2, values, meta, b)
    wd = w.double().abs()
    mag = x2.double().abs() @ wd.T + (b.double().abs() if b is not None else 0)
    tol = 4 * math.sqrt(K / 2 + 1) * torch.finfo(torch.float32).eps * mag + 1e-6
    if dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0**-8
    err = (y.reshape(-1, N).double() - ref).abs()
    assert (err <= tol).all(), f"route {route}: max err {float(err.max()):.3g}"


@FUZZ
@given(
    N=st.integers(1, 40),
    groups=st.integers(1, 65),
    M=st.integers(0, 40),
    lead=st.sampled_from([(), (2,), (1, 3)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    packed=st.booleans(),
    bits=st.sampled_from([(8, 0), (4, 32), (4, 64)]),
    strided=st.booleans(),
    bias=st.booleans(),
    route=st.sampled_from(["native", "avx2", "scalar"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantized_linears_match_reference(
    set_route, N, groups, M, lead, dtype, packed, bits, strided, bias, route, seed
):
    """int8_linear / sparse24_int8_linear and int4_linear / sparse24_int4_linear (group 32, 64):
    the kernels up to 16 rows, the dequantising route past."""
    set_route(route)
    (nbits, group), K = bits, 4 * groups
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    w = ops.prune24(w) if packed else w
    if strided:
        x = torch.randn(*lead, M, 2 * K, generator=gen).to(dtype)[..., ::2]
    else:
        x = torch.randn(*lead, M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    if nbits == 8:
        q, scale = formats.quantize_int8(w)
        wd = formats.dequantize_int8(q, scale).double()
        weights = (*formats.compress24_int8(q), scale) if packed else (q, scale)
        impl = "int8_impl"
    else:
        q, scale = formats.quantize_int4(w, group, sparse24=packed)
        wd = formats.dequantize_int4(q, scale, group, sparse24=packed).double()
        weights = (
            (*formats.compress24_int4(q), scale, group)
            if packed
            else (formats.pack_int4(q), scale, group)
        )
        impl = "int4_impl"
    op = {
        (8, False): ops.int8_linear,
        (8, True): ops.sparse24_int8_linear,
        (4, False): ops.int4_linear,
        (4, True): ops.sparse24_int4_linear,
    }[nbits, packed]
    y = op(x, *weights, b)
    assert y.shape == (*lead, M, N) and y.dtype == dtype
    x2 = x.reshape(-1, K)
    vnni = route == "native" and pysparse._C.cpu_info()[impl] == "avx512_vnni"
    if vnni and x2.shape[0] <= 16:  # x quantised per block of 32, as the reference does
        xq, xs = R.quantize_activations_a8(x2)
        x2 = xq * xs
    ref = R.reference_dense_linear(x2, wd, b)
    assert_quantized_close(y, x2, wd, b, ref, dequantised=True)


@FUZZ
@given(
    N=st.integers(1, 30),
    groups=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_prune_and_compress_properties(N, groups, dtype, ties, seed):
    K = 4 * groups
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    if ties:
        w = w.round()  # many equal magnitudes and zeros
    w = w.to(dtype)
    p = ops.prune24(w)
    torch.testing.assert_close(p, R.reference_prune24(w), rtol=0, atol=0)
    assert R.is_24_sparse(p)
    values, meta = ops.compress24(p)
    rv, rm = R.reference_compress24(p)
    assert torch.equal(values, rv) and torch.equal(meta, rm)
    assert torch.equal(ops.decompress24(values, meta, K), p)


@FUZZ
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    groups=st.integers(1, 12),
    lam=st.sampled_from([0.0, 1e-3, 0.1, 0.5, 2.0, 10.0]),
    scale=st.sampled_from([0.02, 1.0, 5.0]),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_prox24_matches_reference(lead, groups, lam, scale, transpose, seed):
    """prox24 (fp64 kernel) equals the float64 reference; the fp32 kernel is at least as good as
    the reference's point by objective (up to rounding); in-place on a strided view agrees."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, 4 * groups)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    # A tight tolerance so both iterate to the same point: at the default one a different float
    # summation order may stop a slowly converging group one sweep earlier in either.
    ref = R.reference_prox24(w, lam, max_iters=5000, tol=1e-14)
    torch.testing.assert_close(
        ops.prox24(w, lam, max_iters=5000, tol=1e-14), ref, atol=1e-8 * scale, rtol=0
    )
    got = ops.prox24(w.float(), lam, max_iters=5000).double()
    o_got = R.prox24_objective(got, w, lam)
    o_ref = R.prox24_objective(ref, w, lam)
    assert (o_got <= o_ref + 1e-4 * (1 + o_ref.abs())).all()
    if transpose and len(lead) >= 1:
        base = w.float().transpose(0, -1).contiguous().transpose(0, -1)  # same values, strided
        ops.prox24_(base, lam)
        torch.testing.assert_close(base, ops.prox24(w.float(), lam))


FFN_ROUTES = {
    "native": {},
    "no_bf16_dot": {"PYSPARSE_DISABLE_BF16_DOT": "1"},
    "avx2": {"PYSPARSE_DISABLE_AVX512": "1"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
}


@pytest.mark.parametrize("form", ["ffn", "mlp", "ffn24", "mlp24", "ffn24_rows"])
@FUZZ
@given(
    M=st.integers(0, 20),
    lead=st.sampled_from([(), (2,), (1, 3)]),
    D4=st.integers(1, 40),
    F4=st.integers(1, 30),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    threshold=st.sampled_from([0.0, 0.125 + 1 / 1024, 0.6 + 1 / 1024]),
    strided=st.booleans(),
    bias=st.booleans(),
    route=st.sampled_from(sorted(FFN_ROUTES)),
    seed=st.integers(0, 2**31 - 1),
    predict=st.sampled_from([None, 0.0, 0.3, 1.0]),
)
def test_ffn_ops_match_reference(
    monkeypatch, form, M, lead, D4, F4, dtype, threshold, strided, bias, route, seed, predict
):
    """The activation-sparse FFN ops on random shapes (d_model, d_ff multiples of 4 so every form
    applies), batches on both sides of the 16-row limit, leading dims, strided x, every CPU
    route. Inputs are small multiples of 1/8 so the gate is exact and fp32 agrees with fp64 on
    which neurons fire (thresholds sit off that grid); tolerance as in tests/test_ffn.py.
    ``predict``: None (exact), or activation predictors' output marking that share of the
    (row, neuron) pairs at random (the reference keeps only those pairs)."""
    for k in ("PYSPARSE_DISABLE_AVX512", "PYSPARSE_DISABLE_AVX2", "PYSPARSE_DISABLE_BF16_DOT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in FFN_ROUTES[route].items():
        monkeypatch.setenv(k, v)
    D, F = 4 * D4, 4 * F4
    gen = torch.Generator().manual_seed(seed)

    def grid(*shape):
        return (torch.randint(-6, 7, shape, generator=gen).float() / 8).to(dtype)

    wg, wu, wdt = grid(F, D), grid(F, D), grid(F, D)
    b1, b2 = (grid(F), grid(D)) if bias else (None, None)
    x = grid(*lead, M, 2 * D)[..., ::2] if strided else grid(*lead, M, D)
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    pred = None
    if predict is not None:
        pred = torch.rand(*x.shape[:-1], F, generator=gen) < predict
    t, pr = threshold, pred
    if form == "ffn":
        y, ref = ops.sparse_ffn(x, wg, wu, wdt, t, pr), (wg, wu, wdt)
    elif form == "mlp":
        y = ops.sparse_mlp(x, wg, b1, wdt, b2, t, pr)
    elif form == "ffn24_rows":
        d24 = ops.compress24(ops.prune24(wdt))
        y, ref = ops.sparse_ffn24(x, g24, u24, d24, t, pr), (g24, u24, d24)
    else:
        d24 = formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
        if form == "ffn24":
            y, ref = ops.sparse_ffn24(x, g24, u24, d24, t, pr), (g24, u24, d24)
        else:
            y = ops.sparse_mlp24(x, g24, b1, d24, b2, t, pr)
    assert y.shape == x.shape and y.dtype == dtype
    x2 = x.reshape(-1, D)
    p2 = None if pred is None else pred.reshape(-1, F)
    if form.startswith("mlp"):
        w1, w2 = (wg, wdt) if form == "mlp" else (g24, d24)
        expect = R.reference_sparse_mlp(x2, w1, b1, w2, b2, threshold, p2)
    else:
        expect = R.reference_sparse_ffn(x2, *ref, threshold, p2)
    got = y.reshape(-1, D).double()
    scale = (expect.abs().max().item() if expect.numel() else 0.0) + 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, expect, atol=1e-5 * scale, rtol=1e-6)
    elif x2.shape[0] > 1:  # torch's bf16 GEMM may take over (rounds the gate/up products)
        torch.testing.assert_close(got, expect, atol=2.0**-6 * scale, rtol=2.0**-6)
    else:
        torch.testing.assert_close(got, expect, atol=1e-5 * scale, rtol=2.0**-8)
