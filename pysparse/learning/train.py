"""The shared trainer of pysparse's learning passes (ProxSparse, ProSparse).

What it does: AdamW over the parameters a pass hands it, a learning-rate schedule with linear
warm-up then linear / cosine decay (or constant), gradient clipping, gradient accumulation over
micro-batches, a hook after every optimiser step (ProxSparse applies its proximal operator there,
ProSparse advances its λ schedule), a progress bar showing the loss and whatever the pass reports,
and checkpoints.

Checkpoints and resume: every ``checkpoint_every`` steps (and at the end) the trained parameters,
the optimiser and schedule state, the step, the history and the pass's own state are written to
``checkpoint_dir/checkpoint.safetensors`` atomically (temporary file + rename: a crash mid-write
leaves the previous checkpoint intact). A run started with the same ``checkpoint_dir`` resumes from
it. Data order is a pure function of the step (micro-batch ``step * accum + i`` modulo the number
of batches), the models are run without dropout (captured in eval mode) and pysparse draws no
random numbers (the CPU generator's state is saved and restored all the same, for objectives of
the user's that do), so a resumed run reproduces the uninterrupted one bit for bit on the same
machine and thread count. A checkpoint records a fingerprint of the settings and parameter shapes;
resuming with different ones is refused with a message saying what differs.

Why safetensors and JSON, not ``torch.save``: checkpoint directories get shared and copied, and
unpickling a file runs whatever code the file carries. A checkpoint holds only tensors (the
parameters, the optimiser's moments and step counts, the RNG state) in the safetensors part and
plain JSON (step, history, settings fingerprint, the optimiser's hyper-parameters, the pass's
state) in the safetensors header's metadata, one file so that one rename keeps it atomic. Reading
it parses JSON and copies tensor bytes; nothing in it is executed. A ``checkpoint.pt`` of an
older pysparse (a pickle) is refused without being opened.

Over several ranks (torchrun): see ``Trainer`` and ``pysparse.learning.distributed``: FSDP2 shards a copy
of the graph, each rank runs its share of every global batch, metrics are averaged over ranks, and
checkpoints are sharded (``torch.distributed.checkpoint`` writing safetensors, a JSON record in
``checkpoint.json``), resumable on any number of ranks, a single-process one included.

Memory: the optimiser state (two fp32 tensors per trained parameter) plus whatever the pass keeps;
nothing else is copied. The activations kept for the backward pass are the model's;
``checkpoint_layers(gm)`` trades them for recomputation, one transformer layer at a time (the
learning passes' ``activation_checkpointing=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save

from pysparse.capture.inputs import batch_tokens
from pysparse.learning.distributed import (
    load_sharded,
    mean_across_ranks,
    rank_and_world,
    save_sharded,
    shard_for_training,
    shard_like,
    sum_counts,
)
from pysparse.util.progress import bar

_log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
SHARDED_CHECKPOINT = "checkpoint.json"  # a sharded checkpoint's record (torchrun runs)
LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickle format of earlier pysparse; refused unread
_CHECKPOINT_FORMAT = "pysparse-checkpoint"
_CHECKPOINT_VERSION = "1"


class _Recomputed(torch.nn.Module):
    """Runs ``inner`` keeping only its inputs for the backward pass; its intermediate values are
    recomputed when the gradient reaches it (``torch.utils.checkpoint``, non-reentrant)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The captured graph cut after every FFN down projection (one piece per transformer layer,
    the embedding before the first and the head after the last FFN in their own pieces), each
    piece run under activation checkpointing: a forward keeps only the values that cross a cut,
    and the backward recomputes one layer at a time. Same parameters (shared, not copied), same
    outputs and gradients as ``gm``; the graph is a snapshot of ``gm``'s, so make it after the
    last change to the graph that training should see."""
    return split_layers(gm, recompute=True)


def split_layers(gm: torch.fx.GraphModule, recompute: bool) -> torch.fx.GraphModule:
    """``gm`` cut into pieces as :func:`checkpoint_layers` cuts it, each piece a submodule
    (``submod_K``), under activation checkpointing when ``recompute``."""
    from torch.fx.passes.split_module import split_module

    ffns = gm.meta.get("pysparse", {}).get("ffns", [])
    downs = {b["down"] for b in ffns}
    if not downs:
        raise ValueError(
            "activation checkpointing cuts the graph after each FFN; this graph has none "
            "annotated (train it without activation_checkpointing)"
        )
    cut, pieces = 0, {}
    for n in gm.graph.nodes:
        pieces[n] = cut
        if n.name in downs:
            cut += 1
    split = split_module(gm, gm, lambda n: pieces[n], keep_original_order=True)
    for name, child in list(split.named_children()):
        if recompute and name.startswith("submod_"):
            setattr(split, name, _Recomputed(child))
    split.meta["pysparse"] = gm.meta["pysparse"]  # call_kwargs and annotations, shared
    return split


@dataclass
class TrainConfig:
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of steps with a linear ramp from 0
    schedule: str = "linear"  # "linear" | "cosine" | "constant" after warm-up
    grad_clip: float | None = 1.0
    accum: int = 1  # micro-batches per optimiser step
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    desc: str = "train"
    autocast: str | None = None  # "bf16": forward passes under torch.autocast(bfloat16)

    @classmethod
    def for_pass(cls, p: Any, steps: int, lr: float, **over: Any) -> TrainConfig:
        """The settings a learning pass exposes (``warmup``, ``schedule``, ``grad_clip``,
        ``accum``, ``checkpoint_dir``, ``checkpoint_every``, ``autocast``) read off the pass
        ``p``, named after it; ``over`` replaces any of them."""
        names = ("warmup", "schedule", "grad_clip", "accum", "checkpoint_dir")
        kw = {k: getattr(p, k) for k in (*names, "checkpoint_every", "autocast") if hasattr(p, k)}
        return cls(steps=steps, lr=lr, **{"desc": p.name, **kw, **over})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train: steps must be >= 1, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train: lr must be a positive number, got {self.lr}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(
                f"train: schedule must be 'linear', 'cosine' or 'constant', got {self.schedule!r}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(
                f"train: warmup is a fraction of the steps in [0, 1), got {self.warmup}"
            )
        if self.autocast not in (None, "bf16"):
            raise ValueError(f"train: autocast must be None or 'bf16', got {self.autocast!r}")
        if self.accum < 1 or self.checkpoint_every < 1:
            raise ValueError("train: accum and checkpoint_every must be >= 1")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if self.schedule == "constant":
            return self.lr
        rest = max(1, self.steps - warm)
        p = (step - warm) / rest
        if self.schedule == "linear":
            return self.lr * (1 - p)
        return self.lr * 0.5 * (1 + math.cos(math.pi * p))


StepHook = Callable[[int, float], dict[str, float]]


def _params_into_pieces(split: torch.fx.GraphModule) -> None:
    """A split graph's root reads every parameter and hands it to the piece that uses it; this
    moves each tensor read by one piece alone into that piece (a get_attr of its own, the root's
    attribute dropped), so that each piece owns its layer's parameters (an FSDP unit). Tensors
    several pieces read (tied embeddings) stay at the root."""
    fx = torch.fx
    graph = split.graph
    for attr in [n for n in graph.nodes if n.op == "get_attr"]:
        users = list(attr.users)
        if len(users) != 1 or users[0].op != "call_module" or attr in users[0].kwargs.values():
            continue
        call = users[0]
        if list(call.args).count(attr) != 1:
            continue
        piece = split.get_submodule(call.target)
        inner = piece.inner if isinstance(piece, _Recomputed) else piece
        if not isinstance(inner, fx.GraphModule):
            continue
        index = list(call.args).index(attr)
        holder_path, _, leaf = attr.target.rpartition(".")
        holder = split.get_submodule(holder_path) if holder_path else split
        value = getattr(holder, leaf)
        name = "own_" + attr.target.replace(".", "_")
        if isinstance(value, torch.nn.Parameter):
            inner.register_parameter(name, value)
        elif isinstance(value, torch.Tensor):
            inner.register_buffer(name, value)
        else:
            continue
        ph = [n for n in inner.graph.nodes if n.op == "placeholder"][index]
        with inner.graph.inserting_before(ph):
            got = inner.graph.get_attr(name)
        ph.replace_all_uses_with(got)
        inner.graph.erase_node(ph)
        inner.recompile()
        call.args = tuple(a for a in call.args if a is not attr)
        graph.erase_node(attr)
        delattr(holder, leaf)
    split.recompile()


def _twin(module: torch.nn.Module) -> torch.fx.GraphModule:
    """A copy of the graph the loss runs, with module containers of its own around the same
    tensors (sharding it replaces its parameters, not ``module``'s), cut per transformer layer so
    that each layer can be an FSDP unit: a ``checkpoint_layers`` split keeps its pieces (and their
    recomputation); a graph with annotated FFNs is split the same way without recomputation;
    another stays whole."""
    import copy

    fx = torch.fx
    if not isinstance(module, fx.GraphModule):
        raise TypeError("train: under torch.distributed the module must be a captured graph")
    if any(n.op == "call_module" for n in module.graph.nodes):
        # the root graph's own attributes are copied into fresh containers by GraphModule
        holder = torch.nn.Module()
        called = {n.target for n in module.graph.nodes if n.op == "call_module"}
        for name, child in module.named_children():
            if name not in called:
                setattr(holder, name, child)
                continue
            inner = child.inner if isinstance(child, _Recomputed) else child
            if not isinstance(inner, fx.GraphModule) or any(
                n.op == "call_module" for n in inner.graph.nodes
            ):
                raise ValueError(f"train: cannot shard submodule {name} of the graph")
            piece = fx.GraphModule(inner, copy.deepcopy(inner.graph))
            setattr(holder, name, _Recomputed(piece) if inner is not child else piece)
        twin = fx.GraphModule(holder, copy.deepcopy(module.graph))
    elif module.meta.get("pysparse", {}).get("ffns"):
        twin = split_layers(module, recompute=False)
    else:
        twin = fx.GraphModule(module, copy.deepcopy(module.graph))
    twin.meta = module.meta
    if any(n.op == "call_module" for n in twin.graph.nodes):
        _params_into_pieces(twin)
    return twin


def _not_json(value: Any) -> Any:
    raise TypeError(
        f"{type(value).__name__} is not JSON data; a checkpoint holds tensors, numbers, strings, "
        "lists and dicts only"
    )


class Trainer:
    """Runs ``config.steps`` optimiser steps of ``loss_fn`` over ``batches``.

    Args:
        params: ``{name: parameter}`` to train (requires_grad is set on them for the run).
        loss_fn: ``batch -> (loss tensor, {metric: float})``.
        batches: the data, any sequence; micro-batch ``k`` is ``batches[k % len(batches)]``.
        after_step: ``(step, lr) -> {metric: float}``, called after each optimiser step.
        state: ``(get, set)`` of extra pass state to checkpoint (e.g. a schedule's position); the
            state must be JSON data (numbers, strings, lists, dicts).
        fingerprint: extra settings that must match for a resume (the pass's hyper-parameters).
        module: the graph the loss runs. Under torch.distributed (more than one rank) it is
            required: the trainer trains a copy of it sharded with FSDP2 (``self.module``; the
            loss must run that copy) with ``self.params`` its DTensor parameters, and copies the
            trained values back into ``params`` at the end.
        group_dims: 2:4-learned weights, name -> the dimension their groups of 4 run along (see
            ``pysparse.learning.distributed.shard_for_training``).

    Over N ranks, every optimiser step takes ``accum`` micro-batches on each rank (a global batch
    of ``N * accum``: rank r's i-th is micro-batch ``(step * accum + i) * N + r``, the order one
    process with ``accum * N`` runs them in), the gradients are averaged by FSDP and the metrics
    averaged over ranks (a pass that reports a sum over its local shards scales it by N).
    """

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
        batches: Sequence[Any],
        config: TrainConfig,
        after_step: StepHook | None = None,
        state: tuple[Callable[[], Any], Callable[[Any], None]] | None = None,
        fingerprint: dict[str, Any] | None = None,
        module: torch.nn.Module | None = None,
        group_dims: dict[str, int] | None = None,
    ):
        if not params:
            raise ValueError("train: nothing to train (no parameters were given)")
        if len(batches) == 0:
            raise ValueError("train: no data (the batch list is empty)")
        shapes = {k: list(p.shape) for k, p in params.items()}  # before any release
        self.rank, self.world = rank_and_world()
        self.full_params = params
        self.module = module
        if self.world > 1:
            if module is None:
                raise ValueError(
                    f"{config.desc}: under torch.distributed the trainer needs the module"
                )
            flags = {k: p.requires_grad for k, p in params.items()}
            for p in params.values():  # the sharded copies are made trainable
                p.requires_grad_(True)
            try:
                self.module, params, self._pairs = shard_for_training(
                    _twin(module), params, group_dims or {}, config.desc
                )
            finally:
                for k, p in self.full_params.items():
                    p.requires_grad_(flags[k])
            # The graph's own parameters would be another whole copy of the model on every rank:
            # released for the run, rebuilt from the shards at its end (gather()).
            self.release()
        self.params = params
        self.loss_fn = loss_fn
        self.batches = batches
        self.config = config
        self.after_step = after_step
        # Seconds spent in each part of the steps run by this Trainer (forward + backward over the
        # accumulated micro-batches, clipping + optimiser step, the after-step hook): the passes
        # report them per step.
        self.phase_seconds = {"forward_backward": 0.0, "optimizer": 0.0, "after_step": 0.0}
        self.tokens = 0  # tokens (real, not padding) of the micro-batches this Trainer ran
        self.state = state
        self.optimizer = torch.optim.AdamW(
            list(params.values()), lr=config.lr, weight_decay=config.weight_decay
        )
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.resumed_from: int | None = None
        settings = {k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "desc")}
        # the global batch, so that a run resumes on any number of ranks with the same one (a
        # pass's own settings repeat its accum: the same there)
        settings["accum"] = config.accum * self.world
        extra = dict(fingerprint or {})
        if isinstance(extra.get("accum"), int):
            extra["accum"] *= self.world
        ident = {
            "config": settings,
            "shapes": shapes,
            "batches": len(batches),
            "extra": extra,
        }
        self.fingerprint = hashlib.sha256(
            json.dumps(ident, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        # As a checkpoint stores it (settings that are not JSON as their str), for naming what
        # differs when a checkpoint of other settings is found.
        self._ident_json = json.loads(json.dumps(ident, default=str))

    # ---- checkpoints ---------------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        d = self.config.checkpoint_dir
        return Path(d) / CHECKPOINT if d else None

    def _record(self) -> dict[str, Any]:
        """A checkpoint's JSON part (everything but tensors)."""
        return {
            "fingerprint": self.fingerprint,
            "ident": self._ident_json,
            "step": self.step,
            "history": self.history,
            "extra": self.state[0]() if self.state else None,
        }

    def _sharded_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of a sharded checkpoint by name: the trained parameters and AdamW's state
        (DTensor shards under FSDP2), created as AdamW would on its first step where it has none
        yet, so that a resume has tensors to load into."""
        out: dict[str, torch.Tensor] = {}
        for k, p in self.params.items():
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[f"param/{k}"] = p
            for name, t in st.items():
                out[f"optimizer/{k}/{name}"] = t
        return out

    def _save_sharded(self, directory: Path) -> None:
        """Every rank writes its shards (torch.distributed.checkpoint, safetensors files) to a new
        ``sharded-STEP`` folder; then rank 0 points ``checkpoint.json`` at it (temporary file +
        rename) and removes the older folders, so a crash leaves the previous checkpoint whole."""
        import shutil

        import torch.distributed as dist

        name = f"sharded-{self.step}"
        save_sharded(self._sharded_tensors(), str(directory / name))
        dist.barrier()
        if self.rank == 0:
            record = self._record()
            record["sharded"] = name
            record["ranks"] = self.world
            record["param_groups"] = [
                {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
            ]
            tmp = directory / f".{SHARDED_CHECKPOINT}.{os.getpid()}.tmp"
            try:
                tmp.write_text(json.dumps(record, default=_not_json))
                os.replace(tmp, directory / SHARDED_CHECKPOINT)
            finally:
                tmp.unlink(missing_ok=True)
            for old in directory.glob("sharded-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            self._save_sharded(path.parent)
            return
        tensors = {f"param/{k}": p.detach().to("cpu").clone() for k, p in self.params.items()}
        tensors["rng/cpu"] = torch.get_rng_state()
        opt = self.optimizer.state_dict()
        opt_scalars: dict[str, dict[str, Any]] = {}
        for index, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().to("cpu").clone()
                else:
                    opt_scalars.setdefault(str(index), {})[key] = value
        record = self._record()
        record["optimizer"] = {"param_groups": opt["param_groups"], "scalars": opt_scalars}
        try:
            text = json.dumps(record, default=_not_json)
        except TypeError as exc:
            raise RuntimeError(
                f"{self.config.desc}: cannot write checkpoint {path}: {exc}"
            ) from exc
        metadata = {"format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "state": text}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            _st_save(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The JSON record and the tensors of a checkpoint; safetensors and JSON only, so a
        hostile file can be wrong but cannot run code."""

        def unreadable(why: str) -> RuntimeError:
            return RuntimeError(
                f"train: checkpoint {path} cannot be read ({why}); delete it to start over"
            )

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise unreadable(f"not a safetensors file: {exc}") from exc
        if (
            metadata.get("format") != _CHECKPOINT_FORMAT
            or metadata.get("version") != _CHECKPOINT_VERSION
        ):
            raise unreadable(
                f"format {metadata.get('format')!r} version {metadata.get('version')!r}, expected "
                f"{_CHECKPOINT_FORMAT!r} version {_CHECKPOINT_VERSION}"
            )
        try:
            record = json.loads(metadata.get("state", ""))
        except json.JSONDecodeError as exc:
            raise unreadable(f"its state is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise unreadable("its state is not a JSON object")
        missing = [f"param/{k}" for k in self.params if f"param/{k}" not in tensors]
        if missing:
            raise unreadable(f"incomplete: no {', '.join(missing)}")
        step = record.get("step")
        if type(step) is not int or not 0 <= step <= self.config.steps:
            raise unreadable(f"step {step!r} is not a step of this run (0..{self.config.steps})")
        return record, tensors

    def _optimizer_state(
        self, record: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """The optimiser's ``state_dict`` rebuilt from a checkpoint. JSON has no tuples: a
        hyper-parameter that is a tuple in this run's optimiser (AdamW's betas) is made one again."""
        saved = record.get("optimizer", {})
        state: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = t
        for index, scalars in saved.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(scalars)
        groups = []
        for mine, theirs in zip(self.optimizer.state_dict()["param_groups"], saved["param_groups"]):
            groups.append(
                {k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in theirs.items()}
            )
        return {"state": state, "param_groups": groups}

    def _read_sharded_record(self, path: Path) -> dict[str, Any]:
        """The JSON record of a sharded checkpoint (checkpoint.json), checked."""
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(
                f"train: checkpoint {path} cannot be read ({exc}); delete it to start over"
            ) from exc
        step = record.get("step") if isinstance(record, dict) else None
        folder = record.get("sharded") if isinstance(record, dict) else None
        if (
            type(step) is not int
            or not 0 <= step <= self.config.steps
            or not isinstance(folder, str)
        ):
            raise RuntimeError(
                f"train: checkpoint {path} is not a checkpoint of this run (step {step!r}); "
                "delete it to start over"
            )
        if not (path.parent / folder).is_dir():
            raise RuntimeError(
                f"train: checkpoint {path} names {folder}, which is missing; delete it to start over"
            )
        return record

    def _load_by_name(self, full: dict[str, torch.Tensor]) -> None:
        """Parameters and AdamW state from whole tensors named as :meth:`_sharded_tensors` names
        them (each rank keeps its shard)."""
        with torch.no_grad():
            for key, t in self._sharded_tensors().items():
                src = full[key]
                if t.dim() == 0:
                    t.copy_(src)
                else:
                    from pysparse.learning.distributed import local

                    local(t).copy_(shard_like(src, t))

    def _maybe_resume(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        legacy = path.with_name(LEGACY_CHECKPOINT)
        if legacy.exists():
            raise RuntimeError(
                f"train: {legacy} is a checkpoint of an older pysparse, a pickle, which pysparse "
                "no longer reads (unpickling a file runs the code it carries); delete it to start "
                f"over (checkpoints are now {CHECKPOINT})"
            )
        # A single-process run writes checkpoint.safetensors, a torchrun one a sharded checkpoint;
        # either resumes on any number of ranks, from the later of the two.
        sharded = path.with_name(SHARDED_CHECKPOINT)
        found: list[tuple[Path, dict[str, Any], dict[str, torch.Tensor] | None]] = []
        if sharded.is_file():
            found.append((sharded, self._read_sharded_record(sharded), None))
        if path.is_file():
            found.append((path, *self._read_checkpoint(path)))
        if not found:
            return
        where, record, tensors = max(found, key=lambda f: f[1]["step"])
        if record.get("fingerprint") != self.fingerprint:
            theirs = record.get("ident") if isinstance(record.get("ident"), dict) else {}
            ours = self._ident_json
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RuntimeError(
                f"train: checkpoint {where} was written by a run with other settings "
                f"(differs in: {', '.join(diff) or 'unknown'}); use another checkpoint_dir or "
                "delete the checkpoint to start over"
            )
        try:
            if tensors is None:  # sharded: every rank reads the slices of its own shards
                live = self._sharded_tensors()
                load_sharded(live, str(where.parent / record["sharded"]))
                for mine, theirs in zip(self.optimizer.param_groups, record["param_groups"]):
                    mine.update(
                        {
                            k: tuple(v) if isinstance(mine.get(k), tuple) else v
                            for k, v in theirs.items()
                        }
                    )
            elif self.world > 1:  # a single-process checkpoint: whole tensors, kept by shard
                state = self._optimizer_state(record, tensors)
                order = list(self.params)
                full = {f"param/{k}": tensors[f"param/{k}"] for k in order}
                for index, entry in state["state"].items():
                    for name, t in entry.items():
                        full[f"optimizer/{order[index]}/{name}"] = t
                self._load_by_name(full)
            else:
                with torch.no_grad():
                    for k, p in self.params.items():
                        p.copy_(tensors[f"param/{k}"])
                self.optimizer.load_state_dict(self._optimizer_state(record, tensors))
            if tensors is not None and "rng/cpu" in tensors:
                torch.set_rng_state(tensors["rng/cpu"])
            self.history = list(record["history"])
            if self.state and record.get("extra") is not None:
                self.state[1](record["extra"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RuntimeError(
                f"train: checkpoint {where} does not fit this run ({type(exc).__name__}: {exc}); "
                "delete it to start over"
            ) from exc
        self.step = record["step"]
        self.resumed_from = self.step
        _log.info("%s: resumed from %s at step %d", self.config.desc, where, self.step)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> list[dict[str, float]]:
        cfg = self.config
        flags = {k: p.requires_grad for k, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
        self._maybe_resume()
        t0 = time.perf_counter()
        phase = self.phase_seconds
        device = next(iter(self.params.values())).device.type
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16")
        try:
            with bar(total=cfg.steps, desc=cfg.desc, unit="step", initial=self.step) as pbar:
                while self.step < cfg.steps:
                    lr = cfg.lr_at(self.step)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    self.optimizer.zero_grad(set_to_none=True)
                    metrics: dict[str, float] = {}
                    tic = time.perf_counter()
                    for i in range(cfg.accum):
                        k = (self.step * cfg.accum + i) * self.world + self.rank
                        batch = self.batches[k % len(self.batches)]
                        self.tokens += batch_tokens(batch)
                        with autocast:
                            loss, m = self.loss_fn(batch)
                        if not torch.isfinite(loss):
                            raise RuntimeError(
                                f"{cfg.desc}: the loss became {loss.item()} at step {self.step}; "
                                "lower the learning rate or the regulariser weights"
                            )
                        (loss / cfg.accum).backward()
                        for k, v in {"loss": float(loss.detach()), **m}.items():
                            metrics[k] = metrics.get(k, 0.0) + v / cfg.accum
                    metrics = mean_across_ranks(metrics)
                    toc = time.perf_counter()
                    phase["forward_backward"] += toc - tic
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
                    self.optimizer.step()
                    tic = time.perf_counter()
                    phase["optimizer"] += tic - toc
                    if self.after_step is not None:
                        with torch.no_grad():
                            metrics.update(self.after_step(self.step, lr))
                        phase["after_step"] += time.perf_counter() - tic
                    metrics["lr"] = lr
                    metrics["step"] = self.step
                    self.history.append(metrics)
                    self.step += 1
                    pbar.update(1)
                    pbar.set_postfix(
                        {k: f"{v:.4g}" for k, v in metrics.items() if k not in ("step", "lr")},
                        refresh=False,
                    )
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                        self.save_checkpoint()
            if self.world > 1:  # the trained values back into the graph's own parameters
                self.gather()
                self.tokens = sum_counts(self.tokens)[0]
        finally:
            for k, p in self.params.items():
                p.requires_grad_(flags[k])
            self.optimizer.zero_grad(set_to_none=True)
        _log.info(
            "%s: %d steps in %.1fs%s",
            cfg.desc,
            cfg.steps,
            time.perf_counter() - t0,
            f" (resumed at step {self.resumed_from})" if self.resumed_from else "",
        )
        return self.history

    def gather(self) -> None:
        """Under torch.distributed: every parameter of the graph given as ``module`` made whole
        again from the shards (all-gathered, on every rank): the trained values so far."""
        with torch.no_grad():
            for p, shard in getattr(self, "_pairs", ()):
                p.data = shard.full_tensor()

    def release(self) -> None:
        """Under torch.distributed: frees the graph's own parameters (the sharded copy trains)."""
        for p, _ in getattr(self, "_pairs", ()):
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def tokens_per_second(self) -> float:
        """Training throughput of this Trainer's steps: tokens over the seconds of the steps."""
        seconds = sum(self.phase_seconds.values())
        return self.tokens / seconds if seconds > 0 else 0.0


def curve(
    history: list[dict[str, float]], max_points: int = 200, **derived: Callable[[int], float]
) -> list[dict[str, float]]:
    """A training history thinned for reports and plots: at most ``max_points`` records at evenly
    spaced steps (the first and last kept), values rounded to 5 significant digits; ``derived``
    adds a column computed from the step (e.g. ``lam=schedule``)."""
    if not history:
        return []
    n = len(history)
    k = min(n, max(max_points, 2))
    picks = sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    out = []
    for i in picks:
        h = history[i]
        row = {k: float(f"{v:.5g}") for k, v in h.items() if isinstance(v, (int, float))}
        row["step"] = int(h.get("step", i))
        for name, fn in derived.items():
            row[name] = float(f"{fn(row['step']):.5g}")
        out.append(row)
    return out
