"""The built-in text: the topic split of pysparse.quality.corpus and pack_text's blocks."""

from __future__ import annotations

import pytest
import torch

from pysparse.quality.corpus import documents, sentences
from pysparse.quality.evaluate import pack_text


class CharTokenizer:
    """One token per character (code point), enough to check packing exactly."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_training_documents_never_hold_a_heldout_sentence():
    train, held = documents("train"), documents("heldout")
    assert len(train) > 3 * len(held) > 0
    flat = " ".join(" ".join(train).split())
    assert not [s for s in sentences("heldout") if s in flat]
    # whole topics: more text than the filtered training sentences, and most of those are in it
    assert len(flat) > 2 * sum(len(s) for s in sentences("train"))
    found = sum(s in flat for s in sentences("train"))
    assert found > 0.9 * len(sentences("train"))
    with pytest.raises(ValueError, match="train"):
        documents("test")


@pytest.mark.parametrize("block,batch", [(7, 3), (16, 1), (5, 4)])
def test_pack_text_cuts_full_blocks_in_order(block, batch):
    texts = ["alpha beta", "gamma", "delta epsilon zeta"]
    joined = "\n\n".join(texts)
    out = pack_text(CharTokenizer(), texts, block, batch)
    n = len(joined) // block
    ids = torch.cat([args[0] for args, _ in out])
    assert ids.shape == (n, block)
    assert "".join(chr(int(i)) for i in ids.reshape(-1)) == joined[: n * block]
    assert all(kw["attention_mask"].shape == args[0].shape for args, kw in out)
    assert all(bool(kw["attention_mask"].all()) for _, kw in out)
    assert [a[0].shape[0] for a, _ in out[:-1]] == [batch] * (len(out) - 1)


def test_pack_text_refuses_text_shorter_than_a_block_and_bad_sizes():
    with pytest.raises(ValueError, match="shorter than one block"):
        pack_text(CharTokenizer(), ["tiny"], 64, 2)
    with pytest.raises(ValueError, match="block must be >= 2"):
        pack_text(CharTokenizer(), ["some text here"], 1, 2)
