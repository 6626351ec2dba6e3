"""The activation-sparse FFN ops (sparse_ffn, sparse_mlp and their 2:4 forms) against their
float64 references on awkward shapes, every CPU route (AVX-512 2:4 gate, AVX2, scalar, and the
dense route past 16 rows), bit-exact determinism across thread counts, batch invariance and
concurrent callers, pack_down24, opcheck, export, and bad input."""

from __future__ import annotations

import pytest
import torch
from testutil import run_in_threads, skip_unless_kernel
from torch.library import opcheck

import pysparse
from pysparse.kernels import formats, ops
from pysparse.kernels import reference as R

# (M rows of x, d_model, d_ff): M = 1 (decode), odd M, the 16-row limit of the sparse route and 17
# (fp32 2:4: the sparse route in 16-row chunks up to 48 rows; others: the dense route), 33 (three
# chunks, the last of one row), 49 (dense route); d_model not a multiple of 8 (scalar column
# tails), d_ff not a multiple of 8.
SHAPES = [
    (1, 4, 4),
    (1, 36, 20),
    (3, 44, 28),
    (8, 64, 100),
    (16, 132, 36),
    (17, 40, 24),
    (33, 40, 24),
    (49, 40, 24),
]
DENSE_ONLY_SHAPES = [(5, 37, 21), (2, 9, 3)]  # no 2:4 possible: d_model or d_ff not % 4


@pytest.fixture(params=["bf16dot", "avx512", "avx2", "scalar"])
def impl(request, monkeypatch):
    cpu = pysparse._C.cpu_info()
    monkeypatch.delenv("PYSPARSE_DISABLE_AVX512", raising=False)
    monkeypatch.delenv("PYSPARSE_DISABLE_AVX2", raising=False)
    monkeypatch.setenv("PYSPARSE_DISABLE_BF16_DOT", "1")
    if request.param == "bf16dot":  # the bf16 2:4 gate on AVX512-BF16 dot products
        monkeypatch.delenv("PYSPARSE_DISABLE_BF16_DOT")
        skip_unless_kernel("bf16dot", pysparse._C.cpu_info()["bf16_dot"])
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        if params.get("dtype", torch.bfloat16) != torch.bfloat16:
            pytest.skip("the dot-product GEMV takes bf16 only (fp32 runs the avx512 case)")
    if request.param == "avx512":  # the 2:4 gate's fast GEMV
        skip_unless_kernel("avx512", cpu["avx512f"])
    if request.param == "avx2":
        skip_unless_kernel("avx2", cpu["avx2"])
        monkeypatch.setenv("PYSPARSE_DISABLE_AVX512", "1")
    if request.param == "scalar":
        monkeypatch.setenv("PYSPARSE_DISABLE_AVX2", "1")
    expect = "scalar" if request.param == "scalar" else "avx2"
    assert pysparse._C.cpu_info()["ffn_impl"] == expect
    return request.param


def grid(shape, gen, scale=8):
    """Small multiples of 1/scale: every product and every sum in these tests is exact in fp32 and
    the inputs exact in bf16, so the gate (and thus which neurons fire) is the same as in float64
    and only the kernels' handling of the active set is under test; the tolerance covers the rest."""
    return torch.randint(-6, 7, shape, generator=gen).float() / scale


def make(M, D, F, dtype, seed, lead=None):
    gen = torch.Generator().manual_seed(seed)
    x = grid((M, D), gen)
    if lead is not None:
        x = x.reshape(*lead, D)
    wg, wu = grid((F, D), gen), grid((F, D), gen)
    wdt = grid((F, D), gen)
    b1, b2 = grid((F,), gen), grid((D,), gen)
    return [t.to(dtype) for t in (x, wg, wu, wdt, b1, b2)]


def packed(wg, wu, wdt, down="groups"):
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    if down == "rows":  # W_down^T = wdt pruned 2:4 along d_model, packed by row
        return g24, u24, ops.compress24(ops.prune24(wdt))
    # the down weight W_down = wdt.T [D, F], pruned 2:4 along d_ff as a mask pass would
    d24 = formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    return g24, u24, d24


