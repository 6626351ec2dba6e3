"""The shared trainer of pysparse's learning passes (ProxSparse, ProSparse).

What it does: AdamW over the parameters a pass hands it, a learning-rate schedule with linear
warm-up then linear / cosine decay (or constant), gradient clipping, gradient accumulation over
micro-batches, a hook after every optimiser step (ProxSparse applies its proximal operator there,
ProSparse advances its λ schedule), a progress bar showing the loss and whatever the pass reports,
and checkpoints.

Checkpoints and resume: every ``checkpoint_every`` steps (and at the end) the trained parameters,
the optimiser and schedule state, the step, the history and the pass's own state are written to
``checkpoint_dir/checkpoint.pt`` atomically (temporary file + rename: a crash mid-write leaves the
previous checkpoint intact). A run started with the same ``checkpoint_dir`` resumes from it. Data
order is a pure function of the step (micro-batch ``step * accum + i`` modulo the number of
batches), the models are run without dropout (captured in eval mode) and no random numbers are
drawn, so a resumed run reproduces the uninterrupted one bit for bit on the same machine and
thread count. A checkpoint records a fingerprint of the settings and parameter shapes; resuming
with different ones is refused with a message saying what differs.

Memory: the optimiser state (two fp32 tensors per trained parameter) plus whatever the pass keeps;
nothing else is copied.
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

from pysparse.progress import bar

_log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


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


class Trainer:
    """Runs ``config.steps`` optimiser steps of ``loss_fn`` over ``batches``.

    Args:
        params: ``{name: parameter}`` to train (requires_grad is set on them for the run).
        loss_fn: ``batch -> (loss tensor, {metric: float})``.
        batches: the data, any sequence; micro-batch ``k`` is ``batches[k % len(batches)]``.
        after_step: ``(step, lr) -> {metric: float}``, called after each optimiser step.
        state: ``(get, set)`` of extra pass state to checkpoint (e.g. a schedule's position).
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
        self._ident = ident

    # ---- checkpoints ---------------------------------------------------------------------------
    def _ckpt_path(self) -> Path | None:
        d = self.config.checkpoint_dir
        return Path(d) / CHECKPOINT if d else None

    def save_checkpoint(self) -> None:
        path = self._ckpt_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {
            "fingerprint": self.fingerprint,
            "ident": self._ident,
            "step": self.step,
            "params": {k: p.detach().clone() for k, p in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "extra": self.state[0]() if self.state else None,
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _maybe_resume(self) -> None:
        path = self._ckpt_path()
        if path is None or not path.is_file():
            return
        try:
            blob = torch.load(path, weights_only=False)
        except Exception as exc:
            raise RuntimeError(
                f"train: checkpoint {path} cannot be read ({exc}); delete it to start over"
            ) from exc
        if blob.get("fingerprint") != self.fingerprint:
            theirs, ours = blob.get("ident", {}), self._ident
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise RuntimeError(
                f"train: checkpoint {path} was written by a run with other settings "
                f"(differs in: {', '.join(diff) or 'unknown'}); use another checkpoint_dir or "
                "delete the checkpoint to start over"
            )
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(blob["params"][k])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.history = list(blob["history"])
        self.step = int(blob["step"])
        if self.state and blob.get("extra") is not None:
            self.state[1](blob["extra"])
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
        try:
            with bar(total=cfg.steps, desc=cfg.desc, unit="step", initial=self.step) as pbar:
                while self.step < cfg.steps:
                    lr = cfg.lr_at(self.step)
                    for g in self.optimizer.param_groups:
                        g["lr"] = lr
                    self.optimizer.zero_grad(set_to_none=True)
                    metrics: dict[str, float] = {}
                    for i in range(cfg.accum):
                        batch = self.batches[(self.step * cfg.accum + i) % len(self.batches)]
                        loss, m = self.loss_fn(batch)
                        if not torch.isfinite(loss):
                            raise RuntimeError(
                                f"{cfg.desc}: the loss became {loss.item()} at step {self.step}; "
                                "lower the learning rate or the regulariser weights"
                            )
                        (loss / cfg.accum).backward()
                        for k, v in {"loss": float(loss.detach()), **m}.items():
                            metrics[k] = metrics.get(k, 0.0) + v / cfg.accum
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.grad_clip)
                    self.optimizer.step()
                    if self.after_step is not None:
                        with torch.no_grad():
                            metrics.update(self.after_step(self.step, lr))
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
