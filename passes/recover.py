"""Recover: masked fine-tuning of a 2:4-pruned model (not part of any published mask method).

The kept weights of every linear a mask pass pruned train with the chosen objective while the
masks stay fixed (re-applied after every optimiser step); nothing else trains. Distillation
objectives match a dense teacher: pass ``teacher=`` (the original model) - the graph this pass
sees is already pruned, so it cannot be its own teacher. ``ProxSparse(recover_steps=N)`` runs the
same training inside the pass, with the dense graph it saw first as the teacher.

    pysparse.compile(model, [SparseGPTPrune(), Recover(data=batches, teacher=model)], ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from pysparse.compiler.base import MASK_PASSES, Pass, PassContext, PassError, PassResult
from pysparse.learning.distributed import local, shard_like
from pysparse.learning.objectives import Objective, default_objective
from pysparse.learning.train import TrainConfig, Trainer, checkpoint_layers, curve

from .baselines import maskable_linears

# Recover's learning-rate schedule and clipping (ProxSparse's own recovery uses them too).
SCHEDULE: dict[str, Any] = {"warmup": 0.1, "schedule": "linear", "grad_clip": 1.0}


def train_under_masks(
    weights: dict[str, torch.Tensor],
    batches: Sequence[tuple[tuple, dict]],
    objective: Objective,
    cfg: TrainConfig,
    fingerprint: dict[str, Any],
) -> dict[str, Any]:
    """Trains ``weights`` on ``objective`` with their zero pattern fixed; the report's fields."""
    masks = {k: w.detach() != 0 for k, w in weights.items()}

    def after(step: int, lr: float) -> dict[str, float]:
        for k, w in trained.items():
            local(w.data).mul_(masks[k])
        return {}

    trainer = Trainer(
        weights,
        lambda b: (objective(b), {}),
        batches,
        cfg,
        after_step=after,
        fingerprint=fingerprint,
        module=objective.student,
    )
    # under torch.distributed: the sharded copy's parameters, and each rank's part of the masks
    trained = trainer.params
    masks = {k: shard_like(m, trained[k]) for k, m in masks.items()}
    student, objective.student = objective.student, trainer.module
    try:
        hist = trainer.run()
    finally:
        objective.student = student
    return {
        "steps": cfg.steps,
        "lr": cfg.lr,
        "objective": objective.name,
        "first_loss": round(hist[0]["loss"], 5) if hist else None,
        "last_loss": round(hist[-1]["loss"], 5) if hist else None,
        "tokens_per_second": round(trainer.tokens_per_second(), 1),
        "curve": curve(hist),
    }


class Recover(Pass):
    """Masked fine-tuning of the pruned linears' kept weights (see the module docstring).
    Defaults: 100 steps, lr 5e-5 (linear decay, 10% warm-up), the model kind's distillation
    objective (``logit_kl`` for decoders) against ``teacher``."""

    name = "recover"
    after = MASK_PASSES
    needs_one_of = MASK_PASSES

    def __init__(
        self,
        data: Sequence[tuple[tuple, dict]] | None = None,
        steps: int = 100,
        lr: float = 5e-5,
        teacher: Any = None,
        objective: str | Callable[[Any, Any], torch.Tensor] | None = None,
        warmup: float = SCHEDULE["warmup"],
        schedule: str = SCHEDULE["schedule"],
        grad_clip: float | None = SCHEDULE["grad_clip"],
        accum: int = 1,
        autocast: str | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 50,
        activation_checkpointing: bool = False,
    ):
        if steps < 1:
            raise ValueError(f"recover: steps must be >= 1, got {steps}")
        self.data, self.steps, self.lr, self.teacher = data, steps, lr, teacher
        self.activation_checkpointing = activation_checkpointing
        self.objective = objective
        self.warmup, self.schedule, self.grad_clip = warmup, schedule, grad_clip
        self.accum, self.autocast = accum, autocast
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.pop("data", None)
        if self.teacher is not None:
            s["teacher"] = type(self.teacher).__name__
        if callable(self.objective):
            s["objective"] = getattr(self.objective, "__name__", "custom")
        return s

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets, _ = maskable_linears(gm)
        masked = [info for _, info in targets if info.get("masked")]
        if not masked:
            raise PassError(
                "recover: no linear is 2:4-masked; run a mask pass (magnitude, wanda, sparsegpt, "
                "proxsparse) before it"
            )
        batches = ctx.data_for(self.name, self.data)
        kind = self.objective or default_objective(gm, batches[0])
        if isinstance(kind, str) and kind != "causal_lm" and self.teacher is None:
            raise PassError(
                f"recover: objective {kind!r} distils a dense teacher; pass teacher=<the original "
                "model> (the graph here is already pruned), or objective='causal_lm'"
            )
        teacher = getattr(self.teacher, "gm", self.teacher)
        objective = Objective(gm, kind, batches, teacher=teacher)
        if self.activation_checkpointing:  # after every change to the graph training sees
            objective.student = checkpoint_layers(gm)
        flags = {p: p.requires_grad for p in gm.parameters()}
        for p in flags:  # only the kept weights train
            p.requires_grad_(False)
        weights = {info["weight"]: gm.get_parameter(info["weight"]) for info in masked}
        cfg = TrainConfig.for_pass(self, self.steps, self.lr)
        try:
            info = train_under_masks(weights, batches, objective, cfg, self.settings())
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        return PassResult(gm, True, {"layers_trained": len(weights), **info})
