"""GPU benchmark: pysparse 2:4 linear (own GEMV for M <= 16, cuSPARSELt above for bf16) against
cuBLAS dense (torch.nn.functional.linear) on the same masked weight, same run; CUDA-event timing,
median of repeats after warm-up, the two variants alternating call by call. For M = 1 it prints the
bandwidth the GEMV reaches (values + meta bytes / time).

Every row names the route that produced its 2:4 time (``pysparse.ops.last_cuda_route``: gemv,
cusparselt, cublas where cuSPARSELt does not apply, e.g. fp32), and the run sets
PYSPARSE_STRICT_CUSPARSELT=1, so a cuSPARSELt failure is reported as an error on its row instead
of a cuBLAS time labelled 2:4. The script exits non-zero if any row failed. Needs a GPU;
bench/gpu_check.sh runs it after the CUDA tests.

    python bench/gpu_linear24.py
    python bench/gpu_linear24.py --shapes 4096x11008 --batches 1 512 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import pysparse
from pysparse.kernels import ops

SHAPES = ["4096x4096", "11008x4096", "4096x11008", "1536x384"]  # N x K (out x in)
BATCHES = [1, 8, 16, 64, 512, 2048]


def cuda_ms_pair(f_dense, f_sparse, repeats: int) -> tuple[float, float]:
    """Median ms of each, the two alternating call by call after 5 untimed rounds."""
    for _ in range(5):
        f_dense()
        f_sparse()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(repeats):
        for name, fn in (("dense", f_dense), ("sparse", f_sparse)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times[name].append(a.elapsed_time(b))
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="*", default=SHAPES, help="NxK (out_features x in_features)")
    ap.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault(ops.STRICT_CUSPARSELT_ENV, "1")
    pysparse.require_extension()
    info = pysparse.build_info()
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | cuSPARSELt "
        f"{info['cusparselt']} | {ops.STRICT_CUSPARSELT_ENV}={os.environ[ops.STRICT_CUSPARSELT_ENV]}"
    )
    print("| dtype | N x K | M | cuBLAS ms | 2:4 ms | speed-up | 2:4 route | 2:4 GB/s |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    failed = 0
    ops.reset_cuda_route_counts()
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for shape in args.shapes:
            N, K = (int(v) for v in shape.split("x"))
            w = ops.prune24(torch.randn(N, K, device="cuda")).to(dtype)
            v, m = ops.compress24(w)
            nbytes = v.numel() * v.element_size() + m.numel()
            for M in args.batches:
                x = torch.randn(M, K, device="cuda").to(dtype)
                try:
                    torch.ops.pysparse.sparse24_linear(x, v, m)  # builds cuSPARSELt state, if any
                    route = ops.last_cuda_route()
                    td, ts = cuda_ms_pair(
                        lambda x=x, w=w: torch.nn.functional.linear(x, w),
                        lambda x=x, v=v, m=m: torch.ops.pysparse.sparse24_linear(x, v, m),
                        args.repeats,
                    )
                    if ops.last_cuda_route() != route:  # one route per row, or the row is void
                        raise RuntimeError(
                            f"route changed during timing: {route} -> {ops.last_cuda_route()}"
                        )
                except RuntimeError as exc:
                    failed += 1
                    msg = str(exc).splitlines()[0][:160]
                    print(f"| {dname} | {N}x{K} | {M} | | | | error: {msg} | |", flush=True)
                    continue
                bw = f"{nbytes / ts / 1e6:.0f}" if M == 1 else ""
                print(
                    f"| {dname} | {N}x{K} | {M} | {td:.4f} | {ts:.4f} | {td / ts:.2f}x | {route} "
                    f"| {bw} |",
                    flush=True,
                )
    print(f"# calls per route: {ops.cuda_route_counts()}")
    print(f"# cuSPARSELt: {ops.cusparselt_cache_info()}")
    if failed:
        print(f"# {failed} row(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
