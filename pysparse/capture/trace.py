"""Capture a model as a torch.fx GraphModule and annotate its transformer structure.

Capture goes through ``torch.export.export(..., strict=False)`` for every model: with torch 2.14 and
transformers 5, ``torch.fx.symbolic_trace`` fails on Hugging Face decoders and HF's own fx tracer
is gone, while export succeeds and ``ep.module()`` is a GraphModule of ATen ops (``aten.linear``
kept whole) that matches eager. One capture path means one set of patterns for the passes.

Why the passes can train what was captured: ``ep.module()`` holds the *same* parameter tensors as
the model (shared storage, ``requires_grad`` kept; checked in tests), so a learning pass may
optimise ``gm.parameters()`` directly and gradients flow through the captured graph. The flip
side: passes that change weights change the caller's model, so ``pysparse.compile`` captures a
deep copy unless told otherwise.

Annotation is by graph structure, never by parameter name:
  * gated FFN:  ``down(act(gate(x)) * up(x))`` (also a fused gate_up linear split in two),
  * plain FFN:  ``down(act(up(x)))`` (BERT/MiniLM),
  * attention:  linears whose outputs feed attention (``qkv``) and the one reading its result (``o``),
  * ``head``:   linears after the last FFN (lm_head, pooler) and linears sharing an embedding's
                weight: never pruned.
Every prunable ``aten.linear`` node gets ``node.meta["pysparse"] = {"role", "layer", "weight",
"bias", "prunable"}`` and ``gm.meta["pysparse"]["ffns"]`` lists the FFN blocks.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import InputSpec, split_example

_log = logging.getLogger(__name__)
aten = torch.ops.aten

# Element-wise activations an FFN may use (ReLU substitution replaces them).
ACTIVATIONS = {
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.mish.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.hardtanh.default,
}
# Ops that pass a tensor through unchanged at inference (skipped when matching patterns).
TRANSPARENT = {
    aten.dropout.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.detach.default,
}
ATTENTION = {aten.scaled_dot_product_attention.default, aten._softmax.default, aten.softmax.int}
SPLITS = {
    aten.split.Tensor,
    aten.chunk.default,
    aten.split_with_sizes.default,
    aten.unsafe_split.Tensor,
}


class TraceError(RuntimeError):
    """A model could not be captured; the message names the model and what to do."""


@dataclass
class FFNBlock:
    layer: int
    kind: str  # "gated" | "plain"
    act: str  # node name of the activation
    down: str  # node name of the down projection linear
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None  # a fused gate+up linear (then gate/up are None)
    act_op: str = ""


@dataclass
class Annotation:
    ffns: list[FFNBlock] = field(default_factory=list)
    linears: dict[str, dict[str, Any]] = field(default_factory=dict)  # node name -> info

    def to_dict(self) -> dict:
        return {"ffns": [asdict(f) for f in self.ffns], "linears": self.linears}


def _is_linear(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.linear.default


def _skip(n: Any) -> Any:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in TRANSPARENT:
        n = n.args[0]
    return n


def _param_target(n: Any) -> str | None:
    return n.target if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _split_source(n: Any) -> fx.Node | None:
    """For ``getitem(split(linear))`` return that linear."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem:
        src = _skip(n.args[0])
        if isinstance(src, fx.Node) and src.op == "call_function" and src.target in SPLITS:
            lin = _skip(src.args[0])
            if _is_linear(lin):
                return lin
    return None


def _match_ffn(down: fx.Node) -> FFNBlock | None:
    inp = _skip(down.args[0])
    if not isinstance(inp, fx.Node) or inp.op != "call_function":
        return None
    if inp.target in ACTIVATIONS:  # plain: down(act(up(x)))
        up = _skip(inp.args[0])
        if _is_linear(up):
            return FFNBlock(
                layer=-1,
                kind="plain",
                act=inp.name,
                down=down.name,
                up=up.name,
                act_op=str(inp.target),
            )
        return None
    if inp.target is aten.mul.Tensor:  # gated: down(act(gate(x)) * up(x))
        a, b = (_skip(x) for x in inp.args[:2])
        for act, other in ((a, b), (b, a)):
            if not (
                isinstance(act, fx.Node) and act.op == "call_function" and act.target in ACTIVATIONS
            ):
                continue
            gate = _skip(act.args[0])
            if (
                _is_linear(gate)
                and _is_linear(other)
                and _skip(gate.args[0]) is _skip(other.args[0])
            ):
                return FFNBlock(
                    layer=-1,
                    kind="gated",
                    act=act.name,
                    down=down.name,
                    gate=gate.name,
                    up=other.name,
                    act_op=str(act.target),
                )
            fused, fused_other = _split_source(gate), _split_source(other)
            if fused is not None and fused is fused_other:
                return FFNBlock(
                    layer=-1,
                    kind="gated",
                    act=act.name,
                    down=down.name,
                    gate_up=fused.name,
                    act_op=str(act.target),
                )
    return None


