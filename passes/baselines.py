"""Baseline 2:4 masks (ALGORITHMS.md, "Baselines"): magnitude and Wanda. The masked weights stay
dense here (Compress24 packs them); the mask is applied to the live parameters of the captured
graph. Linears whose in_features is not a multiple of 4 are skipped and reported."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import fx

from pysparse import ops
from pysparse.pipeline import Pass, PassContext, PassResult, _call_graph

_log = logging.getLogger(__name__)
aten = torch.ops.aten


def prunable_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, dict[str, Any]]]:
    return [
        (n, n.meta["pysparse"])
        for n in gm.graph.nodes
        if "pysparse" in n.meta and n.meta["pysparse"].get("prunable")
    ]


class _MaskPass(Pass):
    """Shared loop: score each prunable weight, keep the top 2 of every group of 4."""

    def scores(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, torch.Tensor | None]:
        return {}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        scores = self.scores(gm, ctx)
        pruned, skipped, kept, total = [], [], 0, 0
        for node, info in prunable_linears(gm):
            w = gm.get_parameter(info["weight"])
            if w.shape[1] % 4:
                skipped.append(f"{info['weight']}: in_features={w.shape[1]} is not a multiple of 4")
                info["prunable"] = False
                continue
            with torch.no_grad():
                w.copy_(ops.prune24(w.detach(), scores.get(node.name)))
            info["masked"] = self.name
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
    (collected by running the captured graph with an interpreter that watches aten.linear)."""

    name = "wanda"

    def scores(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, torch.Tensor | None]:
        sumsq: dict[str, torch.Tensor] = {}

        def observe(x: torch.Tensor, key: str) -> torch.Tensor:
            x2 = x.detach().reshape(-1, x.shape[-1]).double()
            acc = sumsq.setdefault(key, torch.zeros(x.shape[-1], dtype=torch.float64))
            acc += (x2 * x2).sum(0)
            return x

        # Temporary observer nodes on the inputs of the prunable linears, removed afterwards.
        observers = []
        for node, _ in prunable_linears(gm):
            with gm.graph.inserting_before(node):
                obs = gm.graph.call_function(observe, (node.args[0], node.name))
            node.replace_input_with(node.args[0], obs)
            observers.append(obs)
        gm.recompile()
        try:
            for args, kwargs in ctx.calibration_batches():
                _call_graph(gm, args, kwargs)
        finally:
            for obs in observers:
                obs.replace_all_uses_with(obs.args[0])
                gm.graph.erase_node(obs)
            gm.recompile()
        out: dict[str, torch.Tensor | None] = {}
        for n, info in prunable_linears(gm):
            if n.name in sumsq:
                w = gm.get_parameter(info["weight"]).detach().abs().double()
                out[n.name] = (w * sumsq[n.name].sqrt()).float()
        return out
