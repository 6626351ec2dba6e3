"""Lower: map the annotated graph onto pysparse's kernels.

1. FFN blocks whose activation is ReLU or FATReLU (after ``relu`` / ``prosparse``) become one
   activation-sparse op each (ProSparse inference): gated ``down(act(gate(x)) * up(x))`` ->
   ``pysparse::sparse_ffn``, plain ``down(act(up(x) + b1)) + b2`` -> ``pysparse::sparse_mlp``; when
   all of the block's linears were compressed 2:4, the 2:4 forms ``sparse_ffn24`` /
   ``sparse_mlp24`` (the down projection regrouped with ``formats.pack_down24``, or, when its mask
   runs along d_model (``down_along="d_model"``), in the by-row layout compress24 made). A block is left
   to step 2 when its shape does not fit (fused gate_up, biases on a gated FFN, views between the
   nodes, a dtype other than fp32/bf16, only some linears compressed); the report says why. A
   block with activation predictors (``predictor``) passes their mask (the pass's
   ``pysparse::ffn_predict`` node) as the op's ``predicted``.
2. Every other packed linear (see Compress24) becomes ``pysparse::sparse24_linear``.
3. Every linear left dense (the lm_head; the projections of a model without 2:4) becomes
   ``pysparse::dense_linear``: the same product, on the core's multi-threaded GEMV from a few rows
   of x (a decode step), torch's ``linear`` otherwise. Measured on SmolLM2 (AMD EPYC, 2 threads):
   the fp32 lm_head alone took half of a 2:4 + act-sparse decode step on torch's BLAS GEMV, which
   ran on one thread. ``Lower(dense=False)`` keeps them as they are.
4. In the generation step graph only (``mirror``), torch's attention becomes
   ``pysparse::attention``: the core's decode kernel for a step's few query rows, torch's
   attention for a prefill. Measured on SmolLM2 (AMD EPYC, 2 threads): torch's CPU attention took
   29 us (fp32) / 80 us (bf16) per layer of a decode step, ~25% of a bf16 2:4 + act-sparse step.
   The forward graph keeps torch's attention (its ONNX and TorchScript exports translate it).
   ``Lower(attention=False)`` keeps it everywhere.
5. Linears of one kind (2:4 or dense) that read the same input — q, k and v; the gate and up of an
   FFN no FFN op took (SiLU) — become one op over their weights stacked by rows, each output a
   slice of its result (the weights' records say which rows: ``formats.dense_weight`` reads them
   back). The same dot products, in one weight stream and one parallel region instead of three.
   ``Lower(fuse=False)`` keeps them apart.

Dense weights nothing reads any more are dropped. The result stays exportable (every op has a fake
implementation) and must give the same outputs as before (the PassManager spot-checks it).
``Lower(ffn=False)`` skips step 1."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from pysparse.compiler.base import Pass, PassContext, PassResult
from pysparse.compiler.graph import (
    activation_threshold,
    linear_parts,
    module_tensor,
    sync_graph,
    tensor_owner,
)
from pysparse.kernels.formats import pack_down24, record_layout

from .baselines import prunable_linears

aten = torch.ops.aten


def _drop_parameter(gm: fx.GraphModule, target: str) -> None:
    delattr(*tensor_owner(gm, target))


def _drop_unused_attr(gm: fx.GraphModule, node: object) -> int:
    if isinstance(node, fx.Node) and node.op == "get_attr" and not node.users:
        target = node.target
        gm.graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
            _drop_parameter(gm, target)
            return 1
    return 0


def _fatrelu_ge(act: fx.Node) -> list[fx.Node]:
    """The ``ge`` node of a FATReLU ``where(ge(x, t), x, 0)`` (empty for ReLU)."""
    return [act.args[0]] if act.target is aten.where.ScalarOther else []


class _Skip(Exception):
    pass


class Lower(Pass):
    name = "lower"
    after = ("compress24", "relu", "quantize")
    last = True
    preserves_numerics = True

    def __init__(
        self, ffn: bool = True, dense: bool = True, attention: bool = True, fuse: bool = True
    ):
        self.ffn = ffn
        self.dense = dense
        self.attention = attention
        self.fuse = fuse

    def settings(self):
        return {
            "ffn": self.ffn,
            "dense": self.dense,
            "attention": self.attention,
            "fuse": self.fuse,
        }

    def mirror(
        self, primary: fx.GraphModule, secondary: fx.GraphModule, ctx: PassContext
    ) -> dict[str, Any]:
        """Lowers ``secondary`` the same way, taking the kernel tensors this pass made for
        ``primary`` (regrouped down projections, transposed downs, stacked siblings) instead of
        making them again: both graphs are captures of one model, so FFN ``layer`` k is the same
        block in each. Reports how many of the step graph's attentions it lowered."""
        sync_graph(primary, secondary)
        self._lower(secondary, reuse=dict(primary.named_buffers()))
        if not self.attention:
            return {}
        return {"step_attention_lowered": _lower_attention(secondary.graph)}

    # ---- step 1: FFN blocks -------------------------------------------------------------------
    def _lower_ffn(
        self, gm: fx.GraphModule, block: dict, infos: dict, reuse: dict[str, torch.Tensor]
    ) -> tuple[str, int]:
        """Rewrites one block; returns (the op used, dense weights dropped) or raises _Skip."""
        m = _match_ffn(gm, block, infos)
        with gm.graph.inserting_before(m.down):
            op, args = _ffn_op_args(gm, m, block, reuse)
            new = gm.graph.call_function(op, args)
        new.meta = dict(m.down.meta)
        new.meta["pysparse"] = {"lowered": op.name(), "layer": block["layer"], "threshold": m.t}
        if m.keep is not None:
            new.meta["pysparse"]["predicted"] = True
        m.down.replace_all_uses_with(new)
        for n in [m.down, *reversed(m.inner)]:
            gm.graph.erase_node(n)
        dropped = sum(_drop_unused_attr(gm, p[1]) for p in m.parts.values())
        for v in m.packed.values() if m.n_packed else ():
            for name in v:
                if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
                    _drop_parameter(gm, name)
        block["lowered"] = op.name()
        return op.name(), dropped

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return self._lower(gm, reuse={})

    def _lower(self, gm: fx.GraphModule, reuse: dict[str, torch.Tensor]) -> PassResult:
        lowered, dropped = 0, 0
        graph = gm.graph
        ffn_ops: dict[str, int] = {}
        ffn_skipped: dict[str, int] = {}
        if self.ffn:
            infos = {n.name: n.meta.get("pysparse", {}) for n in graph.nodes}
            for block in gm.meta["pysparse"]["ffns"]:
                try:
                    op, d = self._lower_ffn(gm, block, infos, reuse)
                except _Skip as why:
                    ffn_skipped[str(why)] = ffn_skipped.get(str(why), 0) + 1
                    continue
                ffn_ops[op] = ffn_ops.get(op, 0) + 1
                dropped += d
        left_dense = 0
        for node, info in prunable_linears(gm):
            if not info.get("packed"):
                continue
            if info.get("packed_by_row"):  # only the FFN kernels run that layout
                left_dense += 1
                continue
            vname, mname = info["packed"]
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else None
            quant = info.get("packed_quant", info.get("quant"))
            with graph.inserting_before(node):
                v = graph.get_attr(vname)
                m = graph.get_attr(mname)
                if quant and quant["bits"] == 4:
                    op = torch.ops.pysparse.sparse24_int4_linear.default
                    args = (x, v, m, graph.get_attr(quant["scale"]), quant["group"], bias)
                elif quant:
                    op = torch.ops.pysparse.sparse24_int8_linear.default
                    args = (x, v, m, graph.get_attr(quant["scale"]), bias)
                else:
                    op = torch.ops.pysparse.sparse24_linear.default
                    args = (x, v, m, bias)
                new = graph.call_function(op, args)
            new.meta = dict(node.meta)
            new.meta["pysparse"] = {**info, "lowered": op.name().split("::")[1]}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            lowered += 1
            if isinstance(weight, fx.Node) and weight.op == "get_attr" and not weight.users:
                graph.erase_node(weight)
                _drop_parameter(gm, weight.target)
                dropped += 1
        report = {"linears_lowered": lowered, "dense_weights_dropped": dropped}
        quantized = _lower_quantized(gm)
        if quantized:
            report["quantized_linears_lowered"] = quantized
        if self.dense:
            report["dense_linears_lowered"] = _lower_dense(graph)
        if self.fuse:
            fused = _fuse_siblings(gm, reuse)
            if fused:
                report["sibling_linears_fused"] = fused
        if left_dense:
            report["down_along_d_model_left_dense"] = left_dense
        if self.ffn:
            report["ffns_lowered"] = ffn_ops
            if ffn_skipped:
                report["ffns_not_lowered"] = ffn_skipped
        _drop_unused_quantized(gm)
        changed = (
            lowered > 0
            or bool(ffn_ops)
            or bool(report.get("dense_linears_lowered"))
            or quantized > 0
        )
        return PassResult(gm, changed, report)