def check(y, ref, dtype, M):
    """fp32: the sums are exact (grid inputs) up to reassociation of exact terms -> tiny. bf16: one
    final rounding (half an ulp, 2^-9 relative; allow 2^-8), and where torch's dense GEMM takes
    over (more than 16 rows, from 5 rows when most neurons fire, and for bf16 on AMX CPUs from 2
    rows) it rounds the gate/up products to bf16 too (allow 2^-6 of the output's magnitude)."""
    rows_dense = M > 1
    assert y.dtype == dtype
    y = y.double()
    scale = ref.abs().max().item() + 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-5 * scale, rtol=1e-6)
    elif rows_dense:
        torch.testing.assert_close(y, ref, atol=2.0**-6 * scale, rtol=2.0**-6)
    else:
        torch.testing.assert_close(y, ref, atol=1e-5 * scale, rtol=2.0**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES + DENSE_ONLY_SHAPES)
def test_dense_weights_match_reference(impl, shape, threshold, dtype):
    M, D, F = shape
    x, wg, wu, wdt, b1, b2 = make(M, D, F, dtype, seed=hash(shape) % 1000)
    y = ops.sparse_ffn(x, wg, wu, wdt, threshold)
    check(y, R.reference_sparse_ffn(x, wg, wu, wdt, threshold), dtype, M)
    y = ops.sparse_mlp(x, wg, b1, wdt, b2, threshold)
    check(y, R.reference_sparse_mlp(x, wg, b1, wdt, b2, threshold), dtype, M)
    y = ops.sparse_mlp(x, wg, None, wdt, None, threshold)
    check(y, R.reference_sparse_mlp(x, wg, None, wdt, None, threshold), dtype, M)


