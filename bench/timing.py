"""Timing helpers shared by the benchmark scripts.

This machine is shared and drifts (another process, frequency changes): a figure is only worth
quoting when every variant it compares was timed in the same loop. So every comparison here calls
its variants round-robin, one call each per round, and reports for each variant the median of its
own times and the median of the per-round ratios against the first variant (the baseline). The
times printed beside a ratio are always the times that ratio came from.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float  # median of this variant's per-call times
    ratio: float  # median over rounds of baseline time / this variant's time (> 1: faster)
    calls: int  # timed calls (rounds)


def interleaved_times(
    calls: dict[str, Callable[[], object]],
    min_repeats: int,
    min_seconds: float,
    warmup: int = 2,
    max_repeats: int = 200,
    setup: dict[str, Callable[[], None]] | None = None,
) -> dict[str, Timing]:
    """Times every call in ``calls`` round-robin (``warmup`` untimed rounds first) until at least
    ``min_repeats`` rounds and ``min_seconds`` have passed. ``setup[name]``, if given, runs before
    each call of ``name`` outside its timing (e.g. the environment switch that picks a route). The
    first entry of ``calls`` is the baseline of every ratio."""
    setup = setup or {}
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    rounds = 0
    start = None
    while True:
        for n in names:
            if n in setup:
                setup[n]()
            t0 = time.perf_counter()
            calls[n]()
            dt = time.perf_counter() - t0
            if rounds >= warmup:
                times[n].append(dt)
        rounds += 1
        if rounds == warmup:
            start = time.perf_counter()
        done = rounds - warmup
        if done >= max_repeats or (
            start is not None and done >= min_repeats and time.perf_counter() - start >= min_seconds
        ):
            break
    base = times[names[0]]
    return {
        n: Timing(
            statistics.median(ts),
            statistics.median(b / t for b, t in zip(base, ts)),
            len(ts),
        )
        for n, ts in times.items()
    }


def paired_times(
    f_dense, f_sparse, min_repeats: int, min_seconds: float
) -> tuple[float, float, float]:
    """Two variants interleaved: (median dense s, median sparse s, median per-pair ratio)."""
    r = interleaved_times({"dense": f_dense, "sparse": f_sparse}, min_repeats, min_seconds)
    return r["dense"].median_s, r["sparse"].median_s, r["sparse"].ratio


def median_time(fn, min_repeats: int, min_seconds: float, warmup: int = 2) -> float:
    return interleaved_times({"f": fn}, min_repeats, min_seconds, warmup)["f"].median_s


def stream_read_gbs(nbytes: int, repeats: int, min_seconds: float) -> float:
    """A streaming read of ``nbytes`` (torch.sum over a buffer that size), in GB/s: the roof a
    memory-bound kernel is measured against."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    t = median_time(lambda: buf.sum(), repeats, min_seconds)
    return nbytes / t / 1e9


def cuda_synced(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """``fn`` followed by a device synchronisation when ``device`` is a CUDA device, so a timing
    covers the kernel and not only its launch."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


@contextlib.contextmanager
def restored_env(var: str | None) -> Iterator[None]:
    """The environment variable ``var`` (a kernel switch an A/B sets per round) as it was before
    the block, set or unset, whatever the block did to it; None: nothing to restore."""
    before = os.environ.get(var) if var else None
    try:
        yield
    finally:
        if var:
            if before is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = before
