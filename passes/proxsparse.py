"""ProxSparse (arXiv 2502.00258, ICML 2025): 2:4 masks learned end to end.

The captured graph is trained (its parameters are the live ones; see pysparse.capture) with the
shared trainer (pysparse.learning.train) on

    objective(W) + lam2 * R_frozen(W),   R_frozen = sum_layers ||(W / (W0 + eps*sgn*(W0))) * (W - W0)||_F^2

and after every optimiser step the proximal operator of ``t * Reg`` (the ``prox24_`` kernel) is
applied to every prunable weight, so groups of 4 are driven towards at most 2 nonzeros while the
objective decides which two. ``t`` is ``lam1`` (``prox_scale="lam"``, the default: what the
published code does and what its lam1 range of 0.2-1 for LLaMA was tuned for) or ``lr_t * lam1``
(``prox_scale="lr*lam"``, textbook proximal gradient: lam1 must then be ~1/lr times larger).
Only the prunable linears' weights are trained; everything else stays frozen.

At the end the mask is the top 2 |w| of each group of the *learned* weights and the original
weights are restored under it (``W0 * M``): only masks leave the pass (mask-only, as published).
``reconstruct=True`` then solves SparseGPT's OBS least-squares update of the original weights
under the learned, fixed masks, layer by layer over the calibration batches (the reconstruction
of SparseGPT with ProxSparse's mask; see passes.baselines.sparsegpt_graph): the kept weights
change to compensate for the pruned ones, in closed form. ``recover_steps > 0`` adds a separate,
clearly reported step that then trains the kept weights under the fixed mask with the same
objective (masked distillation / fine-tuning) — not part of ProxSparse proper.

``init_mask`` (``"sparsegpt"`` / ``"magnitude"``: that method's mask chosen here on the pass's
batches; a model compiled by another mask pass, e.g. Wanda's; or a mapping weight name -> bool
mask) starts the learning from ``W0`` under that mask instead of from ``W0``: the prox and the
objective then refine a mask that is already 2:4 (pruned weights can grow back where the
objective wants them), and the report counts the groups the learning changed. ``R_frozen`` is
still measured from the dense ``W0`` (zero at the start), and the final restore is ``W0 * M``.

Defaults: the tuned pipeline, not the published mask-only method. ``ProxSparse()`` starts from
SparseGPT's mask, learns with lam2 = 1, reconstructs under the learned mask and runs 100 recovery
steps — the best rows of bench/masks.py and bench/llm_quality.py (all-MiniLM-L6-v2 0.893 held-out
cosine before recovery vs SparseGPT-with-update's 0.892; SmolLM2 perplexity 21.27 vs SparseGPT
with its update 30.69). ``ProxSparse.mask_only()`` is the method as published: learning from W0,
only the masks leave the pass (W0 under them), no reconstruction, no recovery.

Objective: ``"logit_kl"`` (distillation to the dense model's next-token distributions) for
decoders, distillation to the frozen original for encoders
(``"hidden_mse"`` default, or ``"pooled_cosine"``), or a callable; see pysparse.learning.objectives.

Memory held: a copy of each trained weight's original values (W0, needed for the restore and for
R_frozen) and AdamW's two moment tensors per trained weight; teacher outputs for the calibration
batches when distilling.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

from pysparse.compiler.base import Pass, PassContext, PassError, PassResult
from pysparse.kernels import ops
from pysparse.learning.distributed import local, rank_and_world, shard_like, sum_counts, unshard
from pysparse.learning.objectives import DECODER_OBJECTIVES, Objective, default_objective
from pysparse.learning.train import TrainConfig, Trainer, checkpoint_layers, curve

from .baselines import MagnitudePrune, maskable_linears, masks_from, sparsegpt_graph
from .recover import SCHEDULE as RECOVER_SCHEDULE
from .recover import train_under_masks

_log = logging.getLogger(__name__)

# Tuned defaults by model kind (see ProxSparse's docstring for the sweeps behind them).
# lam2 = 1 for both: the learned weights stay near W0, so the mask is chosen for the W0 the
# reconstruction starts from (all-MiniLM-L6-v2 from SparseGPT's mask + reconstruction: 0.8933
# held-out cosine with lam2 1, 0.8887 with lam2 0; SparseGPT with its update 0.8920).
ENCODER_DEFAULTS = {"steps": 200, "lr": 1e-3, "lam1": 0.5, "lam2": 1.0, "recover_lr": 5e-5}
# Decoders: learned from W0 (mask only) the mask was far worse than magnitude pruning on SmolLM2
# (held-out perplexity 440930 with lam2 0, 129782 with lam2 1, magnitude 992; bench/llm_quality.py).
# Started from SparseGPT's mask (lam2 = 1): 55.97 mask only (SparseGPT's own mask 56.77), 32.45
# with SparseGPT's update under it, 21.27 after 100 recovery steps at lr 1e-4 (SparseGPT + update
# 30.69; the same 100 steps after it 20.75; bench/RESULTS.md).
DECODER_DEFAULTS = {"steps": 200, "lr": 1e-4, "lam1": 0.5, "lam2": 1.0, "recover_lr": 1e-4}
RECOVER_STEPS = 100
INIT_METHODS = ("sparsegpt", "magnitude")

STATS_EVERY = 10  # steps between two counts of the 2:4 groups shown on the progress bar


def frozen_regularizer(w: torch.Tensor, w0: torch.Tensor, eps: float) -> torch.Tensor:
    """||(W / (W0 + eps*sgn*(W0))) * (W - W0)||_F^2 with sgn*(0) = +1: zero when every weight is
    0 or its original value."""
    sgn = torch.where(w0 >= 0, 1.0, -1.0).to(w0.dtype)
    return ((w / (w0 + eps * sgn)) * (w - w0)).pow(2).sum()


def fraction_24(ws: Sequence[torch.Tensor], across_ranks: bool = False) -> float:
    """Fraction of groups of 4 (over all ``ws``) with at most two nonzeros; ``across_ranks``:
    ``ws`` are this rank's shards and the fraction is of every rank's groups."""
    ok = total = 0
    for w in ws:
        g = (w.detach().reshape(-1, 4) != 0).sum(-1)
        ok += int((g <= 2).sum())
        total += g.numel()
    if across_ranks:
        ok, total = sum_counts(ok, total)
    return ok / max(total, 1)


def top2_mask(w: torch.Tensor) -> torch.Tensor:
    g = w.detach().abs().reshape(-1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(2, dim=1).indices, True)
    return keep.reshape(w.shape)


class ProxSparse(Pass):
    """Learned 2:4 masks (see the module docstring). Defaults by model kind: ``ENCODER_DEFAULTS``
    (200 steps, lr 1e-3, lam1 0.5, prox_scale "lam", hidden-state distillation; chosen for
    encoders of MiniLM's size by a sweep scored on a validation part of pysparse.quality.corpus's training
    split: lam1 0.1 / 0.2 / 0.5 / 2 / 5, lr 1e-3 / 3e-3, 100 / 200 steps; held-out text never
    used) or ``DECODER_DEFAULTS`` (lr 1e-4 as published for LLaMA, logit distillation); for both
    the tuned pipeline around the learning: ``init_mask="sparsegpt"``, ``reconstruct=True``,
    ``RECOVER_STEPS`` recovery steps. ``ProxSparse.mask_only(...)``: the published method."""

    name = "proxsparse"
    after = ("relu",)

    def __init__(
        self,
        data: Sequence[tuple[tuple, dict]] | None = None,
        steps: int | None = None,
        lr: float | None = None,
        lam1: float | None = None,
        lam2: float | None = None,
        eps: float = 0.1,
        objective: str | Callable[[Any, Any], torch.Tensor] | None = None,
        prox_scale: str = "lam",
        schedule: str = "linear",
        warmup: float = 0.1,
        grad_clip: float | None = 1.0,
        accum: int = 1,
        max_iters: int = 100,
        recover_steps: int | None = None,
        recover_lr: float | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 50,
        down_along: str = "d_ff",
        reconstruct: bool = True,
        autocast: str | None = None,
        init_mask: Any = "sparsegpt",
        activation_checkpointing: bool = False,
    ):
        if down_along not in ("d_ff", "d_model"):
            raise ValueError(
                f"proxsparse: down_along must be 'd_ff' or 'd_model', got {down_along!r}"
            )
        if prox_scale not in ("lam", "lr*lam"):
            raise ValueError(
                f"proxsparse: prox_scale must be 'lam' or 'lr*lam', got {prox_scale!r}"
            )
        if isinstance(init_mask, str) and init_mask not in INIT_METHODS:
            raise ValueError(
                f"proxsparse: init_mask must be one of {INIT_METHODS}, a compiled model, a "
                f"mapping weight name -> mask, or None (learn from W0); got {init_mask!r}"
            )
        if recover_steps is not None and recover_steps < 0:
            raise ValueError(f"proxsparse: recover_steps must be >= 0, got {recover_steps}")
        if (lam1 or 0) < 0 or (lam2 or 0) < 0 or not math.isfinite((lam1 or 0) + (lam2 or 0)):
            raise ValueError(
                f"proxsparse: lam1 and lam2 must be finite and >= 0 (got {lam1}, {lam2})"
            )
        self.data = data
        self.activation_checkpointing = activation_checkpointing
        self.steps, self.lr, self.lam1, self.lam2, self.eps = steps, lr, lam1, lam2, eps
        self.objective = objective
        self.prox_scale = prox_scale
        self.schedule, self.warmup, self.grad_clip, self.accum = schedule, warmup, grad_clip, accum
        self.max_iters = max_iters
        self.recover_steps, self.recover_lr = recover_steps, recover_lr
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.down_along = down_along
        self.reconstruct = reconstruct
        self.autocast = autocast
        self.init_mask = init_mask

    @classmethod
    def mask_only(cls, **kw: Any) -> ProxSparse:
        """ProxSparse as published: learning starts from the dense W0, only the learned masks leave
        the pass (W0 under them); no reconstruction, no recovery (each can still be given)."""
        return cls(**{"init_mask": None, "reconstruct": False, "recover_steps": 0, **kw})

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.pop("data", None)
        if self.init_mask is not None and not isinstance(self.init_mask, str):
            s["init_mask"] = type(self.init_mask).__name__
        if callable(self.objective):
            s["objective"] = getattr(self.objective, "__name__", "custom")
        return s

    def tuned(self, objective: str) -> dict[str, Any]:
        """steps / lr / lam1 / lam2 / recover_steps / recover_lr: the ones given, else the tuned
        defaults of the model kind (``DECODER_DEFAULTS`` when the objective is a decoder's, else
        ``ENCODER_DEFAULTS``; ``RECOVER_STEPS``)."""
        base = DECODER_DEFAULTS if objective in DECODER_OBJECTIVES else ENCODER_DEFAULTS
        base = {**base, "recover_steps": RECOVER_STEPS}
        given = {
            "steps": self.steps,
            "lr": self.lr,
            "lam1": self.lam1,
            "lam2": self.lam2,
            "recover_steps": self.recover_steps,
            "recover_lr": self.recover_lr,
        }
        return {k: base[k] if v is None else v for k, v in given.items()}

    def _sub_dir(self, name: str) -> str | None:
        return f"{self.checkpoint_dir}/{name}" if self.checkpoint_dir else None

    def expand(self) -> list[Pass] | None:
        """The tuned pipeline as stages the PassManager runs and reports one by one: the start
        mask (``init_mask`` by name), this method, the reconstruction, the recovery. None (run
        as one pass) for the method alone (``mask_only()``)."""
        recover = RECOVER_STEPS if self.recover_steps is None else self.recover_steps
        if not (isinstance(self.init_mask, str) or self.reconstruct or recover > 0):
            return None
        run = _Run(self)
        stages: list[Pass] = []
        if isinstance(self.init_mask, str):
            stages.append(_StartMask(run))
        stages.append(_Learn(run))
        if self.reconstruct:
            stages.append(_Reconstruct(run))
        if recover > 0:
            stages.append(_Recover(run))
        return stages

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """The method alone: learn the masks, restore W0 under them."""
        run = _Run(self)
        run.prepare(gm, ctx)
        if self.init_mask is not None:
            run.apply_init(masks_from(self.init_mask, gm, run.targets, self.name))
        return PassResult(gm, True, run.learn(gm))


class _Run:
    """What the stages of one ProxSparse share: the prunable linears, the batches, the objective
    (its teacher is the graph as the first stage found it: dense), the original weights W0, the
    start mask and the learned mask."""

    def __init__(self, method: ProxSparse):
        self.method = method
        self.prepared = False
        self.init: dict[str, torch.Tensor] | None = None
        self.keep: dict[str, torch.Tensor] = {}

    def prepare(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        m = self.method
        self.ctx = ctx
        self.targets, self.skipped = maskable_linears(gm)
        if not self.targets:
            raise PassError(
                "proxsparse: the model has no prunable linear whose in_features % 4 == 0"
            )
        self.weights = {
            info["weight"]: gm.get_parameter(info["weight"]) for _, info in self.targets
        }
        # down_along="d_model": the FFN down projections are grouped along out_features (the by-row
        # layout of the 2:4 FFN kernels, see baselines._MaskPass); the prox, the 2:4 count and the
        # final top-2 then work on their transposes. The regulariser is elementwise: no change.
        self.along_out = {
            info["weight"]
            for _, info in self.targets
            if m.down_along == "d_model"
            and info.get("role") == "down"
            and self.weights[info["weight"]].shape[0] % 4 == 0
        }
        for name, w in self.weights.items():
            if not torch.isfinite(w).all():
                raise PassError(
                    f"proxsparse: weight {name} contains NaN or Inf; fix the checkpoint first"
                )
        self.batches = ctx.data_for(m.name, m.data)
        kind = m.objective or default_objective(gm, self.batches[0])
        self.objective = Objective(gm, kind, self.batches)
        if m.activation_checkpointing:  # after every change to the graph training sees
            self.objective.student = checkpoint_layers(gm)
        self.hp = m.tuned(self.objective.name)
        self.w0 = {k: w.detach().clone() for k, w in self.weights.items()}
        self.prepared = True

    def grouped(self, k: str, w: torch.Tensor) -> torch.Tensor:
        return w.T if k in self.along_out else w

    def apply_init(self, init: dict[str, torch.Tensor]) -> None:
        """Starts the learning from W0 under ``init``."""
        self.init = init
        with torch.no_grad():
            for k, w in self.weights.items():
                w.mul_(init[k])

    def choose_init(self, gm: fx.GraphModule) -> dict[str, Any]:
        """The ``init_mask`` method's 2:4 masks on the pass's batches (mask only: the weights are
        left as W0 under them)."""
        m = self.method
        if m.init_mask == "sparsegpt":
            split = sparsegpt_graph(
                gm,
                self.ctx,
                self.targets,
                update_weights=False,
                down_along=m.down_along,
                batches=self.batches,
                desc="proxsparse: start mask (sparsegpt)",
            )
        else:
            split = None
            MagnitudePrune(m.down_along).prune_all(gm, self.ctx, self.targets)
        # Masks from the zero pattern: a weight that was already 0 reads as pruned, which changes
        # nothing under the mask (W0 * M) and keeps every group at <= 2 kept.
        init = {k: w != 0 for k, w in self.weights.items()}
        self.apply_init(init)
        return {"method": m.init_mask, "layers_pruned": len(init), "seconds_split": split}

    def learn(self, gm: fx.GraphModule) -> dict[str, Any]:
        """ProxSparse's learning, then the top-2 mask of the learned weights with W0 under it."""
        with _only_trained(gm):
            history, trainer, split, t0 = self._train()
        learned_24 = fraction_24([self.grouped(k, w) for k, w in self.weights.items()])
        changed, moved = self._harden()
        groups = sum(w.numel() // 4 for w in self.weights.values())
        for _, info in self.targets:
            info["masked"] = self.method.name
            info["mask_axis"] = "out" if info["weight"] in self.along_out else "in"
        return {
            "layers_pruned": len(self.weights),
            "skipped": self.skipped,
            "objective": self.objective.name,
            **self.hp,
            "seconds_per_step": round((time.perf_counter() - t0) / max(self.hp["steps"], 1), 3),
            "seconds_per_step_split": {k: round(v, 4) for k, v in split.items()},
            "tokens_per_second": round(trainer.tokens_per_second(), 1),
            "ranks": rank_and_world()[1],
            "first_loss": round(history[0]["task"], 5) if history else None,
            "last_loss": round(history[-1]["task"], 5) if history else None,
            "groups_24_before_hard_mask": round(learned_24, 4),
            "groups_differing_from_magnitude": round(changed / max(groups, 1), 4),
            "groups_differing_from_init_mask": (
                round(moved / max(groups, 1), 4) if self.init is not None else None
            ),
            "weight_density": 0.5,
            "down_along": self.method.down_along,
            "curve": curve(history),
            "grouped_along_out_features": len(self.along_out),
        }

    def _train(self) -> tuple[list[dict], Trainer, dict[str, float], float]:
        """The learning loop: the objective plus lam2 * R_frozen, the prox after every step."""
        m, hp, weights = self.method, self.hp, self.weights
        steps, lam1, lam2 = hp["steps"], hp["lam1"], hp["lam2"]
        _, world = rank_and_world()
        w0_mine = self.w0  # each rank's shard of W0 under torch.distributed (set once sharded)

        def loss_fn(batch):
            task = self.objective(batch)
            metrics = {"task": float(task.detach())}
            if lam2 > 0:
                # over ranks: this rank's shards only; their gradients are local, and the logged
                # sum is scaled by the rank count (the trainer averages metrics over ranks)
                reg = sum(
                    frozen_regularizer(local(w), w0_mine[k], m.eps) for k, w in weights.items()
                )
                metrics["r_frozen"] = float(reg.detach()) * world
                metrics["loss"] = metrics["task"] + lam2 * metrics["r_frozen"]
                return task + lam2 * reg, metrics
            return task, metrics

        # The share of 2:4 groups (progress bar, history) reads every weight: every
        # STATS_EVERY steps and on the last, the last value shown in between.
        # (and on the first step a run takes, so a resumed run shows the value at once)
        stats = {"groups_24": -1.0, "prox_s": 0.0, "stats_s": 0.0}

        def after_step(step: int, lr: float) -> dict[str, float]:
            t = lam1 if m.prox_scale == "lam" else lr * lam1
            tic = time.perf_counter()
            for k, w in weights.items():  # on this rank's shard: its groups of 4 are whole
                ops.prox24_(self.grouped(k, local(w.data)), t, m.max_iters)
            toc = time.perf_counter()
            stats["prox_s"] += toc - tic
            if step % STATS_EVERY == 0 or step == steps - 1 or stats["groups_24"] < 0:
                stats["groups_24"] = fraction_24(
                    [self.grouped(k, local(w.data)) for k, w in weights.items()],
                    across_ranks=True,
                )
                stats["stats_s"] += time.perf_counter() - toc
            return {"groups_24": stats["groups_24"]}

        t0 = time.perf_counter()
        cfg = TrainConfig.for_pass(m, steps, hp["lr"], checkpoint_dir=m._sub_dir("learn"))
        trainer = Trainer(
            weights,
            loss_fn,
            self.batches,
            cfg,
            after_step=after_step,
            fingerprint={**m.settings(), **hp, "objective": self.objective.name},
            module=self.objective.student,
            group_dims={k: 0 if k in self.along_out else 1 for k in weights},
        )
        student = self.objective.student
        weights, self.objective.student = trainer.params, trainer.module
        w0_mine = {k: shard_like(self.w0[k], w) for k, w in weights.items()}
        if world > 1:  # W0 kept by shard for the run (rebuilt whole after it)
            self.w0 = {}
        try:
            history = trainer.run()
            if world > 1:
                self.w0 = {k: unshard(w0_mine[k], w) for k, w in weights.items()}
        finally:
            weights, self.objective.student = self.weights, student
        ran = max(len(history) - (trainer.resumed_from or 0), 1)
        split = {
            "forward_backward": trainer.phase_seconds["forward_backward"] / ran,
            "optimizer": trainer.phase_seconds["optimizer"] / ran,
            "prox": stats["prox_s"] / ran,
            "groups_24_stats": stats["stats_s"] / ran,
        }
        return history, trainer, split, t0

    def _harden(self) -> tuple[int, int]:
        """The top-2 |w| of each learned group becomes the mask and W0 goes under it; returns the
        groups whose mask differs from magnitude's on W0, and from the start mask."""
        changed = moved = 0
        with torch.no_grad():
            for k, w in self.weights.items():
                m = top2_mask(self.grouped(k, w))
                changed += int(
                    (m != top2_mask(self.grouped(k, self.w0[k]))).reshape(-1, 4).any(-1).sum()
                )
                if self.init is not None:
                    moved += int((m != self.grouped(k, self.init[k])).reshape(-1, 4).any(-1).sum())
                self.keep[k] = self.grouped(k, m)
                w.copy_(self.w0[k] * self.keep[k])
        return changed, moved

    def reconstruct(self, gm: fx.GraphModule) -> dict[str, Any]:
        """SparseGPT's OBS least-squares update of the original weights under the learned masks,
        layer by layer over the calibration stream (earlier layers reconstructed)."""
        tic = time.perf_counter()
        with torch.no_grad():
            for k, w in self.weights.items():
                w.copy_(self.w0[k])
        split = sparsegpt_graph(
            gm,
            self.ctx,
            self.targets,
            down_along=self.method.down_along,
            keep=self.keep,
            batches=self.batches,
            desc="proxsparse: reconstruct",
        )
        return {
            "layers_reconstructed": len(self.keep),
            "reconstruct_seconds": round(time.perf_counter() - tic, 1),
            "reconstruct_seconds_split": split,
        }

    def recover(self, gm: fx.GraphModule) -> dict[str, Any]:
        """Masked fine-tune of the kept weights (passes.recover; the teacher is the dense graph
        the objective saw before the first stage)."""
        m = self.method
        cfg = TrainConfig.for_pass(
            m,
            self.hp["recover_steps"],
            self.hp["recover_lr"],
            checkpoint_dir=m._sub_dir("recover"),
            desc="proxsparse: recover",
            **RECOVER_SCHEDULE,  # Recover's, not the learning's
        )
        with _only_trained(gm):
            return train_under_masks(
                self.weights, self.batches, self.objective, cfg, {"recover_of": m.settings()}
            )


@contextlib.contextmanager
def _only_trained(gm: fx.GraphModule) -> Iterator[None]:
    """Every parameter of ``gm`` frozen for the block (the trainer turns on the ones it trains);
    the flags are put back however it ends."""
    flags = {p: p.requires_grad for p in gm.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


class _Stage(Pass):
    """One stage of ``ProxSparse``'s tuned pipeline (``ProxSparse.expand``)."""

    stage = ""

    def __init__(self, run: _Run):
        self.run = run
        self.name = f"proxsparse.{self.stage}" if self.stage else "proxsparse"

    def settings(self) -> dict[str, Any]:
        return self.run.method.settings()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not self.run.prepared:
            self.run.prepare(gm, ctx)
        return PassResult(gm, True, self.step(gm))

    def step(self, gm: fx.GraphModule) -> dict[str, Any]:
        raise NotImplementedError


class _StartMask(_Stage):
    """The start mask of the learning: SparseGPT's (or magnitude's) 2:4 mask, W0 under it."""

    stage = "init"

    def settings(self) -> dict[str, Any]:
        return {"method": self.run.method.init_mask, "down_along": self.run.method.down_along}

    def step(self, gm: fx.GraphModule) -> dict[str, Any]:
        return self.run.choose_init(gm)


class _Learn(_Stage):
    """ProxSparse's learning (the method), from the start mask when there is one."""

    def step(self, gm: fx.GraphModule) -> dict[str, Any]:
        m = self.run.method
        if self.run.init is None and m.init_mask is not None and not isinstance(m.init_mask, str):
            self.run.apply_init(masks_from(m.init_mask, gm, self.run.targets, m.name))
        return self.run.learn(gm)


class _Reconstruct(_Stage):
    """SparseGPT's reconstruction of W0 under the learned masks."""

    stage = "reconstruct"

    def settings(self) -> dict[str, Any]:
        return {"down_along": self.run.method.down_along}

    def step(self, gm: fx.GraphModule) -> dict[str, Any]:
        return self.run.reconstruct(gm)


class _Recover(_Stage):
    """Masked recovery of the kept weights, distilling the dense graph."""

    stage = "recover"

    def settings(self) -> dict[str, Any]:
        m = self.run.method
        hp = self.run.hp if self.run.prepared else m.tuned(m.objective or "")
        return {"steps": hp["recover_steps"], "lr": hp["recover_lr"], **RECOVER_SCHEDULE}

    def step(self, gm: fx.GraphModule) -> dict[str, Any]:
        return self.run.recover(gm)
