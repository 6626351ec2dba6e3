"""Quantize: weight-only int8 / int4 for the linears a decode step reads, composed with 2:4
sparsity.

Batch-1 decode is bound by the bytes of the weights it reads; int8 values with one fp32 scale per
output row read a quarter of fp32's bytes (half of bf16's), and under a 2:4 mask the packed int8
values plus metadata read ~5/32 (``formats.quantize_int8``: symmetric, round to nearest, q in
[-127, 127]). Zeros stay zeros, so the pass runs after any mask pass and before ``compress24``,
which then packs the int8 weight; ``lower`` puts the linears on ``pysparse::int8_linear`` /
``pysparse::sparse24_int8_linear``.

What the pass does to the model: each chosen weight becomes its dequantised value ``q * scale``
(in its own dtype), so every later pass and every export sees the quantised model, and the int8
tensors are attached as buffers with the record ``info["quant"]``. A weight the lm_head shares
with the input embeddings (SmolLM2's tied 49152 x 576) is quantised once for both: the lookup
then reads the same dequantised rows the head multiplies by.

``linears`` picks the weights by role (see pysparse.capture.trace): ``"all"`` (every linear with
a 2-D weight: the projections and the lm_head), ``"prunable"`` (not the head), ``"head"``, or a
tuple of roles (``qkv``, ``o``, ``gate``, ``up``, ``down``, ``head``). FFN blocks the
activation-sparse kernels take (ReLU/FATReLU after ``relu`` / ``prosparse``): by default
(``ffn=None``) the gated ones whose three weights are 2:4 are quantized, for
``pysparse::sparse_ffn24_int8``; the others keep their weights in float, since their kernels read
fp32/bf16 and an int8 FFN lowered as three linears would read every row the activation sparsity
skips. ``ffn=True`` quantizes every FFN, ``ffn=False`` none of the activation-sparse ones.

``method``: ``"rtn"`` (round to nearest) or ``"gptq"`` (GPTQ on the calibration batches, layer by
layer; see ``gptq_quantize``); by default GPTQ at ``bits=4`` (SmolLM2-135M int4 g32, head int8:
held-out perplexity 15.97 against 17.06 round to nearest, dense 14.86, llama.cpp Q4_0 18.39) and
round to nearest at ``bits=8`` (+0.5% already).

``gptq_head``: GPTQ the lm_head too (off by default: it keeps round to nearest; a head tied to
the embeddings then has its update read by the lookups as well).

``bits=4``: int4 with one float16 scale per ``group`` (32 or 64) stored values
(``formats.quantize_int4``: the group's largest-magnitude value over -8, round to nearest; a 2:4
weight is grouped over its kept values, ``2 * group`` columns, since those are what is stored),
packed two values a byte (``formats.pack_int4``), lowered onto ``pysparse::int4_linear`` /
``pysparse::sparse24_int4_linear``. Dense g32 reads 4.5 bits a weight (llama.cpp Q4_0's
budget), 2:4 g32 3.25. The lm_head (and the embeddings it shares) takes ``head_bits``, by default
8 at ``bits=4``: on SmolLM2-135M int4 g32 everywhere scored 18.43 held-out perplexity, with an
int8 head 17.06 (dense 14.86; bench/llm_quality.py). FFNs the int8 FFN op takes stay int8 (there
is no int4 FFN kernel yet)."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from pysparse.compiler.base import MASK_PASSES, Pass, PassContext, PassResult
from pysparse.compiler.graph import module_tensor
from pysparse.kernels.formats import (
    INT4_GROUPS,
    dequantize_int4,
    dequantize_int8,
    int4_scale,
    int8_scale,
    pack_int4,
    quantize_int4,
    quantize_int8,
    record_layout,
)
from pysparse.kernels.reference import is_24_sparse

from .baselines import _gram, obs_inverse, prune_by_groups

ROLES = ("qkv", "o", "gate", "up", "down", "gate_up", "head")
_SELECTIONS = {
    "all": ROLES,
    "prunable": tuple(r for r in ROLES if r != "head"),
    "head": ("head",),
}


def quant_names(weight_target: str) -> tuple[str, str]:
    base = "pysparse__" + weight_target.replace(".", "__")
    return base + "__qweight", base + "__scale"


def _activation_sparse_linears(gm: fx.GraphModule, int8_kernel_too: bool) -> set[str]:
    """Names of the linear nodes of FFN blocks whose activation is ReLU / FATReLU; without those
    of the blocks the int8 FFN op takes (gated, all three weights 2:4) unless ``int8_kernel_too``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: set[str] = set()
    for block in gm.meta["pysparse"]["ffns"]:
        if block.get("act_op") not in ("relu", "fatrelu"):
            continue
        names = [block.get(k) for k in ("gate", "up", "down")]
        if not int8_kernel_too and block.get("kind") == "gated" and all(names):
            weights = [nodes[n].meta.get("pysparse", {}).get("weight") for n in names]
            ws = [module_tensor(gm, w) if w else None for w in weights]
            if all(w is not None and w.shape[-1] % 4 == 0 and is_24_sparse(w) for w in ws):
                continue
        out |= {block.get(k) for k in ("gate", "up", "down", "gate_up")} - {None}
    return out


