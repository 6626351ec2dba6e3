"""pysparse::int8_linear and pysparse::sparse24_int8_linear (int8 weights, dense and 2:4): against
float64 on odd shapes (K with and without a partial last chunk), fp32 / bf16 / fp16 x, with and
without bias, on every route (AVX512-VNNI with x quantised per block, against a reference that
quantises x the same way; the weight-only AVX-512, AVX2 and scalar kernels; the dequantising
route of more rows); a row's bits the same alone, batched and at any thread count; opcheck; clear
errors; the int8 formats' round trips."""

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
    "avx512": {"PYSPARSE_DISABLE_VNNI": "1"},
    "avx2": {"PYSPARSE_DISABLE_AVX512": "1"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
    "dequant": {"PYSPARSE_INT8_GEMV_MAX_ROWS": "0"},  # torch's GEMM / the 2:4 GEMM on dequantised W
}


def _skip_unless_route(name: str) -> None:
    impl = pysparse._C.cpu_info()["int8_impl"]
    if name == "vnni":
        skip_unless_kernel("vnni", impl == "avx512_vnni")
    if name == "avx512":
        skip_unless_kernel("avx512", pysparse._C.cpu_info()["avx512f"])


@pytest.fixture(params=sorted(ROUTES))
def route(request, monkeypatch):
    name = use_route(request.param, ROUTES, monkeypatch)
    _skip_unless_route(name)
    return name


def _weights(N: int, K: int, gen: torch.Generator, packed: bool):
    w = torch.randn(N, K, generator=gen)
    if packed:
        w = ops.prune24(w)
    q, scale = formats.quantize_int8(w)
    if packed:
        values, meta = formats.compress24_int8(q)
        return (values, meta, scale), R.reference_sparse24_int8_linear, q, scale
    return (q, scale), R.reference_int8_linear, q, scale


def _call(packed: bool, x, weights, bias):
    if packed:
        return ops.sparse24_int8_linear(x, *weights, bias)
    return ops.int8_linear(x, *weights, bias)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 4, 5, 16, 17])
@pytest.mark.parametrize(("N", "K"), [(1, 4), (7, 12), (9, 36), (33, 64), (13, 100), (258, 1028)])
def test_matches_float64_reference(route, packed, dtype, M, N, K):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    weights, reference, q, scale = _weights(N, K, gen, packed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if N % 2 else None
    y = _call(packed, x, weights, bias)
    assert y.shape == (M, N) and y.dtype == dtype and y.is_contiguous()
    if route == "vnni" and M <= 16:  # x quantised per block of 32, exactly as the reference does
        ref = R.reference_int8_linear_a8(x, q, scale, bias)
        xq, xs = R.quantize_activations_a8(x)
        x = (xq * xs).to(torch.float32)  # what the kernel multiplies (bounds its rounding)
    else:
        ref = reference(x, *weights, bias)
    w = q.double() * scale.double()[:, None]
    assert_quantized_close(y, x, w, bias, ref, dequantised=route == "dequant" or M > 16)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "2:4"])
@pytest.mark.parametrize("route_name", ["vnni", "avx512", "avx2", "scalar"])
def test_a_row_gets_the_same_bits_alone_batched_and_at_any_thread_count(
    packed, route_name, monkeypatch
):
    """What continuous batching needs: each (row of W, row of x) is one chain in one order (and
    on the VNNI route each row's x quantised on its own)."""
    use_route(route_name, ROUTES, monkeypatch)
    _skip_unless_route(route_name)
    gen = torch.Generator().manual_seed(11)
    for K in (512, 576, 580):  # whole chunks, and a partial last chunk (VNNI: 4.5 of 128)
        weights, *_ = _weights(1031, K, gen, packed)
        x = torch.randn(16, K, generator=gen)
        assert_rows_invariant(lambda x, w=weights: _call(packed, x, w, None), x)


def test_the_kernels_run_up_to_sixteen_rows(monkeypatch):
    monkeypatch.delenv("PYSPARSE_INT8_GEMV_MAX_ROWS", raising=False)
    gen = torch.Generator().manual_seed(3)
    (q, scale), *_ = _weights(40, 32, gen, False)
    ops.kernel_stats(reset=True)
    for m in (1, 16, 17):
        ops.int8_linear(torch.randn(m, 32), q, scale)
    assert ops.kernel_stats(reset=True)["int8_linear"]["calls"] == 2


