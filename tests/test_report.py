"""Reports (pysparse.artifacts.report): every artifact's report.json / report.md / report.html, the dense
read-back of packed and re-laid-out weights they rest on (formats.dense_weight), and the page as
a person sees it: the CLI's report rendered in headless Chromium, checked from its DOM and a
screenshot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from pysparse.passes import Lower, MagnitudePrune, WandaPrune
from testutil import run_cli
from tiny_models import llama_with_batches

import pysparse
from pysparse.artifacts import report
from pysparse.kernels import ops
from pysparse.kernels.formats import dense_weight, pack_down24, unpack_down24


@pytest.mark.parametrize("d_model, d_ff", [(6, 8), (5, 12), (7, 20), (33, 44)])
def test_unpack_down24_inverts_pack_down24(d_model, d_ff):
    torch.manual_seed(d_model)
    values, meta = ops.compress24(ops.prune24(torch.randn(d_model, d_ff)))
    v, m = unpack_down24(*pack_down24(values, meta))
    assert torch.equal(v, values) and torch.equal(m, meta)
    with pytest.raises(ValueError, match="unpack_down24"):
        unpack_down24(values, meta)


def _tensors(sm):
    return {**dict(sm.gm.named_parameters()), **dict(sm.gm.named_buffers())}


@pytest.mark.parametrize(
    "passes, layouts",
    [
        (lambda: [WandaPrune()], {"rows", "down24"}),  # q/k/v/o sparse24_linear; FFN sparse_ffn24
        (lambda: [WandaPrune(down_along="d_model")], {"rows", "by_row"}),
        (lambda: [MagnitudePrune(), Lower(ffn=False)], {"rows"}),
        (list, {"transposed", "dense"}),  # ReLU FFN, dense: the FFN op reads W_down^T; q/k/v
        (lambda: [MagnitudePrune(), Lower(fuse=False)], {"rows", "down24"}),  # q/k/v apart
    ],
    ids=["down24", "by_row", "linears-only", "dense-ffn", "unfused"],
)
def test_dense_weight_reads_every_layout_back(passes, layouts):
    """The compiled model's linears, read back dense, equal the masked (or untouched) weights of
    the same pipeline before compress24/lower; the layouts recorded are the ones expected."""
    model, batches = llama_with_batches(1)
    (ids,), _ = batches[0]
    before = pysparse.compile(model, ["relu", *[p for p in passes() if p.name != "lower"]], (ids,))
    rest = ["compress24"] if passes() else []
    lower = [p for p in passes() if p.name == "lower"] or ["lower"]
    after = pysparse.compile(
        model, ["relu", *[p for p in passes() if p.name != "lower"], *rest, *lower], (ids,)
    )
    recorded = after.gm.meta["pysparse"]["weight_layouts"]
    assert {r["layout"] for r in recorded.values()} == layouts
    tensors, want = _tensors(after), _tensors(before)
    names = [i["weight"] for i in after.gm.meta["pysparse"]["linears"].values() if i["prunable"]]
    assert len(names) == 14
    for name in names:
        got = dense_weight(tensors, name, recorded)
        assert got is not None, name
        torch.testing.assert_close(got, want[name], rtol=0, atol=0, msg=name)
    data = report.collect(after)
    rows = {r["weight"]: r for r in data["linears"]}
    assert set(names) <= set(rows)
    for name in names:
        r = rows[name]
        assert r["stored"] == recorded.get(name, {}).get("layout", "dense")
        if passes():
            assert r["is_24"] and r["zeros"] >= 0.5 and sum(r["patterns"]) > 0, r
        if passes():  # the pattern counts add up to the weight's groups of 4
            assert (
                sum(r["patterns"]) + r["groups_fewer_than_2"] == r["shape"][0] * r["shape"][1] // 4
            )
            axis = "out" if layouts == {"rows", "by_row"} and "down_proj" in name else "in"
            assert r["axis"] == axis, r


def test_weight_stats_counts_patterns():
    w = torch.tensor(
        [[1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 4.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]]
    )
    s = report.weight_stats(w)
    assert s["is_24"] and s["zeros"] == pytest.approx(9 / 16)
    assert dict(zip(report.PATTERNS, s["patterns"], strict=True)) == {
        "1100": 1,
        "1010": 0,
        "1001": 0,
        "0110": 1,
        "0101": 1,
        "0011": 0,
    }
    assert s["groups_fewer_than_2"] == 1  # the last group keeps one weight
    assert not report.weight_stats(torch.ones(2, 8))["is_24"]


def test_save_writes_the_report_and_rewrite_keeps_the_artifact_loadable(tmp_path):
    model, batches = llama_with_batches(1)
    (ids,), _ = batches[0]
    sm = pysparse.compile(model, ["relu", "wanda", "compress24", "lower"], (ids,))
    art = pysparse.save(sm, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    for name in report.REPORT_FILES:
        assert name in manifest["files"], name
    data = report.read(art)
    assert [e["pass"] for e in data["passes"]] == ["relu", "wanda", "compress24", "lower"]
    assert data["quality"] is None and "not measured yet" in (art / "report.md").read_text()
    html = (art / "report.html").read_text()
    assert html.count('<svg class="plot"') == 2  # weight sparsity, 2:4 patterns
    quality = {"kind": "decoder", "perplexity": 12.5, "perplexity_dense": 10.0, "tokens": 99}
    speed = {"dense_ms": 2.0, "compiled_ms": 1.0, "speedup": 2.0, "batch_shape": [1, 7]}
    report.rewrite(art, report.add_evaluation(data, quality, [speed]))
    md = (art / "report.md").read_text()
    assert "| held-out perplexity | 12.50 (dense 10.00, 1.25x) |" in md and "| 1x7 |" in md
    m = pysparse.load(art)  # the manifest's checksums follow the rewritten files
    torch.testing.assert_close(m(ids).logits, sm(ids).logits)
    (art / "report.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a pysparse report"):
        report.read(art)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        "--hide-scrollbars",
        "--virtual-time-budget=2000",
    ]
    return subprocess.run(
        [_chromium(), *flags, *args], check=False, capture_output=True, text=True, timeout=180
    )


def test_cli_report_renders_in_a_real_browser(tmp_path):
    """A learning run's artifact, then `pysparse report` (quality and speed measured here): the
    page loads in headless Chromium with every plot drawn (the page's own check, read from the
    DOM), the training curves and threshold sweep among them, and its screenshot shows them."""
    if _chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/setup installs Debian's chromium")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    art = tmp_path / "pro"
    res = run_cli(
        "compile",
        "--passes",
        "relu,prosparse,lower",
        "--set",
        "prosparse.steps=4",
        "--calib-lines",
        "32",
        "--no-eval",
        "--out",
        str(art),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("report", str(art), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"report: {art / 'report.html'}" in res.stdout
    data = report.read(art)
    assert data["quality"]["kind"] == "encoder" and len(data["speed"]) == 2
    assert len(data["quality"]["activation_sparsity_per_layer"]) == 6
    curve = data["passes"][1]["curve"]
    assert [r["step"] for r in curve] == [0, 1, 2, 3] and "lam" in curve[0]
    page = (art / "report.html").as_uri()
    dom = _browser("--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    n_plots = html.count('<svg class="plot"')
    # activation zeros per layer, loss, sparsity, lambda, lr, threshold sweep (the weights are
    # dense: no weight plot)
    assert n_plots == 6, n_plots
    assert f'data-plots-ok="{n_plots}"' in html and 'data-plots-bad="0"' in html, html[-600:]
    assert f"{n_plots} plots drawn" in html
    assert "mean cosine to the dense original" in html
    shot = tmp_path / "shot.png"
    res = _browser(f"--screenshot={shot}", "--window-size=1024,2400", page)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert img.shape[:2] == (2400, 1024)
    # the bars and lines are drawn in the plot palette: the first series color covers a visible
    # area (a blank page, an error page or a broken plot would not)
    near = (np.abs(img - np.array([0x34, 0x65, 0xA4])).max(axis=2) <= 12).sum()
    assert near > 2000, near
    assert (img.min(axis=2) < 250).mean() > 0.03  # text, tables and plots, not an empty page


def test_training_curve_is_thinned_evenly_with_the_ends_kept():
    from pysparse.learning.train import curve

    history = [{"step": i, "loss": 1.0 / (i + 1), "note": "x"} for i in range(1000)]
    c = curve(history, lam=lambda s: s / 10)
    assert len(c) == 200 and c[0]["step"] == 0 and c[-1]["step"] == 999
    assert c[-1] == {"step": 999, "loss": 0.001, "lam": 99.9}  # non-numbers dropped
    assert [r["step"] for r in curve(history[:4])] == [0, 1, 2, 3]
    assert curve([]) == []
