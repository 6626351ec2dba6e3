"""pysparse CPU ops against their float64 references (pysparse/kernels/reference.py), on random inputs with
awkward shapes, both kernel implementations (AVX2 and the scalar fallback), plus opcheck and the
errors bad inputs get."""

from __future__ import annotations

import math

import pytest
import torch
from testutil import run_in_threads, skip_unless_kernel
from torch.library import opcheck

import pysparse
from pysparse.kernels import formats, ops
from pysparse.kernels import reference as R

DTYPES = [torch.float32, torch.bfloat16]
MS = [1, 3, 17, 64]
KS = [4, 12, 388, 4100]
NS = [1, 7, 33]


def _bf16_matmul_native() -> bool:
    """torch's bf16 GEMM has native bf16 dot products (AMX tiles or AVX512-BF16): the 2:4 linear
    layer's bf16 dense route is taken only then."""
    caps = torch._C._cpu._get_cpu_capability()
    return bool(caps.get("amx_bf16", False) or caps.get("avx512_bf16", False))


@pytest.fixture(params=["amx", "bf16dot", "avx512", "avx2", "scalar", "dense"])
def impl(request, monkeypatch):
    """Runs a test on every CPU route: the AMX tile kernel (bf16 from 7 rows; fp32 as avx512), the
    AVX512-BF16 dot-product GEMV (bf16 up to 16 rows; fp32 as avx512), the widening AVX-512
    kernels, the AVX2 kernels, the scalar fallback (selected per call through
    PYSPARSE_DISABLE_*), and the dense route (chunked decompression + torch's matmul: bf16 where
    torch has native bf16 dot products, small fp32 weights), which the first four switch off and the last one turns on from 17
    rows."""
    cpu = pysparse._C.cpu_info()
    monkeypatch.delenv("PYSPARSE_DISABLE_AVX512", raising=False)
    monkeypatch.delenv("PYSPARSE_DISABLE_AVX2", raising=False)
    monkeypatch.setenv("PYSPARSE_DISABLE_AMX", "1")
    monkeypatch.setenv("PYSPARSE_DISABLE_BF16_DOT", "1")
    if request.param == "bf16dot":
        monkeypatch.delenv("PYSPARSE_DISABLE_BF16_DOT")
        skip_unless_kernel("bf16dot", pysparse._C.cpu_info()["bf16_dot"])
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        if params.get("dtype", torch.bfloat16) != torch.bfloat16:
            pytest.skip("the dot-product GEMV takes bf16 only (fp32 runs the avx512 case)")
    if request.param == "amx":
        skip_unless_kernel("amx", cpu["bf16_amx"])
        monkeypatch.delenv("PYSPARSE_DISABLE_AMX")
        assert pysparse._C.cpu_info()["bf16_amx"]
    monkeypatch.setenv("PYSPARSE_BF16_DENSE_MIN_ROWS", str(2**62))
    monkeypatch.setenv("PYSPARSE_F32_DENSE_MAX_WEIGHTS", "0")
    if request.param == "avx512":
        skip_unless_kernel("avx512", cpu["avx512f"] and cpu["avx2"])
    if request.param == "dense":
        monkeypatch.setenv(
            "PYSPARSE_BF16_DENSE_MIN_ROWS", "17" if _bf16_matmul_native() else str(2**62)
        )
        monkeypatch.setenv("PYSPARSE_F32_DENSE_MAX_WEIGHTS", str(2**62))
        monkeypatch.setenv("PYSPARSE_F32_DENSE_MIN_ROWS", "17")
        # 1 KB chunks: W is decompressed in several chunks of 16 rows once N > 16
        monkeypatch.setenv("PYSPARSE_DENSE_CHUNK_KB", "1")
    if request.param == "avx2":
        skip_unless_kernel("avx2", cpu["avx2"])
        monkeypatch.setenv("PYSPARSE_DISABLE_AVX512", "1")
    if request.param == "scalar":
        monkeypatch.setenv("PYSPARSE_DISABLE_AVX2", "1")
    if request.param not in ("dense", "amx"):
        expect = "avx512" if request.param == "bf16dot" else request.param
        assert pysparse._C.cpu_info()["linear_impl"] == expect
        assert not pysparse._C.cpu_info()["bf16_amx"]
    return request.param


