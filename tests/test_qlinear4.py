"""pysparse::int4_linear and pysparse::sparse24_int4_linear (int4 weights, group 32 / 64, dense and
2:4): against float64 on odd shapes (K with partial blocks and chunks, a 2:4 row whose last
group is half full), fp32 / bf16 / fp16 x, with and without bias, on every route (AVX512-VNNI with
x quantised per block against a reference that does the same; the AVX2 and scalar routes that
dequantise in registers; the dequantising route of more rows); a row's bits the same alone,
batched and at any thread count; opcheck; clear errors; the int4 formats' round trips."""

from __future__ import annotations

import pytest
import torch
from testutil import assert_quantized_close, assert_rows_invariant, skip_unless_kernel, use_route
from torch.library import opcheck

import pysparse
from pysparse.kernels import formats, ops
from pysparse.kernels import reference as R

ROUTES = {
    "vnni": {},
    "avx2": {"PYSPARSE_DISABLE_VNNI": "1"},
    "scalar": {"PYSPARSE_DISABLE_VNNI": "1", "PYSPARSE_DISABLE_AVX2": "1"},
    "dequant": {"PYSPARSE_INT8_GEMV_MAX_ROWS": "0"},  # torch's GEMM / the 2:4 GEMM, dequantised W
}
IMPL = {"vnni": "avx512_vnni", "avx2": "avx2", "scalar": "scalar"}


def _use(name: str, monkeypatch) -> str:
    use_route(name, ROUTES, monkeypatch)
    if name == "vnni":
        skip_unless_kernel("vnni", pysparse._C.cpu_info()["int4_impl"] == "avx512_vnni")
    if name in IMPL:  # the switches took the route they name
        assert pysparse._C.cpu_info()["int4_impl"] == IMPL[name]
    return name


@pytest.fixture(params=sorted(ROUTES))
def route(request, monkeypatch):
    return _use(request.param, monkeypatch)


def _weights(N: int, K: int, group: int, gen: torch.Generator, packed: bool):
    """(op weights, q int8 dense [N, K], the float64 dense weight they stand for)."""
    w = torch.randn(N, K, generator=gen)
    if packed:
        w = ops.prune24(w)
    q, scale = formats.quantize_int4(w, group, sparse24=packed)
    dense = formats.dequantize_int4(q, scale, group, sparse24=packed).double()
    if packed:
        values, meta = formats.compress24_int4(q)
        return (values, meta, scale, group), dense
    return (formats.pack_int4(q), scale, group), dense


def _call(packed: bool, x, weights, bias):
    fn = ops.sparse24_int4_linear if packed else ops.int4_linear
    return fn(x, *weights, bias)


def _reference(packed: bool, x, weights, bias, a8: bool):
    fn = R.reference_sparse24_int4_linear if packed else R.reference_int4_linear
    return fn(x, *weights, bias, a8=a8)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "2:4"])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 5, 16, 17])
@pytest.mark.parametrize(
    ("N", "K"), [(1, 4), (7, 12), (9, 36), (33, 64), (13, 100), (5, 576), (258, 1028)]
)
def test_matches_float64_reference(route, packed, group, dtype, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K + group)
    weights, w = _weights(N, K, group, gen, packed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if N % 2 else None
    y = _call(packed, x, weights, bias)
    assert y.shape == (M, N) and y.dtype == dtype and y.is_contiguous()
    kernels = route != "dequant" and M <= 16
    ref = _reference(packed, x, weights, bias, a8=kernels and route == "vnni")
    if kernels and route == "vnni":
        xq, xs = R.quantize_activations_a8(x)
        x = (xq * xs).to(torch.float32)  # what the kernel multiplies (bounds its rounding)
    assert_quantized_close(y, x, w, bias, ref, dequantised=not kernels)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "2:4"])
