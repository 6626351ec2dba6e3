"""Training objectives shared by the learning passes (ProxSparse, ProSparse).

  * ``"causal_lm"``  next-token cross-entropy on the batch's own tokens, padding excluded
                     (decoders: any output with ``logits``).
  * ``"hidden_mse"`` distillation to the frozen original: mean over real (non-padding) tokens of
                     ||h - h0||^2 / mean ||h0||^2 on the final hidden states (encoders' default).
  * ``"pooled_cosine"`` distillation on sentence embeddings: 1 - cos(mean-pool(h), mean-pool(h0)).
  * a callable ``fn(output, batch) -> loss`` of the user's.

Why ``hidden_mse`` is the encoders' default: it constrains every token's state, which carries far
more signal per sentence than one pooled vector, and pooled embeddings (what sentence-embedding
quality is measured on) follow when all token states match. ``pooled_cosine`` is offered to
compare. The teacher's outputs are computed once, before training, from the graph as it is then
(the frozen original), and cached per batch: no second model is kept in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from pysparse.pipeline import _call, _call_graph

OBJECTIVES = ("causal_lm", "hidden_mse", "pooled_cosine")


def _hidden(out: Any) -> torch.Tensor:
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


def _token_mask(batch: tuple[tuple, dict], like: torch.Tensor) -> torch.Tensor:
    mask = batch[1].get("attention_mask")
    if mask is None:
        return torch.ones(like.shape[:2], dtype=like.dtype)
    return mask.to(like.dtype)


def default_objective(gm: fx.GraphModule, example: tuple[tuple, dict]) -> str:
    """``causal_lm`` when the graph returns logits over a vocabulary, else ``hidden_mse``."""
    out = _call_graph(gm, *example)
    return "causal_lm" if hasattr(out, "logits") else "hidden_mse"


class Objective:
    """``loss(batch) -> (loss, metrics)`` for ``gm``, built by ``make``."""

    def __init__(
        self,
        gm: fx.GraphModule,
        kind: str | Callable[[Any, Any], torch.Tensor],
        batches: Sequence[tuple[tuple, dict]],
    ):
        self.gm = gm
        self.kind = kind
        self.teacher: dict[int, torch.Tensor] = {}
        if kind in ("hidden_mse", "pooled_cosine"):
            for b in batches:  # the graph is still the original here
                h = _hidden(_call_graph(gm, *b)).detach()
                self.teacher[id(b)] = h if kind == "hidden_mse" else self._pool(h, b)
        elif not (callable(kind) or kind == "causal_lm"):
            raise ValueError(
                f"objective must be one of {OBJECTIVES} or a callable (output, batch) -> loss, "
                f"got {kind!r}"
            )

    @staticmethod
    def _pool(h: torch.Tensor, batch: tuple[tuple, dict]) -> torch.Tensor:
        m = _token_mask(batch, h).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    @property
    def name(self) -> str:
        return self.kind if isinstance(self.kind, str) else getattr(self.kind, "__name__", "custom")

    def __call__(self, batch: tuple[tuple, dict]) -> torch.Tensor:
        out = _call(self.gm, *batch)
        if callable(self.kind):
            return self.kind(out, batch)
        if self.kind == "causal_lm":
            logits = out.logits if hasattr(out, "logits") else _hidden(out)
            ids = batch[0][0] if batch[0] else batch[1]["input_ids"]
            mask = _token_mask(batch, logits)[:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                reduction="none",
            ).reshape(mask.shape)
            return (ce * mask).sum() / mask.sum().clamp_min(1)
        h = _hidden(out)
        t = self.teacher[id(batch)]
        if self.kind == "hidden_mse":
            m = _token_mask(batch, h)
            err = ((h - t) ** 2).sum(-1)
            scale = ((t**2).sum(-1) * m).sum() / m.sum().clamp_min(1)
            return (err * m).sum() / m.sum().clamp_min(1) / scale
        cos = torch.nn.functional.cosine_similarity(self._pool(h, batch), t, dim=-1)
        return (1 - cos).mean()