@pytest.mark.parametrize("down", ["groups", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_24_weights_match_reference(impl, shape, threshold, dtype, down):
    M, D, F = shape
    x, wg, wu, wdt, b1, b2 = make(M, D, F, dtype, seed=1 + hash(shape) % 1000)
    g24, u24, d24 = packed(wg, wu, wdt, down)
    y = ops.sparse_ffn24(x, g24, u24, d24, threshold)
    check(y, R.reference_sparse_ffn(x, g24, u24, d24, threshold), dtype, M)
    y = ops.sparse_mlp24(x, g24, b1, d24, b2, threshold)
    check(y, R.reference_sparse_mlp(x, g24, b1, d24, b2, threshold), dtype, M)


@pytest.mark.parametrize("chunk_kb", ["1", "2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_24_dense_route_in_chunks(monkeypatch, dtype, chunk_kb):
    """Past 16 rows the 2:4 FFN hands gate, up and down to torch's GEMM over weights unpacked a
    chunk of outputs at a time: tiny chunks cut W_down [D, F] into several, of 16 (1 KB) and of an
    odd 21 rows (2 KB at d_ff 24 fp32: a chunk starting at an odd output, the high meta nibble)."""
    monkeypatch.setenv("PYSPARSE_DENSE_CHUNK_KB", chunk_kb)
    monkeypatch.setenv("PYSPARSE_FFN_CHUNK_MAX_ROWS", "16")  # (fp32 would take 16-row chunks)
    M, D, F = 19, 42 + 2, 24
    x, wg, wu, wdt, b1, b2 = make(M, D, F, dtype, seed=7)
    g24, u24, d24 = packed(wg, wu, wdt)
    for t in (0.0, 0.3):
        y = ops.sparse_ffn24(x, g24, u24, d24, t)
        check(y, R.reference_sparse_ffn(x, g24, u24, d24, t), dtype, M)
        y = ops.sparse_mlp24(x, g24, b1, d24, b2, t)
        check(y, R.reference_sparse_mlp(x, g24, b1, d24, b2, t), dtype, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_floats_at_model_size(dtype):
    """Gaussian inputs at a MiniLM-sized FFN, batch 1 and 4, ~90% sparse: the fp32 tolerance is the
    usual accumulation bound (the grid tests above are exact); the threshold sits in a gap between
    gate values (checked: none within 1e-4), so fp32 and fp64 agree on every decision."""
    gen = torch.Generator().manual_seed(5)
    D, F = 384, 1536
    wg = torch.randn(F, D, generator=gen) / D**0.5
    wu = torch.randn(F, D, generator=gen) / D**0.5
    wdt = torch.randn(F, D, generator=gen) / F**0.5
    # bf16 from 2 rows may take torch's bf16 gate on AMX CPUs, which rounds the gate before the
    # threshold: decisions near it can differ from fp64 (the grid tests cover those routes)
    for M in (1, 4) if dtype == torch.float32 else (1,):
        x = torch.randn(M, D, generator=gen)
        x_, wg_, wu_, wdt_ = (v.to(dtype) for v in (x, wg, wu, wdt))
        # threshold: the middle of the widest gap between gate values near the 90% quantile
        g = (x_.double() @ wg_.double().T).flatten().sort().values
        k = int(0.9 * g.numel())
        gaps = g[k - 20 : k + 21] - g[k - 21 : k + 20]
        j = int(gaps.argmax())
        t = float(g[k - 21 + j] + g[k - 20 + j]) / 2
        assert ((g - t).abs() > 1e-4).all()
        y = ops.sparse_ffn(x_, wg_, wu_, wdt_, t).double()
        ref = R.reference_sparse_ffn(x_, wg_, wu_, wdt_, t)
        tol = 1e-5 if dtype == torch.float32 else 2.0**-8
        torch.testing.assert_close(y, ref, atol=tol * (ref.abs().max().item() + 1e-3), rtol=tol)
        g24, u24, d24 = packed(wg_, wu_, wdt_)
        y = ops.sparse_ffn24(x_, g24, u24, d24, t).double()
        ref = R.reference_sparse_ffn(x_, g24, u24, d24, t)
        torch.testing.assert_close(y, ref, atol=tol * (ref.abs().max().item() + 1e-3), rtol=tol)


def test_leading_dims_noncontiguous_x_and_empty_batch():
    x, wg, wu, wdt, _, _ = make(6, 40, 24, torch.float32, seed=3)
    x3 = x.reshape(2, 3, 40)
    y = ops.sparse_ffn(x3, wg, wu, wdt, 0.1)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y.reshape(6, 40), ops.sparse_ffn(x, wg, wu, wdt, 0.1))
    wide = torch.zeros(6, 80)
    wide[:, ::2] = x  # a strided view
    torch.testing.assert_close(
        ops.sparse_ffn(wide[:, ::2], wg, wu, wdt, 0.1), ops.sparse_ffn(x, wg, wu, wdt, 0.1)
    )
    assert ops.sparse_ffn(x[:0], wg, wu, wdt).shape == (0, 40)


@pytest.mark.parametrize("form", ["dense", "groups", "rows"])
def test_bit_identical_across_threads_and_batch_invariant(form):
    """The down sum is split by output column, so 1 and 2 threads give the same bits; and a row's
    result does not depend on the other rows in its batch (wherever the sparse kernels run: up to 4
    rows always, up to 16 while few enough neurons fire; FFNs of more than 2^20 weights: smaller
    ones go to torch's GEMM from 2 rows)."""
    gen = torch.Generator().manual_seed(7)
    D, F, M = 512, 2304, 4
    x = torch.randn(M, D, generator=gen)
    wg, wu, wdt = (torch.randn(F, D, generator=gen) / 16 for _ in range(3))
    if form == "dense":

        def run(v):
            return ops.sparse_ffn(v, wg, wu, wdt, 0.5)
    else:
        g24, u24, d24 = packed(wg, wu, wdt, form)

        def run(v):
            return ops.sparse_ffn24(v, g24, u24, d24, 0.5)

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x)
        torch.set_num_threads(2)
        two = run(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    assert torch.equal(run(x), run(x))
    for m in range(M):
        assert torch.equal(run(x[m : m + 1]), one[m : m + 1]), m


def test_concurrent_callers_share_weights():
    gen = torch.Generator().manual_seed(8)
    D, F = 128, 512
    wg, wu, wdt = (torch.randn(F, D, generator=gen) / 11 for _ in range(3))
    g24, u24, d24 = packed(wg, wu, wdt)
    xs = [torch.randn(1 + i % 3, D, generator=gen) for i in range(8)]
    want = [
        (ops.sparse_ffn(x, wg, wu, wdt, 0.2), ops.sparse_ffn24(x, g24, u24, d24, 0.2)) for x in xs
    ]
    got: list = [None] * 8

    def work(i):
        out = []
        for _ in range(20):
            out = (
                ops.sparse_ffn(xs[i], wg, wu, wdt, 0.2),
                ops.sparse_ffn24(xs[i], g24, u24, d24, 0.2),
            )
        got[i] = out

    run_in_threads(work, 8)
    for (a, b), (c, d) in zip(want, got):
        assert torch.equal(a, c) and torch.equal(b, d)


@pytest.fixture
def amx(monkeypatch):
    """bf16 2:4 FFNs on the AMX tile kernels (from 7 rows, down in the neuron-group layout)."""
    for k in ("PYSPARSE_DISABLE_AMX", "PYSPARSE_DISABLE_AVX512", "PYSPARSE_DISABLE_AVX2"):
        monkeypatch.delenv(k, raising=False)
    skip_unless_kernel("amx", pysparse._C.cpu_info()["bf16_amx"])
    return monkeypatch


@pytest.mark.parametrize("tail", ["tiles", "ffn_kernels"])
@pytest.mark.parametrize(
    "shape", [(7, 64, 128), (8, 40, 100), (16, 132, 36), (17, 72, 64), (33, 48, 260)]
)
def test_24_bf16_on_amx_tiles_match_reference(amx, shape, tail):
    """Both ways the tile route can go once the gate is computed (forced here): up and down on the
    tiles (the down from the group layout: B tiles expanded per output column, partial column
    tiles when d_model % 16, partial k-blocks when d_ff % 32, paired 16-row slices from 17 rows),
    or the FFN kernels for the firing neurons (up to 16 rows)."""
    M, D, F = shape
    amx.setenv("PYSPARSE_FFN_AMX_TAIL_MAX", "0" if tail == "tiles" else "1e9")
    x, wg, wu, wdt, b1, b2 = make(M, D, F, torch.bfloat16, seed=M * 100 + D)
    g24, u24, d24 = packed(wg, wu, wdt)
    for t in (0.0, 0.3):
        y = ops.sparse_ffn24(x, g24, u24, d24, t)
        check(y, R.reference_sparse_ffn(x, g24, u24, d24, t), torch.bfloat16, M)
        y = ops.sparse_mlp24(x, g24, b1, d24, b2, t)
        check(y, R.reference_sparse_mlp(x, g24, b1, d24, b2, t), torch.bfloat16, M)


def test_24_bf16_on_amx_tiles_bit_identical_and_batch_invariant(amx):
    """On the tiles: 1 and 2 threads give the same bits, and up to 16 rows a row's result does not
    depend on the rest of its batch (fixed accumulator per k-block; skipped silent blocks add exact
    zeros)."""
    amx.setenv("PYSPARSE_FFN_AMX_TAIL_MAX", "0")
    gen = torch.Generator().manual_seed(11)
    D, F = 256, 1024
    x = torch.randn(16, D, generator=gen).bfloat16()
    wg, wu, wdt = (torch.randn(F, D, generator=gen) / 16 for _ in range(3))
    g24, u24, d24 = packed(wg.bfloat16(), wu.bfloat16(), wdt.bfloat16())
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.sparse_ffn24(x, g24, u24, d24, 0.3)
        torch.set_num_threads(2)
        two = ops.sparse_ffn24(x, g24, u24, d24, 0.3)
        part = ops.sparse_ffn24(x[4:13], g24, u24, d24, 0.3)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    assert torch.equal(one[4:13], part)


@pytest.mark.parametrize("D", [4, 36, 37])
def test_pack_down24_round_trip(D):
    gen = torch.Generator().manual_seed(D)
    F = 28
    w_down = ops.prune24(torch.randn(D, F, generator=gen))  # [d_model, d_ff], 2:4 along d_ff
    gv, gm = formats.pack_down24(*ops.compress24(w_down))
    assert gv.shape == (F // 4, 2, D) and gm.shape == (F // 4, (D + 1) // 2)
    assert torch.equal(R.reference_unpack_down24(gv, gm), w_down.T)


def _unpack_down24_loop(values, meta):
    """The element-by-element definition the vectorised reference replaced (tiny shapes only)."""
    G, _, D = values.shape
    dense = torch.zeros(G * 4, D, dtype=values.dtype)
    for g in range(G):
        for n in range(D):
            nib = (int(meta[g, n // 2]) >> (4 * (n % 2))) & 0xF
            dense[4 * g + (nib & 3), n] = values[g, 0, n]
            dense[4 * g + (nib >> 2), n] = values[g, 1, n]
    return dense


@pytest.mark.parametrize("G,D", [(1, 1), (1, 5), (3, 7), (5, 2), (2, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_unpack_down24_matches_the_loop(G, D, dtype):
    """Odd d_model (a half-used last meta byte) and arbitrary nibbles, repeated indices included
    (idx0 == idx1: the loop's last write, plane 1, must win in both)."""
    gen = torch.Generator().manual_seed(G * 100 + D)
    values = torch.randn(G, 2, D, generator=gen).to(dtype)
    meta = torch.randint(0, 256, (G, (D + 1) // 2), generator=gen, dtype=torch.uint8)
    assert torch.equal(R.reference_unpack_down24(values, meta), _unpack_down24_loop(values, meta))


def _opcheck_cases():
    x, wg, wu, wdt, b1, b2 = make(3, 40, 24, torch.float32, seed=9)
    g24, u24, d24 = packed(wg, wu, wdt)
    return [
        (torch.ops.pysparse.sparse_ffn.default, (x, wg, wu, wdt, 0.25)),
        (torch.ops.pysparse.sparse_ffn.default, (x[:1], wg, wu, wdt)),
        (torch.ops.pysparse.sparse_mlp.default, (x, wg, b1, wdt, b2, 0.0)),
        (torch.ops.pysparse.sparse_mlp.default, (x, wg, None, wdt, None, 0.5)),
        (torch.ops.pysparse.sparse_ffn24.default, (x, *g24, *u24, *d24, 0.25)),
        (torch.ops.pysparse.sparse_mlp24.default, (x, *g24, b1, *d24, b2, 0.0)),
        (
            torch.ops.pysparse.sparse_ffn24.default,
            (x, *[t for pair in packed(wg, wu, wdt, "rows") for t in pair], 0.25),
        ),
        (torch.ops.pysparse.sparse_ffn.default, (x.repeat(7, 1), wg, wu, wdt, 0.1)),  # dense route
        # bf16 from 7 rows: the AMX tile route where the CPU has one
        (
            torch.ops.pysparse.sparse_ffn24.default,
            (x.repeat(3, 1).bfloat16(), *packed_bf16(wg, wu, wdt), 0.25),
        ),
    ]


def packed_bf16(wg, wu, wdt):
    return [t for pair in packed(wg.bfloat16(), wu.bfloat16(), wdt.bfloat16()) for t in pair]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


def test_export_keeps_the_op():
    x, wg, wu, wdt, *_ = make(1, 40, 24, torch.float32, seed=10)

    class FFN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wg, self.wu, self.wdt = (
                torch.nn.Parameter(t, requires_grad=False) for t in (wg, wu, wdt)
            )

        def forward(self, v):
            return ops.sparse_ffn(v, self.wg, self.wu, self.wdt, 0.1)

    ep = torch.export.export(FFN(), (x,))
    assert any(n.target is torch.ops.pysparse.sparse_ffn.default for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), FFN()(x))


def _bad_cases():
    x, wg, wu, wdt, _, b2 = make(2, 40, 24, torch.float32, seed=11)
    g24, u24, d24 = packed(wg, wu, wdt)
    return [
        (
            "x dtype",
            lambda: ops.sparse_ffn(x.double(), wg, wu, wdt),
            "x is Double but the weights are Float",
        ),
        (
            "x width",
            lambda: ops.sparse_ffn(x[:, :36], wg, wu, wdt),
            r"x.shape\[-1\] is 36 but the weights have d_model=40",
        ),
        (
            "down not transposed",
            lambda: ops.sparse_ffn(x, wg, wu, wdt.T.contiguous()),
            r"w_down_t must be \[24, 40\].*transposed",
        ),
        (
            "mixed dtypes",
            lambda: ops.sparse_ffn(x, wg, wu.bfloat16(), wdt),
            "w_up is BFloat16 but the other weights are Float",
        ),
        (
            "fp16",
            lambda: ops.sparse_ffn(x.half(), wg.half(), wu.half(), wdt.half()),
            "must be float32 or bfloat16",
        ),
        (
            "threshold",
            lambda: ops.sparse_ffn(x, wg, wu, wdt, -0.5),
            "threshold must be finite and >= 0",
        ),
        (
            "nan threshold",
            lambda: ops.sparse_ffn(x, wg, wu, wdt, float("nan")),
            "threshold must be finite",
        ),
        ("bias shape", lambda: ops.sparse_mlp(x, wg, b2, wdt, b2), r"b1 must be \[24\]"),
        (
            "down24 layout",
            lambda: ops.sparse_ffn24(x, g24, u24, ops.compress24(ops.prune24(wdt.T.contiguous()))),
            "values has 12 columns, which packs in_features=24, not 40",
        ),
        (
            "down24 groups shape",
            lambda: ops.sparse_ffn24(x, g24, u24, (d24[0][:, :, :20], d24[1])),
            r"down_values must be \[d_ff/4, 2, d_model\].*pack_down24",
        ),
        (
            "down24 meta",
            lambda: ops.sparse_ffn24(x, g24, u24, (d24[0], d24[1].int())),
            "down_meta must be uint8",
        ),
        (
            "gate meta",
            lambda: ops.sparse_ffn24(x, (g24[0], g24[1][:, :2]), u24, d24),
            "meta has 2 columns",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())), ids=[c[0] for c in _bad_cases()])
def test_bad_input_names_problem_and_fix(case):
    _, fn, pattern = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn()
