"""Test helpers shared across test files: threads whose failures reach the test, and the CPU's
features as the kernel (not pysparse) reports them, to cross-check pysparse's own detection."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from functools import cache

import torch


def run_in_threads(work: Callable[[int], None], n: int) -> None:
    """Runs ``work(i)`` for i in range(n) in n threads released together by a barrier, and re-raises
    the first exception any of them raised (a bare exception in a thread reaches pytest only as a
    warning, so the test would pass)."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 -- every failure must reach the test
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:  # the first real failure, not the broken barrier it left for the others
        raise next(
            (e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0]
        )


@cache
def cpuinfo_flags() -> frozenset[str]:
    """The flags of /proc/cpuinfo (empty off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has(*flags: str) -> bool:
    """True when the kernel reports every flag in /proc/cpuinfo, or (elsewhere) torch does."""
    have = cpuinfo_flags()
    if have:
        return all(f in have for f in flags)
    caps = torch._C._cpu._get_cpu_capability()
    return all(bool(caps.get(f, False)) for f in flags)


# /proc/cpuinfo flags each pysparse CPU kernel needs (csrc/core: the AVX2 kernels need FMA; the AMX
# tile kernels also decompress with AVX-512 BW/VBMI and convert with AVX-512 BF16).
KERNEL_FLAGS = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx2", "fma", "avx512f"),
    "bf16dot": ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512vbmi"),
    "vnni": ("avx2", "fma", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni"),
    "amx": (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        # avx512_vbmi is left out: every CPU with AMX has it, and a VM may hide it from
        # /proc/cpuinfo while CPUID (what pysparse reads) reports it and the kernels run.
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
    ),
}


def skip_unless_kernel(kernel: str, available: bool) -> None:
    """Skips a test of ``kernel`` when this CPU cannot run it — but fails when the CPU offers every
    flag the kernel needs and pysparse still says it is unavailable (a build that stubbed the kernel
    out, a compiler that lacked the ISA, a refused AMX tile-permission request): that is a defect,
    not a reason to skip."""
    if available:
        return
    import pytest

    need = KERNEL_FLAGS[kernel]
    if cpu_has(*need):
        pytest.fail(
            f"the CPU offers {', '.join(need)} (/proc/cpuinfo), but pysparse reports its {kernel} "
            "kernel unavailable: was it built without it, or did the OS refuse the AMX tile state?"
        )
    pytest.skip(f"this CPU lacks one of {', '.join(need)}: no {kernel} kernel to test")


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    """``python -m pysparse.cli ARGS`` in ``cwd``, output captured, never raising on failure."""
    return subprocess.run(
        [sys.executable, "-m", "pysparse.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def use_route(name: str, routes: dict[str, dict[str, str]], monkeypatch) -> str:
    """Selects kernel route ``name`` of ``routes`` (route -> environment switches): every switch any
    route sets is cleared first, then this route's are set; the "avx2" route is skipped (or failed,
    see skip_unless_kernel) where the CPU lacks AVX2."""
    import pysparse

    for k in {k for env in routes.values() for k in env} | {"PYSPARSE_DISABLE_AVX2"}:
        monkeypatch.delenv(k, raising=False)
    for k, v in routes[name].items():
        monkeypatch.setenv(k, v)
    if name == "avx2":
        skip_unless_kernel("avx2", pysparse._C.cpu_info()["avx2"])
    return name


def assert_rows_invariant(call, x) -> None:
    """What continuous batching needs of a kernel: ``call(x)``'s rows the same bits at 1 and 2
    threads, and for the first 1, 3, 5, 9 rows and row 7 alone as in the whole batch."""
    import torch

    before = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(call(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    for m in (1, 3, 5, 9):
        assert torch.equal(call(x[:m]), outs[0][:m])
    assert torch.equal(call(x[7:8]), outs[0][7:8])


def assert_quantized_close(y, x, w, bias, ref, dequantised: bool) -> None:
    """A quantized linear's output ``y`` [..., N] against its float64 reference ``ref`` [M, N],
    given the x it multiplied [.., K] and the dense weight ``w`` [N, K] it stands for: fp32
    accumulation of K products, the usual sqrt(K) eps bound on the magnitudes; 16-bit outputs add
    their rounding, and with ``dequantised`` (the route past the kernels' rows) the weight's
    rounding to x's dtype."""
    import math

    import torch

    N, K = w.shape
    x2 = x.reshape(-1, K).double()
    w = w.double()
    mag = x2.abs() @ w.abs().T + (bias.double().abs() if bias is not None else 0)
    tol = 4 * math.sqrt(K + 2) * torch.finfo(torch.float32).eps * mag + 1e-6
    if y.dtype != torch.float32:
        tol = tol + ref.abs() * torch.finfo(y.dtype).eps
        if dequantised:
            tol = tol + mag * torch.finfo(y.dtype).eps
    err = (y.reshape(-1, N).double() - ref).abs()
    assert (err <= tol).all(), f"max err {float(err.max()):.3g} (bound {float(tol.max()):.3g})"
