"""Decoders compiled the way a user starts: from one short prompt (batch 1), calibrated on larger
batches, evaluated by perplexity — before and after a save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import llama_config

import pysparse
from pysparse.kernels import ops
from pysparse.quality.evaluate import perplexity


def _model():
    torch.manual_seed(0)
    import transformers

    return transformers.LlamaForCausalLM(llama_config()).eval()


def _ids(shape, seed):
    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_batch1_example_with_batched_calibration_compiles_and_runs_any_batch(prompt_len):
    """A batch-1 example used to fix the batch dimension at 1 (torch.export specialises size-1
    dimensions), so Wanda's batches of 4 failed; the capture now keeps batch and length dynamic."""
    model = _model()
    prompt = _ids((1, prompt_len), 0)
    calib = [
        ((), {"input_ids": _ids((4, 7), s), "attention_mask": torch.ones(4, 7, dtype=torch.long)})
        for s in (1, 2)
    ]
    example = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    masked = pysparse.compile(model, ["wanda"], example_kwargs=example, calibration=calib)
    sm = pysparse.compile(
        model, ["wanda", "compress24", "lower"], example_kwargs=example, calibration=calib
    )
    with torch.no_grad():
        for shape in [(1, 1), (1, 9), (3, 4)]:
            ids = _ids(shape, 7)
            kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            want = masked(**kw)[0]
            got = sm(**kw)[0]
            assert got.shape == (*shape, 96)
            # fp32 2:4 kernels vs the masked dense graph: same products, another summation order
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_perplexity_of_a_compiled_and_a_reloaded_decoder(tmp_path):
    """`pysparse eval` scores decoders by perplexity; a graph captured with input_ids by keyword
    and an attention mask must be called the same way (it crashed with a kwarg mismatch)."""
    model = _model()
    prompt = _ids((1, 6), 0)
    example = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    sm = pysparse.compile(model, ["magnitude"], example_kwargs=example)
    ids = _ids((50,), 3)
    # The reference: the same 2:4 magnitude masks applied by hand to every decoder linear of a
    # copy of the eager model (lm_head and embeddings stay dense).
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for lin in layer.modules():
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.copy_(ops.prune24(lin.weight))
    want = perplexity(ref, ids, 16)
    got = perplexity(sm, ids, 16)
    reloaded = perplexity(pysparse.load(pysparse.save(sm, tmp_path / "a")), ids, 16)
    assert got == pytest.approx(want, rel=1e-5)
    assert reloaded == pytest.approx(want, rel=1e-5)
    assert perplexity(model, ids, 16) != pytest.approx(want, rel=1e-3)  # the masks did something