@pytest.fixture
def amx_route(monkeypatch):
    """The AMX tile kernel for bf16 (from 7 rows), on CPUs and kernels that offer the tiles."""
    for k in ("PYSPARSE_DISABLE_AMX", "PYSPARSE_DISABLE_AVX512", "PYSPARSE_DISABLE_AVX2"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PYSPARSE_BF16_DENSE_MIN_ROWS", str(2**62))
    skip_unless_kernel("amx", pysparse._C.cpu_info()["bf16_amx"])


def random_24(N: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A 2:4 weight with random patterns, including groups with 0 or 1 nonzeros."""
    w = torch.randn(N, K, generator=gen)
    w = ops.prune24(w)
    drop = torch.rand(N, K, generator=gen) < 0.15
    return w.masked_fill(drop, 0.0).to(dtype)


def assert_close_to_reference(y, ref, mag, n_terms, dtype):
    """fp32 accumulation of n_terms products errs by ~sqrt(n)*eps*sum|x*w| (we allow 4x that);
    bf16 output adds one rounding, half an ulp = 2^-9 relative (we allow 2^-8)."""
    err = (y.to(torch.float64) - ref).abs()
    tol = 4.0 * math.sqrt(n_terms + 1) * torch.finfo(torch.float32).eps * mag + 1e-6
    if dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0**-8
    bad = err > tol
    assert not bad.any(), (
        f"{int(bad.sum())} outputs off; worst err {float(err.max()):.3g} vs tol {float(tol[bad].min()):.3g}"
    )


def magnitude(x, values, meta, bias):
    K = values.shape[1] * 2
    w = R.reference_decompress24(values, meta, K).to(torch.float64).abs()
    m = x.to(torch.float64).abs() @ w.T
    return m + (bias.to(torch.float64).abs() if bias is not None else 0)


# ---- compress / decompress / prune ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("N,K", [(1, 4), (7, 12), (33, 388), (3, 4100)])
def test_compress_matches_reference_and_round_trips(impl, dtype, N, K):
    gen = torch.Generator().manual_seed(N * 1000 + K)
    w = random_24(N, K, dtype, gen)
    values, meta = ops.compress24(w)
    rv, rm = R.reference_compress24(w)
    assert values.dtype == dtype and meta.dtype == torch.uint8
    assert values.shape == (N, K // 2) and meta.shape == (N, ops.meta_cols(K))
    torch.testing.assert_close(values, rv, rtol=0, atol=0)  # a pure copy: bit-exact
    torch.testing.assert_close(meta, rm, rtol=0, atol=0)
    torch.testing.assert_close(ops.decompress24(values, meta, K), w, rtol=0, atol=0)
    torch.testing.assert_close(R.reference_decompress24(values, meta, K), w, rtol=0, atol=0)


def test_compress_accepts_strided_rows():
    gen = torch.Generator().manual_seed(5)
    big = random_24(6, 24, torch.float32, gen)
    view = big[:, 8:20]  # rows with stride 24, groups still aligned to 4
    values, meta = ops.compress24(view)
    torch.testing.assert_close(ops.decompress24(values, meta, 12), view, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("with_score", [False, True])
def test_prune_matches_reference(dtype, with_score):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(17, 388, generator=gen).to(dtype)
    w[0, :8] = 1.0  # exact ties
    score = torch.randn(17, 388, generator=gen) if with_score else None
    if score is not None:
        score[1, :4] = float("nan")
        score[2, 4:8] = 0.5
    out = ops.prune24(w, score)
    torch.testing.assert_close(out, R.reference_prune24(w, score), rtol=0, atol=0)
    assert R.is_24_sparse(out)
    assert ((out != 0).reshape(17, -1, 4).sum(-1) <= 2).all()


def test_prune_tie_rule_is_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert ops.prune24(w).tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]


# ---- sparse24_linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("N", NS)
def test_linear_matches_reference(impl, dtype, M, K, N):
    gen = torch.Generator().manual_seed(hash((M, K, N)) % 2**31)
    w = random_24(N, K, dtype, gen)
    values, meta = ops.compress24(w)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if M % 2 else None
    y = ops.sparse24_linear(x, values, meta, bias)
    assert y.shape == (M, N) and y.dtype == dtype
    ref = R.reference_sparse24_linear(x, values, meta, bias)
    assert_close_to_reference(y, ref, magnitude(x, values, meta, bias), K // 2, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_linear_large_shape_against_dense(impl, dtype):
    """A LLaMA-sized row count through both the GEMV (M=1) and the GEMM (M=70) kernels."""
    gen = torch.Generator().manual_seed(1)
    w = random_24(300, 4096, dtype, gen)
    values, meta = ops.compress24(w)
    for M in (1, 2, 5, 9, 16, 70):
        x = torch.randn(M, 4096, generator=gen).to(dtype)
        y = ops.sparse24_linear(x, values, meta)
        ref = R.reference_sparse24_linear(x, values, meta)
        assert_close_to_reference(y, ref, magnitude(x, values, meta, None), 2048, dtype)


@pytest.mark.parametrize("N,K", [(7, 12), (33, 388), (17, 100), (5, 4100), (40, 64)])
def test_linear_bf16_amx_tiles_match_reference(amx_route, N, K):
    """The AMX kernel's edges: rows of x 7-16 (one slice of x^T, four accumulators), 17-48 (slices
    paired, two each, plus an odd one), N not a multiple of 16, K not a multiple of 32 (the scalar
    tail block), bias or none; and below 7 rows the FMA kernels on the same data."""
    gen = torch.Generator().manual_seed(N * 7 + K)
    w = random_24(N, K, torch.bfloat16, gen)
    values, meta = ops.compress24(w)
    for M in (6, 7, 8, 15, 16, 17, 31, 32, 33, 48):
        x = torch.randn(M, K, generator=gen).bfloat16()
        b = torch.randn(N, generator=gen).bfloat16() if M % 2 else None
        y = ops.sparse24_linear(x, values, meta, b)
        ref = R.reference_sparse24_linear(x, values, meta, b)
        assert_close_to_reference(y, ref, magnitude(x, values, meta, b), K // 2, torch.bfloat16)


def test_linear_bf16_amx_is_batch_and_thread_invariant(amx_route):
    """Up to 16 rows a row of x gets the same bits whatever else is in its batch, with 1 or 2
    threads (fixed k-block -> accumulator assignment, fixed final sum)."""
    gen = torch.Generator().manual_seed(21)
    w = random_24(77, 1000, torch.bfloat16, gen)
    values, meta = ops.compress24(w)
    x = torch.randn(16, 1000, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(ops.sparse24_linear(x, values, meta))
        torch.set_num_threads(2)
        part = ops.sparse24_linear(x[3:12], values, meta)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][3:12], part)


@pytest.mark.parametrize("K", [1000, 576, 68])
def test_linear_bf16_gemv_is_batch_and_thread_invariant(impl, K):
    """On the GEMV routes (1-16 rows of x) a row gets the same bits alone, in any batch and with 1
    or 2 threads: the one-row stream (M = 1) and the blocked kernel keep one accumulator chain per
    row in the same order (K = 1000 and 68 leave groups past the last full 64-column step)."""
    if impl not in ("bf16dot", "avx512", "avx2"):
        pytest.skip("the GEMV routes only")
    gen = torch.Generator().manual_seed(K)
    w = random_24(37, K, torch.bfloat16, gen)
    values, meta = ops.compress24(w)
    x = torch.randn(16, K, generator=gen).bfloat16()
    b = torch.randn(37, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = ops.sparse24_linear(x, values, meta, b)
        torch.set_num_threads(1)
        assert torch.equal(ops.sparse24_linear(x, values, meta, b), full)
        torch.set_num_threads(2)
        for rows in (slice(0, 1), slice(5, 6), slice(3, 12), slice(2, 4)):
            assert torch.equal(ops.sparse24_linear(x[rows], values, meta, b), full[rows])
    finally:
        torch.set_num_threads(before)
    ref = R.reference_sparse24_linear(x, values, meta, b)
    assert_close_to_reference(full, ref, magnitude(x, values, meta, b), K // 2, torch.bfloat16)


def test_linear_leading_dims_and_noncontiguous_x(impl):
    gen = torch.Generator().manual_seed(2)
    w = random_24(9, 40, torch.float32, gen)
    values, meta = ops.compress24(w)
    x = torch.randn(2, 3, 80, generator=gen)[..., ::2]  # non-contiguous last dim
    y = ops.sparse24_linear(x, values, meta)
    assert y.shape == (2, 3, 9)
    ref = R.reference_sparse24_linear(x.reshape(-1, 40), values, meta).reshape(2, 3, 9)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    xt = torch.randn(40, 6, generator=gen).T  # rows with stride 1 along M: transposed view
    torch.testing.assert_close(
        ops.sparse24_linear(xt, values, meta).double(),
        R.reference_sparse24_linear(xt, values, meta),
        rtol=1e-5,
        atol=1e-5,
    )


def test_linear_empty_batch():
    w = ops.prune24(torch.randn(5, 8))
    values, meta = ops.compress24(w)
    assert ops.sparse24_linear(torch.empty(0, 8), values, meta).shape == (0, 5)


@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_linear_gradients_match_dense(lead):
    gen = torch.Generator().manual_seed(4)
    w = random_24(6, 16, torch.float64, gen).float()
    values, meta = ops.compress24(w)
    x = torch.randn(*lead, 16, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    ops.sparse24_linear(x, values, meta, b).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, w, b2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_linear_without_grad_needs_no_autograd_graph():
    w = ops.prune24(torch.randn(6, 16))
    values, meta = ops.compress24(w)
    y = ops.sparse24_linear(torch.randn(2, 16), values, meta)
    assert y.grad_fn is None and not y.requires_grad


def test_results_are_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(8)
    w = random_24(257, 1024, torch.float32, gen)
    values, meta = ops.compress24(w)
    x = torch.randn(33, 1024, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            outs.append(ops.sparse24_linear(x, values, meta))
    finally:
        torch.set_num_threads(before)
    # Each output is one row's reduction in a fixed order, whatever the thread split.
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _every_cpu_op(gen):
    """One call of every CPU op on shared inputs (weights read by all callers), as closures; the
    routes that are pysparse's own kernels (torch's GEMM, where the ops hand work to it, is
    torch's business)."""
    w = random_24(257, 1024, torch.float32, gen)
    wb = w.bfloat16()
    dense = torch.randn(257, 1024, generator=gen)
    values, meta = ops.compress24(w)
    vb, mb = ops.compress24(wb)
    x1, x37 = torch.randn(1, 1024, generator=gen), torch.randn(37, 1024, generator=gen)
    wg, wu, wdt = (torch.randn(1024, 256, generator=gen) / 16 for _ in range(3))
    g24, u24 = ops.compress24(ops.prune24(wg)), ops.compress24(ops.prune24(wu))
    d24 = formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    # one row: the FFN kernels throughout (from 2 rows a small FFN's gate is torch's GEMM)
    xf = torch.randn(1, 256, generator=gen)
    x9b = torch.randn(9, 256, generator=gen).bfloat16()
    g24b, u24b = (
        ops.compress24(ops.prune24(wg).bfloat16()),
        ops.compress24(ops.prune24(wu).bfloat16()),
    )
    d24b = formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous()).bfloat16()))
    return {
        "compress24": lambda: ops.compress24(w),
        "decompress24": lambda: ops.decompress24(values, meta, 1024),
        "prune24": lambda: ops.prune24(dense),
        "linear_gemv": lambda: ops.sparse24_linear(x1, values, meta),
        "linear_gemm": lambda: ops.sparse24_linear(x37, values, meta),
        "linear_bf16": lambda: ops.sparse24_linear(x37[:8].bfloat16(), vb, mb),
        "prox24": lambda: ops.prox24(dense, 0.3),
        "sparse_ffn": lambda: ops.sparse_ffn(xf, wg, wu, wdt, 0.3),
        "sparse_mlp": lambda: ops.sparse_mlp(xf, wg, None, wdt, None, 0.3),
        "sparse_ffn24": lambda: ops.sparse_ffn24(xf, g24, u24, d24, 0.3),
        # bf16, 9 rows: the AMX tile kernels where the CPU has them (gate, up and grouped down)
        "sparse_ffn24_bf16": lambda: ops.sparse_ffn24(x9b, g24b, u24b, d24b, 0.0),
    }


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


