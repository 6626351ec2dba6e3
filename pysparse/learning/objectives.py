"""Training objectives shared by the learning passes (ProxSparse, ProSparse).

  * ``"logit_kl"``   distillation to the frozen original on next-token distributions (decoders'
                     default): mean over real tokens of KL(p_teacher || p_student) at every
                     position. The teacher's log-probabilities are cached in fp16 (2 bytes per
                     token per vocabulary entry: SmolLM2, 49k entries, 96 KiB a token; the cache
                     size is logged, and refused over ``PYSPARSE_TEACHER_CACHE_GB``, default 12).
  * ``"causal_lm"``  next-token cross-entropy on the batch's own tokens, padding excluded
                     (decoders: any output with ``logits``).
  * ``"hidden_mse"`` distillation to the frozen original: mean over real (non-padding) tokens of
                     ||h - h0||^2 / mean ||h0||^2 on the final hidden states (encoders' default).
  * ``"pooled_cosine"`` distillation on sentence embeddings: 1 - cos(mean-pool(h), mean-pool(h0)).
  * a callable ``fn(output, batch) -> loss`` of the user's.

Why ``logit_kl`` is the decoders' default: the dense model's whole next-token distribution is a
far richer target than the one token the text happened to hold, and it keeps the sparse model's
behaviour (not the calibration text's) as the thing to preserve; with a few hundred calibration
sentences the LM loss overfits them (bench/llm_quality.py compares both).

Why ``hidden_mse`` is the encoders' default: it constrains every token's state, which carries far
more signal per sentence than one pooled vector, and pooled embeddings (what sentence-embedding
quality is measured on) follow when all token states match. ``pooled_cosine`` is offered to
compare.

Shapes: hidden states are ``[batch, seq, d]`` (a token per position; the attention mask, when the
batch has one, marks the real ones) or ``[batch, d]`` (a plain model such as an ``nn.Sequential``
on ``[batch, features]``: every row is one item, already pooled). ``causal_lm`` needs
``[batch, seq, vocab]`` logits. The teacher's outputs are computed once, before training, from the graph as it is then
(the frozen original), and cached per batch: no second model is kept in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import call, call_no_grad

_log = logging.getLogger(__name__)

OBJECTIVES = ("logit_kl", "causal_lm", "hidden_mse", "pooled_cosine")


def hidden_states(out: Any) -> torch.Tensor:
    """The final hidden states of a model's output: ``last_hidden_state``, a plain tensor, or the
    first tensor of a tuple."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"objective: cannot find the hidden states in a {type(out).__name__} output; pass "
        "objective=fn(output, batch) -> loss"
    )


def token_mask(batch: tuple[tuple, dict], like: torch.Tensor) -> torch.Tensor:
    """1 for every real token of ``like`` and 0 for padding, shaped like ``like`` without its last
    (feature) dim: ``[batch, seq]`` from the batch's attention mask, or all ones when there is
    none or ``like`` is ``[batch, d]`` (one item per row, nothing to mask)."""
    tokens = like.shape[:-1]
    mask = batch[1].get("attention_mask")
    if mask is None or like.dim() < 3:
        return torch.ones(tokens, dtype=like.dtype, device=like.device)
    if tuple(mask.shape) != tuple(tokens):
        raise ValueError(
            f"objective: the batch's attention_mask is {tuple(mask.shape)} but the output's token "
            f"axes are {tuple(tokens)}; pass objective=fn(output, batch) -> loss"
        )
    return mask.to(like.dtype)


def mean_pool(h: torch.Tensor, batch: tuple[tuple, dict]) -> torch.Tensor:
    """Sentence embeddings: the mean of ``h``'s real tokens, ``[batch, seq, d] -> [batch, d]``. A
    ``[batch, d]`` ``h`` is one vector per row already and comes back as it is."""
    if h.dim() < 3:
        return h
    m = token_mask(batch, h).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


def default_objective(gm: fx.GraphModule, example: tuple[tuple, dict]) -> str:
    """``logit_kl`` when the graph returns logits over a vocabulary, else ``hidden_mse``."""
    out = call_no_grad(gm, *example)
    return "logit_kl" if hasattr(out, "logits") else "hidden_mse"


def _logits(out: Any, kind: str) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else hidden_states(out)
    if logits.dim() != 3:
        raise ValueError(
            f"objective {kind}: needs logits [batch, seq, vocab], got shape "
            f"{tuple(logits.shape)}; pass objective='hidden_mse' or a callable"
        )
    return logits