def _lower_quantized(gm: fx.GraphModule) -> int:
    """Every linear the quantize pass made int8 or int4 and Compress24 did not pack becomes
    ``pysparse::int8_linear`` / ``pysparse::int4_linear`` over its quantised weight and scales;
    returns how many. Its float weight goes when nothing else reads it. (An int4 weight grouped
    over 2:4 kept values, left unpacked, has groups of ``2 * group`` columns: the kernels take 64
    at most, so a g64 one stays a float linear over its dequantised weight.)"""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        info = node.meta.get("pysparse") or {}
        quant = info.get("quant")
        if node.op != "call_function" or node.target is not aten.linear.default or not quant:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if quant["bits"] == 4:
            group = quant["group"] * (2 if quant.get("sparse24") else 1)
            if group > 64:
                continue
            op = torch.ops.pysparse.int4_linear.default
        else:
            op = torch.ops.pysparse.int8_linear.default
        with graph.inserting_before(node):
            q, scale = graph.get_attr(quant["qweight"]), graph.get_attr(quant["scale"])
            args = (x, q, scale, group, bias) if quant["bits"] == 4 else (x, q, scale, bias)
            new = graph.call_function(op, args)
        new.meta = dict(node.meta)
        new.meta["pysparse"] = {**info, "lowered": op.name().split("::")[1]}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        _drop_unused_attr(gm, weight)
        count += 1
    return count