def test_every_op_is_thread_count_invariant_and_deterministic():
    calls = _every_cpu_op(torch.Generator().manual_seed(9))
    before = torch.get_num_threads()
    try:
        for name, fn in calls.items():
            outs = []
            for nt in (1, 2, 1):
                torch.set_num_threads(nt)
                outs.append(_flat(fn()))
            for o in outs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(outs[0], o)), name
    finally:
        torch.set_num_threads(before)


def test_every_op_gives_the_same_bits_from_8_threads_at_once():
    """No shared mutable scratch: 8 Python threads calling every op on shared weights at once get
    what a lone call gets."""
    calls = _every_cpu_op(torch.Generator().manual_seed(10))
    want = {name: _flat(fn()) for name, fn in calls.items()}
    bad: list[str] = []

    def work(i):
        names = list(calls)
        for r in range(3):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                got = _flat(calls[name]())
                if not all(torch.equal(a, b) for a, b in zip(want[name], got)):
                    bad.append(f"{name} (thread {i}, round {r})")

    run_in_threads(work, 8)
    assert not bad, bad


def test_a_failure_in_a_worker_thread_fails_the_test():
    def work(i):
        if i == 5:
            raise ValueError("worker 5 failed")

    with pytest.raises(ValueError, match="worker 5"):
        run_in_threads(work, 8)