def _feeds_attention(n: fx.Node, depth: int = 12) -> bool:
    """Whether n's output reaches an attention op through shape/elementwise ops (not a linear)."""
    frontier, seen = [n], set()
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for u in node.users:
                if u in seen or _is_linear(u):
                    continue
                seen.add(u)
                if u.op == "call_function" and u.target in ATTENTION:
                    return True
                nxt.append(u)
        frontier = nxt
    return False


def annotate(gm: fx.GraphModule) -> Annotation:
    """Finds FFN blocks and prunable linears by structure; writes node.meta and gm.meta."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    ann = Annotation()
    embedding_weights = {
        _param_target(n.args[0])
        for n in nodes
        if n.op == "call_function" and n.target is aten.embedding.default
    }
    # Gated matches first: they are the more specific pattern. A plain match is kept only when
    # none of its linears is already claimed (e.g. act(pre(x)) feeding a fused gate_up is not an FFN).
    matches = [(n, _match_ffn(n)) for n in nodes if _is_linear(n)]
    claimed: set[str] = set()
    blocks: list[FFNBlock] = []
    for kind in ("gated", "plain"):
        for n, block in matches:
            if block is None or block.kind != kind:
                continue
            names = {block.down, block.up, block.gate, block.gate_up} - {None}
            if names & claimed:
                continue
            claimed |= names
            blocks.append(block)
    by_name = {n.name: n for n in nodes}
    blocks.sort(key=lambda b: order[by_name[b.down]])
    ffn_of: dict[str, tuple[FFNBlock, str]] = {}
    for block in blocks:
        block.layer = len(ann.ffns)
        ann.ffns.append(block)
        ffn_of[block.down] = (block, "down")
        for role in ("gate", "up", "gate_up"):
            name = getattr(block, role)
            if name:
                ffn_of[name] = (block, role)
    down_positions = sorted(order[n] for n in nodes if n.name in {b.down for b in ann.ffns})
    last_down = down_positions[-1] if down_positions else -1
    for n in nodes:
        if not _is_linear(n):
            continue
        weight = _param_target(n.args[1])
        bias = _param_target(n.args[2]) if len(n.args) > 2 else None
        info: dict[str, Any] = {"weight": weight, "bias": bias, "prunable": weight is not None}
        if n.name in ffn_of:
            block, role = ffn_of[n.name]
            info.update(role=role, layer=block.layer)
        else:
            layer = sum(1 for p in down_positions if p < order[n])
            if weight in embedding_weights or (ann.ffns and order[n] > last_down):
                info.update(role="head", layer=None, prunable=False)
            elif _feeds_attention(n) or any(
                u.op == "call_function" and u.target in SPLITS for u in n.users
            ):
                info.update(role="qkv", layer=layer)
            else:
                info.update(role="o", layer=layer)
        w = gm.get_parameter(weight) if weight else None
        if w is None or w.dim() != 2:
            info["prunable"] = False
        n.meta["pysparse"] = info
        ann.linears[n.name] = info
    gm.meta["pysparse"] = ann.to_dict()
    return ann


def _model_record(model: torch.nn.Module) -> dict[str, Any]:
    """What the artifact manifest records about the source model: its class and, for Hugging Face
    models, the config (JSON-safe)."""
    record: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        try:
            record["config"] = json.loads(json.dumps(config.to_dict(), default=str))
        except (TypeError, ValueError):  # an exotic config: keep the class name only
            pass
    return record


def _prepare_kwargs(model: torch.nn.Module, kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        # A KV cache object in the outputs is not exportable; pysparse graphs are stateless.
        kwargs.setdefault("use_cache", False)
    return kwargs


def dynamic_shapes_for(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """A ``dynamic_shapes`` spec marking every dimension of every tensor input ``Dim.AUTO`` (export
    decides which are really dynamic), keyed like ``module.forward``'s signature."""

    def one(v: Any) -> Any:
        return (
            {i: torch.export.Dim.AUTO for i in range(v.dim())}
            if isinstance(v, torch.Tensor)
            else None
        )

    sig = inspect.signature(module.forward)
    bound = sig.bind(*args, **kwargs)
    spec: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(one(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: one(v) for k, v in value.items()}
        else:
            spec[name] = one(value)
    return spec


def widen_unit_dims(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Examples to capture with, where the batch (dim 0) or the sequence (dim 1) of every tensor
    input is 1: that dimension repeated to 2. torch.export specialises a dimension whose example
    size is 0 or 1 to that constant even when it is marked dynamic, so a model captured from one
    prompt would refuse a calibration batch of 32 ("Expected input at 'input_ids'.shape[0] to be
    equal to 1"); captured from two, the dimension stays dynamic and size 1 still runs. Only the
    capture sees the widened copies."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]

    def widen(dim: int, ts: list[torch.Tensor]) -> bool:
        return bool(ts) and all(t.dim() > dim and t.shape[dim] == 1 for t in ts)

    dims = [d for d in (0, 1) if widen(d, [t for t in tensors if t.dim() > d])]
    if not dims:
        return args, kwargs  # the same objects: nothing to widen

    def rep(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        for d in dims:
            if v.dim() > d:
                v = torch.cat([v, v], dim=d)
        return v

    return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


def export_module(
    module: torch.nn.Module, args: tuple, kwargs: dict
) -> torch.export.ExportedProgram:
    """torch.export with automatic dynamic shapes (batch and sequence length vary at run time);
    falls back to static shapes, with a warning, for models that do not export dynamically."""
    widened = widen_unit_dims(args, kwargs)
    unchanged = widened[0] is args and widened[1] is kwargs  # (an empty tuple is always `()`)
    attempts = [(args, kwargs)] if unchanged else [widened, (args, kwargs)]
    error: Exception | None = None
    for ex_args, ex_kwargs in attempts:
        try:
            return torch.export.export(
                module,
                ex_args,
                ex_kwargs,
                strict=False,
                dynamic_shapes=dynamic_shapes_for(module, ex_args, ex_kwargs),
            )
        except Exception as exc:  # noqa: BLE001 - any failure here means "try the next way"
            error = exc
    _log.warning(
        "dynamic-shape export of %s failed (%s: %s); exporting with static shapes: "
        "the result only accepts inputs shaped like the examples",
        type(module).__name__,
        type(error).__name__,
        str(error).splitlines()[0][:200] if str(error) else "",
    )
    return torch.export.export(module, args, kwargs, strict=False)


def _drop_guard_module(gm: fx.GraphModule) -> None:
    """Removes the shape-guard call that ``ep.module()`` inserts (a ``_guards_fn`` submodule). Its
    generated code does not survive a second export (save/export re-export the compiled graph and
    then fail to reload with "name 'L' is not defined"); the input-constraint pre-hook that
    ``ep.module()`` also installs still checks shapes on every call."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        gm.delete_submodule("_guards_fn")
    gm.recompile()


def trace(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict | None = None,
    *,
    copy_model: bool = False,
) -> fx.GraphModule:
    """Captures ``model`` (in eval mode) with torch.export and annotates it (see module docstring).

    Args:
        model: an ``nn.Module`` (a Hugging Face model or any other).
        example_inputs: positional example inputs (a tensor or a tuple), or a mapping of keyword
            inputs (a tokenizer's output: the ``model(**inputs)`` habit).
        example_kwargs: keyword example inputs (e.g. ``attention_mask``).
        copy_model: capture a deep copy, so passes never touch the caller's parameters.

    Returns:
        The annotated ``fx.GraphModule``; ``gm.meta["pysparse"]["call_kwargs"]`` holds keyword
        arguments the graph expects on every call (e.g. ``use_cache=False`` for HF decoders).
    """
    if copy_model:
        model = copy.deepcopy(model)
    model.eval()
    args, kwargs = split_example(example_inputs, example_kwargs)
    kwargs = _prepare_kwargs(model, kwargs)
    try:
        ep = export_module(model, args, kwargs)
    except Exception as exc:  # export raises many types; all mean "not capturable as given"
        raise TraceError(
            f"pysparse could not capture {type(model).__name__} with torch.export: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc}. Pass example "
            "inputs the model accepts (example_inputs / example_kwargs), make data-dependent "
            "Python control flow in forward() static, or wrap the model in an nn.Module whose "
            "forward only takes and returns tensors."
        ) from exc
    gm = ep.module()
    _drop_guard_module(gm)
    annotate(gm)
    fixed = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    gm.meta["pysparse"]["call_kwargs"] = fixed
    gm.meta["pysparse"]["inputs"] = InputSpec.capture(model, args, kwargs, fixed)
    gm.meta["pysparse"]["model"] = _model_record(model)
    n_ffn = len(gm.meta["pysparse"]["ffns"])
    n_lin = sum(1 for i in gm.meta["pysparse"]["linears"].values() if i["prunable"])
    _log.info("captured %s: %d FFN blocks, %d prunable linears", type(model).__name__, n_ffn, n_lin)
    return gm
