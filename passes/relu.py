"""ReluSubstitution: the first step of ProSparse (arXiv 2402.13516) — replace the activation of
every FFN (SiLU, GELU, any element-wise one) with ReLU, or with FATReLU ``x if x >= t else 0`` when
a threshold is given. Only the activation node of each annotated FFN block changes: attention,
GELUs outside FFNs, norms and everything else are left alone. Gated FFNs keep their up branch
linear (``relu(gate(x)) * up(x)``), as the paper prescribes."""

from __future__ import annotations

import torch
from torch import fx

from pysparse.compiler.base import Pass, PassContext, PassResult
from pysparse.compiler.graph import set_activation

aten = torch.ops.aten


class ReluSubstitution(Pass):
    name = "relu"

    def __init__(self, threshold: float | None = None):
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"ReluSubstitution: threshold must be >= 0, got {threshold}")
        self.threshold = threshold

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in gm.graph.nodes}
        replaced, previous = 0, set()
        want = "relu" if not self.threshold else "fatrelu"
        for block in gm.meta["pysparse"]["ffns"]:
            act = nodes[block["act"]]
            if block.get("act_op") == want and block.get("threshold") == self.threshold:
                continue
            previous.add(block["act_op"])
            if "original" not in block:  # how to rebuild the model's own activation (teachers)
                block["original"] = {
                    "target": act.target,
                    "args": list(act.args[1:]),
                    "kwargs": dict(act.kwargs),
                }
            set_activation(gm, block, want, self.threshold)
            block.update(act_op=want, threshold=self.threshold)
            replaced += 1
        return PassResult(
            gm,
            replaced > 0,
            {"ffn_activations_replaced": replaced, "replaced_ops": sorted(previous), "now": want},
        )

    def settings(self):
        return {"threshold": self.threshold}

    def ensures(self, gm: fx.GraphModule) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for block in gm.meta["pysparse"]["ffns"]:
            act = nodes[block["act"]]
            ok = act.target in (aten.relu.default, aten.where.ScalarOther)
            assert ok, f"FFN layer {block['layer']} still uses {act.target}"