# ---- opcheck --------------------------------------------------------------------------------------
def _opcheck_cases():
    gen = torch.Generator().manual_seed(3)
    cases = []
    for dtype in DTYPES:
        w = random_24(7, 12, dtype, gen)
        values, meta = ops.compress24(w)
        cases += [
            (torch.ops.pysparse.compress24.default, (w,)),
            (torch.ops.pysparse.decompress24.default, (values, meta, 12)),
            (
                torch.ops.pysparse.prune24.default,
                (torch.randn(5, 8, generator=gen).to(dtype), None),
            ),
            (
                torch.ops.pysparse.prune24.default,
                (torch.randn(5, 8, generator=gen).to(dtype), torch.randn(5, 8, generator=gen)),
            ),
            (
                torch.ops.pysparse.sparse24_linear.default,
                (torch.randn(3, 12, generator=gen).to(dtype), values, meta, None),
            ),
            (
                torch.ops.pysparse.sparse24_linear.default,
                (
                    torch.randn(2, 1, 12, generator=gen).to(dtype),
                    values,
                    meta,
                    torch.randn(7, generator=gen).to(dtype),
                ),
            ),
            (  # bf16: the AMX tile kernel where the CPU has one (from 7 rows)
                torch.ops.pysparse.sparse24_linear.default,
                (torch.randn(9, 12, generator=gen).to(dtype), values, meta, None),
            ),
        ]
    x = torch.randn(4, 12, generator=gen, requires_grad=True)
    w = random_24(7, 12, torch.float32, gen)
    values, meta = ops.compress24(w)
    cases.append(
        (
            torch.ops.pysparse.sparse24_linear.default,
            (x, values, meta, torch.randn(7, generator=gen, requires_grad=True)),
        )
    )
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args)


