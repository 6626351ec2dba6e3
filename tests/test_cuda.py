"""CUDA kernels against the CPU kernels and the float64 references: compress/decompress/prune,
the hand-written 2:4 GEMV (M <= 16), cuSPARSELt (bf16, larger M) and decompress + cuBLAS (fp32),
the FFN kernels, misaligned (offset) views. Every test runs with PYSPARSE_STRICT_CUSPARSELT=1 and
checks the route each call took, so a cuSPARSELt failure fails the test instead of passing on
cuBLAS. Skipped, with the reason, where no GPU is present; bench/gpu_check.sh runs them on a lent
GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import pysparse
from pysparse.kernels import ops
from pysparse.kernels import reference as R

pytestmark = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and pysparse.extension_error() is None
        and pysparse.build_info()["cuda"]
    ),
    reason="needs an NVIDIA GPU and pysparse built with CUDA",
)


@pytest.fixture(autouse=True)
def strict_cusparselt(monkeypatch):
    monkeypatch.setenv(ops.STRICT_CUSPARSELT_ENV, "1")


def expected_route(M, N, K, dtype):
    if M <= pysparse.build_info()["cuda_gemv_max_rows"]:
        return "gemv"
    if dtype == torch.bfloat16 and N % 16 == 0 and K % 16 == 0:
        return "cusparselt"
    return "cublas"


def offset_view(t, offset=1):
    """A contiguous copy of t that starts `offset` elements into its storage (misaligned for
    vector loads when offset * element_size is not a multiple of their width)."""
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


def random_24(N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = ops.prune24(torch.randn(N, K, generator=gen))
    return w.masked_fill(torch.rand(N, K, generator=gen) < 0.15, 0.0).to(dtype)


def check_close(y, x, values, meta, bias, dtype):
    ref = R.reference_sparse24_linear(
        x.cpu(), values.cpu(), meta.cpu(), None if bias is None else bias.cpu()
    )
    w = R.reference_decompress24(values.cpu(), meta.cpu(), values.shape[1] * 2).double().abs()
    mag = x.cpu().double().abs() @ w.T + (0 if bias is None else bias.cpu().double().abs())
    n = values.shape[1]
    # fp32 accumulation (cuSPARSELt and cuBLAS included); bf16 adds one output rounding.
    tol = 4 * math.sqrt(n + 1) * 1.2e-7 * mag + 1e-5
    if dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0**-8
    err = (y.cpu().double() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K", [(1, 4), (7, 12), (33, 388), (64, 4100)])
def test_pack_ops_match_cpu_bit_for_bit(dtype, N, K):
    w = random_24(N, K, dtype, N + K)
    v_cpu, m_cpu = ops.compress24(w)
    v, m = ops.compress24(w.cuda())
    assert torch.equal(v.cpu(), v_cpu) and torch.equal(m.cpu(), m_cpu)
    assert torch.equal(ops.decompress24(v, m, K).cpu(), w)
    dense = torch.randn(N, K).to(dtype)
    assert torch.equal(ops.prune24(dense.cuda()).cpu(), ops.prune24(dense))


def test_compress_rejects_non_24_on_cuda():
    w = torch.zeros(3, 8, device="cuda")
    w[2, 4:7] = 1.0
    with pytest.raises(RuntimeError, match=r"row 2, group 1 .* 3 nonzeros"):
        ops.compress24(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 2048])
@pytest.mark.parametrize("N,K", [(33, 388), (256, 4096), (4096, 4100)])
def test_linear_matches_reference(dtype, M, N, K):
    w = random_24(N, K, dtype, M * 7 + N)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(M, K).to(dtype).cuda()
    bias = torch.randn(N).to(dtype).cuda()
    y = ops.sparse24_linear(x, v, m, bias)
    assert ops.last_cuda_route() == expected_route(M, N, K, dtype)
    assert y.shape == (M, N) and y.dtype == dtype and y.is_cuda
    check_close(y, x, v, m, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 5, 6, 7, 8])
@pytest.mark.parametrize("N,K", [(33, 388), (4096, 4096)])
def test_gemv_rows_match_reference(dtype, M, N, K):
    """The GEMV's row-count instantiations (2, 4 and 8 rows: M = 5..8 runs the 8-row one partly
    filled), with and without bias, and on misaligned offset views of x and the weights."""
    w = random_24(N, K, dtype, M * 13 + K)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(M, K).to(dtype).cuda()
    bias = torch.randn(N).to(dtype).cuda()
    for args in (
        (x, v, m, bias),
        (x, v, m, None),
        (offset_view(x), offset_view(v), offset_view(m), offset_view(bias)),
    ):
        y = ops.sparse24_linear(*args)
        assert ops.last_cuda_route() == "gemv"
        check_close(y, *args, dtype)


@pytest.mark.parametrize("M", [17, 40, 100, 257, 1000])
@pytest.mark.parametrize("N,K", [(64, 64), (128, 272), (4096, 4096), (11008, 4096), (4096, 11008)])
def test_cusparselt_matches_reference(M, N, K):
    """cuSPARSELt (bf16) on several shapes and row counts that are not bucket sizes (x padded),
    without bias (beta = 0: C is not read) and with it (beta = 1 over the pre-filled bias), against
    the float64 reference; and x at a misaligned offset."""
    w = random_24(N, K, torch.bfloat16, M + N + K)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(N, dtype=torch.bfloat16, device="cuda")
    for b in (None, bias):
        y = ops.sparse24_linear(x, v, m, b)
        assert ops.last_cuda_route() == "cusparselt"
        assert y.shape == (M, N)
        check_close(y, x, v, m, b, torch.bfloat16)
    xo = offset_view(x)
    y = ops.sparse24_linear(xo, v, m)
    assert ops.last_cuda_route() == "cusparselt"
    check_close(y, xo, v, m, None, torch.bfloat16)


def test_cusparselt_plans_are_bucketed_and_searched_once():
    w = random_24(256, 512, torch.bfloat16, 11)
    v, m = (t.cuda() for t in ops.compress24(w))
    rows = [100, 120, 128, 100]  # one bucket (128 rows)
    assert {pysparse._C._cusparselt_rows(r) for r in rows} == {128}
    ops.sparse24_linear(torch.randn(rows[0], 512, dtype=torch.bfloat16, device="cuda"), v, m)
    before = ops.cusparselt_cache_info()
    for r in rows[1:]:
        x = torch.randn(r, 512, dtype=torch.bfloat16, device="cuda")
        y = ops.sparse24_linear(x, v, m)
        assert ops.last_cuda_route() == "cusparselt" and y.shape == (r, 256)
        check_close(y, x, v, m, None, torch.bfloat16)
    after = ops.cusparselt_cache_info()
    assert after["plans_built"] == before["plans_built"], (before, after)
    assert after["searches_run"] == before["searches_run"], (before, after)


def test_cusparselt_buffer_is_freed_with_its_weight():
    base = ops.cusparselt_cache_info()
    w = random_24(512, 1024, torch.bfloat16, 12)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(64, 1024, dtype=torch.bfloat16, device="cuda")
    ops.sparse24_linear(x, v, m)
    ops.sparse24_linear(x, v, m)  # the same entry, not a second one
    held = ops.cusparselt_cache_info()
    assert held["weights"] == base["weights"] + 1 and held["bytes"] > base["bytes"]
    del v, m
    freed = ops.cusparselt_cache_info()
    assert freed["weights"] == base["weights"] and freed["bytes"] == base["bytes"]


def test_fp32_runs_cublas_without_tripping_strict_mode():
    w = random_24(256, 256, torch.float32, 4)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(64, 256, device="cuda")
    y = ops.sparse24_linear(x, v, m)
    assert ops.last_cuda_route() == "cublas"
    check_close(y, x, v, m, None, torch.float32)


def test_cusparselt_cache_sees_in_place_weight_updates():
    w = random_24(256, 256, torch.bfloat16, 3)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    y1 = ops.sparse24_linear(x, v, m)
    v.mul_(2)  # bumps the version counter: the cached cuSPARSELt buffer must be rebuilt
    y2 = ops.sparse24_linear(x, v, m)
    assert ops.last_cuda_route() == "cusparselt"
    torch.testing.assert_close(y2.float(), 2 * y1.float(), rtol=2e-2, atol=2e-2)


def test_opcheck_on_cuda():
    w = random_24(32, 64, torch.bfloat16, 5)
    v, m = (t.cuda() for t in ops.compress24(w))
    opcheck(
        torch.ops.pysparse.sparse24_linear.default,
        (torch.randn(3, 64, dtype=torch.bfloat16, device="cuda"), v, m, None),
    )
    opcheck(
        torch.ops.pysparse.sparse24_linear.default,
        (torch.randn(40, 64, dtype=torch.bfloat16, device="cuda"), v, m, None),
    )
    opcheck(torch.ops.pysparse.compress24.default, (w.cuda(),))
    opcheck(torch.ops.pysparse.decompress24.default, (v, m, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [0.0, 0.3, 3.0])
def test_prox24_matches_cpu(dtype, lam):
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(129, 4 * 33, generator=gen).to(dtype)
    want = ops.prox24(w, lam)
    got = ops.prox24(w.cuda(), lam).cpu()
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    view = w.cuda()[:, 4:]  # offset view: not 16-byte aligned for fp32 -> the copy path
    ops.prox24_(view, lam)
    torch.testing.assert_close(
        view.cpu(), ops.prox24(w[:, 4:].contiguous(), lam), atol=tol, rtol=tol
    )
    opcheck(torch.ops.pysparse.prox24.default, (w.cuda(), lam, 100, 1e-6))


# ---- activation-sparse FFN ------------------------------------------------------------------------
def _ffn_case(M, D, F, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen)
    wg, wu = (torch.randn(F, D, generator=gen) / D**0.5 for _ in range(2))
    wdt = torch.randn(F, D, generator=gen) / F**0.5
    b1, b2 = torch.randn(F, generator=gen), torch.randn(D, generator=gen)
    return [t.to(dtype) for t in (x, wg, wu, wdt, b1, b2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("D,F", [(64, 96), (132, 44), (4096, 11008)])
def test_ffn_ops_match_reference_on_cuda(dtype, M, D, F):
    """Up to 8 rows the CUDA FFN kernels, from 9 the dense route; each against float64. The gate
    sits in a gap (threshold between two gate values, as in tests/test_ffn.py) so fp32 and fp64
    agree on which neurons fire; tolerance: fp32 accumulation, bf16 one (sparse) or a few (dense
    route) roundings."""
    x, wg, wu, wdt, b1, b2 = _ffn_case(M, D, F, dtype, seed=M + D)
    g = (x.double() @ wg.double().T).flatten().sort().values
    k = int(0.9 * g.numel())
    t = max(float(g[k - 1] + g[k]) / 2, 0.0)
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    d24 = pysparse.kernels.formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    d24_rows = ops.compress24(ops.prune24(wdt))
    cuda = lambda ts: tuple(v.cuda() for v in ts)
    cases = [
        (ops.sparse_ffn, (x, wg, wu, wdt, t), R.reference_sparse_ffn(x, wg, wu, wdt, t)),
        (ops.sparse_mlp, (x, wg, b1, wdt, b2, t), R.reference_sparse_mlp(x, wg, b1, wdt, b2, t)),
        (
            ops.sparse_ffn24,
            (x.cuda(), cuda(g24), cuda(u24), cuda(d24), t),
            R.reference_sparse_ffn(x, g24, u24, d24, t),
        ),
        (
            ops.sparse_mlp24,
            (x.cuda(), cuda(g24), b1.cuda(), cuda(d24), b2.cuda(), t),
            R.reference_sparse_mlp(x, g24, b1, d24, b2, t),
        ),
        (  # the by-row 2:4 down layout
            ops.sparse_ffn24,
            (x.cuda(), cuda(g24), cuda(u24), cuda(d24_rows), t),
            R.reference_sparse_ffn(x, g24, u24, d24_rows, t),
        ),
    ]
    for fn, args, ref in cases:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        y = fn(*args)
        assert ops.last_cuda_route("sparse_ffn") == ("ffn_kernel" if M <= 8 else "ffn_dense")
        assert y.is_cuda and y.dtype == dtype and y.shape == x.shape
        tol = 1e-4 if dtype == torch.float32 else (2.0**-7 if M <= 8 else 2.0**-5)
        scale = ref.abs().max().item() + 1e-3
        torch.testing.assert_close(y.cpu().double(), ref, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 9])
def test_ffn_ops_with_predicted_on_cuda(dtype, M):
    """Activation predictors on CUDA: the kernels (up to 8 rows; a neuron predicted for no row is
    not read) and the dense route (9 rows) give the exact FFN restricted to the predicted pairs,
    against float64; ffn_predict's mask equals the reference's sign where the logit is clear of
    0; NaN in every row of the unpredicted neurons never reaches the kernels' result."""
    D, F = 132, 204
    x, wg, wu, wdt, b1, b2 = _ffn_case(M, D, F, dtype, seed=M + 7)
    gen = torch.Generator().manual_seed(M)
    pred = torch.rand(M, F, generator=gen) < 0.3
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    d24 = pysparse.kernels.formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    cuda = lambda ts: tuple(v.cuda() for v in ts)
    tol = 1e-4 if dtype == torch.float32 else 2.0**-5
    for fn, args, ref in [
        (ops.sparse_ffn, (x, wg, wu, wdt), R.reference_sparse_ffn(x, wg, wu, wdt, 0.0, pred)),
        (
            ops.sparse_mlp,
            (x, wg, b1, wdt, b2),
            R.reference_sparse_mlp(x, wg, b1, wdt, b2, 0.0, pred),
        ),
        (
            ops.sparse_ffn24,
            (x, cuda(g24), cuda(u24), cuda(d24)),
            R.reference_sparse_ffn(x, g24, u24, d24, 0.0, pred),
        ),
    ]:
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
        y = fn(*args, 0.0, pred.cuda())
        assert ops.last_cuda_route("sparse_ffn") == ("ffn_kernel" if M <= 8 else "ffn_dense")
        scale = ref.abs().max().item() + 1e-3
        torch.testing.assert_close(y.cpu().double(), ref, atol=tol * scale, rtol=tol)
    if M <= 8:
        off = ~pred.any(0)
        spoiled = [w.clone() for w in (wg, wu, wdt)]
        for w in spoiled:
            w[off] = float("nan")
        y = ops.sparse_ffn(x.cuda(), *cuda(spoiled), 0.0, pred.cuda())
        ref = R.reference_sparse_ffn(x, wg, wu, wdt, 0.0, pred)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.cpu().double(), ref, atol=tol * scale, rtol=tol)
    a = (torch.randn(16, D, generator=gen) / D**0.5).to(dtype)
    b = (torch.randn(F, 16, generator=gen) / 4).to(dtype)
    c = (0.3 * torch.randn(F, generator=gen)).to(dtype)
    mask = ops.ffn_predict(x.cuda(), a.cuda(), b.cuda(), c.cuda()).cpu()
    logits = R.reference_ffn_predict(x, a, b, c)
    clear = logits.abs() > 2e-2 * logits.abs().max()
    assert torch.equal(mask[clear], (logits > 0)[clear])
    rows = x.numel() // D  # the row cap: past it every neuron, at it the predictor's mask
    capped = ops.ffn_predict(x.cuda(), a.cuda(), b.cuda(), c.cuda(), max_rows=rows - 1)
    assert capped.is_cuda and bool(capped.all())
    same = ops.ffn_predict(x.cuda(), a.cuda(), b.cuda(), c.cuda(), max_rows=rows).cpu()
    assert torch.equal(same, mask)


