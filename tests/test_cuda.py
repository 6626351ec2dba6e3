"""CUDA kernels against the CPU kernels and the float64 references: compress/decompress/prune,
the hand-written 2:4 GEMV (M <= 16), cuSPARSELt (bf16, larger M) and the decompress + cuBLAS
fallback (fp32). Skipped, with the reason, where no GPU is present; bench/gpu_check.sh runs them on
a lent GPU machine."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import pysparse
from pysparse import ops
from pysparse import reference as R

pytestmark = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and pysparse.extension_error() is None
        and pysparse.build_info()["cuda"]
    ),
    reason="needs an NVIDIA GPU and pysparse built with CUDA",
)


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
    assert y.shape == (M, N) and y.dtype == dtype and y.is_cuda
    check_close(y, x, v, m, bias, dtype)


def test_cusparselt_cache_sees_in_place_weight_updates():
    w = random_24(256, 256, torch.bfloat16, 3)
    v, m = (t.cuda() for t in ops.compress24(w))
    x = torch.randn(64, 256, dtype=torch.bfloat16, device="cuda")
    y1 = ops.sparse24_linear(x, v, m)
    v.mul_(2)  # bumps the version counter: the cached cuSPARSELt buffer must be rebuilt
    y2 = ops.sparse24_linear(x, v, m)
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
