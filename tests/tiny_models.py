"""Tiny Hugging Face configs built in code, shared by the pipeline and learning-pass tests."""

from __future__ import annotations

import torch
import transformers


def llama_config(**overrides) -> transformers.LlamaConfig:
    kw = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **overrides,
    }
    return transformers.LlamaConfig(**kw)


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )


def llama_with_batches(n_batches: int = 2, seed: int = 0):
    """A tiny LLaMA (eval mode) and ``n_batches`` batches ``((ids [4, 16],), {})``."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [((torch.randint(0, 96, (4, 16), generator=gen),), {}) for _ in range(n_batches)]


def bert_with_batches(n_batches: int = 2):
    """A tiny BERT (eval mode) and batches with an attention mask (one padded row each)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, 100, (4, 9), generator=gen)
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[0, 6:] = 0
        batches.append(((ids,), {"attention_mask": mask}))
    return transformers.BertModel(bert_config()).eval(), batches


def sequential_with_batches(n_batches: int = 2):
    """A plain ``nn.Sequential`` MLP (eval mode) called on ``[batch, features]``: no sequence
    axis, every row one item; batches ``((x [4, 16],), {})``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)
    ).eval()
    gen = torch.Generator().manual_seed(3)
    return model, [((torch.randn(4, 16, generator=gen),), {}) for _ in range(n_batches)]
