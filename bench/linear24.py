"""Benchmark: pysparse 2:4 linear vs torch dense linear on the same masked weight, same run.

For each weight shape [N, K] (out x in), batch M and dtype it prints the median time of both after
warm-up and the speed-up: the median over alternating dense/sparse pairs of dense time / sparse
time (> 1 means pysparse is faster; pairing cancels most of this shared machine's drift). For M = 1 (decode, memory-bound)
it also prints the bandwidth the 2:4 kernel achieves (values + meta bytes / time) beside a streaming
read of a buffer of the same size timed in the same run (torch.sum over it), and their ratio.

    python bench/linear24.py                 # the full table of the foundation issue
    python bench/linear24.py --quick         # fewer shapes and repeats
    python bench/linear24.py --shapes 11008x4096 --batches 1 --dtypes float32
    python bench/linear24.py --routes --dtypes bfloat16 --batches 4 8 16 64
    python bench/linear24.py --int8 --shapes 4096x4096 11008x4096 4096x11008 --batches 1 4 16

--int8 times the 2:4 int8 linear (``sparse24_int8_linear``: int8 values, meta and one fp32 scale
a row; x in each --dtype) against torch dense on the same weight in that dtype; --int4 the 2:4
int4 linear (``sparse24_int4_linear``: kept values two a byte, meta, a float16 scale per 32 kept
values).

--routes compares the CPU routes the dispatcher chooses between instead (each forced per call
through its environment switch, all interleaved with torch dense in one loop): the AMX tile kernel,
the FMA kernels (GEMV/GEMM) and chunked decompression + torch's GEMM; the crossovers in
csrc/core/sparse24.h and csrc/aten/sparse24_cpu.cpp come from this.
"""

from __future__ import annotations

import argparse
import os

import torch
from timing import interleaved_times, paired_times, stream_read_gbs

import pysparse
from pysparse.kernels import formats, ops

DEFAULT_SHAPES = ["4096x4096", "11008x4096", "4096x11008", "1536x384"]
DEFAULT_BATCHES = [1, 8, 64, 512]


ROUTES = {  # environment per route (read by the op on every call)
    "tiles": {"PYSPARSE_DISABLE_AMX": None, "PYSPARSE_BF16_DENSE_MIN_ROWS": str(2**62)},
    "fma": {"PYSPARSE_DISABLE_AMX": "1", "PYSPARSE_BF16_DENSE_MIN_ROWS": str(2**62)},
    "chunks": {"PYSPARSE_DISABLE_AMX": "1", "PYSPARSE_BF16_DENSE_MIN_ROWS": "1"},
}


