"""GPU benchmark: pysparse 2:4 linear (own GEMV for M <= 16, cuSPARSELt above for bf16) against
cuBLAS dense (torch.nn.functional.linear) on the same masked weight, same run; CUDA-event timing,
median of repeats after warm-up. For M = 1 it prints the bandwidth the GEMV reaches (values + meta
bytes / time). Needs a GPU; bench/gpu_check.sh runs it after the CUDA tests."""

from __future__ import annotations

import statistics

import torch

import pysparse
from pysparse import ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 384)]
BATCHES = [1, 8, 16, 64, 512, 2048]


def cuda_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {pysparse.build_info()['cusparselt']}"
    )
    print("| dtype | N x K | M | cuBLAS ms | 2:4 ms | speed-up | 2:4 GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for N, K in SHAPES:
            w = ops.prune24(torch.randn(N, K, device="cuda")).to(dtype)
            v, m = ops.compress24(w)
            nbytes = v.numel() * v.element_size() + m.numel()
            for M in BATCHES:
                x = torch.randn(M, K, device="cuda").to(dtype)
                td = cuda_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                ts = cuda_ms(lambda x=x, v=v, m=m: torch.ops.pysparse.sparse24_linear(x, v, m))
                bw = f"{nbytes / ts / 1e6:.0f}" if M == 1 else ""
                print(
                    f"| {str(dtype)[6:]} | {N}x{K} | {M} | {td:.4f} | {ts:.4f} | {td / ts:.2f}x | {bw} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