def _drop_unused_quantized(gm: fx.GraphModule) -> None:
    """The quantize pass's int8/int4 weights that no op reads any more (Compress24 packed
    them)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name.startswith("pysparse__") and name.endswith("__qweight") and name not in used:
            _drop_parameter(gm, name)


def _lower_dense(graph: fx.Graph) -> int:
    """Step 3: every ``aten.linear`` left becomes ``pysparse::dense_linear``; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.pysparse.dense_linear.default, (x, weight, bias))
        new.meta = dict(node.meta)
        new.meta["pysparse"] = {**node.meta.get("pysparse", {}), "lowered": "dense_linear"}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def _fusable() -> dict[Any, tuple[str, ...]]:
    """The ops step 5 stacks, with the names of their weight arguments (looked up when the pass
    runs: pysparse imports without its extension, the ops do not exist then)."""
    return {
        torch.ops.pysparse.sparse24_linear.default: ("values", "meta"),
        torch.ops.pysparse.dense_linear.default: ("weight",),
        torch.ops.pysparse.sparse24_int8_linear.default: ("values", "meta", "scale"),
        torch.ops.pysparse.int8_linear.default: ("qweight", "scale"),
        torch.ops.pysparse.sparse24_int4_linear.default: ("values", "meta", "scale", "group"),
        torch.ops.pysparse.int4_linear.default: ("qweight", "scale", "group"),
    }


def _linear_args(node: fx.Node, kinds: tuple[str, ...]) -> tuple[list[Any], Any]:
    """(weight tensors' nodes, bias node or None) of a linear op call taking ``kinds`` arguments
    after x (tensors, then an int4 op's group, which is not returned), then the bias."""
    tensors = [k for k in kinds if k != "group"]
    weights = list(node.args[1 : 1 + len(tensors)])
    bias = node.args[1 + len(kinds)] if len(node.args) > 1 + len(kinds) else None
    return weights, bias


def _fuse_siblings(gm: fx.GraphModule, reuse: dict[str, torch.Tensor]) -> int:
    """Step 5: linears of one kind that read the same input (q, k and v; a SiLU FFN's gate and
    up) become one op over their weights stacked by rows, each output a slice of its result.
    Returns how many linears were merged away. Same products: each output row is the same dot
    product over the same weight row; only the calls change (one weight stream instead of three,
    one parallel region)."""
    graph = gm.graph
    fusable = _fusable()
    groups: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        kinds = fusable.get(node.target) if node.op == "call_function" else None
        if kinds is None:
            continue
        weights, bias = _linear_args(node, kinds)
        if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in weights):
            continue
        if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
            continue
        t = [module_tensor(gm, w.target) for w in weights]
        group = node.args[1 + len(weights)] if "group" in kinds else None
        key = (
            node.target,
            node.args[0],
            t[0].dtype,
            t[0].device,
            t[0].shape[1],
            bias is None,
            group,
        )
        groups.setdefault(key, []).append(node)
    merged = 0
    for (op, *_), nodes in groups.items():
        if len(nodes) > 1:
            _fuse_group(gm, nodes, fusable[op], reuse)
            merged += len(nodes) - 1
    return merged


