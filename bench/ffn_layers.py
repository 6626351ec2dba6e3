"""The 2:4 activation-sparse FFN as a decode step meets it: one token through the FFNs of every
layer in turn, so each layer's weights come from memory, not from a cache the previous call warmed.

SmolLM2-135M's shape by default (30 layers, d_model 576, d_ff 1536, random 2:4 weights; the gate
threshold set for --active of the neurons to fire). Prints microseconds per layer for the whole
op at that activity and for the gate alone (a threshold nothing reaches: the op reads the gate and
returns), their difference being the tail (up rows of the active neurons and the 2:4 down groups),
and the bytes each phase reads over its time. ``--ab-env VAR`` times every case with the kernel
switch VAR at 1 and at 0 in alternating rounds (the kernels read their switches per call).

    python bench/ffn_layers.py
    python bench/ffn_layers.py --dtypes bfloat16 --ab-env PYSPARSE_DISABLE_BF16_DOT
    python bench/ffn_layers.py --int8 --ab-env PYSPARSE_DISABLE_VNNI   # sparse_ffn24_int8

``--int8``: the weights int8 (the quantize pass's form; x and y keep each dtype) on
``sparse_ffn24_int8``; bytes counted at one a weight value.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from runinfo import header
from timing import restored_env

import pysparse
from pysparse.kernels import formats, ops


def build_layers(args: argparse.Namespace, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    D, F = args.d_model, args.d_ff
    layers = []
    for _ in range(args.layers):
        wg = torch.randn(F, D, generator=g) / math.sqrt(D)
        wu = torch.randn(F, D, generator=g) / math.sqrt(D)
        wd = torch.randn(D, F, generator=g) / math.sqrt(F)
        if args.int8:
            (qg, sg), (qu, su), (qd, sd) = (
                formats.quantize_int8(ops.prune24(w)) for w in (wg, wu, wd)
            )
            down = (*formats.pack_down24(*formats.compress24_int8(qd)), sd)
            layers.append(
                ((*formats.compress24_int8(qg), sg), (*formats.compress24_int8(qu), su), down)
            )
            continue
        wg, wu, wd = (w.to(dtype) for w in (wg, wu, wd))
        down = formats.pack_down24(*ops.compress24(ops.prune24(wd)))
        layers.append((ops.compress24(ops.prune24(wg)), ops.compress24(ops.prune24(wu)), down))
    x = torch.randn(1, D, generator=g).to(dtype)
    gate = x.float() @ gate_weight(layers[0][0], D).T
    threshold = float(torch.quantile(gate.flatten(), 1.0 - args.active))
    return layers, x, threshold


def gate_weight(gate: tuple, D: int) -> torch.Tensor:
    """The first layer's gate weight, dense fp32 (int8: dequantised)."""
    if len(gate) == 3:
        return formats.dequantize_int8(formats.decompress24_int8(gate[0], gate[1]), gate[2])
    return ops.decompress24(*gate, D).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--active", type=float, default=0.1, help="fraction of neurons that fire")
    ap.add_argument("--reps", type=int, default=60, help="passes over the layers per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ab-env", metavar="VAR", help="time each case with VAR=1 and VAR=0")
    ap.add_argument("--int8", action="store_true", help="int8 weights (sparse_ffn24_int8)")
    args = ap.parse_args()
    pysparse.pin_threads()
    print(header())
    envs = ["1", "0"] if args.ab_env else [None]
    print("| dtype | case | switch | us/layer | GB/s |")
    print("|---|---|---|---:|---:|")
    with restored_env(args.ab_env):
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            layers, x, t = build_layers(args, dtype)
            es = 1 if args.int8 else torch.tensor([], dtype=dtype).element_size()
            ffn = ops.sparse_ffn24_int8 if args.int8 else ops.sparse_ffn24
            D, F = args.d_model, args.d_ff
            gate_bytes = F * D // 2 * es + F * D // 8  # packed values + 4 bits a group
            down_group_bytes = 2 * D * es + (D + 1) // 2
            h = (x.float() @ gate_weight(layers[0][0], D).T).flatten()
            fired = h >= t
            groups = int(fired.view(-1, 4).any(1).sum())
            tail_bytes = int(fired.sum()) * (D // 2 * es + D // 8) + groups * down_group_bytes
            times: dict[tuple[str, str | None], list[float]] = {}
            cases = {"gate only": 1e30, f"{args.active:.0%} active": t}
            for _ in range(args.rounds):
                for case, thr in cases.items():
                    for env in envs:
                        if env is not None:
                            os.environ[args.ab_env] = env
                        per = []
                        for _ in range(args.reps):
                            t0 = time.perf_counter()
                            for g24, u24, d24 in layers:
                                ffn(x, g24, u24, d24, thr)
                            per.append((time.perf_counter() - t0) / args.layers)
                        times.setdefault((case, env), []).append(statistics.median(per))
            for env in envs:
                gate_s = statistics.median(times[("gate only", env)])
                for case in cases:
                    s = statistics.median(times[(case, env)])
                    moved = gate_bytes + (tail_bytes if case != "gate only" else 0)
                    label = f"{args.ab_env}={env}" if env is not None else "-"
                    name = f"{dname}{' / int8' if args.int8 else ''}"
                    print(f"| {name} | {case} | {label} | {s * 1e6:.1f} | {moved / s / 1e9:.1f} |")
                tail_s = statistics.median(times[(f"{args.active:.0%} active", env)]) - gate_s
                print(
                    f"| {name} | tail (difference; {int(fired.sum())} neurons, {groups} down "
                    f"groups) | {label} | {tail_s * 1e6:.1f} | {tail_bytes / max(tail_s, 1e-9) / 1e9:.1f} |"
                )


if __name__ == "__main__":
    main()