def _opcheck_cases():
    gen = torch.Generator().manual_seed(7)
    (q, s), *_ = _weights(9, 20, gen, False)
    (v, m, s24), *_ = _weights(9, 20, gen, True)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        b = torch.randn(9, generator=gen).to(dtype)
        for rows in ((1,), (2, 3), (20,)):  # the last: more rows than the kernels take
            x = torch.randn(*rows, 20, generator=gen).to(dtype)
            cases.append((torch.ops.pysparse.int8_linear.default, (x, q, s, b)))
            cases.append((torch.ops.pysparse.sparse24_int8_linear.default, (x, v, m, s24, None)))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    # no autograd: the int8 ops are inference-only (the weights are not trainable in this form)
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _bad_cases():
    q = torch.zeros(6, 8, dtype=torch.int8)
    s = torch.ones(6)
    v, m = formats.compress24_int8(q)
    x = torch.randn(2, 8)
    return [
        (ops.int8_linear, (x, q.float(), s), r"qweight must be int8, got Float"),
        (ops.int8_linear, (torch.randn(2, 7), q, s), r"x.shape\[-1\] is 7 but the weight has in"),
        (ops.int8_linear, (x, q, torch.ones(5)), r"scale must be \[out_features\] = \[6\]"),
        (ops.int8_linear, (x, q, s.double()), r"scale must be float32"),
        (ops.int8_linear, (x.double(), q, s), r"x must be float32, bfloat16 or float16"),
        (ops.int8_linear, (x, q, s, torch.randn(6).bfloat16()), r"bias is BFloat16 but x is F"),
        (ops.sparse24_int8_linear, (x, v.float(), m, s), r"values must be int8"),
        (ops.sparse24_int8_linear, (x, v, m[:, :0], s), r"meta has 0 columns"),
        (ops.sparse24_int8_linear, (torch.randn(2, 12), v, m, s), r"x.shape\[-1\] is 12"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_problem(case):
    fn, args, pattern = _bad_cases()[case]
    with pytest.raises(RuntimeError, match=pattern):
        fn(*args)


def test_activations_quantised_per_block_of_32():
    """The VNNI route's x: blocks of 32 along K (the last partial), round half to even, an
    all-zero block exact; one block's outlier does not coarsen the others."""
    x = torch.zeros(2, 70)
    x[0, :32] = torch.linspace(-1, 1, 32)
    x[0, 32:64] = 100.0 * torch.linspace(-1, 1, 32)  # an outlier block
    x[0, 64:] = torch.tensor([0.5, -0.25, 1.0, 0.0, 0.125, 2.0])
    xq, xs = R.quantize_activations_a8(x)
    assert torch.equal(xq[1], torch.zeros(70)) and torch.equal(xs[1], torch.zeros(70))
    assert xq[0].abs().max() == 127 and torch.equal(xq[0], xq[0].round())
    assert torch.allclose(xs[0, :32], torch.full((32,), 1 / 127, dtype=torch.float64))
    assert torch.allclose(xs[0, 64:], torch.full((6,), 2 / 127, dtype=torch.float64))
    assert ((xq * xs - x.double()).abs() <= xs / 2 + 1e-12).all()


def test_quantize_int8_rounds_to_nearest_and_keeps_zeros():
    gen = torch.Generator().manual_seed(5)
    w = ops.prune24(torch.randn(37, 64, generator=gen))
    w[3] = 0.0  # an all-zero row: scale 1, q 0
    q, scale = formats.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q == 0, (w == 0) | (w.abs() < scale[:, None] / 2))
    deq = formats.dequantize_int8(q, scale)
    assert ((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()
    assert scale[3] == 1 and not q[3].any()
    assert R.is_24_sparse(q)
    values, meta = formats.compress24_int8(q)
    assert values.dtype == torch.int8 and values.shape == (37, 32)
    assert torch.equal(formats.decompress24_int8(values, meta), q)
    with pytest.raises(ValueError, match="2-D float weight"):
        formats.quantize_int8(q)


def test_dense_weight_reads_int8_layouts_back():
    gen = torch.Generator().manual_seed(6)
    w = ops.prune24(torch.randn(8, 16, generator=gen))
    q, scale = formats.quantize_int8(w)
    values, meta = formats.compress24_int8(q)
    stacked_q = torch.cat([torch.zeros(2, 16, dtype=torch.int8), q])
    stacked_s = torch.cat([torch.ones(2), scale])
    tensors = {"q": stacked_q, "s": stacked_s, "v": values, "m": meta, "s1": scale}
    layouts = {
        "a": {"layout": "int8", "tensor": "q", "scale": "s", "rows": [2, 10]},
        "b": {"layout": "int8_rows", "values": "v", "meta": "m", "scale": "s1"},
        "c": {"layout": "int8", "tensor": "q"},  # no scale recorded: unreadable
    }
    want = formats.dequantize_int8(q, scale)
    assert torch.equal(formats.dense_weight(tensors, "a", layouts), want)
    assert torch.equal(formats.dense_weight(tensors, "b", layouts), want)
    assert formats.dense_weight(tensors, "c", layouts) is None


# ---- sparse_ffn24_int8: the 2:4 activation-sparse FFN over int8 weights ----------------------
def _ffn_weights(F: int, D: int, gen: torch.Generator):
    out = []
    for shape in ((F, D), (F, D), (D, F)):
        q, scale = formats.quantize_int8(ops.prune24(torch.randn(*shape, generator=gen)))
        values, meta = formats.compress24_int8(q)
        out.append((values, meta, scale))
    out[2] = (*formats.pack_down24(out[2][0], out[2][1]), out[2][2])
    return tuple(out)


def _threshold_between(g: torch.Tensor, q: float) -> float:
    """A FATReLU threshold near quantile q of the gate values, midway across the widest gap
    there, so that no value sits within rounding of it (FATReLU jumps at its threshold)."""
    v = g.flatten().sort().values
    i = int(q * (len(v) - 1))
    lo, hi = max(i - 8, 0), min(i + 8, len(v) - 1)
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    j = lo + int(gaps.argmax())
    return float((v[j] + v[j + 1]) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 17])
@pytest.mark.parametrize(("F", "D"), [(64, 36), (96, 68), (256, 576)])
@pytest.mark.parametrize("predicted", [False, True])
def test_int8_ffn_matches_float64_reference(route, dtype, M, F, D, predicted):
    gen = torch.Generator().manual_seed(M * 100 + F + D)
    gate, up, down = _ffn_weights(F, D, gen)
    x = torch.randn(M, D, generator=gen).to(dtype)
    # the gate on the VNNI route quantises x as the reference does (the FFN op's own limit of 16
    # rows does not follow PYSPARSE_INT8_GEMV_MAX_ROWS: the "dequant" route is native here)
    vnni = pysparse._C.cpu_info()["int8_impl"] == "avx512_vnni"
    a8 = route in ("vnni", "dequant") and M <= 16 and vnni
    gq = formats.decompress24_int8(gate[0], gate[1])
    gates = (
        R.reference_int8_linear_a8(x, gq, gate[2])
        if a8
        else R.reference_int8_linear(x, gq, gate[2])
    )
    t = _threshold_between(gates, 0.8)
    if dtype == torch.bfloat16 and M > 16:
        t = 0.0  # torch's bf16 GEMM rounds each gate value to bf16: ReLU, continuous at t
    pred = torch.rand(M, F, generator=gen) < 0.7 if predicted else None
    y = ops.sparse_ffn24_int8(x, gate, up, down, max(t, 0.0), pred)
    ref = R.reference_sparse_ffn24_int8(x, gate, up, down, max(t, 0.0), pred, gate_a8=a8)
    assert y.shape == x.shape and y.dtype == dtype
    err = (y.double() - ref).abs().max()
    scale = ref.abs().max() + 1e-6
    # fp32 sums over D and d_ff; bf16: x, the activations and y rounded to bf16 (y once)
    tol = (1e-5 if dtype == torch.float32 else 2e-2) * scale
    if M > 16:
        tol = tol + (0 if dtype == torch.float32 else 2e-2 * scale)
    assert err <= tol, f"max err {float(err):.3g} (scale {float(scale):.3g})"


@pytest.mark.parametrize("route_name", ["vnni", "avx512", "avx2", "scalar"])
def test_int8_ffn_bits_do_not_depend_on_the_thread_count(route_name, monkeypatch):
    use_route(route_name, ROUTES, monkeypatch)
    _skip_unless_route(route_name)
    gen = torch.Generator().manual_seed(9)
    gate, up, down = _ffn_weights(1536, 576, gen)
    x = torch.randn(4, 576, generator=gen)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(ops.sparse_ffn24_int8(x, gate, up, down, 0.1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_int8_ffn_opcheck_and_errors():
    gen = torch.Generator().manual_seed(10)
    gate, up, down = _ffn_weights(32, 20, gen)
    op = torch.ops.pysparse.sparse_ffn24_int8.default
    for rows in ((1,), (2, 3), (20,)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(*rows, 20, generator=gen).to(dtype)
            opcheck(
                op,
                (x, *gate, *up, *down, 0.0, None),
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
            )
    x = torch.randn(2, 20)
    with pytest.raises(RuntimeError, match="gate_values must be int8"):
        ops.sparse_ffn24_int8(x, (gate[0].float(), *gate[1:]), up, down)
    with pytest.raises(RuntimeError, match=r"down_scale must be float32 \[20\]"):
        ops.sparse_ffn24_int8(x, gate, up, (*down[:2], torch.ones(21)))
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        ops.sparse_ffn24_int8(x.double(), gate, up, down)
