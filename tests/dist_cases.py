"""The model, batches and passes tests/test_distributed.py runs in one process and over ranks."""

from __future__ import annotations

import torch
import transformers
from pysparse.passes import SparseGPTPrune, WandaPrune
from tiny_models import llama_config

import pysparse

PASSES = {
    "wanda": WandaPrune,
    "wanda_one_forward": lambda: WandaPrune(sequential=False),
    "sparsegpt": SparseGPTPrune,
}


def prune(name: str, n_batches: int = 5) -> dict[str, torch.Tensor]:
    """The tiny LLaMA's weights after one calibration pass over ``n_batches`` batches."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(max_position_embeddings=64)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.randint(0, 96, (2, 16), generator=gen),), {}) for _ in range(n_batches)]
    sm = pysparse.compile(model, [PASSES[name]()], *batches[0], calibration=batches)
    return {k: v.detach().clone() for k, v in sm.gm.state_dict().items()}


def _learning(name: str, accum: int, checkpoint_dir: str | None) -> list:
    from pysparse.passes import MagnitudePrune, ProSparse, ProxSparse, Recover, ReluSubstitution

    ck = {"accum": accum, "checkpoint_dir": checkpoint_dir, "checkpoint_every": 2}
    if name in (
        "proxsparse",
        "proxsparse_down_rows",
    ):  # the prox step on each rank's shards; W0 and lam2 per shard
        # _down_rows: the down projection's groups of 4 along d_model, sharded by column
        rows = name == "proxsparse_down_rows"
        prox = {"lr": 1e-3, "lam1": 0.5, "lam2": 1.0, "init_mask": "magnitude"}
        prox.update(reconstruct=False, recover_steps=0, **ck)
        return [
            ProxSparse(steps=4 if rows else 6, down_along="d_model" if rows else "d_ff", **prox)
        ]
    if name == "proxsparse_recompute":  # activation checkpointing: its layer pieces the units
        prox = {"lr": 1e-3, "init_mask": "magnitude", "reconstruct": False, "recover_steps": 0}
        return [ProxSparse(steps=4, activation_checkpointing=True, **prox, **ck)]
    if name == "prosparse":  # every parameter trained (tied embeddings: the root FSDP unit); the
        # L1 penalty on each rank's batches
        return [ReluSubstitution(), ProSparse(steps=4, lr=1e-3, lam=1e-3, threshold=None, **ck)]
    if name == "recover":
        return [MagnitudePrune(), Recover(steps=4, lr=1e-3, objective="causal_lm", **ck)]
    raise KeyError(name)


LEARNING = ("proxsparse", "proxsparse_down_rows", "proxsparse_recompute", "prosparse", "recover")


def learn(
    name: str, accum: int, checkpoint_dir: str | None = None, n_batches: int = 8
) -> dict[str, object]:
    """The tiny LLaMA after one learning pass with ``accum`` micro-batches per step on each rank
    (one process with accum 2 has the global batch of 2 ranks with accum 1): its weights, and the
    pass's training curve."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tied = name == "prosparse"
    config = llama_config(max_position_embeddings=64, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.randint(0, 96, (2, 16), generator=gen),), {}) for _ in range(n_batches)]
    passes = _learning(name, accum, checkpoint_dir)
    sm = pysparse.compile(model, passes, *batches[0], calibration=batches)
    report = next(r for r in sm.report if r["pass"] == passes[-1].name)
    out: dict[str, object] = {k: v.detach().clone() for k, v in sm.gm.state_dict().items()}
    out["_curve"] = report.get("curve") or report.get("learn", {}).get("curve")
    return out
