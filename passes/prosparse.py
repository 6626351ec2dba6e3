"""ProSparse (arXiv 2402.13516): high activation sparsity in ReLU FFNs.

After ReluSubstitution, the model is fine-tuned with

    loss = task + sum_layers lambda(t) * mean|x1|

where x1 is each FFN's intermediate (the input of its down projection) and lambda(t) follows a
``StagedSine`` schedule (or ``Constant`` for the fixed-lambda baseline). Then FATReLU threshold
shifting (``threshold``: None, a value, or ``"sweep"``) trades a bounded quality drop for more
zeros.

Three ways to use it:
  * the pass, ``ProSparse(...)`` in ``pysparse.compile`` (runs pysparse's trainer, checkpoints,
    resume, a plot of lambda / sparsity / loss over training);
  * your own loop: ``reg = regularizer(sm, schedule)``; per step ``loss = task + reg.loss()``,
    then ``reg.step()``; ``reg.lam``, ``reg.sparsity()``; ``reg.remove()`` when done;
  * a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[reg.callback()])``. A callback cannot
    change the loss the Trainer computes, so in this mode the penalty enters through the
    backward pass instead: each tap adds lambda * sign(x1) / numel(x1) to x1's gradient, which
    is exactly the gradient of lambda * mean|x1| (the value is not added to the logged loss).

The taps are graph nodes after each x1 (``call_function`` nodes that the pass removes when done,
so the compiled graph carries no trace of them; disabled = absent = free). They record the
per-layer mean |x1| (as a differentiable term) and the zero fraction per token, padding
excluded when the attention mask is known (pysparse's trainer passes it; a user loop can call
``reg.set_mask``).

Distillation teachers (encoders) are the model with its *original* activations: the pass swaps
them back in temporarily (ReluSubstitution records them) to compute the targets once.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import call_no_grad
from pysparse.compiler.base import Pass, PassContext, PassError, PassResult
from pysparse.compiler.graph import add_taps, remove_taps, set_activation, tapped
from pysparse.learning.objectives import (
    DECODER_OBJECTIVES,
    Objective,
    default_objective,
    lm_loss,
    mean_pool,
)
from pysparse.learning.train import TrainConfig, Trainer, checkpoint_layers, curve

_log = logging.getLogger(__name__)


# ---- schedules ----------------------------------------------------------------------------------
class Constant:
    """lambda(t) = lam: the fixed-lambda baseline."""

    def __init__(self, lam: float):
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"Constant: lam must be finite and >= 0, got {lam}")
        self.lam = float(lam)

    @property
    def total_steps(self) -> int | None:
        return None

    def __call__(self, t: int) -> float:
        return self.lam

    def describe(self) -> str:
        return f"Constant({self.lam:g})"


class StagedSine:
    """ProSparse's progressive schedule over accumulated step counts.

    ``stages = [(lam_0, T_0), (lam_1, T_1), ..., (lam_S, T_S)]`` with T strictly increasing and
    lam non-decreasing. With lam_0 = 0 the first stage is the lambda = 0 stage (t <= T_0), the
    second the flat warm-up at lam_1 (T_0 < t <= T_1); without a zero stage the first stage is the
    warm-up. Every later stage i ramps along a sine, for T_(i-1) < t <= T_i:
        eta = 1/2 [sin(-pi/2 + pi (t - T_(i-1)) / (T_i - T_(i-1))) + 1]
        lambda = lam_(i-1) + eta (lam_i - lam_(i-1))     (lam_i = lam_(i-1): a plateau).
    ``t`` is the number of optimiser steps taken, counting from 1; after T_S lambda stays lam_S.
    """

    def __init__(self, stages: Sequence[tuple[float, int]]):
        stages = [(float(lam), int(t)) for lam, t in stages]
        if not stages:
            raise ValueError("StagedSine: give at least one (lam, end_step) stage")
        for (l0, t0), (l1, t1) in itertools.pairwise(stages):
            if t1 <= t0:
                raise ValueError(f"StagedSine: end steps must increase, got {t0} then {t1}")
            if l1 < l0:
                raise ValueError(f"StagedSine: lambdas must not decrease, got {l0:g} then {l1:g}")
        if stages[0][1] < 0 or any(not (lam >= 0 and math.isfinite(lam)) for lam, _ in stages):
            raise ValueError("StagedSine: steps must be >= 0 and lambdas finite and >= 0")
        self.stages = stages
        self.flat = 2 if stages[0][0] == 0 else 1  # stages that are constant

    @classmethod
    def scaled(cls, steps: int, lam: float) -> StagedSine:
        """The published LLaMA-2 schedule's shape fitted to ``steps`` and a final ``lam``: stage
        lengths of 30/6/24/12/24/4 % of the steps, lambdas 0, lam/40, lam/4 (sine), lam/4 (plateau),
        lam (sine), lam (plateau) - the same ratios as 0, 5e-3, 5e-2, 5e-2, 0.2, 0.2."""
        fractions = (0.30, 0.36, 0.60, 0.72, 0.96, 1.0)
        lams = (0.0, lam / 40, lam / 4, lam / 4, lam, lam)
        ends, prev = [], -1
        for f in fractions:
            end = max(prev + 1, round(f * steps))
            ends.append(end)
            prev = end
        return cls(list(zip(lams, ends)))

    @property
    def total_steps(self) -> int:
        return self.stages[-1][1]

    def __call__(self, t: int) -> float:
        prev_lam, prev_end = 0.0, 0
        for i, (lam, end) in enumerate(self.stages):
            if t <= end:
                if i < self.flat:
                    return lam
                eta = 0.5 * (
                    math.sin(-math.pi / 2 + math.pi * (t - prev_end) / (end - prev_end)) + 1
                )
                return prev_lam + eta * (lam - prev_lam)
            prev_lam, prev_end = lam, end
        return self.stages[-1][0]

    def describe(self) -> str:
        return "StagedSine(" + ", ".join(f"({lam:g}, {t})" for lam, t in self.stages) + ")"


# ---- taps and the regulariser -------------------------------------------------------------------
class _InjectL1(torch.autograd.Function):
    """Identity forward; backward adds ``scale * sign(x) * mask`` (the gradient of
    ``lam * mean|x|`` over real tokens)."""

    @staticmethod
    def forward(ctx, x, scale, mask):
        ctx.save_for_backward(x, mask)
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        x, mask = ctx.saved_tensors
        extra = torch.sign(x) * ctx.scale
        if mask.numel():
            extra = extra * mask.reshape(*mask.shape, *([1] * (x.dim() - mask.dim()))).to(x.dtype)
        return g + extra, None, None


def _ffn_inputs(gm: fx.GraphModule) -> list[tuple[int, fx.Node]]:
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for block in gm.meta["pysparse"]["ffns"]:
        down = nodes.get(block["down"])
        if down is not None:
            out.append((block["layer"], down))
    return out


class Regularizer:
    """lambda(t) * sum_layers mean|x1| for a compiled (not yet lowered) ReLU model; see the module
    docstring. ``target`` is a SparseModel or its GraphModule."""

    def __init__(self, target: Any, schedule: Callable[[int], float] | float, mode: str = "loss"):
        gm = getattr(target, "gm", target)
        if not isinstance(gm, fx.GraphModule) or "pysparse" not in gm.meta:
            raise TypeError("regularizer: pass a model from pysparse.compile (or its .gm)")
        if mode not in ("loss", "inject"):
            raise ValueError(f"regularizer: mode must be 'loss' or 'inject', got {mode!r}")
        self.gm = gm
        self.schedule = Constant(schedule) if isinstance(schedule, (int, float)) else schedule
        self.mode = mode
        self.t = 0
        self.enabled = True
        self.mask: torch.Tensor | None = None
        self.terms: dict[int, torch.Tensor] = {}
        self.zeros: dict[int, float] = {}
        self.taps: list[fx.Node] = []
        sites = _ffn_inputs(gm)
        if not sites:
            raise PassError("prosparse: the model has no annotated FFN block to regularise")
        self.layers = [layer for layer, _ in sites]
        self.install()

    def install(self) -> None:
        """Puts the taps in the graph (``__init__`` does; after ``remove``, puts them back)."""
        if self.taps:
            return
        self.taps = add_taps(
            self.gm,
            [(down, self._tap, (i,), "input") for i, (_, down) in enumerate(_ffn_inputs(self.gm))],
        )

    # the graph calls this for every FFN on every forward
    def _tap(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if not self.enabled:
            return x
        mask = self.mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[: mask.dim()]):
            mask = None
        with torch.no_grad():
            per_token = (x == 0).float().mean(-1)
            if mask is not None:
                m = mask.to(per_token.dtype)
                self.zeros[i] = float((per_token * m).sum() / m.sum().clamp_min(1))
            else:
                self.zeros[i] = float(per_token.mean())
        if not torch.is_grad_enabled():
            return x
        if self.mode == "loss":
            a = x.abs().mean(-1)
            if mask is not None:
                m = mask.to(a.dtype)
                self.terms[i] = (a * m).sum() / m.sum().clamp_min(1)
            else:
                self.terms[i] = a.mean()
            return x
        lam = self.lam
        if lam == 0:
            return x
        n = x.shape[-1] * (float(mask.sum()) if mask is not None else x[..., 0].numel())
        empty = torch.empty(0)
        return _InjectL1.apply(x, lam / max(n, 1.0), mask if mask is not None else empty)

    @property
    def lam(self) -> float:
        return float(self.schedule(self.t + 1))

    def set_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Token mask of the next forward (1 = real token), to keep padding out of the figures."""
        self.mask = attention_mask

    def loss(self) -> torch.Tensor:
        """lambda(t) * sum over layers of mean|x1| from the last forward (loss mode)."""
        if self.mode != "loss":
            raise RuntimeError("regularizer: loss() is for mode='loss'; inject mode adds gradients")
        if not self.terms:
            raise RuntimeError("regularizer: no forward pass with gradients recorded yet")
        total = torch.stack([self.terms[i] for i in sorted(self.terms)]).sum()
        self.terms = {}
        return self.lam * total

    def l1(self) -> float:
        return float(sum(float(v.detach()) for v in self.terms.values()))

    def sparsity(self) -> dict[str, Any]:
        """Zero fraction of x1 per layer (last forward) and their mean."""
        per = [self.zeros.get(i, float("nan")) for i in range(len(self.taps))]
        return {"per_layer": per, "mean": sum(per) / len(per) if per else float("nan")}

    def step(self) -> None:
        self.t += 1

    def remove(self) -> None:
        """Takes the taps out of the graph (the graph is as before ``regularizer``)."""
        remove_taps(self.gm, self.taps)
        self.taps = []

    def callback(self) -> Any:
        """A ``transformers.TrainerCallback`` that applies the penalty (inject mode) and advances
        lambda after every optimiser step."""
        from transformers import TrainerCallback

        self.mode = "inject"
        reg = self

        class ProSparseCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                reg.step()
                if state.log_history is not None:
                    s = reg.sparsity()["mean"]
                    if not math.isnan(s):
                        state.log_history.append(
                            {
                                "step": state.global_step,
                                "prosparse_lambda": reg.lam,
                                "activation_sparsity": s,
                            }
                        )

        return ProSparseCallback()


