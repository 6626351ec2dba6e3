"""What a benchmark run needs to print so that two runs can be told apart: the CPU and kernels
dispatched, threads and their CPU affinity, the machine's load, and per timed row what pysparse's
kernels really did (route, threads asked for / used, regions whose threads shared one CPU —
pysparse.ops.kernel_stats), the involuntary context switches of the timing thread (another
process taking the core), and the alignment of the packed weights.

A row that is slow because its kernels ran narrower than asked, or because the machine was busy,
shows it here instead of reading as a slower kernel.
"""

from __future__ import annotations

import os
import resource
from collections import defaultdict

import torch

import pysparse
from pysparse.kernels import ops


def cpu_model() -> str:
    return pysparse.build_info()["cpu"]["model"]


def header() -> str:
    cpu = pysparse.build_info()["cpu"]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    isa = "AMX-BF16" if cpu["bf16_amx"] else cpu["linear_impl"].upper()
    return (
        f"{cpu_model()} ({isa}; 2:4 linear {cpu['linear_impl']}, FFN {cpu['ffn_impl']}, int8 {cpu.get('int8_impl', '-')}, int4 {cpu.get('int4_impl', '-')}) | "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"this thread may run on {len(os.sched_getaffinity(0))} CPU(s) | load avg {load}"
    )


def _nivcsw() -> int:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_nivcsw


class KernelTally:
    """Accumulates, per row name, pysparse's kernel counters and the timing thread's involuntary
    context switches over the calls made between ``start()`` and ``stop(name)``."""

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int))
        )
        self.preempted: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._cs = 0

    def start(self) -> None:
        ops.kernel_stats(reset=True)
        self._cs = _nivcsw()

    def stop(self, name: str) -> None:
        self.preempted[name] += _nivcsw() - self._cs
        self.calls[name] += 1
        for route, s in ops.kernel_stats(reset=True).items():
            acc = self.routes[name][route]
            for k in ("calls", "threads_requested", "threads_used", "one_cpu_calls"):
                acc[k] += s[k]

    def cell(self, name: str) -> str:
        """'gemv_avx512 2.0/2 thr, 0% one-CPU; ... | 0.3 preempt/call'."""
        parts = []
        for route, s in sorted(self.routes[name].items()):
            n = max(s["calls"], 1)
            if route == "linear_dense_chunks":
                parts.append(f"{route} x{s['calls'] // max(self.calls[name], 1)}")
                continue
            parts.append(
                f"{route} {s['threads_used'] / n:.1f}/{s['threads_requested'] / n:.0f} thr, "
                f"{s['one_cpu_calls'] / n:.0%} one-CPU"
            )
        kernels = "; ".join(parts) if parts else "no pysparse kernel"
        return f"{kernels} | {self.preempted[name] / max(self.calls[name], 1):.1f}"


def packed_alignment(gm: torch.nn.Module) -> str:
    """How the packed 2:4 buffers of a compiled graph sit in memory: the share 64-byte aligned
    (a cache line) and 4096-byte aligned (a page)."""
    ptrs = [
        b.data_ptr()
        for b in gm.buffers()
        if b.dtype == torch.uint8 or (b.dim() == 2 and b.numel() >= 4096)
    ]
    if not ptrs:
        return "—"
    line = sum(p % 64 == 0 for p in ptrs) / len(ptrs)
    page = sum(p % 4096 == 0 for p in ptrs) / len(ptrs)
    return f"{len(ptrs)} bufs, {line:.0%} 64B / {page:.0%} 4K"


def given(**settings):
    """The settings a bench's command line gave (those not None), for a pass's keyword
    arguments: what is not given stays the pass's default."""
    return {k: v for k, v in settings.items() if v is not None}
