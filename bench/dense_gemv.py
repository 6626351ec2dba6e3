"""Benchmark: pysparse::dense_linear (the core's dense GEMV, what Lower puts every dense linear on)
vs torch's linear on the same weight, same run, interleaved call by call.

Each call reads a different copy of the weight (copies cycled past the last-level cache), so the
figures are what a decode step sees: every weight comes from memory once per token. Prints the
median time of each, the median per-call ratio torch / ours (> 1: ours faster), and the GB/s each
reaches against the weight's bytes.

    python bench/dense_gemv.py                      # SmolLM2 and LLaMA-7B shapes, fp32 and bf16
    python bench/dense_gemv.py --rows 1 4 8 --dtypes float32
    python bench/dense_gemv.py --shapes 1152x384 384x384 --rows 14 64 304 --cycle-mb 4
                                                    # MiniLM's linears, weights in cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runinfo import header
from timing import interleaved_times

from pysparse.kernels import ops

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (11008, 4096)]


def _cycled(fn, x: torch.Tensor, ws: list[torch.Tensor]):
    """fn(x, w) on the next copy of the weight at each call."""
    state = [0]

    def run():
        state[0] = (state[0] + 1) % len(ws)
        return fn(x, ws[state[0]])

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--cycle-mb", type=float, default=256.0, help="weight copies per shape (MB)")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--shapes", nargs="+", help="N x K of each weight (default: SmolLM2, 7B)")
    args = ap.parse_args()
    print(header())
    print("| dtype | N x K | M | torch ms | ours ms | ours x | torch GB/s | ours GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        shapes = (
            [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
        )
        for N, K in shapes:
            nbytes = N * K * torch.finfo(dtype).bits // 8
            copies = max(2, int(args.cycle_mb * 1e6 // nbytes))
            ws = [torch.randn(N, K).to(dtype) for _ in range(copies)]
            for M in args.rows:
                x = torch.randn(M, K).to(dtype)
                calls = {
                    "torch": _cycled(torch.nn.functional.linear, x, ws),
                    "ours": _cycled(ops.dense_linear, x, ws),
                }
                t = interleaved_times(
                    calls,
                    min_repeats=20,
                    min_seconds=args.seconds,
                )
                tt, to = t["torch"].median_s, t["ours"].median_s
                print(
                    f"| {dname} | {N}x{K} | {M} | {tt * 1e3:.3f} | {to * 1e3:.3f} | "
                    f"{t['ours'].ratio:.2f} | {nbytes / tt / 1e9:.1f} | {nbytes / to / 1e9:.1f} |",
                    flush=True,
                )
            del ws


if __name__ == "__main__":
    main()