def _fuse_group(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    kinds: tuple[str, ...],
    reuse: dict[str, torch.Tensor],
) -> None:
    graph = gm.graph
    op = nodes[0].target
    has_bias = _linear_args(nodes[0], kinds)[1] is not None  # (the same for every node: the key)
    parts = []
    for n in nodes:
        weights, bias = _linear_args(n, kinds)
        parts.append(weights + ([bias] if has_bias else []))
    # named after the weights stacked (in order), so that the step graph's mirror takes the same
    # tensors, and only for the same stack
    weights = [
        n.meta.get("pysparse", {}).get("weight") or p[0].target for n, p in zip(nodes, parts)
    ]
    digest = hashlib.sha256("|".join(weights).encode()).hexdigest()[:8]
    base = f"pysparse__fused__{weights[0].replace('.', '__')}__{digest}"
    tensor_kinds = [k for k in kinds if k != "group"]
    group = nodes[0].args[1 + len(tensor_kinds)] if "group" in kinds else None
    names = [base if k == "weight" else f"{base}__{k}" for k in tensor_kinds]
    names += [f"{base}__bias"] if has_bias else []
    rows = [module_tensor(gm, p[0].target).shape[0] for p in parts]
    x_val = nodes[0].args[0].meta.get("val") if isinstance(nodes[0].args[0], fx.Node) else None
    in_features = int(x_val.shape[-1]) if x_val is not None else None
    with graph.inserting_before(nodes[0]):
        attrs = []
        for i, name in enumerate(names):
            made = reuse.get(name)
            if made is None:
                made = torch.cat([module_tensor(gm, p[i].target) for p in parts]).contiguous()
            gm.register_buffer(name, made)
            attrs.append(graph.get_attr(name))
        consts = [group] if group is not None else []
        nt = len(tensor_kinds)
        fused = graph.call_function(
            op, (nodes[0].args[0], *attrs[:nt], *consts, *(attrs[nt:] if has_bias else [None]))
        )
    fused.meta = {"pysparse": {"lowered": op.name(), "fused": [n.name for n in nodes]}}
    if all("val" in n.meta for n in nodes):
        fused.meta["val"] = torch.cat([n.meta["val"] for n in nodes], -1)
    r0 = 0
    for node, part, n_rows, weight in zip(nodes, parts, rows, weights):
        rows_of = (r0, r0 + n_rows)
        if kinds == ("weight",):
            record_layout(gm, weight, "dense", rows=rows_of, tensor=names[0])
        elif kinds == ("qweight", "scale"):
            record_layout(gm, weight, "int8", rows=rows_of, tensor=names[0], scale=names[1])
        elif kinds in (("qweight", "scale", "group"), ("values", "meta", "scale", "group")):
            dense4 = kinds[0] == "qweight"
            tensors = (
                {"tensor": names[0], "scale": names[1]}
                if dense4
                else {"values": names[0], "meta": names[1], "scale": names[2]}
            )
            record_layout(
                gm,
                weight,
                "int4" if dense4 else "int4_rows",
                rows=rows_of,
                group=group,
                in_features=in_features
                or gm.meta["pysparse"]["weight_layouts"].get(weight, {}).get("in_features"),
                **tensors,
            )
        elif kinds == ("values", "meta", "scale"):
            record_layout(
                gm,
                weight,
                "int8_rows",
                rows=rows_of,
                values=names[0],
                meta=names[1],
                scale=names[2],
            )
        else:
            record_layout(gm, weight, "rows", rows=rows_of, values=names[0], meta=names[1])
        if has_bias:
            record_layout(gm, part[-1].target, "dense", rows=(r0, r0 + n_rows), tensor=names[-1])
        with graph.inserting_before(node):
            piece = graph.call_function(aten.slice.Tensor, (fused, -1, r0, r0 + n_rows))
        piece.meta = dict(node.meta)
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
        for p in part:
            _drop_unused_attr(gm, p)
        r0 += n_rows