def lm_loss(out: Any, batch: tuple[tuple, dict]) -> torch.Tensor:
    """Next-token cross-entropy of a decoder's output on the batch's own tokens, padding
    excluded (the ``causal_lm`` objective, and decoders' quality measure in the passes)."""
    logits = _logits(out, "causal_lm")
    ids = batch[0][0] if batch[0] else batch[1]["input_ids"]
    mask = token_mask(batch, logits)[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        ids[:, 1:].reshape(-1),
        reduction="none",
    ).reshape(mask.shape)
    return (ce * mask).sum() / mask.sum().clamp_min(1)


DECODER_OBJECTIVES = ("logit_kl", "causal_lm")


def _same_batch(a: Any, b: Any) -> bool:
    """Equal ``(args, kwargs)`` batches: same structure, tensors equal in shape and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_batch(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_batch(a[k], b[k]) for k in a)
    return a == b


class Objective:
    """``loss(batch) -> (loss, metrics)`` for ``gm``, built by ``make``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        kind: str | Callable[[Any, Any], torch.Tensor],
        batches: Sequence[tuple[tuple, dict]],
        teacher: Any = None,
    ):
        """``teacher``: the model whose outputs the distillation objectives match (a module, or a
        compiled model); by default ``gm`` itself, as it is now (before the pass changes it)."""
        self.gm = gm
        self.student: Any = gm  # what the loss runs: gm, or checkpoint_layers(gm)
        self.kind = kind
        # The teacher's outputs by batch index. The batches are kept (so no other object can take
        # one's id while this lives); a batch handed back as a copy is found by its contents.
        self.batches = list(batches)
        self._index = {id(b): i for i, b in enumerate(self.batches)}
        self.teacher: dict[int, torch.Tensor] = {}

        def run_teacher(b: tuple[tuple, dict]) -> Any:
            if teacher is None:
                return call_no_grad(gm, *b)
            with torch.no_grad():
                return teacher(*b[0], **b[1])

        if kind in ("hidden_mse", "pooled_cosine"):
            for i, b in enumerate(self.batches):  # the graph is still the original here
                h = hidden_states(run_teacher(b)).detach()
                self.teacher[i] = h if kind == "hidden_mse" else mean_pool(h, b)
        elif kind == "logit_kl":
            limit = float(os.environ.get("PYSPARSE_TEACHER_CACHE_GB", "12")) * 2**30
            size = 0
            for i, b in enumerate(self.batches):
                lp = torch.log_softmax(_logits(run_teacher(b), kind).float(), -1)
                self.teacher[i] = lp.to(torch.float16)
                size += lp.numel() * 2
                if size > limit:
                    raise ValueError(
                        f"objective logit_kl: the teacher's cached log-probabilities pass "
                        f"{limit / 2**30:g} GiB ({len(self.teacher)} of {len(batches)} batches); "
                        "pass fewer or shorter batches, or raise PYSPARSE_TEACHER_CACHE_GB"
                    )
            _log.info("logit_kl: teacher cache %.2f GiB", size / 2**30)
        elif not (callable(kind) or kind == "causal_lm"):
            raise ValueError(
                f"objective must be one of {OBJECTIVES} or a callable (output, batch) -> loss, "
                f"got {kind!r}"
            )

    def teacher_for(self, batch: tuple[tuple, dict]) -> torch.Tensor:
        """The cached teacher output of ``batch`` (one of the batches given, or a copy of one)."""
        i = self._index.get(id(batch))
        if i is None or self.batches[i] is not batch:
            i = next((j for j, b in enumerate(self.batches) if _same_batch(b, batch)), None)
            if i is None:
                raise KeyError(
                    "objective: this batch is not one the teacher's outputs were computed for; "
                    "build the Objective with every batch it will see"
                )
            self._index[id(batch)] = i
        return self.teacher[i]

    @property
    def name(self) -> str:
        return self.kind if isinstance(self.kind, str) else getattr(self.kind, "__name__", "custom")

    def __call__(self, batch: tuple[tuple, dict]) -> torch.Tensor:
        out = call(self.student, *batch)
        if callable(self.kind):
            return self.kind(out, batch)
        if self.kind == "logit_kl":
            logits = _logits(out, self.kind)
            t = self.teacher_for(batch).float()
            kl = (t.exp() * (t - torch.log_softmax(logits.float(), -1))).sum(-1)
            mask = token_mask(batch, logits)
            return (kl * mask).sum() / mask.sum().clamp_min(1)
        if self.kind == "causal_lm":
            return lm_loss(out, batch)
        h = hidden_states(out)
        t = self.teacher_for(batch)
        if self.kind == "hidden_mse":
            m = token_mask(batch, h)
            err = ((h - t) ** 2).sum(-1)
            scale = ((t**2).sum(-1) * m).sum() / m.sum().clamp_min(1)
            return (err * m).sum() / m.sum().clamp_min(1) / scale
        cos = torch.nn.functional.cosine_similarity(mean_pool(h, batch), t, dim=-1)
        return (1 - cos).mean()