def test_export_with_sparse_linear():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            w = ops.prune24(torch.randn(8, 16))
            values, meta = ops.compress24(w)
            self.register_buffer("w_values", values)
            self.register_buffer("w_meta", meta)

        def forward(self, x):
            return torch.ops.pysparse.sparse24_linear(x, self.w_values, self.w_meta)

    m = Tiny()
    x = torch.randn(3, 16)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))
    assert any("pysparse.sparse24_linear" in str(n.target) for n in ep.graph.nodes)


# ---- bad inputs -----------------------------------------------------------------------------------
def _packed(N=4, K=8, dtype=torch.float32):
    return ops.compress24(ops.prune24(torch.randn(N, K)).to(dtype))


BAD_INPUTS = [
    ("K not multiple of 4", lambda: ops.compress24(torch.zeros(3, 6)), r"multiple of 4.*pad"),
    (
        "not 2:4",
        lambda: ops.compress24(torch.tensor([[0.0, 0, 0, 0, 1, 1, 1, 0]])),
        r"row 0, group 1 \(columns 4..7\) has 3 nonzeros.*prune24",
    ),
    ("compress 1-D", lambda: ops.compress24(torch.zeros(8)), r"must be 2-D"),
    (
        "compress int",
        lambda: ops.compress24(torch.zeros(2, 8, dtype=torch.int32)),
        r"float32, bfloat16",
    ),
    ("prune K", lambda: ops.prune24(torch.zeros(2, 10)), r"multiple of 4"),
    (
        "prune score shape",
        lambda: ops.prune24(torch.zeros(2, 8), torch.zeros(2, 4)),
        r"score must have the shape",
    ),
    (
        "decompress K mismatch",
        lambda: ops.decompress24(*_packed(), 12),
        r"packs in_features=8, not 12",
    ),
    (
        "decompress K zero",
        lambda: ops.decompress24(torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.uint8), 0),
        r"positive multiple of 4",
    ),
    (
        "decompress meta dtype",
        lambda: ops.decompress24(_packed()[0], _packed()[1].int(), 8),
        r"meta must be uint8",
    ),
    (
        "linear x dtype",
        lambda: ops.sparse24_linear(torch.zeros(2, 8, dtype=torch.bfloat16), *_packed()),
        r"x is BFloat16 but the weight is Float.*cast x",
    ),
    (
        "linear x K",
        lambda: ops.sparse24_linear(torch.zeros(2, 12), *_packed()),
        r"x.shape\[-1\] is 12",
    ),
    (
        "linear meta size",
        lambda: ops.sparse24_linear(
            torch.zeros(2, 8), _packed()[0], torch.zeros(4, 3, dtype=torch.uint8)
        ),
        r"meta has 3 columns but in_features=8 needs ceil\(K/8\)=1",
    ),
    (
        "linear meta rows",
        lambda: ops.sparse24_linear(
            torch.zeros(2, 8), _packed()[0], torch.zeros(5, 1, dtype=torch.uint8)
        ),
        r"meta has 5 rows but values has 4",
    ),
    (
        "linear weight dtype",
        lambda: ops.sparse24_linear(
            torch.zeros(2, 8, dtype=torch.float64), *_packed(dtype=torch.float64)
        ),
        r"weights must be float32 or bfloat16",
    ),
    (
        "linear bias shape",
        lambda: ops.sparse24_linear(torch.zeros(2, 8), *_packed(), torch.zeros(3)),
        r"bias must be \[4\]",
    ),
    (
        "linear bias dtype",
        lambda: ops.sparse24_linear(
            torch.zeros(2, 8), *_packed(), torch.zeros(4, dtype=torch.float64)
        ),
        r"bias is Double",
    ),
    (
        "linear device",
        lambda: ops.sparse24_linear(torch.zeros(2, 8, device="meta"), *_packed()),
        r"x is on meta but the weight is on cpu",
    ),
]


@pytest.mark.parametrize("name,fn,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_error_names_problem_and_fix(name, fn, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        fn()