def _lower_attention(graph: fx.Graph) -> int:
    """Step 4: torch's attention (no dropout) -> ``pysparse::attention``; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if (
            node.op != "call_function"
            or node.target is not aten.scaled_dot_product_attention.default
        ):
            continue
        names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal")
        args = {**dict(zip(names, node.args)), **node.kwargs}
        if args.get("dropout_p", 0.0) != 0.0:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.pysparse.attention.default,
                (args["q"], args["k"], args["v"], args.get("attn_mask")),
                {
                    "is_causal": bool(args.get("is_causal", False)),
                    "scale": args.get("scale"),
                    "enable_gqa": bool(args.get("enable_gqa", False)),
                },
            )
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


@dataclass
class _FfnMatch:
    """An FFN block's nodes as ``_match_ffn`` found them, ready to lower."""

    down: fx.Node
    gated: bool
    t: float  # 0 for ReLU, the FATReLU threshold
    keep: fx.Node | None  # the predictor's mask (passes.predictor), or None
    parts: dict[str, tuple]  # role -> linear_parts (input, weight, bias)
    inner: list[fx.Node]  # the nodes the op replaces, down excluded
    w: dict[str, torch.Tensor]  # role -> weight
    packed: dict[str, Any]  # role -> (values, meta) buffer names when 2:4-packed
    n_packed: int
    by_row: bool  # the 2:4 down projection is masked along d_model (packed by row)
    quant: dict[str, dict] | None = None  # role -> the quantize pass's record (int8 weights)


