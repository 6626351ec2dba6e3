"""Hugging Face interop (pysparse.artifacts.hf): a compiled model exported as a transformers folder loads
with plain transformers and gives pysparse's outputs; from an in-memory compile, from a loaded
artifact and from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from pysparse.passes import ReluSubstitution
from testutil import run_cli
from tiny_models import bert_with_batches, llama_with_batches, sequential_with_batches

import pysparse
from pysparse.artifacts.hf import THRESHOLD_FIELD, export_hf
from pysparse.kernels.reference import is_24_sparse


def test_llama_2_4_round_trip_through_transformers(tmp_path):
    model, batches = llama_with_batches(1)
    (ids,), _ = batches[0]
    sm = pysparse.compile(model, ["relu", "wanda", "compress24", "lower"], (ids,))
    for source in (sm, pysparse.load(pysparse.save(sm, tmp_path / "art"))):
        out = export_hf(source, tmp_path / "hf")
        config = json.loads((out / "config.json").read_text())
        assert config["hidden_act"] == "relu" and config[THRESHOLD_FIELD] == 0.0
        assert config["architectures"] == ["LlamaForCausalLM"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert not any("pysparse" in k for k in hf.state_dict())
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):  # q/k/v/o, gate/up/down: masked dense 2:4
                assert is_24_sparse(p.detach()), name
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, sm(ids).logits, rtol=1e-4, atol=1e-4)


def test_fatrelu_threshold_goes_to_the_config_with_a_loader_note(tmp_path):
    """FATReLU (threshold 0.05) is recorded in the config; transformers runs plain ReLU until
    the activation is set as pysparse.artifacts.hf's docstring says, then the outputs are pysparse's."""
    model, batches = bert_with_batches(1)
    (ids,), kw = batches[0]
    sm = pysparse.compile(
        model, [ReluSubstitution(threshold=0.05), "wanda", "compress24", "lower"], (ids,), kw
    )
    out = export_hf(sm, tmp_path / "hf")
    hf = transformers.AutoModel.from_pretrained(out).eval()
    t = hf.config.pysparse_fatrelu_threshold
    assert t == 0.05 and hf.config.hidden_act == "relu"
    want = sm(ids, **kw).last_hidden_state
    with torch.no_grad():
        plain = hf(ids, **kw).last_hidden_state
        for m in hf.modules():  # the loader note
            if hasattr(m, "intermediate_act_fn"):
                m.intermediate_act_fn = torch.nn.Threshold(t, 0.0)
        patched = hf(ids, **kw).last_hidden_state
    assert (plain - want).abs().max() > 1e-4  # the threshold matters on these weights
    torch.testing.assert_close(patched, want, rtol=1e-4, atol=1e-4)


def test_cli_export_hf_and_clear_errors(tmp_path):
    model, batches = sequential_with_batches(1)
    sm = pysparse.compile(model, ["magnitude"], batches[0][0])
    with pytest.raises(ValueError, match="not a Hugging Face transformers model"):
        export_hf(sm, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    res = run_cli(
        "compile", "--recipe", "fast", "--no-eval", "--out", str(tmp_path / "art"), cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("export", str(tmp_path / "art"), "--format", "hf", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "art" / "hf"
    hf = transformers.AutoModel.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = tok(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt")
    m = pysparse.load(tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(
            hf(**enc).last_hidden_state, m(**enc).last_hidden_state, rtol=1e-4, atol=1e-4
        )
