"""Compiled models and loaded artifacts are called like the original model (pysparse.capture.inputs)."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import transformers
from tiny_models import bert_config

import pysparse
from pysparse.artifacts.store import ArtifactError
from pysparse.capture.inputs import InputError, InputSpec, split_example

SPEC = InputSpec(
    params=("input_ids", "attention_mask", "token_type_ids", "position_ids"),
    n_args=1,
    kwargs=("attention_mask",),
    fixed={"use_cache": False},
)
IDS = torch.tensor([[5, 6, 7], [8, 9, 1]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_bind_moves_inputs_to_their_captured_places():
    args, kwargs = SPEC.bind((), {"input_ids": IDS, "attention_mask": MASK})
    assert args[0] is IDS and kwargs == {"attention_mask": MASK}
    args, kwargs = SPEC.bind((IDS, MASK), {})  # attention_mask by position
    assert args[0] is IDS and kwargs["attention_mask"] is MASK


def test_bind_fills_and_drops_the_hugging_face_defaults():
    _, kwargs = SPEC.bind((IDS,), {})
    assert torch.equal(kwargs["attention_mask"], torch.ones_like(IDS))
    _, kwargs = SPEC.bind(
        (IDS,),
        {"attention_mask": MASK, "token_type_ids": torch.zeros_like(IDS), "position_ids": None},
    )
    assert list(kwargs) == ["attention_mask"]
    _, kwargs = SPEC.bind((IDS,), {"use_cache": False})  # the setting the capture fixed
    assert "use_cache" not in kwargs


def test_bind_refuses_inputs_it_would_have_to_ignore():
    with pytest.raises(InputError, match=r"\['token_type_ids'\] were not part of the capture"):
        SPEC.bind((IDS,), {"token_type_ids": torch.ones_like(IDS)})
    with pytest.raises(InputError, match="given twice"):
        SPEC.bind((IDS,), {"input_ids": IDS})
    with pytest.raises(InputError, match="at most 4"):
        SPEC.bind((IDS,) * 5, {})
    with pytest.raises(InputError, match="captured with use_cache=False"):
        SPEC.bind((IDS,), {"use_cache": True})
    with pytest.raises(InputError, match="'input_ids' is missing"):
        SPEC.bind((), {"attention_mask": MASK})


def test_spec_record_round_trip_and_corrupt_records():
    assert InputSpec.from_dict(SPEC.to_dict()) == SPEC
    for bad in (
        None,
        {"params": "x"},
        {**SPEC.to_dict(), "n_args": 9},
        {**SPEC.to_dict(), "n_args": "1"},
    ):
        with pytest.raises(ValueError):
            InputSpec.from_dict(bad)


def test_split_example_takes_a_mapping_as_keyword_inputs():
    enc = transformers.BatchEncoding({"input_ids": IDS, "attention_mask": MASK})
    assert split_example(enc, None) == ((), {"input_ids": IDS, "attention_mask": MASK})
    assert split_example(IDS, {"attention_mask": MASK}) == ((IDS,), {"attention_mask": MASK})
    with pytest.raises(InputError, match="given twice"):
        split_example(enc, {"attention_mask": MASK})


def _bert_and_encoding():
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    ids = torch.randint(0, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    enc = transformers.BatchEncoding(
        {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    )
    return model, enc


def test_compile_from_a_tokenizer_output_and_call_it_like_the_model(tmp_path):
    model, enc = _bert_and_encoding()
    with torch.no_grad():
        want = model(**enc).last_hidden_state
    sm = pysparse.compile(model, ["relu"], enc)  # the model(**inputs) habit
    with torch.no_grad():
        relu_out = sm(**enc).last_hidden_state
        # the same model called positionally / without the defaults gives the same output
        assert torch.equal(sm(enc["input_ids"], enc["attention_mask"]).last_hidden_state, relu_out)
    assert relu_out.shape == want.shape
    loaded = pysparse.load(pysparse.save(sm, tmp_path / "a"))
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).last_hidden_state, relu_out, atol=1e-5)
        got = loaded(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    assert torch.allclose(got, relu_out, atol=1e-5)


def test_a_model_captured_without_token_type_ids_takes_a_tokenizer_output(tmp_path):
    """The CLI's capture (input_ids, attention_mask=...) called with ``**tok(...)``."""
    model, enc = _bert_and_encoding()
    sm = pysparse.compile(model, [], enc["input_ids"], {"attention_mask": enc["attention_mask"]})
    loaded = pysparse.load(pysparse.save(sm, tmp_path / "a"))
    with torch.no_grad():
        want = model(**enc).last_hidden_state
        for m in (sm, loaded):
            assert torch.allclose(m(**enc).last_hidden_state, want, atol=1e-5)
    typed = {**enc, "token_type_ids": torch.ones_like(enc["input_ids"])}
    for m in (sm, loaded):
        with pytest.raises(InputError, match="token_type_ids"):
            m(**typed)


def test_a_corrupt_input_record_is_refused(tmp_path):
    import json

    model, enc = _bert_and_encoding()
    out = pysparse.save(pysparse.compile(model, [], enc), tmp_path / "a")
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text())
    assert manifest["inputs"]["kwargs"] == ["input_ids", "token_type_ids", "attention_mask"]
    manifest["inputs"]["n_args"] = -1
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="input record"):
        pysparse.load(out)


class _CharTokenizer:
    """A tokenizer stand-in: one id per character (at most 30: the tiny BERT's positions),
    padded on the right."""

    pad_token = "\0"
    eos_token = "\0"

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        rows = [[1 + ord(c) % 99 for c in t[: min(max_length, 30)]] for t in texts]
        n = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})


@contextlib.contextmanager
def _warnings():
    """The messages pysparse's loggers write at WARNING and above inside the block."""
    got: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    log = logging.getLogger("pysparse")
    handler = Keep(logging.WARNING)
    log.addHandler(handler)
    try:
        yield got
    finally:
        log.removeHandler(handler)


def test_tokenizer_gives_data_passes_the_corpus_and_little_data_is_warned_of():
    from pysparse.compiler.base import MIN_CALIBRATION_TOKENS, count_tokens

    model, enc = _bert_and_encoding()
    with _warnings() as got:
        pysparse.compile(model, ["wanda"], enc)
    warned = [m for m in got if "fewer than" in m]
    assert len(warned) == 1 and "the example inputs alone" in warned[0]
    assert f"only {int(enc['attention_mask'].sum())} tokens" in warned[0]

    tok = _CharTokenizer()
    with _warnings() as got:
        sm = pysparse.compile(model, ["wanda"], tokenizer=tok)
    assert not [m for m in got if "fewer than" in m]
    assert sm.tokenizer is tok
    from pysparse.quality.corpus import sentences
    from pysparse.quality.evaluate import encode_sentences

    batches = encode_sentences(tok, sentences("train", 256), 8, 64)
    assert count_tokens(batches) >= MIN_CALIBRATION_TOKENS
    # the corpus batches were the calibration: the same masks as passing them by hand
    by_hand = pysparse.compile(model, ["wanda"], *batches[0], calibration=batches)
    for (n, a), (_, b) in zip(sm.gm.named_parameters(), by_hand.gm.named_parameters()):
        assert torch.equal(a, b), n
    assert count_tokens([((torch.randn(2, 3),), {})]) is None