def _match_ffn(gm: fx.GraphModule, block: dict, infos: dict) -> _FfnMatch:
    """The block's nodes, checked to be exactly the FFN the ops compute, or _Skip saying why."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if block.get("gate_up"):
        raise _Skip("fused gate_up projection")
    act = nodes.get(block["act"])
    down = nodes.get(block["down"])
    up = nodes.get(block["up"]) if block.get("up") else None
    gate = nodes.get(block["gate"]) if block.get("gate") else None
    if act is None or down is None or up is None:
        raise _Skip("block nodes not found")
    t = activation_threshold(act)
    if t is None:
        raise _Skip(f"activation {act.target} is not ReLU/FATReLU")
    act_in = act.args[0] if act.target is aten.relu.default else act.args[1]
    # With activation predictors (passes.predictor) the block reads x1 * keep: the op takes keep
    # as its ``predicted`` mask and the product goes.
    pred = block.get("predictor")
    kept = nodes.get(pred["kept"]) if pred else act
    keep = nodes.get(pred["keep"]) if pred else None
    if kept is None or (pred and keep is None):
        raise _Skip("predictor nodes not found")
    gated = block["kind"] == "gated"
    parts = {"down": linear_parts(down), "up": linear_parts(up)}
    if gated:
        parts["gate"] = linear_parts(gate) if gate is not None else None
    if any(v is None for v in parts.values()):
        raise _Skip("a projection is not a plain linear over a module weight")
    if gated:
        mul = down.args[0]
        ok = (
            act_in is gate
            and isinstance(mul, fx.Node)
            and mul.target is aten.mul.Tensor
            and set(mul.args) == {kept, up}
            and parts["gate"][0] is parts["up"][0]
        )
        if not ok:
            raise _Skip("nodes between the FFN's ops (views or casts)")
        if any(parts[r][2] is not None for r in ("gate", "up", "down")):
            raise _Skip("biases on a gated FFN")
        inner = [gate, up, *_fatrelu_ge(act), act, *([kept] if pred else []), mul]
    else:
        if not (act_in is up and down.args[0] is kept):
            raise _Skip("nodes between the FFN's ops (views or casts)")
        inner = [up, *_fatrelu_ge(act), act, *([kept] if pred else [])]
    for n in inner:
        if not set(n.users) <= {down} | set(inner):
            raise _Skip(f"{n.name} has users outside the FFN")
    w = {r: module_tensor(gm, p[1].target) for r, p in parts.items()}
    dtypes = {v.dtype for v in w.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16):
        raise _Skip(f"weights are {sorted(map(str, dtypes))}, the FFN ops take fp32 or bf16")
    if w["down"].shape[0] != w["up"].shape[1]:  # the ops return d_model features
        raise _Skip("the down projection's out_features differ from the FFN's in_features")
    linears = {"down": down, "up": up, **({"gate": gate} if gated else {})}
    packed = {r: infos.get(n.name, {}).get("packed") for r, n in linears.items()}
    n_packed = sum(1 for v in packed.values() if v)
    if n_packed and (n_packed != len(packed) or w["up"].shape[1] % 4 or w["up"].shape[0] % 4):
        raise _Skip("only some of the FFN's linears are 2:4 (or padded)")
    by_row = bool(infos.get(down.name, {}).get("packed_by_row"))
    quant = {r: infos.get(n.name, {}).get("quant") for r, n in linears.items()}
    int8_ok = (
        all(q and q["bits"] == 8 for q in quant.values())
        and gated
        and n_packed == len(packed)
        and not by_row
    )
    if any(quant.values()) and not int8_ok:
        raise _Skip(
            "int8 weights: the int8 FFN op takes a gated FFN with all three linears 2:4 and "
            "int8 (Quantize(ffn=False) keeps the others in float)"
        )
    return _FfnMatch(
        down,
        gated,
        t,
        keep,
        parts,
        inner,
        w,
        packed,
        n_packed,
        by_row,
        quant if any(quant.values()) else None,
    )


def _ffn_op_args(
    gm: fx.GraphModule, m: _FfnMatch, block: dict, reuse: dict[str, torch.Tensor]
) -> tuple[Any, tuple]:
    """The FFN op for a matched block and its arguments; registers the kernel tensors it needs
    (transposed or regrouped down projections; ``reuse``'s when given). Called inside the
    graph's ``inserting_before(down)``."""
    prefix = f"pysparse_ffn{block['layer']}"
    graph, parts, packed, gated = gm.graph, m.parts, m.packed, m.gated
    x = parts["up"][0]

    def attr(name: str, make: Callable[[], torch.Tensor]) -> fx.Node:
        full = f"{prefix}_{name}"
        made = reuse.get(full)
        gm.register_buffer(full, made if made is not None else make().detach().contiguous())
        return graph.get_attr(full)

    regrouped: list[tuple[torch.Tensor, torch.Tensor]] = []

    def down24(i: int) -> torch.Tensor:  # pack_down24 once for both of its outputs
        if not regrouped:
            regrouped.append(
                pack_down24(gm.get_buffer(packed["down"][0]), gm.get_buffer(packed["down"][1]))
            )
        return regrouped[0][i]

    if m.n_packed:
        if m.by_row:
            down_args = tuple(graph.get_attr(n) for n in packed["down"])  # masked along d_model
        else:  # masked along d_ff: regroup by groups of 4 neurons
            down_args = (
                attr("down24_values", lambda: down24(0)),
                attr("down24_meta", lambda: down24(1)),
            )
            record_layout(
                gm,
                parts["down"][1].target,
                "int8_down24" if m.quant else "down24",
                values=f"{prefix}_down24_values",
                meta=f"{prefix}_down24_meta",
                **({"scale": m.quant["down"]["scale"]} if m.quant else {}),
            )
        first = parts["gate" if gated else "up"]
        fv, fm = (graph.get_attr(n) for n in packed["gate" if gated else "up"])
        if m.quant:
            uv, um = (graph.get_attr(n) for n in packed["up"])
            gs, us, ds = (graph.get_attr(m.quant[r]["scale"]) for r in ("gate", "up", "down"))
            op = torch.ops.pysparse.sparse_ffn24_int8.default
            args = (x, fv, fm, gs, uv, um, us, down_args[0], down_args[1], ds, m.t)
        elif gated:
            uv, um = (graph.get_attr(n) for n in packed["up"])
            op = torch.ops.pysparse.sparse_ffn24.default
            args = (x, fv, fm, uv, um, *down_args, m.t)
        else:
            op = torch.ops.pysparse.sparse_mlp24.default
            args = (x, fv, fm, first[2], *down_args, parts["down"][2], m.t)
    else:
        down_t = attr("down_t", lambda: m.w["down"].T)
        record_layout(gm, parts["down"][1].target, "transposed", tensor=f"{prefix}_down_t")
        if gated:
            op = torch.ops.pysparse.sparse_ffn.default
            args = (x, parts["gate"][1], parts["up"][1], down_t, m.t)
        else:
            op = torch.ops.pysparse.sparse_mlp.default
            args = (x, parts["up"][1], parts["up"][2], down_t, parts["down"][2], m.t)
    if m.keep is not None:
        args = (*args, m.keep)
    return op, args
