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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pysparse.capture.inputs import batch_tokens
from pysparse.learning.checkpoint import Checkpoints
from pysparse.learning.distributed import (
    mean_across_ranks,
    rank_and_world,
    shard_for_training,
    sum_counts,
)
from pysparse.util.progress import bar

_log = logging.getLogger(__name__)


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


class Trainer(Checkpoints):
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