def regularizer(
    target: Any, schedule: Callable[[int], float] | float = 0.1, mode: str = "loss"
) -> Regularizer:
    """The ProSparse penalty for your own training loop (see the module docstring)."""
    return Regularizer(target, schedule, mode)


@contextlib.contextmanager
def original_activations(gm: fx.GraphModule) -> Iterator[None]:
    """Temporarily puts back the activations ReluSubstitution replaced (for teachers)."""
    blocks = [b for b in gm.meta["pysparse"]["ffns"] if "original" in b]
    saved = [(b, b.get("act_op"), b.get("threshold")) for b in blocks]
    for b in blocks:
        set_activation(gm, b, "original")
    gm.recompile()
    try:
        yield
    finally:
        for b, op, t in saved:
            set_activation(gm, b, op or "relu", t)
        gm.recompile()


def set_threshold(gm: fx.GraphModule, t: float) -> None:
    """Every ReLU FFN -> FATReLU with threshold ``t`` (``t = 0``: plain ReLU)."""
    for b in gm.meta["pysparse"]["ffns"]:
        set_activation(gm, b, "fatrelu" if t else "relu", t or None)
        b["act_op"], b["threshold"] = ("fatrelu", t) if t else ("relu", None)
    gm.recompile()


# ---- the pass -----------------------------------------------------------------------------------
# Defaults by model kind (``ProSparse.tuned``). Encoders: bench/prosparse.py on MiniLM (150 steps,
# final lambda 0.5 and the sweep: 86% at 0.969 held-out cosine). Decoders: bench/llm_quality.py on
# SmolLM2-135M, 4 x 256 packed tokens a step (see its "prosparse" row and issue 14's note);
# bf16 autocast where the CPU multiplies bf16 natively (AVX512-BF16 / AMX: 1.5x the fp32 step).
ENCODER_DEFAULTS = {"steps": 150, "lam": 0.5, "lr": 1e-4, "autocast": None}
DECODER_DEFAULTS = {"steps": 500, "lam": 1.5, "lr": 2e-4, "autocast": "bf16"}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (else bf16 autocast is emulated, slower)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


