"""Batch-invariant mode (``pysparse.kernels.batch_invariant``): every CPU op a decode step runs gives
each row of x the same bits whatever the other rows are and however many (what the server's
continuous batching relies on for a request's greedy tokens), on every ISA route; the results stay
those of the ops (checked against the mode off); one row alone is the same bits on or off."""

from __future__ import annotations

import pytest
import torch
from testutil import assert_rows_invariant, use_route

import pysparse
from pysparse.kernels import formats, ops

ROUTES = {
    "native": {},
    "avx2": {"PYSPARSE_DISABLE_AVX512": "1"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
}
M = 21  # two chunks of 16 and more, for the ops that take at most 16 rows at a time


def _w(n, k, dtype, seed, sparse=False):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    return (ops.prune24(w) if sparse else w).to(dtype)


def _down24(wdt):
    return formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))


def _cases(dtype):
    """name -> (call(x), d_in): the ops of a decode step, odd sizes."""
    D, F, N = 72, 200, 52
    wg, wu, wdt = (_w(F, D, dtype, s) for s in (1, 2, 3))
    g24, u24 = ops.compress24(ops.prune24(wg)), ops.compress24(ops.prune24(wu))
    d24 = _down24(wdt)
    w = _w(N, D, dtype, 4)
    v, m = ops.compress24(_w(N, D, dtype, 5, sparse=True))
    q8, s8 = formats.quantize_int8(w.float())
    q4, s4 = formats.quantize_int4(w.float(), group=32)
    p4 = formats.pack_int4(q4)
    qffn = []
    for i, shape in enumerate(((F, D), (F, D), (D, F))):
        qv, qs = formats.quantize_int8(ops.prune24(_w(*shape, torch.float32, 10 + i)))
        qffn.append((*formats.compress24_int8(qv), qs))
    qffn[2] = (*formats.pack_down24(qffn[2][0], qffn[2][1]), qffn[2][2])
    cases = {
        "sparse_ffn24_int8": (lambda x: ops.sparse_ffn24_int8(x, *qffn, 0.0), D),
        "dense_linear": (lambda x: ops.dense_linear(x, w), D),
        "sparse24_linear": (lambda x: ops.sparse24_linear(x, v, m), D),
        "sparse_ffn": (lambda x: ops.sparse_ffn(x, wg, wu, wdt, 0.0), D),
        "sparse_ffn24": (lambda x: ops.sparse_ffn24(x, g24, u24, d24, 0.0), D),
        "int8_linear": (lambda x: ops.int8_linear(x, q8, s8), D),
        "int4_linear": (lambda x: ops.int4_linear(x, p4, s4, 32), D),
    }
    if dtype == torch.float32:
        pred_a, pred_b = _w(16, D, dtype, 6), _w(F, 16, dtype, 7)
        cases["ffn_predict"] = (lambda x: ops.ffn_predict(x, pred_a, pred_b, max_rows=4), D)
        proj = torch.randn(D, F, generator=torch.Generator().manual_seed(8))
        cases["sparse_ffn_predicted"] = (  # a row's prediction is a function of that row
            lambda x: ops.sparse_ffn(x, wg, wu, wdt, 0.0, predicted=(x @ proj) > 0),
            D,
        )
    return cases


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_row_is_the_same_bits_whatever_the_batch(route, dtype, monkeypatch):
    use_route(route, ROUTES, monkeypatch)
    for name, (call, d) in _cases(dtype).items():
        x = torch.randn(M, d, generator=torch.Generator().manual_seed(9)).to(dtype)
        free = call(x)
        with ops.batch_invariant():
            assert pysparse._C.batch_invariant()
            try:
                assert_rows_invariant(call, x)
            except AssertionError as exc:
                raise AssertionError(f"{name} ({route}, {dtype}) is not batch-invariant") from exc
            held = call(x)
            alone = call(x[:1])
        assert not pysparse._C.batch_invariant()
        if held.dtype == torch.bool:
            assert torch.equal(held, free) or name == "ffn_predict", name  # (the cap differs)
        else:
            # (int8/int4 past 16 rows: the dequantised weight in fp32 against the VNNI route's
            # x quantised per block of 32)
            tol = 1e-5 if dtype == torch.float32 and "int" not in name else 3e-2
            torch.testing.assert_close(held.float(), free.float(), atol=tol, rtol=tol, msg=name)
        # one row alone: the same routes with the mode on or off
        assert torch.equal(alone, call(x[:1])), name


def test_the_predictor_cap_applies_per_row_in_the_mode():
    D, F = 40, 64
    a, b = _w(8, D, torch.float32, 1), _w(F, 8, torch.float32, 2)
    x = torch.randn(6, D)
    assert bool(ops.ffn_predict(x, a, b, max_rows=4).all())  # 6 rows > 4: every neuron predicted
    with ops.batch_invariant():
        inv = ops.ffn_predict(x, a, b, max_rows=4)
        assert not bool(inv.all())
        assert torch.equal(
            inv, torch.cat([ops.ffn_predict(x[i : i + 1], a, b, max_rows=4) for i in range(6)])
        )
        assert bool(ops.ffn_predict(x, a, b, max_rows=0).all())  # a cap of 0 holds for one row too


def test_the_mode_is_restored_after_the_block_and_nests():
    assert not pysparse._C.batch_invariant()
    with ops.batch_invariant():
        with ops.batch_invariant(False):
            assert not pysparse._C.batch_invariant()
        assert pysparse._C.batch_invariant()
        with pytest.raises(ValueError), ops.batch_invariant():
            raise ValueError
        assert pysparse._C.batch_invariant()
    assert not pysparse._C.batch_invariant()
