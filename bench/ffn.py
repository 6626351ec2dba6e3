"""Benchmark: pysparse's activation-sparse FFN (sparse_ffn) and its 2:4 form (sparse_ffn24) vs
torch's dense gated FFN on the same weights, same run.

For each shape (d_model/d_ff), dtype, activation pattern, sparsity and batch it prints the median
time of torch dense (``F.linear`` x3 with the same FATReLU), of ``sparse_ffn`` and of
``sparse_ffn24``, the speed-ups (median of per-pair ratios over alternating calls: this shared
machine drifts) and, for the pysparse kernels, the bandwidth they achieve: the bytes they must read
(gate in full; up rows and down rows of the neurons active for some row of the batch; 2:4: packed
bytes, down by groups of 4 neurons) / time, as a fraction of the roof: the faster of a streaming read
(``torch.sum``) and torch's dense FFN itself (bytes of its three weights / time), both timed in the
same run. ``--down-rows`` adds the 2:4 FFN with the other down layout (W_down pruned 2:4 along
d_model, each active neuron's packed row read; see csrc/core/sparse_ffn.h) and the megabytes each
2:4 layout must read. The 2:4 columns use the same activation pattern on 2:4-pruned weights
(magnitude), so their ratio is against the same dense FFN.

Activation patterns (the threshold is set per case to hit the target sparsity over the batch):
    independent  random x rows: every token's active set is independent (the worst case at batch > 1)
    clustered    a shared base vector + per-token noise (tokens' active sets overlap, as in text),
                 and neurons hot or cold in blocks of 64 (active neurons bunch up by index)

    python bench/ffn.py                      # the table of the issue (takes a while)
    python bench/ffn.py --quick              # LLaMA-7B shape, fp32, batch 1, 0/90%
    python bench/ffn.py --shapes 4096x11008 --sparsities 90 --batches 1 --dtypes float32
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from linear24 import paired_times, stream_read_gbs

import pysparse
from pysparse import formats, ops

SHAPES = {"4096x11008": "LLaMA-7B", "2048x5632": "1B-class", "384x1536": "MiniLM"}


class Weights:
    """One shape/dtype/pattern's weights, their 2:4 forms and a batch of x (built once; the cases
    differ by batch size and threshold, and at low sparsity by the gate's row signs)."""

    def __init__(self, D: int, Fd: int, pattern: str, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        wg = torch.randn(Fd, D, generator=g) / math.sqrt(D)
        wu = torch.randn(Fd, D, generator=g) / math.sqrt(D)
        wd = torch.randn(D, Fd, generator=g) / math.sqrt(Fd)
        if pattern == "clustered":
            heat = torch.rand(Fd // 64 + 1, generator=g).repeat_interleave(64)[:Fd] * 1.5 + 0.25
            wg = wg * heat[:, None]
            x = 0.9 * torch.randn(D, generator=g) + 0.45 * torch.randn(16, D, generator=g)
        else:
            x = torch.randn(16, D, generator=g)
        self.D, self.Fd, self.dtype = D, Fd, dtype
        self.wg32, self.x32 = wg, x
        self.x = x.to(dtype)
        self.wg, self.wu, self.wd = (w.to(dtype) for w in (wg, wu, wd))
        self.wdt = self.wd.T.contiguous()
        self.g24 = ops.compress24(ops.prune24(self.wg))
        self.u24 = ops.compress24(ops.prune24(self.wu))
        self.d24 = formats.pack_down24(*ops.compress24(ops.prune24(self.wd)))
        # the other 2:4 down layout: W_down^T pruned along d_model, packed by neuron row
        self.d24_rows = ops.compress24(ops.prune24(self.wdt))

    def case(self, M: int, sparsity: float):
        """(x, wg, g24, threshold) for M rows at about ``sparsity`` over the batch."""
        x = self.x[:M]
        gate = self.x32[:M] @ self.wg32.T
        t = float(torch.quantile(gate.flatten()[:1_000_000], sparsity)) if sparsity > 0 else -1.0
        if t >= 0:  # one threshold for the whole batch, at the sparsity's quantile
            return x, self.wg, self.g24, t
        # The op's threshold is >= 0, so low sparsities are made with the signs instead: flip gate
        # rows so that a random (1 - sparsity) share of neurons is positive for the first token,
        # the rest negative, threshold 0 (the other tokens of the batch fire independently).
        want = torch.rand(self.Fd, generator=self.gen) >= sparsity
        sign = torch.where((gate[0] >= 0) == want, 1.0, -1.0)[:, None].to(self.dtype)
        wg = self.wg * sign
        return x, wg, ops.compress24(ops.prune24(wg)), 0.0


def run_case(W: Weights, shape, M, sp, pattern, dname, args, stream) -> str:
    """One table row: times torch dense, sparse_ffn and sparse_ffn24 on one case."""
    D, Fd = W.D, W.Fd
    es = torch.tensor([], dtype=W.dtype).element_size()
    x, wg, g24, t = W.case(M, sp / 100)
    wu, wd, wdt, u24, d24 = W.wu, W.wd, W.wdt, W.u24, W.d24
    dev = torch.device(args.device)
    on = (lambda v: tuple(t.to(dev) for t in v)) if dev.type == "cuda" else (lambda v: v)
    xd, wgd, wud, wdd, wdtd = on((x, wg, wu, wd, wdt))
    g24d, u24d, d24d = on(g24), on(u24), on(d24)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def dense():
        gt = F.linear(xd, wgd)
        out = F.linear(torch.where(gt >= t, gt, 0) * F.linear(xd, wud), wdd)
        sync()
        return out

    def sparse():
        out = ops.sparse_ffn(xd, wgd, wud, wdtd, t)
        sync()
        return out

    def sparse24():
        out = ops.sparse_ffn24(xd, g24d, u24d, d24d, t)
        sync()
        return out

    n_act = int(((x.float() @ wg.float().T) >= t).any(0).sum())
    gate24 = (x.float() @ ops.decompress24(*g24, D).float().T >= t).any(0)
    groups24 = int(gate24.view(-1, 4).any(1).sum())
    td, ts, r = paired_times(dense, sparse, args.repeats, args.seconds)
    _, ts24, r24 = paired_times(dense, sparse24, args.repeats, args.seconds)
    need = (Fd + 2 * n_act) * D * es
    half = D // 2 * es + (D + 7) // 8  # one packed row
    need24 = Fd * half + int(gate24.sum()) * half + groups24 * (2 * D * es + D // 2)
    bw, bw24 = need / ts / 1e9, need24 / ts24 / 1e9
    rows = ""
    if args.down_rows:
        d24r = on(W.d24_rows)

        def rows24():
            out = ops.sparse_ffn24(xd, g24d, u24d, d24r, t)
            sync()
            return out

        _, tsr, rr = paired_times(dense, rows24, args.repeats, args.seconds)
        need_r = Fd * half + int(gate24.sum()) * half + n_act * half
        rows = f" {tsr * 1e3:.2f} | {rr:.2f}x | {need_r / 1e6:.0f} vs {need24 / 1e6:.0f} |"
    # The roof: the faster of a plain read and torch's own dense FFN (which reads all three
    # weights), both timed in this run.
    roof = max(stream, 3 * Fd * D * es / td / 1e9)
    return (
        f"| {shape} | {dname} | {pattern} | {sp:g}% | {M} | {n_act / Fd:.0%} | "
        f"{td * 1e3:.2f} | {ts * 1e3:.2f} | {r:.2f}x | {bw:.1f} ({bw / roof:.0%}) | "
        f"{ts24 * 1e3:.2f} | {r24:.2f}x | {bw24:.1f} ({bw24 / roof:.0%}) |{rows}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), help="DxF (d_model x d_ff)")
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0, 50, 80, 90, 95])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 4, 16])
    ap.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    ap.add_argument("--patterns", nargs="*", default=["independent", "clustered"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (weights built on the CPU, moved)")
    ap.add_argument(
        "--down-rows",
        action="store_true",
        help="also time the 2:4 FFN with the down weight pruned along d_model (by-row layout)",
    )
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.sparsities, args.batches = ["4096x11008"], [0, 90], [1]
        args.dtypes, args.patterns = ["float32"], ["independent"]
    pysparse.require_extension()
    threads = torch.get_num_threads()
    print(
        f"# sparse_ffn / sparse_ffn24 vs torch dense gated FFN | torch {torch.__version__} | "
        f"device {args.device} | threads {threads} | "
        f"impl {pysparse._C.cpu_info().get('ffn_impl', '?')}"
    )
    extra = " 2:4 rows ms | 2:4 rows x | MB read rows vs groups |" if args.down_rows else ""
    print(
        "| shape | dtype | pattern | sparsity | batch | active (union) | dense ms | ffn ms | "
        "ffn x | ffn GB/s (% roof) | 2:4 ms | 2:4 x | 2:4 GB/s (% roof) |" + extra
    )
    print(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * (3 * bool(extra))
    )
    for shape in args.shapes:
        D, Fd = (int(v) for v in shape.split("x"))
        for dname in args.dtypes:
            dtype = getattr(torch, dname)
            es = torch.tensor([], dtype=dtype).element_size()
            stream = (
                stream_read_gbs(Fd * D * es, args.repeats, args.seconds)
                if args.device == "cpu"
                else 0.0  # on a GPU the roof is cuBLAS's own dense FFN
            )
            for pattern in args.patterns:
                W = Weights(D, Fd, pattern, dtype)
                for sp in args.sparsities:
                    for M in args.batches:
                        print(run_case(W, shape, M, sp, pattern, dname, args, stream), flush=True)
                del W
            print(f"<!-- {shape} {dname}: streaming read {stream:.1f} GB/s -->")


if __name__ == "__main__":
    main()
