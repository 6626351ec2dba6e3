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
