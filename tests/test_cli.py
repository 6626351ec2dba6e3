"""The pysparse CLI end to end on the embedded all-MiniLM-L6-v2: compile -> artifact -> load in
this process -> export to both formats; and the errors it prints for bad input."""

from __future__ import annotations

import torch
from testutil import run_cli

import pysparse


def test_compile_default_model_then_load_and_export(tmp_path):
    res = run_cli(
        "compile",
        "--passes",
        "relu,wanda,compress24,lower",
        "--out",
        str(tmp_path / "art"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled in" in res.stdout and "lower" in res.stdout
    # the closing summary: quality against the original, sparsity, measured speed-up
    quality = next(line for line in res.stdout.splitlines() if line.startswith("quality: "))
    cosine = float(quality.split("mean cosine to the dense original ")[1].split()[0])
    assert 0.2 < cosine < 0.99, quality  # ReLU + Wanda 2:4 with no training: far from 1
    assert "sparsity: weights 2:4 on 36 linears" in res.stdout
    assert "FFN activations zero" in res.stdout and "x the dense model" in res.stdout
    assert "modified=" not in res.stderr  # each pass is reported once, in the table
    m = pysparse.load(tmp_path / "art")
    assert [e["pass"] for e in m.report] == ["relu", "wanda", "compress24", "lower"]
    enc = m.tokenizer(
        ["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt"
    )
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}
    assert m(**enc).last_hidden_state.shape[:2] == enc["input_ids"].shape  # the HF habit
    ids = torch.randint(0, 1000, (3, 11))
    out = m(ids, attention_mask=torch.ones(3, 11, dtype=torch.long))  # other shapes than compiled
    assert out.last_hidden_state.shape == (3, 11, 384)
    assert m.tokenizer is not None and m.tokenizer("a b c")["input_ids"][0] == 101  # stored with it
    for fmt in ("pt2", "torchscript", "onnx"):
        res = run_cli(
            "export",
            str(tmp_path / "art"),
            "--format",
            fmt,
            "--out",
            str(tmp_path / f"m.{fmt}"),
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert (tmp_path / f"m.{fmt}").stat().st_size > 1_000_000


def test_cli_errors_are_clear(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = run_cli("compile", "--calib", str(empty), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert res.returncode == 2 and "has no text lines" in res.stderr
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    res = run_cli("compile", "--calib", str(binary), "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert res.returncode == 2 and "is not UTF-8 text" in res.stderr
    res = run_cli("compile", "--passes", "wanda,bogus", "--out", str(tmp_path / "a"), cwd=tmp_path)
    assert res.returncode == 2 and "unknown pass 'bogus'" in res.stderr
    res = run_cli("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert res.returncode == 2 and "manifest.json is missing" in res.stderr
    assert not (tmp_path / "a").exists()


def test_compile_proxsparse_then_eval(tmp_path):
    art = tmp_path / "prox"
    res = run_cli(
        "compile",
        "--passes",
        "proxsparse,compress24,lower",
        "--set",
        "proxsparse.steps=3",
        "--set",
        "proxsparse.lam1=1.0",
        "--set",
        "proxsparse.recover_steps=5",
        "--calib-lines",
        "16",
        "--no-eval",
        "--out",
        str(art),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = pysparse.load(art)
    stages = [r["pass"] for r in m.report]
    assert stages[:4] == [
        "proxsparse.init",
        "proxsparse",
        "proxsparse.reconstruct",
        "proxsparse.recover",
    ], stages
    rep = m.report[1]
    assert rep["settings"]["steps"] == 3 and rep["objective"] == "hidden_mse"
    assert m.report[3]["steps"] == 5
    res = run_cli("eval", str(art), "--json", str(tmp_path / "e.json"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "e.json").read_text())
    from pysparse.quality.corpus import sentences

    assert result["kind"] == "encoder" and result["sentences"] == len(sentences("heldout"))
    # The defaults' pipeline on 16 calibration lines (SparseGPT's mask as the start, 3 learning
    # steps, SparseGPT's reconstruction under the learned mask, 5 recovery steps), every linear
    # 2:4: measured mean cosine 0.8082 (min 0.4389); the published mask-only learning with the
    # same 3 steps measured 0.6262. Seeded and deterministic on one machine; between CPU kinds
    # only float rounding differs, which moves a few near-tied mask choices, far less than the
    # +-0.05 allowed. Dense-vs-dense (1.0) or the mask-only result falls outside.
    assert 0.76 < result["mean_cosine_to_dense"] < 0.86, result
    assert result["min_cosine_to_dense"] <= result["mean_cosine_to_dense"]
    assert "mean_cosine_to_dense" in res.stdout
    res = run_cli("compile", "--passes", "wanda", "--set", "wanda.bogus=1", cwd=tmp_path)
    assert (
        res.returncode == 2 and "settings of pass 'wanda'" in res.stderr and "bogus" in res.stderr
    )


def test_compile_relu_prosparse_reports_sparsity(tmp_path):
    art = tmp_path / "pro"
    res = run_cli(
        "compile",
        "--passes",
        "relu,prosparse",
        "--set",
        "prosparse.steps=2",
        "--set",
        'prosparse.threshold="sweep"',
        "--calib-lines",
        "48",
        "--no-eval",
        "--out",
        str(art),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rep = pysparse.load(art).report[-1]
    assert rep["pass"] == "prosparse" and "threshold_sweep" in rep
    res = run_cli("eval", str(art), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "activation_sparsity" in res.stdout and "zeros in x1" in res.stdout
