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

from pysparse.progress import bar

_log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
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
        if name.startswith("submod_"):
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
    ):
        if not params:
            raise ValueError("train: nothing to train (no parameters were given)")
        if len(batches) == 0:
            raise ValueError("train: no data (the batch list is empty)")
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
        shapes = {k: list(p.shape) for k, p in params.items()}
        ident = {
            "config": {
                k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "desc")
            },
            "shapes": shapes,
            "batches": len(batches),
            "extra": fingerprint or {},
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

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
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
        record = {
            "fingerprint": self.fingerprint,
            "ident": self._ident_json,
            "step": self.step,
            "history": self.history,
            "extra": self.state[0]() if self.state else None,
            "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars},
        }
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
        if not path.is_file():
            return
        record, tensors = self._read_checkpoint(path)
        if record.get("fingerprint") != self.fingerprint:
            theirs = record.get("ident") if isinstance(record.get("ident"), dict) else {}
            ours = self._ident_json
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RuntimeError(
                f"train: checkpoint {path} was written by a run with other settings "
                f"(differs in: {', '.join(diff) or 'unknown'}); use another checkpoint_dir or "
                "delete the checkpoint to start over"
            )
        try:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(tensors[f"param/{k}"])
            self.optimizer.load_state_dict(self._optimizer_state(record, tensors))
            if "rng/cpu" in tensors:
                torch.set_rng_state(tensors["rng/cpu"])
            self.history = list(record["history"])
            if self.state and record.get("extra") is not None:
                self.state[1](record["extra"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RuntimeError(
                f"train: checkpoint {path} does not fit this run ({type(exc).__name__}: {exc}); "
                "delete it to start over"
            ) from exc
        self.step = record["step"]
        self.resumed_from = self.step
        _log.info("%s: resumed from %s at step %d", self.config.desc, path, self.step)

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
                        batch = self.batches[(self.step * cfg.accum + i) % len(self.batches)]
                        self.tokens += count_tokens(batch)
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


def count_tokens(batch: Any) -> int:
    """Tokens in a ``(args, kwargs)`` batch: the attention mask's ones when there is one, else
    the first tensor input's elements (ids ``[batch, seq]``) or rows (features ``[batch, d]``)."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[1], dict):
        mask = batch[1].get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        for x in (*batch[0], *batch[1].values()):
            if isinstance(x, torch.Tensor):
                if x.is_floating_point() and x.dim() > 1:
                    return x.numel() // x.shape[-1]
                return x.numel()
    return 0
