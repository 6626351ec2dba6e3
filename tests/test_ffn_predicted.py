"""The FFN ops with activation predictors' output (``predicted``, bool [..., d_ff]): the result is
the exact FFN restricted to the predicted (row, neuron) pairs, against the float64 reference on
every CPU route (AVX-512 / AVX2 / scalar builds, the FFN kernels and the dense fallback), dense
and 2:4 weights, fp32 and bf16; rows of neurons predicted for no row are never read; bit-identical
across thread counts; opcheck; bad input."""

from __future__ import annotations

import pytest
import torch
from test_ffn import SHAPES, check, impl, make, packed  # noqa: F401  (impl: a fixture)
from torch.library import opcheck

from pysparse.kernels import ops
from pysparse.kernels import reference as R


def _predicted(shape, F, share, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, F, generator=gen) < share


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_predicted_matches_reference(impl, shape, share, dtype):  # noqa: F811
    M, D, F = shape
    x, wg, wu, wdt, b1, b2 = make(M, D, F, dtype, seed=3 + hash(shape) % 1000)
    pred = _predicted((M,), F, share, seed=M * F)
    for t in (0.0, 0.3):
        y = ops.sparse_ffn(x, wg, wu, wdt, t, pred)
        check(y, R.reference_sparse_ffn(x, wg, wu, wdt, t, pred), dtype, M)
        y = ops.sparse_mlp(x, wg, b1, wdt, b2, t, pred)
        check(y, R.reference_sparse_mlp(x, wg, b1, wdt, b2, t, pred), dtype, M)
        for down in ("groups", "rows"):
            g24, u24, d24 = packed(wg, wu, wdt, down)
            y = ops.sparse_ffn24(x, g24, u24, d24, t, pred)
            check(y, R.reference_sparse_ffn(x, g24, u24, d24, t, pred), dtype, M)
            y = ops.sparse_mlp24(x, g24, b1, d24, b2, t, pred)
            check(y, R.reference_sparse_mlp(x, g24, b1, d24, b2, t, pred), dtype, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_predicted_on_the_kernels_at_model_size(impl, M, dtype):  # noqa: F811
    """A FFN past the small-FFN rule (d_ff x d_model > 2^20) so that several rows stay on the FFN
    kernels too; 10% of the pairs predicted. Up to 3 rows the FFN kernels compute the predicted
    neurons (bf16 on AMX from 2 rows: torch's gate on the tiles, then the prediction and our
    tail, as the exact route does); at 16 rows the exact route's rules decide, on the pairs that
    fire and are predicted."""
    D, F = 516, 2056
    x, wg, wu, wdt, _, _ = make(M, D, F, dtype, seed=M)
    pred = _predicted((M,), F, 0.1, seed=M)
    ops.kernel_stats(reset=True)
    y = ops.sparse_ffn(x, wg, wu, wdt, 0.0, pred)
    ran = ops.kernel_stats(reset=True).get("ffn_tail", {}).get("calls", 0)
    assert ran > 0 or M > 3, ran
    check(y, R.reference_sparse_ffn(x, wg, wu, wdt, 0.0, pred), dtype, M)
    g24, u24, d24 = packed(wg, wu, wdt)
    y = ops.sparse_ffn24(x, g24, u24, d24, 0.0, pred)
    check(y, R.reference_sparse_ffn(x, g24, u24, d24, 0.0, pred), dtype, M)


@pytest.mark.parametrize("form", ["ffn", "mlp", "ffn24", "mlp24"])
def test_rows_of_unpredicted_neurons_are_never_read(impl, form):  # noqa: F811
    """Garbage (NaN) in every gate, up and down row of the neurons predicted for no row: the
    FFN kernels never read them, so the result equals the reference over clean weights."""
    M, D, F = 1, 64, 96
    x, wg, wu, wdt, b1, b2 = make(M, D, F, torch.float32, seed=11)
    pred = _predicted((M,), F, 0.25, seed=5)
    off = ~pred.any(0)
    assert off.sum() > 40
    g24, u24, d24 = packed(wg, wu, wdt, "rows")
    if form == "ffn":
        clean = R.reference_sparse_ffn(x, wg, wu, wdt, 0.0, pred)
        ws = [w.clone() for w in (wg, wu, wdt)]
        for w in ws:
            w[off] = float("nan")
        y = ops.sparse_ffn(x, *ws, 0.0, pred)
    elif form == "mlp":
        clean = R.reference_sparse_mlp(x, wg, b1, wdt, b2, 0.0, pred)
        w1, w2 = wg.clone(), wdt.clone()
        w1[off], w2[off] = float("nan"), float("nan")
        y = ops.sparse_mlp(x, w1, b1, w2, b2, 0.0, pred)
    else:
        if form == "ffn24":
            clean = R.reference_sparse_ffn(x, g24, u24, d24, 0.0, pred)
        else:
            clean = R.reference_sparse_mlp(x, g24, b1, d24, b2, 0.0, pred)
        spoiled = [(v.clone(), m) for v, m in (g24, u24, d24)]
        for v, _ in spoiled:
            v[off] = float("nan")
        g, u, d = spoiled
        if form == "ffn24":
            y = ops.sparse_ffn24(x, g, u, d, 0.0, pred)
        else:
            y = ops.sparse_mlp24(x, g, b1, d, b2, 0.0, pred)
    assert torch.isfinite(y).all()
    check(y, clean, torch.float32, M)


def test_all_predicted_equals_exact_and_threads_do_not_change_bits():
    M, D, F = 4, 516, 2056
    x, wg, wu, wdt, _, _ = make(M, D, F, torch.float32, seed=2)
    every = torch.ones(M, F, dtype=torch.bool)
    torch.testing.assert_close(
        ops.sparse_ffn(x, wg, wu, wdt, 0.0, every), ops.sparse_ffn(x, wg, wu, wdt, 0.0)
    )
    pred = _predicted((M,), F, 0.2, seed=9)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append(ops.sparse_ffn(x, wg, wu, wdt, 0.1, pred))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_opcheck_with_predicted():
    x, wg, wu, wdt, b1, b2 = make(3, 40, 24, torch.float32, seed=4)
    pred = _predicted((3,), 24, 0.5, seed=4)
    g24, u24, d24 = packed(wg, wu, wdt)
    p = torch.ops.pysparse
    opcheck(p.sparse_ffn.default, (x, wg, wu, wdt, 0.25, pred))
    opcheck(p.sparse_mlp.default, (x, wg, b1, wdt, b2, 0.0, pred))
    opcheck(p.sparse_ffn24.default, (x, *g24, *u24, *d24, 0.25, pred))
    opcheck(p.sparse_mlp24.default, (x, *g24, b1, *d24, b2, 0.0, pred))
    x3 = x.reshape(1, 3, 40)
    opcheck(p.sparse_ffn.default, (x3, wg, wu, wdt, 0.0, pred.reshape(1, 3, 24)))


def test_bad_predicted_names_problem():
    x, wg, wu, wdt, _, _ = make(2, 40, 24, torch.float32, seed=6)
    pred = _predicted((2,), 24, 0.5, seed=6)
    with pytest.raises(RuntimeError, match="predicted must be a bool tensor"):
        ops.sparse_ffn(x, wg, wu, wdt, 0.0, pred.float())
    with pytest.raises(RuntimeError, match=r"predicted must be x's leading shape \+ \[d_ff\]"):
        ops.sparse_ffn(x, wg, wu, wdt, 0.0, pred[:, :20])
    with pytest.raises(RuntimeError, match=r"predicted must be x's leading shape"):
        ops.sparse_ffn(x, wg, wu, wdt, 0.0, pred[:1])


def _predictor(M, D, r, F, dtype, seed, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen).to(dtype)
    a = (torch.randn(r, D, generator=gen) / D**0.5).to(dtype)
    b = (torch.randn(F, r, generator=gen) / r**0.5).to(dtype)
    c = (0.3 * torch.randn(F, generator=gen)).to(dtype) if bias else None
    return x, a, b, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "M,D,r,F", [(1, 37, 5, 19), (3, 64, 8, 100), (8, 516, 17, 2056), (17, 40, 4, 30)]
)
def test_ffn_predict_matches_reference(impl, M, D, r, F, dtype):  # noqa: F811
    """ffn_predict's mask is the float64 reference's logits > 0 wherever the logit is clear of 0
    by more than the rounding of the route (x a^T kept in fp32 on the kernels; torch's route
    rounds it to bf16 for bf16 weights); odd shapes, with and without c, on every CPU build and
    on both routes (17 rows: torch's)."""
    for bias in (True, False):
        x, a, b, c = _predictor(M, D, r, F, dtype, seed=M + D + r, bias=bias)
        got = ops.ffn_predict(x, a, b, c)
        assert got.dtype == torch.bool and got.shape == (M, F)
        ref = R.reference_ffn_predict(x, a, b, c)
        margin = (2e-2 if dtype == torch.bfloat16 else 1e-4) * ref.abs().max()
        clear = ref.abs() > margin
        assert clear.float().mean() > 0.8
        assert torch.equal(got[clear], (ref > 0)[clear])
        assert 0 < int(got.sum()) < got.numel()
        x3 = x.reshape(1, M, D)  # leading dims follow x
        assert torch.equal(ops.ffn_predict(x3, a, b, c), got.reshape(1, M, F))