class ProSparse(Pass):
    """Fine-tunes a ReLU-substituted model with the sine-staged L1 penalty on x1, then shifts the
    activation threshold (FATReLU): ``threshold="sweep"`` (the default) picks the largest
    threshold whose quality drop on a validation slice of the data (``val_fraction``) stays within
    ``max_quality_drop``; a number sets it; None keeps plain ReLU. steps / lam / lr /
    autocast left as None take the defaults of the model kind (``tuned``): encoders
    ``ENCODER_DEFAULTS`` (MiniLM, 2 CPU cores: 150 steps, final lambda 0.5 and the sweep reach 86%
    activation sparsity at 0.969 held-out cosine; without the sweep 79%), decoders
    ``DECODER_DEFAULTS`` (SmolLM2-135M; meant for packed text, ``pysparse.quality.evaluate.pack_text``)."""

    name = "prosparse"
    after = ("relu",)
    needs_one_of = ("relu",)

    def __init__(
        self,
        data: Sequence[tuple[tuple, dict]] | None = None,
        steps: int | None = None,
        lam: float | None = None,
        schedule: Callable[[int], float] | None = None,
        lr: float | None = None,
        objective: str | Callable[[Any, Any], torch.Tensor] | None = None,
        threshold: float | str | None = "sweep",
        max_quality_drop: float = 0.01,
        val_fraction: float = 0.2,
        warmup: float = 0.05,
        lr_schedule: str = "cosine",
        grad_clip: float | None = 1.0,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 50,
        plot: str | None = None,
        accum: int = 1,
        autocast: str | None = None,
        monitor: Callable[[int, fx.GraphModule], dict[str, Any]] | None = None,
        monitor_every: int = 0,
        activation_checkpointing: bool = False,
    ):
        if (
            threshold is not None
            and threshold != "sweep"
            and not (isinstance(threshold, (int, float)) and threshold >= 0)
        ):
            raise ValueError(
                f"prosparse: threshold must be None, a number >= 0 or 'sweep', got {threshold!r}"
            )
        self.data = data
        self.activation_checkpointing = activation_checkpointing
        self.steps, self.lam, self.lr = steps, lam, lr
        self.schedule = schedule
        self.objective = objective
        self.threshold = threshold
        self.max_quality_drop = max_quality_drop
        self.val_fraction = val_fraction
        self.warmup, self.lr_schedule, self.grad_clip = warmup, lr_schedule, grad_clip
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.plot = plot
        self.accum, self.autocast = accum, autocast
        self.monitor, self.monitor_every = monitor, monitor_every

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        if self.schedule is not None:
            s["schedule"] = getattr(self.schedule, "describe", lambda: repr(self.schedule))()
        if callable(self.objective):
            s["objective"] = getattr(self.objective, "__name__", "custom")
        return s

    def tuned(self, objective: str) -> dict[str, Any]:
        """steps / lam / lr / autocast and the schedule: the ones given, else the defaults of the
        model kind (``DECODER_DEFAULTS`` when the objective is a decoder's, else
        ``ENCODER_DEFAULTS``; decoders' bf16 autocast only on a CPU with native bf16)."""
        base = dict(DECODER_DEFAULTS if objective in DECODER_OBJECTIVES else ENCODER_DEFAULTS)
        if base["autocast"] and not native_bf16():
            base["autocast"] = None
        steps = self.steps
        if steps is None and getattr(self.schedule, "total_steps", None):
            steps = self.schedule.total_steps  # a staged schedule of the user's sets the length
        given = {"steps": steps, "lam": self.lam, "lr": self.lr, "autocast": self.autocast}
        hp = {k: base[k] if v is None else v for k, v in given.items()}
        hp["schedule"] = self.schedule or StagedSine.scaled(hp["steps"], hp["lam"])
        return hp

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        batches, val, objective = self._setup(gm, ctx)
        info, history, schedule = self._train(gm, objective, batches)
        if self.threshold == "sweep":
            info["threshold_sweep"] = self._sweep(gm, objective, val)
            info["threshold"] = info["threshold_sweep"]["chosen"]
        elif self.threshold:
            set_threshold(gm, float(self.threshold))
            info["threshold"] = float(self.threshold)
        plot = self.plot or (
            f"{self.checkpoint_dir}/prosparse.png" if self.checkpoint_dir else None
        )
        if plot:
            info["plot"] = plot_history(history, schedule, plot)
        return PassResult(gm, True, info)

    def _setup(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[list, list, Objective]:
        """(training batches, validation batches for the threshold sweep, the objective whose
        teacher is the model with its original activations), after checking the graph."""
        ffns = gm.meta["pysparse"]["ffns"]
        if not ffns:
            raise PassError("prosparse: the model has no FFN block")
        if any(b.get("act_op") not in ("relu", "fatrelu") for b in ffns):
            raise PassError("prosparse: run ReluSubstitution ('relu') first; FFNs are not ReLU")
        batches = ctx.data_for(self.name, self.data)
        val: list = []
        if self.threshold == "sweep":
            n_val = max(1, int(len(batches) * self.val_fraction)) if len(batches) > 1 else 0
            val = batches[len(batches) - n_val :] if n_val else batches
            batches = batches[: len(batches) - n_val] if n_val else batches
        kind = self.objective or default_objective(gm, batches[0])
        with original_activations(gm):
            seen = {id(b) for b in batches}
            objective = Objective(gm, kind, batches + [b for b in val if id(b) not in seen])
        for p in gm.parameters():
            if not torch.isfinite(p).all():
                raise PassError(
                    "prosparse: the model has NaN/Inf weights; fix the checkpoint first"
                )
        return batches, val, objective

    def _train(
        self, gm: fx.GraphModule, objective: Objective, batches: list
    ) -> tuple[dict[str, Any], list[dict[str, float]], Any]:
        """The L1-regularised fine-tune along the lambda schedule; (report fields, history,
        schedule)."""
        params = {k: p for k, p in gm.named_parameters()}
        hp = self.tuned(objective.name)
        schedule = hp["schedule"]
        reg = Regularizer(gm, schedule, mode="loss")
        if self.activation_checkpointing:  # after every change to the graph training sees
            objective.student = checkpoint_layers(gm)

        def loss_fn(batch):
            reg.set_mask(batch[1].get("attention_mask"))
            task = objective(batch)
            l1 = reg.l1()
            penalty = reg.loss()
            return task + penalty, {
                "task": float(task.detach()),
                "l1": l1,
                "lam": reg.lam,
                "sparsity": reg.sparsity()["mean"],
            }

        # ``monitor(step, gm)`` every ``monitor_every`` steps (e.g. held-out perplexity and
        # sparsity for a frontier against training time); its seconds are not training time.
        watched: list[dict[str, Any]] = []
        spent = {"monitor": 0.0}

        def after_step(step: int, lr: float) -> dict[str, float]:
            reg.t = step + 1
            if self.monitor and self.monitor_every and reg.t % self.monitor_every == 0:
                tic = time.perf_counter()
                reg.remove()  # the graph as it will leave the pass (plain ReLU)
                trainer.gather()  # ... with the weights trained so far (torch.distributed)
                try:
                    row = dict(self.monitor(reg.t, gm) or {})
                finally:
                    reg.install()
                    trainer.release()
                train_s = tic - t0 - spent["monitor"]
                spent["monitor"] += time.perf_counter() - tic
                watched.append({"step": reg.t, "train_seconds": round(train_s, 1), **row})
            return {}

        def state():
            return {"t": reg.t}

        def set_state(s):
            reg.t = int(s["t"])

        t0 = time.perf_counter()
        try:
            trainer = Trainer(
                params,
                loss_fn,
                batches,
                TrainConfig.for_pass(
                    self, hp["steps"], hp["lr"], schedule=self.lr_schedule, autocast=hp["autocast"]
                ),
                after_step=after_step,
                state=(state, set_state),
                module=objective.student,
                fingerprint={
                    **self.settings(),
                    **{k: v for k, v in hp.items() if k != "schedule"},
                    "schedule": schedule.describe() if hasattr(schedule, "describe") else "custom",
                    "objective": objective.name,
                },
            )
            objective.student = trainer.module  # under torch.distributed: the sharded copy
            history = trainer.run()
        finally:
            reg.remove()
            objective.student = gm  # the sweep changes the graph: the snapshot would not see it
        info: dict[str, Any] = {
            "objective": objective.name,
            "schedule": getattr(schedule, "describe", lambda: repr(schedule))(),
            "steps": hp["steps"],
            "lr": hp["lr"],
            "autocast": hp["autocast"],
            "final_lambda": round(schedule(hp["steps"]), 6),
            "seconds_training": round(time.perf_counter() - t0 - spent["monitor"], 1),
            "tokens_per_second": round(trainer.tokens_per_second(), 1),
            "ranks": trainer.world,
            "train_sparsity_last": round(history[-1]["sparsity"], 4) if history else None,
            "task_loss_last": round(history[-1]["task"], 5) if history else None,
            "curve": curve(history, lam=schedule),
        }
        if watched:
            info["monitor"] = watched
        return info, history, schedule

    def _sweep(self, gm: fx.GraphModule, objective: Objective, val: list) -> dict[str, Any]:
        """Largest FATReLU threshold, rising along a grid until the first candidate whose quality
        drop on ``val`` leaves the bound (a larger threshold only zeroes more):
        encoders (distillation): mean cosine to the original's embeddings may fall by at most
        ``max_quality_drop``; decoders: the LM loss may rise by at most that fraction; a callable
        objective of the user's: its own value, likewise."""
        from pysparse.quality.evaluate import measure_activation_sparsity

        # Grid in units of the mean positive x1 value on the validation text.
        scale = self._positive_scale(gm, val)
        rows = []
        chosen = 0.0
        base = None
        metric = (
            "objective"
            if callable(objective.kind)
            else "LM loss"
            if objective.name in DECODER_OBJECTIVES
            else "mean cosine to original"
        )
        for mult in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5):
            t = mult * scale
            set_threshold(gm, t)
            quality = self._quality(gm, objective, val)
            sp = measure_activation_sparsity(gm, val, gm.meta["pysparse"].get("call_kwargs"))
            sparsity = sum(sp) / len(sp) if sp else float("nan")
            if base is None:
                base = quality
            ok = (
                quality >= base - self.max_quality_drop
                if metric == "mean cosine to original"
                else quality <= base * (1 + self.max_quality_drop)
            )
            rows.append(
                {
                    "t": round(t, 6),
                    "quality": round(quality, 5),
                    "sparsity": round(sparsity, 4),
                    "ok": ok,
                }
            )
            if not ok:  # larger thresholds only zero more: the first miss ends the sweep
                break
            chosen = t
        set_threshold(gm, chosen)
        return {
            "metric": metric,
            "bound": self.max_quality_drop,
            "rows": rows,
            "chosen": round(chosen, 6),
        }

    @staticmethod
    def _positive_scale(gm: fx.GraphModule, val: list) -> float:
        vals: list[float] = []

        def grab(x: torch.Tensor, i: int) -> torch.Tensor:
            p = x.detach()[x.detach() > 0]
            if p.numel():
                vals.append(float(p.mean()))
            return x

        taps = [(down, grab, (i,), "input") for i, (_, down) in enumerate(_ffn_inputs(gm))]
        with tapped(gm, taps):
            for b in val:
                call_no_grad(gm, *b)
        return sum(vals) / len(vals) if vals else 0.0

    @staticmethod
    def _quality(gm: fx.GraphModule, objective: Objective, val: list) -> float:
        with torch.no_grad():
            if callable(objective.kind):
                return float(sum(float(objective(b)) for b in val) / len(val))
            if objective.name in DECODER_OBJECTIVES:
                return float(sum(float(lm_loss(call_no_grad(gm, *b), b)) for b in val) / len(val))
            from pysparse.quality.evaluate import _pooled

            cos = []
            for b in val:
                e = _pooled(lambda *a, **k: call_no_grad(gm, a, k), b)
                t = objective.teacher_for(b)
                if objective.name == "hidden_mse":
                    t = mean_pool(t, b)
                cos.append(torch.nn.functional.cosine_similarity(e, t, dim=-1).mean())
            return float(torch.stack(cos).mean())


def plot_history(
    history: list[dict[str, float]], schedule: Callable[[int], float], path: str
) -> str | None:
    """lambda(t), training activation sparsity and task loss over the run, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log.warning("prosparse: matplotlib is not installed; no plot written")
        return None
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] + 1 for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot(steps, [schedule(s) for s in steps])
    axes[0].set_ylabel("lambda")
    axes[1].plot(steps, [h["sparsity"] for h in history])
    axes[1].set_ylabel("x1 zeros (train batch)")
    axes[2].plot(steps, [h["task"] for h in history])
    axes[2].set_ylabel("task loss")
    axes[2].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