@pytest.mark.parametrize("route_name", ["vnni", "avx2", "scalar"])
def test_a_row_gets_the_same_bits_alone_batched_and_at_any_thread_count(
    packed, route_name, monkeypatch
):
    _use(route_name, monkeypatch)
    gen = torch.Generator().manual_seed(11)
    for K in (512, 576, 580):
        weights, _ = _weights(1031, K, 32, gen, packed)
        x = torch.randn(16, K, generator=gen)
        assert_rows_invariant(lambda x, w=weights: _call(packed, x, w, None), x)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(7)
    dense, _ = _weights(9, 40, 32, gen, False)
    sparse, _ = _weights(9, 40, 64, gen, True)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        b = torch.randn(9, generator=gen).to(dtype)
        for rows in ((1,), (2, 3), (20,)):  # the last: more rows than the kernels take
            x = torch.randn(*rows, 40, generator=gen).to(dtype)
            cases.append((torch.ops.pysparse.int4_linear.default, (x, *dense, b)))
            cases.append((torch.ops.pysparse.sparse24_int4_linear.default, (x, *sparse, None)))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _bad_cases():
    q = torch.zeros(6, 64, dtype=torch.int8)
    p, s = formats.pack_int4(q), torch.ones(6, 2, dtype=torch.float16)
    v, m = formats.compress24_int4(q)
    s24 = torch.ones(6, 1, dtype=torch.float16)
    x = torch.randn(2, 64)
    return [
        (ops.int4_linear, (x, p, s, 48), r"group must be 32 or 64, got 48"),
        (ops.int4_linear, (x, p.to(torch.int8), s, 32), r"must be uint8 \[out_features"),
        (
            ops.int4_linear,
            (torch.randn(2, 100), p, s, 32),
            r"has 32 bytes a row but x.shape\[-1\] = 100",
        ),
        (ops.int4_linear, (x, p, s.float(), 32), r"scale must be float16 \[6, 2\]"),
        (ops.int4_linear, (x, p, s[:, :1], 32), r"scale must be float16 \[6, 2\]"),
        (ops.int4_linear, (x.double(), p, s, 32), r"x must be float32, bfloat16 or float16"),
        (ops.int4_linear, (x, p, s, 32, torch.randn(6).bfloat16()), r"bias is BFloat16 but x is F"),
        (ops.sparse24_int4_linear, (x, v, m[:, :1], s24, 32), r"meta must be uint8 \[6, 8\]"),
        (ops.sparse24_int4_linear, (torch.randn(2, 66), v, m, s24, 32), r"must be a multiple of 4"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_problem(case):
    fn, args, pattern = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn(*args)


def test_quantize_int4_uses_all_sixteen_levels_and_keeps_zeros():
    gen = torch.Generator().manual_seed(5)
    w = ops.prune24(torch.randn(37, 128, generator=gen))
    w[3] = 0.0  # an all-zero row: scales 1, q 0
    for group, sparse24 in ((32, False), (64, False), (32, True)):
        q, scale = formats.quantize_int4(w, group, sparse24=sparse24)
        cols = group * (2 if sparse24 else 1)
        assert q.dtype == torch.int8 and scale.dtype == torch.float16
        assert scale.shape == (37, 128 // cols)
        assert int(q.min()) == -8 and int(q.max()) <= 7
        assert torch.equal(q == 0, (w == 0) | (q == 0)) and (q[w == 0] == 0).all()
        assert torch.equal(scale[3], torch.ones(128 // cols, dtype=torch.float16))
        deq = formats.dequantize_int4(q, scale, group, sparse24=sparse24)
        # each group's largest magnitude lands exactly on -8 * scale; the rest within half a
        # step, but values past +7.5 steps (the other sign, clamped to 7) within one
        s_full = scale.float().repeat_interleave(cols, 1)
        step = s_full.abs()
        err = (deq - w).abs()
        clamped = w / s_full > 7.5
        assert (err[~clamped] <= step[~clamped] / 2 + 1e-6).all()
        assert (err[clamped] <= step[clamped] + 1e-6).all()
        assert (err <= step + 1e-6).all()
        packed = formats.pack_int4(q)
        assert packed.shape == (37, 64) and torch.equal(formats.unpack_int4(packed, 128), q)
    v, m = formats.compress24_int4(q)
    assert v.shape == (37, 32) and torch.equal(formats.decompress24_int4(v, m, 128), q)
    with pytest.raises(ValueError, match="values must lie in"):
        formats.pack_int4(torch.full((2, 4), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="group=16"):
        formats.quantize_int4(w, 16)


def test_the_nibble_layout():
    """Byte i of a block of 32 values: value i + 8 low, value i + 16 + 8 high; a partial last
    block padded with zeros (nibbles of 8)."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:40].reshape(1, 40)
    p = formats.pack_int4(q)
    assert p.shape == (1, 32)
    for i in range(16):
        assert int(p[0, i]) == (int(q[0, i]) + 8) | ((int(q[0, i + 16]) + 8) << 4)
    for i in range(8):
        assert int(p[0, 16 + i]) == (int(q[0, 32 + i]) + 8) | (8 << 4)
    assert all(int(b) == 0x88 for b in p[0, 24:])


def test_dense_weight_reads_int4_layouts_back():
    gen = torch.Generator().manual_seed(9)
    w = ops.prune24(torch.randn(12, 72, generator=gen))
    q, s = formats.quantize_int4(w, 32, sparse24=True)
    v, m = formats.compress24_int4(q)
    want = formats.dequantize_int4(q, s, 32, sparse24=True)
    t = {"v": v, "m": m, "s": s, "p": formats.pack_int4(q)}
    layouts = {
        "a": {
            "layout": "int4_rows",
            "values": "v",
            "meta": "m",
            "scale": "s",
            "group": 32,
            "in_features": 72,
        },
        "b": {"layout": "int4", "tensor": "p", "scale": "s", "group": 64, "in_features": 72},
        "c": {
            "layout": "int4",
            "tensor": "p",
            "scale": "s",
            "group": 64,
            "in_features": 72,
            "rows": [4, 9],
        },
    }
    assert torch.equal(formats.dense_weight(t, "a", layouts), want)
    assert torch.equal(formats.dense_weight(t, "b", layouts), want)
    assert torch.equal(formats.dense_weight(t, "c", layouts), want[4:9])
