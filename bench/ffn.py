"""Benchmark: pysparse's activation-sparse FFN (sparse_ffn) and its 2:4 form (sparse_ffn24) vs
torch's dense gated FFN on the same weights, same run.

For each shape (d_model/d_ff), dtype, activation pattern, sparsity and batch it prints the median
time of torch dense (``F.linear`` x3 with the same FATReLU), of ``sparse_ffn`` and of
``sparse_ffn24``, the speed-ups (median of per-pair ratios over alternating calls: this shared
machine drifts) and, for the pysparse kernels, the bandwidth they achieve: the bytes they must read
(gate in full; up rows and down rows of the neurons active for some row of the batch; 2:4: packed
bytes, down by groups of 4 neurons) / time, as a fraction of the roof: the faster of a streaming read
(``torch.sum``) and torch's dense FFN itself (bytes of its three weights / time), both timed in the
same run. ``--predictor S`` adds both FFNs with activation predictors (``predicted=``): each call computes a
predictor of rank S x d_model, ``(x A^T) B^T + c > 0`` with ``ops.ffn_predict`` as a lowered model
does, with its row cap ``--predictor-max-rows``: past it the mask is all true, nothing predicted),
and hands the op its mask (its cost is in the time);
so that the set it marks is what a fitted predictor marks (the random A, B here predict nothing),
the mask is OR-ed with the firing (row, neuron) pairs plus false alarms at ``--precision``.
``--down-rows`` adds the 2:4 FFN with the other down layout (W_down pruned 2:4 along
d_model, each active neuron's packed row read; see csrc/core/sparse_ffn.h) and the megabytes each
2:4 layout must read. The 2:4 columns run 2:4-pruned weights (magnitude) at the same target
sparsity, set on the gate they run (the pruned gate: its pre-activations differ from the dense
one's), so a row labelled 90% is ~90% sparse in every column; each variant's measured active
fraction is printed, and every ratio is against the same dense FFN.
Every variant of a row is timed in one round-robin loop (bench/timing.py), and the times printed
are the ones its ratios come from.

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
from timing import cuda_synced, interleaved_times, stream_read_gbs

import pysparse
from pysparse.kernels import formats, ops

SHAPES = {"4096x11008": "LLaMA-7B", "2048x5632": "1B-class", "384x1536": "MiniLM"}


class Weights:
    """One shape/dtype/pattern's weights, their 2:4 forms and a batch of x (built once; the cases
    differ by batch size and threshold, and at low sparsity by the gate's row signs)."""

    def __init__(self, D: int, Fd: int, pattern: str, dtype: torch.dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
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

    def predictor(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A rank-``rank`` predictor's weights (A [r, D], B [F, r], c [F]) in the weights' dtype;
        c so low that it marks nothing itself (see the module docstring)."""
        g = torch.Generator().manual_seed(5)
        a = torch.randn(rank, self.D, generator=g) / math.sqrt(self.D)
        b = torch.randn(self.Fd, rank, generator=g) / math.sqrt(rank)
        c = torch.full((self.Fd,), -1e4)
        return tuple(v.to(self.dtype) for v in (a, b, c))

    def case(self, M: int, sparsity: float, pruned: bool):
        """(x, gate weight, packed 2:4 gate or None, threshold) for M rows at about ``sparsity``
        over the batch. The activation pattern is set on the gate the variant runs: the dense gate
        for dense / sparse_ffn, the 2:4-pruned gate for sparse_ffn24 (so both run at the labelled
        sparsity; the pruned gate's pre-activations differ from the dense one's)."""
        x = self.x[:M]
        gate_w = ops.decompress24(*self.g24, self.D).float() if pruned else self.wg32
        gate = self.x32[:M] @ gate_w.T
        t = float(torch.quantile(gate.flatten()[:1_000_000], sparsity)) if sparsity > 0 else -1.0
        if t >= 0:  # one threshold for the whole batch, at the sparsity's quantile
            return x, self.wg, (self.g24 if pruned else None), t
        # The op's threshold is >= 0, so low sparsities are made with the signs instead: flip gate
        # rows so that a random (1 - sparsity) share of neurons is positive for the first token,
        # the rest negative, threshold 0 (the other tokens of the batch fire independently). The
        # same draw for both variants (one generator per case), each flipped on its own gate.
        want = torch.rand(self.Fd, generator=torch.Generator().manual_seed(M)) >= sparsity
        sign = torch.where((gate[0] >= 0) == want, 1.0, -1.0)[:, None].to(self.dtype)
        wg = self.wg * sign
        # prune24 keeps the two largest |w| per group: flipping a row's sign commutes with it
        return x, wg, (ops.compress24(ops.prune24(wg)) if pruned else None), 0.0


def marked(x: torch.Tensor, gate_w: torch.Tensor, t: float, precision: float) -> torch.Tensor:
    """[M, F] bool: the firing (row, neuron) pairs plus false alarms, so that the firing pairs
    are ``precision`` of those marked (what a predictor at that precision and full recall marks)."""
    fires = (x.float() @ gate_w.float().T) >= t
    extra = fires.sum().item() * (1 / precision - 1) / max((~fires).sum().item(), 1)
    gen = torch.Generator().manual_seed(11)
    return fires | ((torch.rand(fires.shape, generator=gen) < extra) & ~fires)


def active(x: torch.Tensor, gate_w: torch.Tensor, t: float) -> torch.Tensor:
    """Neurons that fire for some row of x (the union over the batch)."""
    return ((x.float() @ gate_w.float().T) >= t).any(0)


def run_case(W: Weights, shape, M, sp, pattern, dname, args, stream) -> str:
    """One table row: dense, sparse_ffn and sparse_ffn24 (and the by-row 2:4 layout with
    --down-rows) timed round-robin in one loop; every ratio is against the dense times printed."""
    D, Fd = W.D, W.Fd
    es = torch.tensor([], dtype=W.dtype).element_size()
    x, wg, _, t = W.case(M, sp / 100, pruned=False)
    _, _, g24, t24 = W.case(M, sp / 100, pruned=True)
    wu, wd, wdt, u24, d24 = W.wu, W.wd, W.wdt, W.u24, W.d24
    dev = torch.device(args.device)
    on = (lambda v: tuple(t.to(dev) for t in v)) if dev.type == "cuda" else (lambda v: v)
    xd, wgd, wud, wdd, wdtd = on((x, wg, wu, wd, wdt))
    g24d, u24d, d24d = on(g24), on(u24), on(d24)
    calls = {
        "dense": lambda: F.linear(
            torch.where((gt := F.linear(xd, wgd)) >= t, gt, 0) * F.linear(xd, wud), wdd
        ),
        "ffn": lambda: ops.sparse_ffn(xd, wgd, wud, wdtd, t),
        "ffn24": lambda: ops.sparse_ffn24(xd, g24d, u24d, d24d, t24),
    }
    if args.down_rows:
        d24r = on(W.d24_rows)
        calls["rows24"] = lambda: ops.sparse_ffn24(xd, g24d, u24d, d24r, t24)
    if args.predictor:
        A, B, c = on(W.predictor(max(1, int(args.predictor * D))))
        fires = on((marked(x, wg, t, args.precision),))[0]
        fires24 = on((marked(x, ops.decompress24(*g24, D), t24, args.precision),))[0]

        def predict(fired):
            return ops.ffn_predict(xd, A, B, c, args.predictor_max_rows) | fired

        calls["pred"] = lambda: ops.sparse_ffn(xd, wgd, wud, wdtd, t, predict(fires))
        calls["pred24"] = lambda: ops.sparse_ffn24(xd, g24d, u24d, d24d, t24, predict(fires24))
    with torch.inference_mode():
        res = interleaved_times(
            {k: cuda_synced(f, dev) for k, f in calls.items()}, args.repeats, args.seconds
        )
    td, ts, ts24 = (res[k].median_s for k in ("dense", "ffn", "ffn24"))
    act = active(x, wg, t)
    act24 = active(x, ops.decompress24(*g24, D), t24)
    n_act, n_act24 = int(act.sum()), int(act24.sum())
    groups24 = int(act24.view(-1, 4).any(1).sum())
    need = (Fd + 2 * n_act) * D * es
    half = D // 2 * es + (D + 7) // 8  # one packed row
    need24 = Fd * half + n_act24 * half + groups24 * (2 * D * es + D // 2)
    bw, bw24 = need / ts / 1e9, need24 / ts24 / 1e9
    rows = ""
    if args.down_rows:
        need_r = Fd * half + n_act24 * half + n_act24 * half
        rows = (
            f" {res['rows24'].median_s * 1e3:.2f} | {res['rows24'].ratio:.2f}x | "
            f"{need_r / 1e6:.0f} vs {need24 / 1e6:.0f} |"
        )
    if args.predictor:
        rows += (
            f" {res['pred'].median_s * 1e3:.2f} | {res['pred'].ratio:.2f}x | "
            f"{res['pred24'].median_s * 1e3:.2f} | {res['pred24'].ratio:.2f}x |"
        )
    # The roof: the faster of a plain read and torch's own dense FFN (which reads all three
    # weights), both timed in this run.
    roof = max(stream, 3 * Fd * D * es / td / 1e9)
    return (
        f"| {shape} | {dname} | {pattern} | {sp:g}% | {M} | {n_act / Fd:.0%} | {n_act24 / Fd:.0%} | "
        f"{td * 1e3:.2f} | {ts * 1e3:.2f} | {res['ffn'].ratio:.2f}x | {bw:.1f} ({bw / roof:.0%}) | "
        f"{ts24 * 1e3:.2f} | {res['ffn24'].ratio:.2f}x | {bw24:.1f} ({bw24 / roof:.0%}) |{rows}"
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
        "--predictor",
        type=float,
        default=0.0,
        help="predictor rank as a share of d_model (e.g. 0.125): adds predicted-FFN columns",
    )
    ap.add_argument("--precision", type=float, default=0.8, help="of the predicted sets")
    ap.add_argument(
        "--predictor-max-rows",
        type=int,
        default=8,
        help="ffn_predict's row cap, as the predictor pass sets it (default 8; -1: none)",
    )
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
    if args.predictor:
        extra += f" pred r{args.predictor} ms | pred x | pred 2:4 ms | pred 2:4 x |"
    print(
        "| shape | dtype | pattern | sparsity | batch | ffn active | 2:4 active | dense ms | ffn ms | "
        "ffn x | ffn GB/s (% roof) | 2:4 ms | 2:4 x | 2:4 GB/s (% roof) |" + extra
    )
    print(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + "---:|" * (3 * args.down_rows + 4 * bool(args.predictor))
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
