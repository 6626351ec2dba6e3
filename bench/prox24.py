"""Benchmark: the prox24 kernel's CPU paths (lanes: groups across AVX-512 lanes, else AVX2; the
AVX2 build; the scalar per-group loop) vs a straightforward vectorised PyTorch version of the same
operator vs one in-place elementwise pass over the same tensor (mul_, the memory roof), same run,
same input.

The PyTorch version does what a plain implementation does: sort |w| per group of 4, then the
three candidates over the whole matrix at once (top-2; top-3 and all-4 by the same sequential
coordinate-descent updates as the kernel, each coordinate a vectorised op over all groups) for a
fixed number of iterations (100, as the published code runs), pick the least objective, restore
signs and order. The kernel does the same per group but stops each group when it has converged
(see csrc/core/prox24_group.h); its paths give identical bits (checked here on every lam).
Printed: medians (interleaved), the lanes/scalar speed-up, the read + write bandwidth of the
lanes path, and how many groups' 2:4 masks (top-2 |w| of the result) differ from torch's.

    python bench/prox24.py                         # 11008x4096 (LLaMA-7B up/gate), lam sweep
    python bench/prox24.py --torch-lams 0.5        # the PyTorch operator at one lam only
    python bench/prox24.py --shape 1536x384 --lams 0.5 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from runinfo import header
from timing import cuda_synced, interleaved_times

import pysparse
from pysparse.kernels import ops


def torch_prox24(w: torch.Tensor, lam: float, iters: int = 100) -> torch.Tensor:
    z = w.reshape(-1, 4).float()
    a, order = z.abs().sort(dim=1, descending=True, stable=True)
    a0, a1, a2, a3 = (a[:, i].contiguous() for i in range(4))
    obj_a = 0.5 * (a2 * a2 + a3 * a3)
    b0, b1, b2 = a0.clone(), a1.clone(), a2.clone()
    for _ in range(iters):
        b0 = (a0 - lam * b1 * b2).clamp_min(0)
        b1 = (a1 - lam * b0 * b2).clamp_min(0)
        b2 = (a2 - lam * b0 * b1).clamp_min(0)
    obj_b = 0.5 * ((b0 - a0) ** 2 + (b1 - a1) ** 2 + (b2 - a2) ** 2 + a3 * a3) + lam * b0 * b1 * b2
    c0, c1, c2, c3 = a0.clone(), a1.clone(), a2.clone(), a3.clone()
    for _ in range(iters):
        c0 = (a0 - lam * (c1 * c2 + c1 * c3 + c2 * c3)).clamp_min(0)
        c1 = (a1 - lam * (c0 * c2 + c0 * c3 + c2 * c3)).clamp_min(0)
        c2 = (a2 - lam * (c0 * c1 + c0 * c3 + c1 * c3)).clamp_min(0)
        c3 = (a3 - lam * (c0 * c1 + c0 * c2 + c1 * c2)).clamp_min(0)
    obj_c = 0.5 * ((c0 - a0) ** 2 + (c1 - a1) ** 2 + (c2 - a2) ** 2 + (c3 - a3) ** 2) + lam * (
        c0 * c1 * c2 + c1 * c2 * c3 + c2 * c3 * c0 + c3 * c0 * c1
    )
    zero = torch.zeros_like(a0)
    top2 = torch.stack([a0, a1, zero, zero], 1)
    top3 = torch.stack([b0, b1, b2, zero], 1)
    all4 = torch.stack([c0, c1, c2, c3], 1)
    use_b = obj_b < obj_a
    best = torch.where(use_b[:, None], top3, top2)
    best_obj = torch.where(use_b, obj_b, obj_a)
    best = torch.where((obj_c < best_obj)[:, None], all4, best)
    out = torch.empty_like(z)
    out.scatter_(1, order, best)
    return (out * torch.where(z < 0, -1.0, 1.0)).reshape(w.shape)


def mask(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(-1, 4).abs()
    return torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)


PATHS = {  # the kernel's CPU paths, chosen per call by the same switches the tests use
    "lanes": {},
    "avx2": {"PYSPARSE_DISABLE_AVX512": "1"},
    "scalar": {"PYSPARSE_DISABLE_AVX2": "1"},
}


def on_path(name: str, fn):
    def run():
        for k in ("PYSPARSE_DISABLE_AVX512", "PYSPARSE_DISABLE_AVX2"):
            os.environ.pop(k, None)
        os.environ.update(PATHS[name])
        try:
            return fn()
        finally:
            for k in PATHS[name]:
                os.environ.pop(k, None)

    return run


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="11008x4096", help="out x in")
    p.add_argument("--lams", default="0.1,0.5,1,5", help="comma-separated thresholds")
    p.add_argument("--scale", type=float, default=0.02, help="weight std (LLaMA-like ~0.02)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the same comparison on the GPU)")
    p.add_argument(
        "--torch-lams",
        default=None,
        help="lams at which the PyTorch operator is timed too (default: all; it takes minutes a "
        "call on a 2-core CPU; '' for none)",
    )
    args = p.parse_args()
    pysparse.require_extension()
    n, k = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    w = (torch.randn(n, k) * args.scale).to(args.device)
    cpu = args.device == "cpu"
    lams = [float(v) for v in args.lams.split(",")]
    torch_lams = (
        lams if args.torch_lams is None else [float(v) for v in args.torch_lams.split(",") if v]
    )
    print(header() if cpu else f"# prox24 on {args.device} | torch {torch.__version__}")
    print(
        f"# w {n}x{k} fp32, std {args.scale}; prox24_ in place (the form ProxSparse calls), "
        "timed as copy_ + prox24_ minus copy_; kernel: per-group convergence (tol 1e-6, max "
        "100); torch: 100 iterations over the whole matrix; mul_: one in-place elementwise pass "
        "over the same tensor (the memory roof)"
    )
    paths = list(PATHS) if cpu else ["lanes"]
    cols = " | ".join(f"{name} ms" for name in paths)
    print(f"| lam | {cols} | lanes vs scalar | GB/s | torch s | mul_ ms | masks differ (torch) |")
    print("|---:|" + "---:|" * (len(paths) + 5))
    work = w.clone()
    nbytes = 2 * w.numel() * w.element_size()
    for lam in lams:
        ref = ops.prox24(w, lam)  # the dispatched kernel, untimed: warms caches and the allocator
        for name in paths:
            got = on_path(name, lambda lam=lam: ops.prox24(w, lam))()
            assert torch.equal(got, ref), f"path {name} differs from the dispatched kernel"
        fns = {
            name: on_path(name, lambda lam=lam: ops.prox24_(work.copy_(w), lam)) for name in paths
        }
        fns["copy"] = lambda: work.copy_(w)
        fns["mul_"] = lambda: work.mul_(1.0)
        res = interleaved_times(
            {k: cuda_synced(f, w.device) for k, f in fns.items()}, args.repeats, 0.0
        )
        ms = {name: (res[name].median_s - res["copy"].median_s) * 1e3 for name in paths}
        t_torch, differ = float("nan"), "-"
        if lam in torch_lams:
            t0 = time.perf_counter()
            tref = torch_prox24(w, lam)
            t_torch = time.perf_counter() - t0
            differ = f"{int((mask(tref) != mask(ref)).any(1).sum())} of {w.numel() // 4}"
        speed = f"{ms['scalar'] / ms['lanes']:.1f}x" if "scalar" in ms else "-"
        print(
            f"| {lam:g} | " + " | ".join(f"{ms[name]:.1f}" for name in paths) + f" | {speed} | "
            f"{nbytes / (ms['lanes'] * 1e-3) / 1e9:.1f} | {t_torch:.1f} | "
            f"{res['mul_'].median_s * 1e3:.1f} | {differ} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
