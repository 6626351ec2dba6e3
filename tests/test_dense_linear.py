"""pysparse::dense_linear, the GEMV every linear a model leaves dense is lowered onto (passes/lower.py
step 3): against float64 on odd shapes, fp32 and bf16, with and without bias, on the AVX2 kernel,
the scalar fallback and torch's route (more rows than the kernel takes); bit-identical results at
every thread count; opcheck; gradients; clear errors; what Lower makes of a model's linears."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import use_route
from torch.library import opcheck

import pysparse
from pysparse.kernels import ops
from pysparse.kernels import reference as R

ROUTES = {  # the kernel routes take up to 8 rows of x whatever the dtype
    "avx2": {"PYSPARSE_DENSE_GEMV_MAX_ROWS": "8"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1", "PYSPARSE_DENSE_GEMV_MAX_ROWS": "8"},
    "torch": {"PYSPARSE_DENSE_GEMV_MAX_ROWS": "0"},
}


@pytest.fixture(params=sorted(ROUTES))
def route(request, monkeypatch):
    return use_route(request.param, ROUTES, monkeypatch)


def _check(y, x, w, b, dtype):
    K = w.shape[1]
    ref = R.reference_dense_linear(x.reshape(-1, K), w, b)
    mag = x.reshape(-1, K).double().abs() @ w.double().abs().T
    if b is not None:
        mag = mag + b.double().abs()
    tol = 4 * math.sqrt(K + 1) * torch.finfo(torch.float32).eps * mag + 1e-6
    if dtype == torch.bfloat16:
        tol = tol + ref.abs() * 2.0**-8
    err = (y.reshape(-1, w.shape[0]).double() - ref).abs()
    assert (err <= tol).all(), f"max err {float(err.max()):.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8, 9])
@pytest.mark.parametrize(("N", "K"), [(1, 1), (7, 13), (33, 8), (257, 1031)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(route, dtype, M, N, K, bias):
    gen = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = ops.dense_linear(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    assert y.is_contiguous()  # what the fake declares, on every route
    _check(y, x, w, b, dtype)


def test_the_kernel_runs_from_one_to_sixteen_rows(monkeypatch):
    """The GEMV route is taken (the kernel trace counts its calls) up to 16 fp32 rows, not 17."""
    monkeypatch.delenv("PYSPARSE_DENSE_GEMV_MAX_ROWS", raising=False)
    w = torch.randn(64, 32)
    ops.kernel_stats(reset=True)
    for m in (1, 16, 17):
        ops.dense_linear(torch.randn(m, 32), w)
    assert ops.kernel_stats(reset=True)["dense_gemv"]["calls"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_and_leading_dims_do_not_change_the_bits(dtype, monkeypatch):
    monkeypatch.setenv("PYSPARSE_DENSE_GEMV_MAX_ROWS", "8")  # both calls on the kernel
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 515, generator=gen).to(dtype)
    w = torch.randn(1029, 515, generator=gen).to(dtype)
    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            outs.append(ops.dense_linear(x, w))
    finally:
        torch.set_num_threads(before)
    assert outs[0].shape == (2, 3, 1029)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # a row's result does not depend on the other rows (one chain per output)
    assert torch.equal(ops.dense_linear(x[1, 2:3], w), outs[0][1, 2:3])


def test_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2 * 40, generator=gen)[:, ::2]
    w = torch.randn(40, 2 * 17, generator=gen).T  # [17, 40], not contiguous
    y = ops.dense_linear(x, w)
    _check(y, x.contiguous(), w.contiguous(), None, torch.float32)


@given(
    N=st.integers(1, 70),
    K=st.integers(1, 300),
    M=st.integers(0, 12),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_fuzz_against_reference(N, K, M, dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = ops.dense_linear(x, w, b)
    assert y.shape == (M, N)
    if M:
        _check(y, x, w, b, dtype)


def _opcheck_cases():
    gen = torch.Generator().manual_seed(7)
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(9, 13, generator=gen).to(dtype)
        cases += [
            (torch.randn(1, 13, generator=gen).to(dtype), w, None),
            (torch.randn(2, 1, 13, generator=gen).to(dtype), w, torch.randn(9).to(dtype)),
            (torch.randn(12, 13, generator=gen).to(dtype), w, None),  # torch's route
        ]
    cases.append(
        (
            torch.randn(3, 13, generator=gen, requires_grad=True),
            torch.randn(9, 13, generator=gen, requires_grad=True),
            torch.randn(9, generator=gen, requires_grad=True),
        )
    )
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    opcheck(torch.ops.pysparse.dense_linear.default, _opcheck_cases()[case])


def test_gradients_match_torch_linear():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, generator=gen, requires_grad=True)
    w = torch.randn(6, 5, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    g = torch.randn(2, 6, generator=gen)
    grads = torch.autograd.grad((ops.dense_linear(x, w, b) * g).sum(), (x, w, b))
    want = torch.autograd.grad((torch.nn.functional.linear(x, w, b) * g).sum(), (x, w, b))
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((torch.randn(2, 5), torch.randn(6, 4)), r"x.shape\[-1\] is 5 but the weight has in_f"),
        ((torch.randn(2, 5), torch.randn(6, 5, 1)), r"weight must be 2-D"),
        ((torch.randn(2, 5).double(), torch.randn(6, 5)), r"x is Double but the weight is Float"),
        ((torch.randn(2, 5), torch.randn(6, 5), torch.randn(5)), r"bias must be \[6\]"),
    ],
)
def test_bad_input_names_the_problem(args, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.dense_linear(*args)


def test_lower_puts_every_dense_linear_on_the_op():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 32)
            self.b = torch.nn.Linear(32, 8, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net().eval()
    x = torch.randn(1, 16)
    cm = pysparse.compile(net, [pysparse.passes.Lower()], (x,))
    targets = [n.target for n in cm.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.pysparse.dense_linear.default) == 2
    assert torch.ops.aten.linear.default not in targets
    torch.testing.assert_close(cm(x), net(x))
    kept = pysparse.compile(net, [pysparse.passes.Lower(dense=False)], (x,))
    targets = [n.target for n in kept.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.pysparse.dense_linear.default not in targets
