"""Graph queries and edits that passes share: the module tensors a ``get_attr`` names, a linear's
parts, FFN activations (ReLU / FATReLU / the original), taps (observer calls put into a graph for
calibration, evaluation and training), and keeping a second capture of the model (the generation
step graph) in line with the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


def tensor_attrs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``gm`` by dotted name."""
    return {**dict(gm.named_parameters()), **dict(gm.named_buffers())}


def tensor_owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """(the submodule holding a dotted parameter/buffer name, its last part)."""
    owner_path, _, attr = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), attr


def module_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer a ``get_attr`` target names."""
    return getattr(*tensor_owner(gm, target))


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(input, weight, bias or None) of an ``aten.linear`` whose weight (and bias) are module
    tensors (``get_attr``), else None."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    return x, w, b


def set_tensor_attr(gm: fx.GraphModule, name: str, t: torch.Tensor) -> None:
    owner, attr = tensor_owner(gm, name)
    if isinstance(t, torch.nn.Parameter):
        if attr in owner._buffers:
            del owner._buffers[attr]
        owner.register_parameter(attr, t)
    else:
        if attr in owner._parameters:
            del owner._parameters[attr]
        owner.register_buffer(attr, t)


# A tap: (node, fn, extra args, where). where "input": ``fn(node's first input, *args)`` runs
# before the node and the node reads its result; "output": ``fn(node, *args)`` runs after it and
# every other user reads its result; "side": ``fn(*args)`` runs before the node, nothing rewired.
Tap = tuple[fx.Node, Callable[..., Any], tuple, str]


def add_taps(gm: fx.GraphModule, taps: Sequence[Tap]) -> list[fx.Node]:
    """Puts observer calls into ``gm``'s graph (see ``Tap``) and recompiles; returns the new nodes
    for ``remove_taps``. What calibration, evaluation and ProSparse watch the graph with."""
    added = []
    for node, fn, args, where in taps:
        if where == "input":
            x = node.args[0]
            with gm.graph.inserting_before(node):
                tap = gm.graph.call_function(fn, (x, *args))
            node.replace_input_with(x, tap)
        elif where == "output":
            with gm.graph.inserting_after(node):
                tap = gm.graph.call_function(fn, (node, *args))
            node.replace_all_uses_with(tap, delete_user_cb=lambda u, tap=tap: u is not tap)
        elif where == "side":
            with gm.graph.inserting_before(node):
                tap = gm.graph.call_function(fn, tuple(args))
        else:
            raise ValueError(f"add_taps: where must be input, output or side, got {where!r}")
        tap.meta["pysparse_tap"] = where
        added.append(tap)
    gm.recompile()
    return added


def remove_taps(gm: fx.GraphModule, taps: Sequence[fx.Node]) -> None:
    """Takes ``add_taps``' nodes out again; the graph is as before."""
    for tap in taps:
        if tap.meta.get("pysparse_tap") != "side":
            tap.replace_all_uses_with(tap.args[0])
        gm.graph.erase_node(tap)
    gm.recompile()


@contextlib.contextmanager
def tapped(gm: fx.GraphModule, taps: Sequence[Tap]) -> Iterator[list[fx.Node]]:
    """``add_taps`` for the duration of a ``with`` block, removed however it ends."""
    added = add_taps(gm, taps)
    try:
        yield added
    finally:
        remove_taps(gm, added)


def activation_threshold(act: fx.Node) -> float | None:
    """0.0 for ReLU, t for FATReLU ``where(ge(x, t), x, 0)``, None for anything else."""
    if act.target is aten.relu.default:
        return 0.0
    if act.target is aten.where.ScalarOther:
        keep = act.args[0]
        if (
            isinstance(keep, fx.Node)
            and keep.target is aten.ge.Scalar
            and keep.args[0] is act.args[1]
            and act.args[2] == 0
        ):
            return float(keep.args[1])
    return None


def set_activation(
    gm: fx.GraphModule, block: dict, kind: str, threshold: float | None = None
) -> None:
    """Rewrites one annotated FFN block's activation node to ``kind``: ``"relu"``, ``"fatrelu"``
    (with ``threshold``) or ``"original"`` (the op ReluSubstitution replaced, recorded in
    ``block["original"]``). The caller recompiles."""
    nodes = {n.name: n for n in gm.graph.nodes}
    act = nodes[block["act"]]
    x = act.args[0]
    if act.target is aten.where.ScalarOther:  # FATReLU: where(ge(x, t), x, 0)
        x = act.args[1]
    with gm.graph.inserting_after(act):
        if kind == "relu" or (kind == "fatrelu" and not threshold):
            new = gm.graph.call_function(aten.relu.default, (x,))
        elif kind == "fatrelu":
            keep = gm.graph.call_function(aten.ge.Scalar, (x, float(threshold)))
            with gm.graph.inserting_after(keep):
                new = gm.graph.call_function(aten.where.ScalarOther, (keep, x, 0.0))
        else:
            o = block["original"]
            new = gm.graph.call_function(o["target"], (x, *o["args"]), o["kwargs"])
    new.meta = dict(act.meta)
    old_cond = act.args[0] if act.target is aten.where.ScalarOther else None
    act.replace_all_uses_with(new)
    gm.graph.erase_node(act)
    if old_cond is not None and not old_cond.users:
        gm.graph.erase_node(old_cond)
    block["act"] = new.name


def sync_graph(primary: fx.GraphModule, secondary: fx.GraphModule) -> None:
    """Brings ``secondary`` in line with ``primary``, two captures of one model whose tensors have
    the same names: every tensor of ``primary`` the other holds, or that a pass added (packed
    2:4 buffers), becomes the same tensor there; each linear's record (mask axis, packing) is
    copied by weight name; each FFN's activation is rewritten to match (ReLU, FATReLU threshold,
    the original). Graph rewrites beyond activations are the passes' own (``Pass.mirror``)."""
    theirs = tensor_attrs(secondary)
    for name, t in tensor_attrs(primary).items():
        if theirs.get(name) is not t and (name in theirs or name.startswith("pysparse__")):
            set_tensor_attr(secondary, name, t)
    pmeta, smeta = primary.meta["pysparse"], secondary.meta["pysparse"]
    by_weight = {i["weight"]: i for i in pmeta["linears"].values() if i.get("weight")}
    for info in smeta["linears"].values():
        src = by_weight.get(info.get("weight"))
        if src is not None:
            info.update({k: v for k, v in src.items() if k != "layer"})
    pnodes = {n.name: n for n in primary.graph.nodes}
    snodes = {n.name: n for n in secondary.graph.nodes}

    def down_weight(meta: dict, block: dict) -> str | None:
        return meta["linears"].get(block["down"], {}).get("weight")

    pblocks = {down_weight(pmeta, b): b for b in pmeta["ffns"]}
    changed = False
    for block in smeta["ffns"]:
        src = pblocks.get(down_weight(smeta, block))
        if src is None or src["act"] not in pnodes or block["act"] not in snodes:
            continue
        want = activation_threshold(pnodes[src["act"]])
        have = activation_threshold(snodes[block["act"]])
        if want == have and (want is not None or src.get("act_op") == block.get("act_op")):
            continue
        if "original" in src and "original" not in block:
            block["original"] = src["original"]
        if want is None:
            if "original" in block:
                set_activation(secondary, block, "original")
        else:
            set_activation(secondary, block, "fatrelu" if want else "relu", want or None)
        for key in ("act_op", "threshold"):
            if key in src:
                block[key] = src[key]
        changed = True
    if changed:
        secondary.recompile()
