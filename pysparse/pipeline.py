"""Pass machinery: Pass / PassResult / PassManager, and ``pysparse.compile``.

A pass takes the annotated GraphModule (see pysparse/trace.py) and returns a PassResult whose
``modified`` is honest. The PassManager orders the passes by their declared constraints (a stable
topological sort: the user's order is kept where it is legal), runs ``requires`` / ``call`` /
``ensures``, lints and recompiles the graph after each pass, optionally spot-checks the numerics
of passes that must not change them, and records a report entry per pass (what changed, figures,
wall time). Errors name the failing pass and the passes that ran before it.

Ordering constraints: relu before prosparse; a mask pass (magnitude, wanda, sparsegpt,
proxsparse) before compress24; compress24 before lower; lower last.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from pysparse.generate import CacheSpec, Generates, GenerationError, capture_step
from pysparse.inputs import split_example

_log = logging.getLogger(__name__)

MASK_PASSES = ("magnitude", "wanda", "sparsegpt", "proxsparse")


class PassError(RuntimeError):
    """A pass failed or the requested passes cannot run; the message says which and why."""


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share: example inputs, calibration batches, settings."""

    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    calibration: list[tuple[tuple, dict]] = field(default_factory=list)
    check_numerics: bool = True

    def calibration_batches(self) -> list[tuple[tuple, dict]]:
        return self.calibration or [(self.example_args, self.example_kwargs)]

    def data_for(self, who: str, data: Any = None) -> list[tuple[tuple, dict]]:
        """The batches a data pass learns or calibrates on: its own ``data`` when given, else the
        calibration batches; warns (once per pass) when they hold fewer than
        ``MIN_CALIBRATION_TOKENS`` tokens, with the count and how to pass more."""
        batches = list(data) if data is not None else self.calibration_batches()
        n = count_tokens(batches)
        if n is not None and n < MIN_CALIBRATION_TOKENS:
            source = (
                "its data="
                if data is not None
                else "the calibration batches"
                if self.calibration
                else "the example inputs alone (no calibration= given)"
            )
            _log.warning(
                "%s: %s hold only %d tokens (fewer than %d): statistics and training on so little "
                "text fit it and not the model's use; pass more text: calibration=[(args, kwargs), "
                "...] to pysparse.compile (or tokenizer=tok for pysparse.corpus's training text), "
                "or the pass's data=",
                who,
                source,
                n,
                MIN_CALIBRATION_TOKENS,
            )
        return batches


# Fewer tokens than this in a data pass's batches draws a warning (the CLI's default calibration,
# 256 corpus sentences, holds ~5-6k tokens; the reference Wanda / SparseGPT setting is 128 x 2048).
MIN_CALIBRATION_TOKENS = 4096


def count_tokens(batches: Sequence[tuple[tuple, dict]]) -> int | None:
    """Real (unpadded) tokens in token-id batches (``pysparse.train.count_tokens`` summed); None
    when the batches' inputs are not token ids (e.g. float features)."""
    from pysparse.train import count_tokens as tokens_in

    for args, kwargs in batches:
        x = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.is_floating_point():
            return None
    return sum(tokens_in(b) for b in batches)


class Pass:
    """Base class. Subclasses set ``name``, optionally ``after`` (names that must run earlier when
    present), ``needs_one_of`` (at least one of these must run earlier), ``last``, and
    ``preserves_numerics`` (the graph's outputs must not change, up to float rounding)."""

    name: str = "pass"
    after: tuple[str, ...] = ()
    needs_one_of: tuple[str, ...] = ()
    last: bool = False
    preserves_numerics: bool = False

    def requires(self, gm: fx.GraphModule) -> None:
        if "pysparse" not in gm.meta:
            raise PassError(
                f"{self.name}: the graph is not annotated; capture it with pysparse.trace"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        pass

    def mirror(self, primary: fx.GraphModule, secondary: fx.GraphModule, ctx: PassContext) -> None:
        """Makes ``secondary`` (another capture of the same model, e.g. the generation step graph
        of pysparse.generate) what this pass made of ``primary``. The default suits passes that
        change weights (shared tensors), records and activations: ``sync_graph``. A pass that
        rewrites other parts of the graph overrides this and runs itself on ``secondary``."""
        sync_graph(primary, secondary)

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _plain(v)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def _plain(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), tuple, list))


