"""The native route (pysparse.runtime.native): a compiled decoder's step graph as AOTInductor
code that calls pysparse's kernels, against the graph run op by op; its cache (hit, miss, damaged
entry); the fallback.

Greedy tokens must be identical and logits equal within fp32 rounding. The FATReLU cases use the
tiny model's threshold, where no gate value lies within rounding of it on these prompts (a value
that did could flip a neuron between two correct routes; docs/generation.md says so)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_generate import _compiled

import pysparse
from pysparse.runtime import native
from pysparse.runtime.generate import _mask, export_step, generate

CASES = ("dense-lowered", "2:4", "act-sparse", "2:4+fatrelu")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PYSPARSE_NATIVE", "1")


def _prompts(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0] = torch.randint(3, 96, (12,), generator=gen)
    mask[0] = 1
    ids[1, 7:] = torch.randint(3, 96, (5,), generator=gen)  # left-padded
    mask[1, 7:] = 1
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_native_step_generates_what_the_graph_does(case):
    sm, _ = _compiled(case)
    ids, mask = _prompts(5)
    want = sm.generate(ids, mask, max_new_tokens=24, eos_token_id=[], native=False)
    assert not sm.last_generation.native
    got = sm.generate(ids, mask, max_new_tokens=24, eos_token_id=[])  # the default: native
    assert sm.last_generation.native
    assert torch.equal(got, want), case
    # the logits of one prefill, natively and op by op, on a fresh cache each
    spec, runner = sm.cache_spec, sm.native_step()
    outs = []
    for step in (sm.step, runner):
        shape = (2, spec.kv_heads, 16, spec.head_dim)
        keys = [torch.zeros(shape) for _ in range(spec.n_layers)]
        values = [torch.zeros(shape) for _ in range(spec.n_layers)]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        att = _mask(mask.bool(), torch.arange(12))
        outs.append(step(ids, pos, torch.arange(12), att, keys, values))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)  # fp32 summation orders
    assert runner._direct  # the step's calls went straight to the loader (checked once)


def test_runner_takes_the_package_call_for_other_arguments():
    """Keyword arguments, or containers other than lists/tuples of tensors, go through the
    package's own call (pytree); so does a package without a loader."""

    class Package:
        def __init__(self):
            self.calls = []

        def __call__(self, *args, **kwargs):
            self.calls.append((args, kwargs))
            return "package"

    pkg = Package()
    runner = native.Runner(pkg, {})
    x = torch.zeros(2)
    assert runner(x, [x, x]) == "package"  # no loader: checked once, then the package's call
    assert runner._direct is False
    assert runner(x, y=x) == "package" and runner({"a": x}) == "package"
    assert len(pkg.calls) == 3
    assert native._tensor_leaves((x, [x, x], (x,))) == [x, x, x, x]
    assert native._tensor_leaves((x, {"a": x})) is None and native._tensor_leaves((x, [1])) is None


def test_cache_hit_miss_and_damaged_entry(caplog, tmp_path):
    sm, _ = _compiled("2:4")

    def make():
        return export_step(sm.step, sm.cache_spec)

    _, _, built = native.build(make, "step", "test")
    assert built
    entries = sorted((tmp_path / "cache" / "native").glob("*.pt2"))
    assert len(entries) == 1
    _, _, built = native.build(make, "step", "test")
    assert not built  # the same graph on the same machine: taken from the cache
    record = json.loads(entries[0].with_suffix(".json").read_text())
    assert record["sha256"] and record["torch"] == torch.__version__
    # a damaged package: rebuilt, never loaded
    data = entries[0].read_bytes()
    entries[0].write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="pysparse.runtime.native"):
        _, _, built = native.build(make, "step", "test")
    assert built and "damaged" in caplog.text
    record = json.loads(entries[0].with_suffix(".json").read_text())  # the rebuilt entry's
    assert entries[0].stat().st_size == record["bytes"]
    # other weights, same architecture: the same entry (it holds code; the model's own tensors
    # are handed to it), computing with the new weights
    with torch.no_grad():
        next(sm.step.parameters()).mul_(2.0)
    runner, _, built = native.build(make, "step", "test")
    assert not built
    ids = torch.tensor([[5, 6, 7, 8]])
    want = sm.generate(ids, max_new_tokens=6, eos_token_id=[], native=False)
    got = generate(runner, sm.cache_spec, ids, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(got, want)
    # another graph: another entry
    other, _ = _compiled("dense-lowered")
    _, _, built = native.build(lambda: export_step(other.step, other.cache_spec), "step", "t")
    assert built and len(list((tmp_path / "cache" / "native").glob("*.pt2"))) == 2
    assert all(p.stat().st_size < 10 * 2**20 for p in entries)  # code, not weights


def test_fallback_when_the_native_compile_fails(monkeypatch, caplog):
    sm, _ = _compiled("act-sparse")
    ids, mask = _prompts(7)
    want = sm.generate(ids, mask, max_new_tokens=8, eos_token_id=[], native=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with caplog.at_level(logging.WARNING):
        got = sm.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, want) and not sm.last_generation.native
    assert "no C++ compiler" in caplog.text and "op by op" in caplog.text
    assert not list(native.cache_dir().glob("*.pt2"))  # nothing half-written left
    with pytest.raises(native.NativeError, match="no C.. compiler"):
        sm.generate(ids, mask, max_new_tokens=8, native=True)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("PYSPARSE_NATIVE", "0")
    sm, _ = _compiled("2:4")
    sm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, eos_token_id=[])
    assert not sm.last_generation.native and "_native_step" not in sm.__dict__
    assert not native.cache_dir().exists()


