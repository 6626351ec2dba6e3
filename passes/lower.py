"""Lower: replace every packed linear (see Compress24) with ``torch.ops.pysparse.sparse24_linear``
reading the packed buffers, and drop the dense weights nothing reads any more. The result runs on
pysparse's kernels, stays exportable (the op has a fake implementation) and must give the same
outputs as before (the PassManager spot-checks it)."""

from __future__ import annotations

import torch
from torch import fx

from pysparse.pipeline import Pass, PassContext, PassResult

from .baselines import prunable_linears


def _drop_parameter(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, attr)


class Lower(Pass):
    name = "lower"
    after = ("compress24", "relu")
    last = True
    preserves_numerics = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lowered, dropped = 0, 0
        graph = gm.graph
        for node, info in prunable_linears(gm):
            if not info.get("packed"):
                continue
            vname, mname = info["packed"]
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            with graph.inserting_before(node):
                v = graph.get_attr(vname)
                m = graph.get_attr(mname)
                new = graph.call_function(
                    torch.ops.pysparse.sparse24_linear.default, (x, v, m, bias)
                )
            new.meta = dict(node.meta)
            new.meta["pysparse"] = {**info, "lowered": "sparse24_linear"}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            lowered += 1
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and not weight.users:
                graph.erase_node(weight)
                _drop_parameter(gm, weight.target)
                dropped += 1
        return PassResult(
            gm, lowered > 0, {"linears_lowered": lowered, "dense_weights_dropped": dropped}
        )