def _tensor_attrs(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
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


def _set_tensor_attr(gm: fx.GraphModule, name: str, t: torch.Tensor) -> None:
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


def sync_graph(primary: fx.GraphModule, secondary: fx.GraphModule) -> None:
    """Brings ``secondary`` in line with ``primary``, two captures of one model whose tensors have
    the same names: every tensor of ``primary`` the other holds, or that a pass added (packed
    2:4 buffers), becomes the same tensor there; each linear's record (mask axis, packing) is
    copied by weight name; each FFN's activation is rewritten to match (ReLU, FATReLU threshold,
    the original). Graph rewrites beyond activations are the passes' own (``Pass.mirror``)."""
    from pysparse.passes.relu import activation_threshold, set_activation

    theirs = _tensor_attrs(secondary)
    for name, t in _tensor_attrs(primary).items():
        if theirs.get(name) is not t and (name in theirs or name.startswith("pysparse__")):
            _set_tensor_attr(secondary, name, t)
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


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Stable topological order under the declared constraints; errors when they cannot hold."""
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise PassError(f"a pass is listed twice: {names}")
    for p in passes:
        if p.needs_one_of and not any(n in names for n in p.needs_one_of):
            raise PassError(
                f"pass '{p.name}' needs one of {list(p.needs_one_of)} before it; got passes {names}"
            )
    remaining = list(passes)
    ordered: list[Pass] = []
    while remaining:
        for p in remaining:
            deps = set(p.after) | set(p.needs_one_of)
            blocked = any(q.name in deps for q in remaining if q is not p)
            if p.last and len(remaining) > 1:
                blocked = True
            if not blocked:
                ordered.append(p)
                remaining.remove(p)
                break
        else:
            raise PassError(f"the ordering constraints of passes {names} cannot all hold")
    if [p.name for p in ordered] != names:
        _log.info(
            "passes reordered by their constraints: %s -> %s", names, [p.name for p in ordered]
        )
    return ordered


def _call(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """Calls a captured graph the way the original model is called (``pysparse.inputs``: inputs
    moved to their captured places, ones that change nothing dropped), with the keyword arguments
    its capture fixed (e.g. use_cache)."""
    meta = gm.meta.get("pysparse", {})
    spec = meta.get("inputs")
    if spec is not None:
        args, kwargs = spec.bind(args, kwargs)
    return gm(*args, **{**meta.get("call_kwargs", {}), **kwargs})


def _call_graph(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return _call(gm, args, kwargs)


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    if not leaves and hasattr(out, "to_tuple"):
        leaves, _ = torch.utils._pytree.tree_flatten(out.to_tuple())
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = order_passes(passes)
        self.report: list[dict[str, Any]] = []

    def run(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        mirrors: Sequence[fx.GraphModule] = (),
    ) -> fx.GraphModule:
        """Runs the passes on ``gm``; after each, ``Pass.mirror`` applies it to every graph of
        ``mirrors`` (other captures of the same model, such as the generation step graph)."""
        done: list[str] = []
        for p in self.passes:
            before = None
            if ctx.check_numerics and p.preserves_numerics:
                before = _flat_tensors(_call_graph(gm, ctx.example_args, ctx.example_kwargs))
            t0 = time.perf_counter()
            try:
                p.requires(gm)
                result = p.call(gm, ctx)
                gm = result.gm
                gm.graph.lint()
                gm.recompile()
                p.ensures(gm)
                for other in mirrors:
                    p.mirror(gm, other, ctx)
                    other.graph.lint()
                    other.recompile()
            except Exception as exc:
                raise PassError(
                    f"pass '{p.name}' failed (passes run before it: {done or 'none'}): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            seconds = time.perf_counter() - t0
            entry = {
                "pass": p.name,
                "settings": p.settings(),
                "modified": result.modified,
                "seconds": round(seconds, 3),
                **result.info,
            }
            if before is not None:
                after = _flat_tensors(_call_graph(gm, ctx.example_args, ctx.example_kwargs))
                err = max(
                    ((a.double() - b.double()).abs().max().item() for a, b in zip(after, before)),
                    default=0.0,
                )
                scale = max((b.double().abs().max().item() for b in before), default=1.0)
                entry["spot_check_max_abs_err"] = err
                # a few units in the last place of the outputs' dtype per sqrt(layer) — rounding
                # differences of the layers add up like a random walk (bf16 keeps 8 bits: SmolLM2
                # 2:4 in bf16 differs by 1.34 at logit scale 25.6 after 30 layers) — and never
                # tighter than 1e-3
                eps = max(
                    (torch.finfo(b.dtype).eps for b in before if b.is_floating_point()), default=0.0
                )
                depth = max(len(gm.meta.get("pysparse", {}).get("ffns", [])), 1)
                if err > max(1e-3, 4 * eps * depth**0.5) * max(scale, 1.0):
                    msg = (
                        f"pass '{p.name}' changed the model's outputs (max abs err {err:.3g}, "
                        f"output scale {scale:.3g}); passes run before it: {done or 'none'}"
                    )
                    if not _has_fatrelu(gm):
                        raise PassError(msg)
                    # FATReLU is discontinuous at its threshold t: a gate value within rounding
                    # of t that one summation order puts above and another below moves an output
                    # by ~t * up * down, and 30 layers amplify that. Not a wrong rewrite; said.
                    entry["spot_check"] = "exceeded at FATReLU thresholds (see the log)"
                    _log.warning(
                        "%s. The graph has FATReLU activations (threshold > 0), whose output jumps "
                        "at the threshold, so rounding differences between the dense and the "
                        "sparse kernels switch neurons on or off; compare the two on your data "
                        "(pysparse eval) before relying on it",
                        msg,
                    )
            # DEBUG: the report holds the same facts, and the CLI prints the report
            _log.debug(
                "pass %s: modified=%s in %.2fs %s",
                p.name,
                result.modified,
                seconds,
                {k: v for k, v in result.info.items() if not isinstance(v, (list, dict))},
            )
            self.report.append(entry)
            done.append(p.name)
        return gm


class SparseModel(Generates, torch.nn.Module):
    """What ``pysparse.compile`` returns: the rewritten GraphModule, called like the model (keyword
    arguments the capture fixed, such as ``use_cache=False``, are supplied), plus ``report``.
    Decoders also carry ``step``, the generation step graph (see pysparse.generate), and
    ``generate(...)``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        report: list[dict[str, Any]],
        example_args: tuple = (),
        example_kwargs: dict | None = None,
        step: fx.GraphModule | None = None,
    ):
        super().__init__()
        self.gm = gm
        self.report = report
        self.step = step
        self.cache_spec = (
            CacheSpec.from_dict(step.meta["pysparse"]["cache"]) if step is not None else None
        )
        # Kept for save/export, which capture the compiled model again with these inputs.
        self.example_args = example_args
        self.example_kwargs = dict(example_kwargs or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _call(self.gm, args, kwargs)

    def train(self, mode: bool = True) -> SparseModel:
        """Only flips ``self.training``: the captured graph was traced in eval mode (no dropout)
        and torch.export graphs refuse ``train()``; training loops (a Hugging Face Trainer
        included) call this and then train the graph's parameters as they are."""
        self.training = mode
        return self


def resolve_passes(passes: Sequence[Pass | str]) -> list[Pass]:
    from pysparse.passes import PASS_REGISTRY

    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            factory: Callable[[], Pass] | None = PASS_REGISTRY.get(p)
            if factory is None:
                raise PassError(f"unknown pass '{p}'; known passes: {sorted(PASS_REGISTRY)}")
            out.append(factory())
        else:
            raise PassError(f"a pass must be a Pass or a name, got {type(p).__name__}")
    return out


def compile(
    model: torch.nn.Module,
    passes: Sequence[Pass | str] = ("relu", "magnitude", "compress24", "lower"),
    example_inputs: tuple | torch.Tensor | Mapping | None = None,
    example_kwargs: dict | None = None,
    *,
    calibration: list[tuple[tuple, dict]] | None = None,
    copy_model: bool = True,
    check_numerics: bool = True,
    generation: bool | None = None,
    max_cache_len: int | None = None,
    tokenizer: Any = None,
) -> SparseModel:
    """Captures ``model``, runs ``passes`` (objects or names) and returns a runnable SparseModel.

    Args:
        model: any nn.Module (Hugging Face models included).
        passes: pass objects or names ("relu", "magnitude", "wanda", "compress24", "lower").
        example_inputs / example_kwargs: inputs for capture and numeric spot checks: a tensor,
            a tuple, or a mapping of keyword inputs (``tokenizer(texts, return_tensors="pt")``).
            The compiled model is then called like the original (``pysparse.inputs``).
        calibration: batches ``[(args, kwargs), ...]`` for data-driven passes (Wanda); default the
            example inputs.
        copy_model: capture a deep copy so the caller's weights are never modified.
        check_numerics: after passes that must not change outputs, compare against the graph
            before the pass and fail loudly if they differ.
        generation: also capture the generation step graph (KV cache, see pysparse.generate) and
            transform it with the same passes. None (default): for models that can generate
            (Hugging Face decoders), with a warning when the capture fails; True: fail instead;
            False: never.
        max_cache_len: the default KV-cache limit of ``generate`` (prompt + new tokens); default
            the model's ``max_position_embeddings``.
        tokenizer: the model's (Hugging Face) tokenizer: without ``calibration``, data passes
            calibrate and train on ``pysparse.corpus``'s training text (256 lines, the CLI's
            default), and the example inputs default to its first batch; ``pysparse.save`` stores
            it with the artifact.
    """
    from pysparse.trace import trace

    pass_objs = resolve_passes(passes)
    manager = PassManager(pass_objs)  # validates the order before any expensive work
    if tokenizer is not None and calibration is None:
        from pysparse.corpus import sentences
        from pysparse.evaluate import encode_sentences

        calibration = encode_sentences(tokenizer, sentences("train", 256), 8, 64)
    if example_inputs is None and example_kwargs is None and calibration:
        example_inputs, example_kwargs = calibration[0]
    if copy_model:
        model = copy.deepcopy(model)
    args, kwargs = split_example(example_inputs, example_kwargs)
    gm = trace(model, args, kwargs)
    step = None
    if generation or (generation is None and _is_decoder(model)):
        t0 = time.perf_counter()
        try:
            step = capture_step(model, max_cache_len)
            _log.info("captured the generation step graph in %.1fs", time.perf_counter() - t0)
        except GenerationError as exc:
            if generation:
                raise
            _log.warning("%s; the compiled model will not generate", exc)
    ctx = PassContext(
        example_args=args,
        example_kwargs=kwargs,
        calibration=list(calibration or []),
        check_numerics=check_numerics,
    )
    gm = manager.run(gm, ctx, mirrors=[step] if step is not None else [])
    sm = SparseModel(gm, manager.report, args, kwargs, step=step)
    if tokenizer is not None:
        sm.tokenizer = tokenizer
    return sm


def _has_fatrelu(gm: fx.GraphModule) -> bool:
    return any(b.get("threshold") for b in gm.meta.get("pysparse", {}).get("ffns", []))


def _is_decoder(model: torch.nn.Module) -> bool:
    """Hugging Face models that generate text (``*ForCausalLM`` and the like)."""
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a model's own check failing means "no"
        return False