def test_loaded_artifact_runs_natively(tmp_path):
    sm, _ = _compiled("2:4+fatrelu")
    pysparse.save(sm, tmp_path / "a")
    loaded = pysparse.load(tmp_path / "a")
    ids, mask = _prompts(9)
    want = loaded.generate(ids, mask, max_new_tokens=16, eos_token_id=[], native=False)
    got = loaded.generate(ids, mask, max_new_tokens=16, eos_token_id=[])
    assert loaded.last_generation.native and torch.equal(got, want)
    # the artifact itself holds no native code: the build lives in the cache only
    assert not [p for p in (tmp_path / "a").rglob("*") if p.suffix in (".so", ".cpp")]


def test_native_forward_equals_the_graph_encoder_and_decoder(tmp_path, monkeypatch):
    """The forward graph natively under no_grad (an act-sparse BERT with a padded batch, a 2:4
    decoder), the same after save / load; with autograd recording, the graph runs (and trains)."""
    from pysparse.passes import Lower, ReluSubstitution
    from tiny_models import bert_with_batches

    bert, batches = bert_with_batches()
    enc = pysparse.compile(bert, [ReluSubstitution(), Lower()], *batches[0])
    dec, _ = _compiled("2:4")
    for sm, (args, kwargs) in ((enc, batches[1]), (dec, ((torch.tensor([[4, 5, 6, 7]]),), {}))):
        monkeypatch.setenv("PYSPARSE_NATIVE", "0")
        with torch.no_grad():
            want = sm(*args, **kwargs)
        assert "_native_forward" not in sm.__dict__
        monkeypatch.setenv("PYSPARSE_NATIVE", "1")
        with torch.no_grad():
            got = sm(*args, **kwargs)
        runner = sm.__dict__["_native_forward"]
        assert runner is not None and runner.accepts(*sm._bound(args, kwargs))
        # inputs the code was not compiled for (int32 ids) go to the graph, which checks them
        int32 = tuple(a.to(torch.int32) for a in args)
        assert not runner.accepts(*sm._bound(int32, kwargs))
        assert type(got) is type(want) and list(got.keys()) == list(want.keys())
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)
        out = sm(*args, **kwargs)  # autograd on: the graph, whose parameters train
        assert out[0].requires_grad
    pysparse.save(enc, tmp_path / "enc")
    loaded = pysparse.load(tmp_path / "enc")
    with torch.no_grad():
        got = loaded(*batches[1][0], **batches[1][1])
        want = enc(*batches[1][0], **batches[1][1])
    assert loaded.__dict__["_native_forward"] is not None
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4, atol=1e-4)


def test_saving_and_exporting_never_build_native_code(tmp_path):
    """save / export trace the graph (some exporters under no_grad): no native build for them."""
    from pysparse.passes import Lower, ReluSubstitution
    from tiny_models import bert_with_batches

    bert, batches = bert_with_batches()
    enc = pysparse.compile(bert, [ReluSubstitution(), Lower()], *batches[0])
    pysparse.save(enc, tmp_path / "a")
    for fmt in ("torchscript", "onnx", "pt2"):
        pysparse.export(enc, tmp_path / f"m.{fmt}", format=fmt)
    assert "_native_forward" not in enc.__dict__
    assert not native.cache_dir().exists()
