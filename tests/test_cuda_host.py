"""The host-side decisions of the CUDA glue, checked on the CPU (they are plain C++ in
csrc/core/launch_rules.h and csrc/aten/routes.h, built into every extension): when an operand must
be copied before a vectorised load, how cuSPARSELt row counts are bucketed, the strict-mode switch
and the route report. tests/test_cuda.py checks the same on a GPU."""

from __future__ import annotations

import threading

import pytest
import torch

import pysparse
from pysparse.kernels import ops

pytestmark = pytest.mark.skipif(
    pysparse.extension_error() is not None, reason="needs the compiled extension"
)
C = pysparse._C


@pytest.mark.parametrize(
    "dtype,offset,aligned",
    [
        (torch.float32, 0, True),
        (torch.float32, 1, False),  # 4 bytes into a float4
        (torch.float32, 2, False),
        (torch.float32, 4, True),
        (torch.bfloat16, 1, False),  # 2 bytes into a uint2
        (torch.bfloat16, 2, False),
        (torch.bfloat16, 4, True),
        (torch.bfloat16, 8, True),
    ],
)
def test_offset_views_are_flagged_for_a_copy(dtype, offset, aligned):
    """What the FFN and linear glue decide for a contiguous view `offset` elements into its
    storage: 4-element vector loads need 16 bytes (fp32) / 8 bytes (bf16) alignment."""
    base = torch.zeros(64 + offset, dtype=dtype)
    view = base[offset:].view(8, 8)
    assert view.is_contiguous()
    need = C._vec4_bytes(view.element_size())
    assert need == 4 * view.element_size()
    assert base.data_ptr() % 64 == 0  # the CPU allocator aligns to 64 bytes at least
    assert C._is_aligned(view.data_ptr(), need) is aligned


def test_is_aligned_on_raw_addresses():
    assert C._is_aligned(0, 16) and C._is_aligned(48, 16) and not C._is_aligned(40, 16)
    assert C._is_aligned(8, 8) and not C._is_aligned(12, 8)
    assert C._is_aligned(13, 0)  # no requirement


def test_cusparselt_row_buckets():
    rows = range(1, 5000)
    buckets = [C._cusparselt_rows(M) for M in rows]
    for M, b in zip(rows, buckets):
        assert b >= M and b % 8 == 0, (M, b)
        # padding stays bounded: at most 2x below 256 rows, fewer than 256 rows above
        assert b <= max(2 * M, 16) if M <= 256 else b - M < 256, (M, b)
    assert buckets == sorted(buckets)
    assert [C._cusparselt_rows(M) for M in (17, 32, 33, 100, 256, 257, 2048)] == [
        32,
        32,
        64,
        128,
        256,
        512,
        2048,
    ]
    assert len(set(buckets)) <= 25  # plans (and searches) for every prefill length up to 5000


@pytest.mark.parametrize(
    "value,strict",
    [
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("OFF", False),
        ("1", True),
        ("yes", True),
    ],
)
def test_strict_cusparselt_switch(monkeypatch, value, strict):
    if value is None:
        monkeypatch.delenv(ops.STRICT_CUSPARSELT_ENV, raising=False)
    else:
        monkeypatch.setenv(ops.STRICT_CUSPARSELT_ENV, value)
    assert C.strict_cusparselt() is strict


def test_route_report_api():
    counts = ops.cuda_route_counts()
    assert set(counts) == {
        "gemv",
        "cusparselt",
        "cublas",
        "cublas_fallback",
        "ffn_kernel",
        "ffn_dense",
    }
    seen = []
    t = threading.Thread(target=lambda: seen.append(ops.last_cuda_route()))
    t.start()
    t.join()
    assert seen == ["none"]  # per thread: a new thread has run nothing
    assert ops.last_cuda_route("sparse_ffn") in {"none", "ffn_kernel", "ffn_dense"}
    with pytest.raises(ValueError, match="sparse24_linear"):
        ops.last_cuda_route("matmul")
    # CPU calls are not CUDA routes: they leave the counters alone.
    w = ops.prune24(torch.randn(32, 64))
    ops.sparse24_linear(torch.randn(3, 64), *ops.compress24(w))
    assert ops.cuda_route_counts() == counts
    ops.reset_cuda_route_counts()
    assert set(ops.cuda_route_counts().values()) == {0}
    info = ops.cusparselt_cache_info()
    assert set(info) == {"plans_cached", "plans_built", "searches_run", "weights", "bytes"}
    if not torch.cuda.is_available():
        assert all(v == 0 for v in info.values())