def test_ffn_opcheck_on_cuda():
    x, wg, wu, wdt, b1, b2 = (t.cuda() for t in _ffn_case(2, 64, 96, torch.float32, seed=1))
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    d24 = pysparse.kernels.formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    p = torch.ops.pysparse
    opcheck(p.sparse_ffn.default, (x, wg, wu, wdt, 0.1))
    opcheck(p.sparse_mlp.default, (x, wg, b1, wdt, b2, 0.1))
    opcheck(p.sparse_ffn24.default, (x, *g24, *u24, *d24, 0.1))
    opcheck(p.sparse_mlp24.default, (x, *g24, b1, *d24, b2, 0.1))
    pred = torch.rand(2, 96, generator=torch.Generator().manual_seed(2)).cuda() < 0.5
    opcheck(p.sparse_ffn.default, (x, wg, wu, wdt, 0.1, pred))
    opcheck(p.sparse_ffn24.default, (x, *g24, *u24, *d24, 0.1, pred))
    opcheck(p.ffn_predict.default, (x, wg[:8], wu[:, :8].contiguous(), b1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 5])
def test_ffn_misaligned_views_are_copied_not_faulted(dtype, M):
    """Contiguous views one element into their storage: x (float4 loads in fp32), the dense
    gate/up/down rows and the neuron-group down values (4 weights per load). The glue must copy
    them (a fault would poison the CUDA context and fail every later test) and match the
    float64 reference."""
    D, F = 132, 44
    x, wg, wu, wdt, b1, b2 = _ffn_case(M, D, F, dtype, seed=M + 7)
    t = 0.05
    g24 = ops.compress24(ops.prune24(wg))
    u24 = ops.compress24(ops.prune24(wu))
    d24 = pysparse.kernels.formats.pack_down24(*ops.compress24(ops.prune24(wdt.T.contiguous())))
    off = lambda ts: tuple(offset_view(v.cuda()) for v in ts)
    cases = [
        (ops.sparse_ffn, (*off((x, wg, wu, wdt)), t), R.reference_sparse_ffn(x, wg, wu, wdt, t)),
        (
            ops.sparse_mlp,
            (*off((x, wg, b1, wdt, b2)), t),
            R.reference_sparse_mlp(x, wg, b1, wdt, b2, t),
        ),
        (
            ops.sparse_ffn24,
            (*off((x,)), off(g24), off(u24), off(d24), t),
            R.reference_sparse_ffn(x, g24, u24, d24, t),
        ),
    ]
    for fn, args, ref in cases:
        y = fn(*args)
        torch.cuda.synchronize()  # a fault would surface here
        assert ops.last_cuda_route("sparse_ffn") == "ffn_kernel"
        tol = 1e-4 if dtype == torch.float32 else 2.0**-7
        scale = ref.abs().max().item() + 1e-3
        torch.testing.assert_close(y.cpu().double(), ref, atol=tol * scale, rtol=tol)