def _route_env(env: dict[str, str | None]) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def routes_table(args, repeats: int) -> None:
    """Dense and every route, interleaved call by call; the median per-call ratio dense / route."""
    if not pysparse.build_info()["cpu"].get("bf16_amx"):
        print("# this CPU/OS offers no AMX-BF16 tiles: the 'tiles' column is the FMA route")
    print(
        "| dtype | N x K | M | dense ms | " + " | ".join(f"{r} ms | {r} x" for r in ROUTES) + " |"
    )
    print("|---|---|---:|---:|" + "---:|---:|" * len(ROUTES))
    saved = {k: os.environ.get(k) for env in ROUTES.values() for k in env}
    torch.manual_seed(0)
    try:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for shape in args.shapes:
                N, K = (int(v) for v in shape.lower().split("x"))
                w = ops.prune24(torch.randn(N, K)).to(dtype)
                values, meta = ops.compress24(w)
                for M in args.batches:
                    x = torch.randn(M, K).to(dtype)
                    calls = {"dense": (lambda x=x, w=w: torch.nn.functional.linear(x, w), {})}
                    for r, env in ROUTES.items():
                        calls[r] = (
                            lambda x=x, v=values, m=meta: ops.sparse24_linear(x, v, m),
                            env,
                        )
                    with torch.inference_mode():
                        res = interleaved_times(
                            {k: fn for k, (fn, _) in calls.items()},
                            repeats,
                            0.0,
                            setup={
                                k: (lambda env=env: _route_env(env))
                                for k, (_, env) in calls.items()
                            },
                        )
                    cells = [f"{res['dense'].median_s * 1e3:.3f}"]
                    for r in ROUTES:
                        cells += [f"{res[r].median_s * 1e3:.3f}", f"{res[r].ratio:.2f}x"]
                    print(
                        f"| {dtype_name} | {N}x{K} | {M} | " + " | ".join(cells) + " |", flush=True
                    )
    finally:
        _route_env(saved)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES, help="NxK (out x in)")
    ap.add_argument("--batches", nargs="*", type=int, default=DEFAULT_BATCHES)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument(
        "--routes", action="store_true", help="compare the CPU routes (tiles / FMA / chunks)"
    )
    ap.add_argument(
        "--int8", action="store_true", help="the 2:4 int8 linear (sparse24_int8_linear)"
    )
    ap.add_argument(
        "--int4", action="store_true", help="the 2:4 int4 linear (sparse24_int4_linear, g32)"
    )
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    pysparse.pin_threads()  # team threads one per CPU (see its docstring), as the other benches
    repeats, min_s = (3, 0.2) if args.quick else (7, 0.5)
    if args.routes:
        routes_table(args, repeats=9 if args.quick else 21)
        return
    info = pysparse.build_info()
    print(
        f"# pysparse {info['version']} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
        f"cpu kernel {info['cpu']['linear_impl']} (gemv for M <= {info['cpu']['gemv_max_rows']})"
        + (f" | int8 {info['cpu']['int8_impl']}" if args.int8 else "")
        + (f" | int4 {info['cpu']['int4_impl']}" if args.int4 else "")
    )
    print(
        "| dtype | N x K | M | dense ms | 2:4 ms | speed-up | 2:4 GB/s | stream GB/s | % of stream |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in args.shapes:
            N, K = (int(s) for s in shape.lower().split("x"))
            w = ops.prune24(torch.randn(N, K, dtype=torch.float32)).to(dtype)
            sw = pysparse.Sparse24Weight.from_dense(w)
            sparse, nbytes = (
                (lambda x, sw=sw: torch.ops.pysparse.sparse24_linear(x, sw.values, sw.meta)),
                sw.nbytes(),
            )
            if args.int8:
                q, scale = formats.quantize_int8(w.float())
                values, meta = formats.compress24_int8(q)
                sparse = lambda x, v=values, m=meta, s=scale: ops.sparse24_int8_linear(x, v, m, s)
                nbytes = values.numel() + meta.numel() + 4 * scale.numel()
            if args.int4:
                q, scale = formats.quantize_int4(w.float(), 32, sparse24=True)
                values, meta = formats.compress24_int4(q)
                sparse = lambda x, v=values, m=meta, s=scale: ops.sparse24_int4_linear(
                    x, v, m, s, 32
                )
                nbytes = values.numel() + meta.numel() + 2 * scale.numel()
            stream = None
            for M in args.batches:
                x = torch.randn(M, K, dtype=torch.float32).to(dtype)
                with torch.inference_mode():
                    t_dense, t_sparse, ratio = paired_times(
                        lambda x=x, w=w: torch.nn.functional.linear(x, w),
                        lambda x=x, f=sparse: f(x),
                        repeats,
                        min_s,
                    )
                cols = ["", "", ""]
                if M == 1:
                    if stream is None:
                        stream = stream_read_gbs(nbytes, repeats, min_s)
                    gbs = nbytes / t_sparse / 1e9
                    cols = [f"{gbs:.1f}", f"{stream:.1f}", f"{100 * gbs / stream:.0f}%"]
                print(
                    f"| {dtype_name} | {N}x{K} | {M} | {t_dense * 1e3:.3f} | {t_sparse * 1e3:.3f} | "
                    f"{ratio:.2f}x | " + " | ".join(cols) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