def test_ffn_predict_threads_opcheck_and_bad_input():
    x, a, b, c = _predictor(4, 516, 16, 2056, torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append(ops.ffn_predict(x, a, b, c))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    ops.kernel_stats(reset=True)
    ops.ffn_predict(x[:1], a, b, c)
    assert ops.kernel_stats(reset=True)["ffn_gate"]["calls"] == 2  # both products on the kernel
    small = _predictor(3, 40, 4, 24, torch.float32, seed=4)
    opcheck(torch.ops.pysparse.ffn_predict.default, small)
    opcheck(torch.ops.pysparse.ffn_predict.default, (*small[:3], None))
    with pytest.raises(RuntimeError, match=r"b must be \[d_ff, rank\]"):
        ops.ffn_predict(x, a, b[:, :5], c)
    with pytest.raises(RuntimeError, match="b is BFloat16 but a is Float"):
        ops.ffn_predict(x, a, b.bfloat16(), c)
    with pytest.raises(RuntimeError, match="x.shape\\[-1\\] is 515"):
        ops.ffn_predict(x[:, :515], a, b, c)
    with pytest.raises(RuntimeError, match=r"c must be \[2056\]"):
        ops.ffn_predict(x, a, b, c[:7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_predict_max_rows_predicts_every_neuron_past_the_cap(impl, dtype):  # noqa: F811
    """max_rows: up to that many rows of x the mask is the predictor's; past it every neuron
    (the predictor is not run: no kernel call); the float64 reference says the same; opcheck."""
    x, a, b, c = _predictor(6, 64, 8, 100, dtype, seed=5)
    free = ops.ffn_predict(x, a, b, c)
    assert 0 < int(free.sum()) < free.numel()
    assert torch.equal(ops.ffn_predict(x, a, b, c, max_rows=6), free)
    assert torch.equal(
        ops.ffn_predict(x.reshape(2, 3, 64), a, b, c, max_rows=6), free.view(2, 3, 100)
    )
    ops.kernel_stats(reset=True)
    capped = ops.ffn_predict(x.reshape(2, 3, 64), a, b, c, max_rows=5)
    assert "ffn_gate" not in ops.kernel_stats(reset=True)
    assert capped.dtype == torch.bool and capped.shape == (2, 3, 100) and bool(capped.all())
    assert bool(ops.ffn_predict(x, a, b, c, max_rows=0).all())
    assert bool((R.reference_ffn_predict(x, a, b, c, max_rows=5) > 0).all())
    assert torch.equal(
        R.reference_ffn_predict(x, a, b, c, max_rows=6), R.reference_ffn_predict(x, a, b, c)
    )
    for cap in (-1, 2, 6):
        opcheck(torch.ops.pysparse.ffn_predict.default, (x, a, b, c, cap))
    with pytest.raises(RuntimeError, match="max_rows must be -1 \\(no cap\\) or >= 0, got -2"):
        torch.ops.pysparse.ffn_predict.default(x, a, b, c, -2)
