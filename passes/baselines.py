"""Baseline 2:4 masks: magnitude, Wanda (arXiv 2306.11695) and SparseGPT (arXiv 2301.00774).
The masked weights stay dense here (Compress24 packs them); the mask is applied to the live
parameters of the captured graph. Linears whose in_features is not a multiple of 4 are skipped
and reported."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from pysparse import ops
from pysparse.pipeline import Pass, PassContext, PassError, PassResult, _call_graph
from pysparse.progress import track

_log = logging.getLogger(__name__)
aten = torch.ops.aten


def prunable_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, dict[str, Any]]]:
    return [
        (n, n.meta["pysparse"])
        for n in gm.graph.nodes
        if "pysparse" in n.meta and n.meta["pysparse"].get("prunable")
    ]


def maskable_linears(gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, dict[str, Any]]], list[str]]:
    """The prunable linears a 2:4 mask can apply to, and a report line for each one skipped
    (in_features not a multiple of 4; those are marked not prunable)."""
    keep, skipped = [], []
    for node, info in prunable_linears(gm):
        in_features = gm.get_parameter(info["weight"]).shape[1]
        if in_features % 4:
            skipped.append(f"{info['weight']}: in_features={in_features} is not a multiple of 4")
            info["prunable"] = False
        else:
            keep.append((node, info))
    return keep, skipped


class _Observed(Exception):
    """Raised by the last observer of a calibration forward: nothing after it is needed."""


def observe_linear_inputs(
    gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], fold: Any, desc: str = "calibration"
) -> dict[str, torch.Tensor]:
    """Runs the calibration batches through ``gm`` with temporary observer nodes on the inputs of
    ``nodes`` (removed afterwards); ``fold(acc, x2)`` accumulates a statistic of the float64
    ``[tokens, in_features]`` inputs, ``acc`` None on the first batch. Returns node name -> acc.

    Each forward stops at the last observed input: the rest of the graph (later layers, a 49k-token
    lm_head) cannot change the statistics. SparseGPT observes one layer at a time, so without the
    stop every layer paid a whole forward over the calibration set, lm_head included."""
    stats: dict[str, torch.Tensor] = {}
    weights = {n.name: n.meta.get("pysparse", {}).get("weight", n.name) for n in nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(nodes, key=lambda n: order[n]).name if nodes else None

    def observe(x: torch.Tensor, key: str) -> torch.Tensor:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()
        if not torch.isfinite(x2).all():
            raise PassError(
                f"{desc}: the inputs of the linear with weight {weights[key]} contain NaN or Inf "
                f"on the calibration data; nothing was pruned. Check the calibration batches (and "
                f"the model's activations on them)"
            )
        stats[key] = fold(stats.get(key), x2)
        if key == last:
            raise _Observed
        return x

    observers = []
    for node in nodes:
        with gm.graph.inserting_before(node):
            obs = gm.graph.call_function(observe, (node.args[0], node.name))
        node.replace_input_with(node.args[0], obs)
        observers.append(obs)
    gm.recompile()
    try:
        for args, kwargs in track(ctx.calibration_batches(), desc, unit="batch"):
            try:
                _call_graph(gm, args, kwargs)
            except _Observed:
                pass
    finally:
        for obs in observers:
            obs.replace_all_uses_with(obs.args[0])
            gm.graph.erase_node(obs)
        gm.recompile()
    return stats


class _MaskPass(Pass):
    """Shared loop: score each prunable weight, keep the top 2 of every group of 4.

    ``down_along``: ``"d_ff"`` (default) groups the FFN down projections' weights along their
    in_features like every other linear (the pattern cuSPARSELt and ``sparse24_linear`` run);
    ``"d_model"`` groups them along their out_features instead, the by-row layout of the 2:4
    activation-sparse FFN kernels: each active neuron's down row is read at half size and nothing
    else (bench/ffn.py --down-rows: LLaMA-7B shape, batch 1, 90% sparse, fp32: 4.2x torch dense
    against 3.6x for the d_ff grouping; but slower from 4 rows when most neurons fire). Such down
    projections run only inside FFNs that ``lower`` maps to ``sparse_ffn24``/``sparse_mlp24``
    (ReLU/FATReLU FFNs); elsewhere they stay dense (masked)."""

    def __init__(self, down_along: str = "d_ff"):
        if down_along not in ("d_ff", "d_model"):
            raise ValueError(
                f"{self.name}: down_along must be 'd_ff' or 'd_model', got {down_along!r}"
            )
        self.down_along = down_along

    def settings(self) -> dict[str, Any]:
        return {"down_along": self.down_along}

    def scores(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, torch.Tensor | None]:
        return {}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets, skipped = maskable_linears(gm)
        scores = self.scores(gm, ctx, targets)
        pruned, kept, total = [], 0, 0
        for node, info in targets:
            w = gm.get_parameter(info["weight"])
            score = scores.get(node.name)
            along_out = (
                self.down_along == "d_model" and info.get("role") == "down" and w.shape[0] % 4 == 0
            )
            with torch.no_grad():
                if along_out:  # groups of 4 along out_features: prune the transpose
                    t = None if score is None else score.T.contiguous()
                    w.copy_(ops.prune24(w.detach().T.contiguous(), t).T)
                else:
                    w.copy_(ops.prune24(w.detach(), score))
            info["masked"] = self.name
            info["mask_axis"] = "out" if along_out else "in"
            pruned.append(info["weight"])
            kept += int((w != 0).sum())
            total += w.numel()
        for line in skipped:
            _log.warning("%s: skipped %s", self.name, line)
        return PassResult(
            gm,
            bool(pruned),
            {
                "layers_pruned": len(pruned),
                "skipped": skipped,
                "weight_density": round(kept / max(total, 1), 4),
            },
        )


class MagnitudePrune(_MaskPass):
    """Keep the 2 largest |w| of each group of 4 along in_features."""

    name = "magnitude"


class WandaPrune(_MaskPass):
    """Score |W_ij| * ||X_j||_2, with X the inputs of each linear over the calibration batches
    (collected with temporary observer nodes, see observe_linear_inputs)."""

    name = "wanda"

    def scores(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, torch.Tensor | None]:
        sumsq = observe_linear_inputs(
            gm,
            ctx,
            [n for n, _ in targets],
            lambda acc, x: (x * x).sum(0) if acc is None else acc + (x * x).sum(0),
            desc="wanda: calibration",
        )
        out: dict[str, torch.Tensor | None] = {}
        for n, info in targets:
            w = gm.get_parameter(info["weight"]).detach().abs().double()
            out[n.name] = (w * sumsq[n.name].sqrt()).float()
        return out


def sparsegpt_24(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    block: int = 128,
    damp: float = 0.01,
    update_weights: bool = True,
    along_out: bool = False,
) -> torch.Tensor:
    """SparseGPT for one layer at 2:4 (arXiv 2301.00774): H = XᵀX + damping (1% of the mean diagonal),
    then an OBS sweep over the columns in blocks of ``block``: at the first column of every group of
    4 choose the 2 weights per row with the smallest w² / [H⁻¹]_jj² to prune, zero them, and spread
    each column's error over the columns not yet visited (through the upper Cholesky factor of H⁻¹).

    ``along_out``: the groups of 4 run along out_features instead (``down_along="d_model"``). The
    OBS update is per row, so only the choice changes: at every column, within each group of 4
    rows, the 2 with the smallest w² / [H⁻¹]_ii² — the same [H⁻¹]_ii for all of them, so the 2
    smallest |w| of the (already updated) column.

    Args:
        w: ``[out, in]`` weight, ``in % 4 == 0`` (``along_out``: ``out % 4 == 0``).
        hessian: ``[in, in]`` XᵀX over the calibration tokens of this layer's input.
        update_weights: False keeps the original weights under the chosen mask (mask-only variant).

    Returns:
        The pruned weight (same dtype as ``w``), 2:4 along in_features (``along_out``: along
        out_features).
    """
    N, K = w.shape
    W = w.detach().to(torch.float64).clone()
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    prune = torch.zeros(N, K, dtype=torch.bool)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if along_out:
                drop = torch.topk(
                    W1[:, i].abs().reshape(N // 4, 4), 2, dim=1, largest=False
                ).indices
                rows = (drop + 4 * torch.arange(N // 4).unsqueeze(1)).flatten()
                prune[rows, i1 + i] = True
            elif i % 4 == 0:
                score = W1[:, i : i + 4] ** 2 / torch.diag(Hinv1)[i : i + 4].unsqueeze(0) ** 2
                drop = torch.topk(score, 2, dim=1, largest=False).indices
                prune[:, i1 + i : i1 + i + 4].scatter_(1, drop, True)
            col = W1[:, i]
            q = col.masked_fill(prune[:, i1 + i], 0.0)
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if not update_weights:
        return w.detach().masked_fill(prune, 0.0)
    return W.masked_fill(prune, 0.0).to(w.dtype)


class SparseGPTPrune(Pass):
    """SparseGPT (with weight update by default; ``update_weights=False`` keeps the original
    weights under its mask), layer by layer: the Hessians of a transformer layer's linears are
    collected by running the calibration batches through the graph whose earlier layers are
    already pruned, as the method prescribes."""

    name = "sparsegpt"

    def __init__(
        self,
        update_weights: bool = True,
        block: int = 128,
        damp: float = 0.01,
        down_along: str = "d_ff",
    ):
        if down_along not in ("d_ff", "d_model"):
            raise ValueError(
                f"sparsegpt: down_along must be 'd_ff' or 'd_model', got {down_along!r}"
            )
        self.update_weights = update_weights
        self.block = block
        self.damp = damp
        self.down_along = down_along

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets, skipped = maskable_linears(gm)
        by_layer: dict[Any, list[tuple[fx.Node, dict[str, Any]]]] = {}
        for node, info in targets:
            by_layer.setdefault(info["layer"], []).append((node, info))
        pruned = 0
        layers = sorted(by_layer, key=lambda x: (x is None, x))
        for layer in track(layers, "sparsegpt: layers", unit="layer"):
            group = by_layer[layer]
            hess = observe_linear_inputs(
                gm,
                ctx,
                [n for n, _ in group],
                lambda acc, x: x.T @ x if acc is None else acc + x.T @ x,
                desc=f"sparsegpt: layer {layer} Hessians",
            )
            for node, info in group:
                w = gm.get_parameter(info["weight"])
                along_out = (
                    self.down_along == "d_model"
                    and info.get("role") == "down"
                    and w.shape[0] % 4 == 0
                )
                with torch.no_grad():
                    w.copy_(
                        sparsegpt_24(
                            w,
                            hess[node.name],
                            block=self.block,
                            damp=self.damp,
                            update_weights=self.update_weights,
                            along_out=along_out,
                        )
                    )
                info["masked"] = self.name
                info["mask_axis"] = "out" if along_out else "in"
                pruned += 1
        return PassResult(
            gm,
            pruned > 0,
            {"layers_pruned": pruned, "skipped": skipped, "update_weights": self.update_weights},
        )