class Quantize(Pass):
    name = "quantize"
    after = (*MASK_PASSES, "recover", "relu", "prosparse", "predictor")
    preserves_numerics = False

    def __init__(
        self,
        bits: int = 8,
        linears: str | tuple[str, ...] = "all",
        ffn: bool | None = None,
        group: int = 32,
        head_bits: int | None = None,
        method: str | None = None,
        damp: float = 0.01,
        gptq_head: bool = False,
    ):
        method = ("gptq" if bits == 4 else "rtn") if method is None else method
        if method not in ("rtn", "gptq"):
            raise ValueError(f"Quantize: method={method!r}; use 'rtn' or 'gptq'")
        head_bits = (8 if bits == 4 else bits) if head_bits is None else head_bits
        if bits not in (8, 4) or head_bits not in (8, 4):
            raise ValueError(
                f"Quantize: bits={bits}, head_bits={head_bits}; int8 (8) and int4 (4) are built"
            )
        if group not in INT4_GROUPS:
            raise ValueError(f"Quantize: group={group}; int4 scales are per 32 or 64 values")
        roles = _SELECTIONS.get(linears) if isinstance(linears, str) else tuple(linears)
        if roles is None or not set(roles) <= set(ROLES):
            raise ValueError(
                f"Quantize: linears={linears!r}; use one of {sorted(_SELECTIONS)} or a tuple of "
                f"roles from {ROLES}"
            )
        self.bits = bits
        self.group = group
        self.head_bits = head_bits
        self.method = method
        self.damp = damp
        self.gptq_head = gptq_head
        self.linears = linears if isinstance(linears, str) else list(linears)
        self.ffn = ffn
        self._roles = roles

    def _quantize(self, w: torch.Tensor, bits: int, sparse24: bool):
        """Round to nearest: (stored (q or packed q), scale, dequantised float32, record)."""
        if bits == 8:
            return self._finish(*quantize_int8(w), 8, sparse24)
        return self._finish(*quantize_int4(w, self.group, sparse24=sparse24), 4, sparse24)

    def _selected(self, gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, dict, int, bool]], int]:
        """(node, info, bits, sparse24) of every linear the pass quantizes, in graph order
        (sparse24: a 2:4 weight other than the head, grouped over its kept values), and how many
        activation-sparse FFN linears it leaves in float."""
        skip_ffn = set() if self.ffn else _activation_sparse_linears(gm, self.ffn is False)
        # the linears of FFNs the int8 FFN op takes: int8 whatever ``bits`` is
        int8_ffn = _activation_sparse_linears(gm, True) - _activation_sparse_linears(gm, False)
        out, left_for_ffn = [], 0
        for node in gm.graph.nodes:
            info = node.meta.get("pysparse")
            if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
                continue
            if not info or not info.get("weight") or info.get("role") not in self._roles:
                continue
            if node.name in skip_ffn:
                left_for_ffn += 1
                continue
            w = module_tensor(gm, info["weight"])
            if w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                continue
            head = info["role"] == "head"
            bits = self.head_bits if head else (8 if node.name in int8_ffn else self.bits)
            sparse24 = not head and w.shape[-1] % 4 == 0 and is_24_sparse(w)
            out.append((node, info, bits, sparse24))
        return out, left_for_ffn

    def _gptq(self, gm: fx.GraphModule, ctx: PassContext, selected: list) -> dict[str, Any]:
        """GPTQ over the selected linears but the head, layer by layer on the calibration stream
        (each layer's Hessians with the earlier layers already quantised): weight -> (stored,
        scale, dequantised, record). The head (tied to the embeddings on the decoders pysparse
        serves: an update would move the table the lookups read) keeps round to nearest."""
        solved: dict[str, Any] = {}
        of = {node.name: (bits, sparse24) for node, _, bits, sparse24 in selected}
        targets = [(n, i) for n, i, _, _ in selected if i["role"] != "head" or self.gptq_head]

        def solve(group: list, stats: dict) -> None:
            sweeps: dict[tuple, list] = {}
            for node, info in group:
                if info["weight"] in solved:
                    continue
                w = module_tensor(gm, info["weight"])
                key = (id(stats[node.name]), *of[node.name])
                sweeps.setdefault(key, []).append((node, info, w))
            for (_, bits, sparse24), items in sweeps.items():
                ws = [w for _, _, w in items]
                stacked = torch.cat([w.detach() for w in ws]) if len(ws) > 1 else ws[0].detach()
                q, scale = gptq_quantize(
                    stacked,
                    stats[items[0][0].name],
                    bits=bits,
                    group=self.group,
                    sparse24=sparse24,
                    damp=self.damp,
                )
                rows = [w.shape[0] for w in ws]
                for (_, info, w), qi, si in zip(items, q.split(rows), scale.split(rows)):
                    solved[info["weight"]] = self._finish(qi, si, bits, sparse24)
                    with torch.no_grad():
                        w.copy_(solved[info["weight"]][2].to(w.dtype))

        prune_by_groups(gm, ctx, targets, _gram, solve, "quantize (gptq)")
        return solved

    def _finish(self, q: torch.Tensor, scale: torch.Tensor, bits: int, sparse24: bool):
        """(stored, scale, dequantised float32, record) of a solved int8 q or int4 q."""
        if bits == 8:
            return q, scale, dequantize_int8(q, scale), {"bits": 8}
        deq = dequantize_int4(q, scale, self.group, sparse24=sparse24)
        return pack_int4(q), scale, deq, {"bits": 4, "group": self.group, "sparse24": sparse24}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        selected, left_for_ffn = self._selected(gm)
        # the weights GPTQ will update, as they were (the error metric's reference)
        original = {
            i["weight"]: module_tensor(gm, i["weight"]).detach().float().clone()
            for _, i, _, _ in selected
            if self.method == "gptq" and (i["role"] != "head" or self.gptq_head)
        }
        solved = self._gptq(gm, ctx, selected) if self.method == "gptq" else {}
        done: dict[str, tuple[str, str, dict]] = {}  # weight -> buffers (several linears read)
        counts: dict[str, int] = {}
        by_bits: dict[int, int] = {}
        before_bytes, after_bytes, err_num, err_den = 0, 0, 0.0, 0.0
        for node, info, bits, sparse24 in selected:
            target = info["weight"]
            w = module_tensor(gm, target)
            if target not in done:
                if target in solved:
                    q, scale, deq, rec = solved[target]
                else:
                    q, scale, deq, rec = self._quantize(w, bits, sparse24)
                w0 = original.get(target, w.detach().float())
                err_num += float((deq - w0).pow(2).sum())
                err_den += float(w0.pow(2).sum())
                with torch.no_grad():
                    w.copy_(deq.to(w.dtype))
                qname, sname = quant_names(target)
                gm.register_buffer(qname, q)
                gm.register_buffer(sname, scale)
                if bits == 8:
                    record_layout(gm, target, "int8", tensor=qname, scale=sname)
                else:
                    g = self.group * (2 if rec["sparse24"] else 1)
                    record_layout(
                        gm,
                        target,
                        "int4",
                        tensor=qname,
                        scale=sname,
                        group=g,
                        in_features=w.shape[-1],
                    )
                done[target] = (qname, sname, rec)
                before_bytes += w.numel() * w.element_size()
                after_bytes += q.numel() + scale.numel() * scale.element_size()
            qname, sname, rec = done[target]
            info["quant"] = {**rec, "qweight": qname, "scale": sname}
            counts[info["role"]] = counts.get(info["role"], 0) + 1
            by_bits[rec["bits"]] = by_bits.get(rec["bits"], 0) + 1
        report = {
            "linears_quantized": sum(counts.values()),
            "by_role": counts,
            "by_bits": {str(b): n for b, n in sorted(by_bits.items())},
            "method": self.method,
            "weights_mb": round(before_bytes / 1e6, 2),
            "quantized_mb": round(after_bytes / 1e6, 2),
            "relative_weight_error": round((err_num / err_den) ** 0.5, 5) if err_den else 0.0,
        }
        if left_for_ffn:
            report["activation_sparse_ffn_linears_left"] = left_for_ffn
        return PassResult(gm, bool(counts), report)

    def settings(self):
        return {
            "bits": self.bits,
            "linears": self.linears,
            "ffn": self.ffn,
            "group": self.group,
            "head_bits": self.head_bits,
            "method": self.method,
            "gptq_head": self.gptq_head,
        }


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group: int = 32,
    sparse24: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for one weight (arXiv 2210.17323; SparseGPT's sweep with a quantiser): the columns
    are quantised in order, each one's error ``(w - q) / [H^-1]_jj`` spread over the columns not
    yet visited through the upper Cholesky factor of H^-1 (``obs_inverse``; lazy blocks of
    ``block`` columns). int4: a group's scale is taken (``int4_scale``) from its weights as the
    sweep reaches it, already updated by the earlier columns' errors, as GPTQ does; int8: one
    scale per row from the original weight. ``sparse24``: the weight's zeros are its 2:4 mask,
    kept at zero (their "quantised" value is 0: the sweep that prunes and quantises at once of
    SparseGPT, under a fixed mask), and the int4 groups span ``2 * group`` columns.

    Returns ``(q int8 [N, K], scale)`` as ``quantize_int8`` / ``quantize_int4`` return them."""
    N, K = w.shape
    hinv, dead = obs_inverse(hessian, damp)
    W = w.detach().to(torch.float64).clone()
    W[:, dead] = 0.0
    keep = (w.detach() != 0).to(torch.float64) if sparse24 else None
    cols = (2 * group if sparse24 else group) if bits == 4 else K
    qmin, qmax = (-8, 7) if bits == 4 else (-127, 127)
    Q = torch.zeros(N, K, dtype=torch.int8)
    scales = []
    if bits == 8:
        scales.append(int8_scale(w).to(torch.float64))
    s = scales[0] if bits == 8 else None
    block = max(cols, block // cols * cols) if bits == 4 else block
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros(N, i2 - i1, dtype=torch.float64)
        hb = hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            c = i1 + j
            if bits == 4 and c % cols == 0:
                g = W1[:, j : j + cols]
                if keep is not None:
                    g = g * keep[:, c : c + cols]
                s16 = int4_scale(g.to(torch.float32), g.shape[1])
                scales.append(s16)
                s = s16.to(torch.float64)[:, 0]
            q = torch.round(W1[:, j] / s).clamp_(qmin, qmax)
            if keep is not None:
                q = q * keep[:, c]
            Q[:, c] = q.to(torch.int8)
            e = (W1[:, j] - q * s) / hb[j, j]
            W1[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        W[:, i2:] -= err @ hinv[i1:i2, i2:]
    if bits == 8:
        return Q, scales[0].to(torch.float32)
    return Q, torch.cat(scales, dim=1)
