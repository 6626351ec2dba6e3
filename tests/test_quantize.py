"""The quantize pass (weight-only int8) on tiny models: what it quantizes, how Compress24 and Lower
carry the int8 weights onto pysparse::int8_linear / sparse24_int8_linear, that the lowered model
computes what the quantized graph does (and generates the same tokens, loaded or native), and
that exports give the dequantised model back."""

from __future__ import annotations

import pytest
import torch
from pysparse.passes import Quantize
from tiny_models import llama_with_batches

import pysparse
from pysparse.kernels import formats

P = torch.ops.pysparse


@pytest.fixture(autouse=True)
def weight_only(monkeypatch):
    """The int8 linears weight-only (their VNNI route also quantises x: a kernel's arithmetic,
    tested in test_qlinear.py; here the rewrites are, against graphs and exports that compute
    with x as given). test_the_vnni_route_stays_near_the_weight_only_one lifts it."""
    monkeypatch.setenv("PYSPARSE_DISABLE_VNNI", "1")


def _targets(sm) -> list:
    return [n.target for n in sm.gm.graph.nodes if n.op == "call_function"]


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.logits


@pytest.fixture(scope="module")
def llama():
    return llama_with_batches()


def _compile(llama, passes, **kw):
    model, batches = llama
    return pysparse.compile(model, passes, (batches[0][0][0][:1, :8],), calibration=batches, **kw)


@pytest.mark.parametrize(
    ("passes", "ops"),
    [
        (["quantize", "lower"], {P.int8_linear.default}),
        (
            ["magnitude", "quantize", "compress24", "lower"],
            {P.int8_linear.default, P.sparse24_int8_linear.default},
        ),
    ],
    ids=["int8", "2:4+int8"],
)
def test_lowered_model_computes_the_quantized_graph(llama, passes, ops):
    model, batches = llama
    ids = batches[1][0][0]
    lowered = _compile(llama, passes, generation=False)
    graph = _compile(
        llama, [p for p in passes if p not in ("compress24", "lower")], generation=False
    )
    targets = _targets(lowered)
    assert ops <= set(targets)
    assert torch.ops.aten.linear.default not in targets
    assert P.dense_linear.default not in targets and P.sparse24_linear.default not in targets
    torch.testing.assert_close(_logits(lowered(ids)), _logits(graph(ids)), rtol=1e-4, atol=1e-4)
    # the quantized model stays near the unquantized one (int8 per row: ~0.5% weight error)
    report = next(r for r in lowered.report if r["pass"] == "quantize")
    assert report["linears_quantized"] == 15 and 0 < report["relative_weight_error"] < 0.01
    assert report["quantized_mb"] < report["weights_mb"] / 3.5
    unquantized = [p for p in passes if p not in ("quantize", "compress24", "lower")]
    before = _compile(llama, unquantized, generation=False) if unquantized else model
    with torch.no_grad():
        err = (_logits(graph(ids)) - _logits(before(ids))).abs().max()
    assert 0 < err < 0.1


def test_activation_sparse_ffns(llama):
    """2:4 gated ReLU FFNs go int8 onto sparse_ffn24_int8 (computing what the quantized graph
    does); FFNs without 2:4 keep float weights on their act-sparse kernels unless ffn=True, and
    ffn=False keeps every FFN in float."""
    _, batches = llama
    ids = batches[1][0][0]
    both = ["relu", "magnitude", "quantize", "compress24", "lower"]
    sm = _compile(llama, both, generation=False)
    targets = _targets(sm)
    assert targets.count(P.sparse_ffn24_int8.default) == 2
    assert P.sparse24_int8_linear.default in targets  # attention
    report = next(r for r in sm.report if r["pass"] == "quantize")
    assert set(report["by_role"]) == {"qkv", "o", "gate", "up", "down", "head"}
    graph = _compile(llama, ["relu", "magnitude", "quantize"], generation=False)
    torch.testing.assert_close(_logits(sm(ids)), _logits(graph(ids)), rtol=1e-4, atol=1e-4)
    layouts = sm.gm.meta["pysparse"]["weight_layouts"]
    assert sum(r["layout"] == "int8_down24" for r in layouts.values()) == 2

    kept = _compile(
        llama, ["relu", "magnitude", Quantize(ffn=False), "compress24", "lower"], generation=False
    )
    assert _targets(kept).count(P.sparse_ffn24.default) == 2
    report = next(r for r in kept.report if r["pass"] == "quantize")
    assert report["activation_sparse_ffn_linears_left"] == 6

    dense_ffn = _compile(llama, ["relu", "quantize", "lower"], generation=False)
    assert _targets(dense_ffn).count(P.sparse_ffn.default) == 2
    forced = _compile(llama, ["relu", Quantize(ffn=True), "lower"], generation=False)
    lower = next(r for r in forced.report if r["pass"] == "lower")
    assert any("int8 weights" in why for why in lower["ffns_not_lowered"])
    assert P.sparse_ffn.default not in _targets(forced)


def test_which_linears(llama):
    head = _compile(llama, [Quantize(linears="head"), "lower"], generation=False)
    assert _targets(head).count(P.int8_linear.default) == 1
    attn = _compile(llama, [Quantize(linears=("qkv", "o")), "lower"], generation=False)
    report = next(r for r in attn.report if r["pass"] == "quantize")
    assert report["by_role"] == {"qkv": 6, "o": 2}
    with pytest.raises(ValueError, match="linears='everything'"):
        Quantize(linears="everything")
    with pytest.raises(ValueError, match="bits=3"):
        Quantize(bits=3)
    with pytest.raises(ValueError, match="group=48"):
        Quantize(bits=4, group=48)


def test_quantize_runs_after_masks_and_before_packing(llama):
    sm = _compile(llama, ["quantize", "compress24", "magnitude", "lower"], generation=False)
    assert [r["pass"] for r in sm.report] == ["magnitude", "quantize", "compress24", "lower"]


@pytest.mark.parametrize("bits", [8, 4])
def test_save_load_generate_native_and_exports(llama, tmp_path, bits):
    """2:4 + int8 / int4 + activation sparsity (the FFNs int8 on their op): loaded, the artifact
    generates the tokens the compiled model does, in the graph and natively; its ONNX file runs in
    onnxruntime (int8: DequantizeLinear over the int8 initializers; int4: nibbles unpacked by
    standard ops, the dense int4 linear too); its HF export is the dequantised model."""
    _, batches = llama
    ids = batches[1][0][0]
    sm = _compile(llama, ["relu", "magnitude", Quantize(bits=bits), "compress24", "lower"])
    targets = _targets(sm)
    assert targets.count(P.sparse_ffn24_int8.default) == 2
    assert (P.sparse24_int4_linear if bits == 4 else P.sparse24_int8_linear).default in targets
    pysparse.save(sm, tmp_path / "art")
    loaded = pysparse.load(tmp_path / "art")
    prompt = ids[:1, :5]
    want = sm.generate(prompt, max_new_tokens=8, native=False)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, native=False), want)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=8, native=True), want)
    logits = _logits(sm(ids))
    hf = pysparse.export(loaded, tmp_path / "hf", format="hf")
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(str(hf)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits, rtol=1e-4, atol=1e-4)
    ort = pytest.importorskip("onnxruntime")
    dense = _compile(llama, [Quantize(bits=bits), "lower"], generation=False)
    for name, m in (("sparse", sm), ("dense", dense)):
        path = pysparse.export(m, tmp_path / f"{name}.onnx", format="onnx")
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), _logits(m(ids)), rtol=1e-4, atol=1e-4)


def test_the_tied_lm_head_is_quantized_once_for_the_embedding_too():
    model, batches = llama_with_batches()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    sm = pysparse.compile(
        model, ["quantize", "lower"], (batches[0][0][0][:1, :8],), generation=False
    )
    table = next(t for n, t in sm.gm.named_parameters() if "embed" in n)
    head = next(n for n in sm.gm.graph.nodes if n.meta.get("pysparse", {}).get("role") == "head")
    record = sm.gm.meta["pysparse"]["weight_layouts"][head.meta["pysparse"]["weight"]]
    assert record["layout"] == "int8"
    q, scale = sm.gm.get_buffer(record["tensor"]), sm.gm.get_buffer(record["scale"])
    assert q.shape == table.shape
    torch.testing.assert_close(table, formats.dequantize_int8(q, scale), rtol=0, atol=0)


def test_the_vnni_route_stays_near_the_weight_only_one(llama, monkeypatch):
    """Where the CPU has AVX512-VNNI the int8 ops quantise x per block of 32 too: the lowered
    model's logits move by that rounding only (relative error well under 1%), and it generates
    the same tokens in the graph and natively."""
    _, batches = llama
    ids = batches[1][0][0][:1, :8]  # up to 16 rows: the int8 kernels (more: dequantised weights)
    sm = _compile(llama, ["relu", "magnitude", "quantize", "compress24", "lower"])
    exact = _logits(sm(ids))
    monkeypatch.delenv("PYSPARSE_DISABLE_VNNI")
    if pysparse._C.cpu_info()["int8_impl"] != "avx512_vnni":
        pytest.skip("this CPU has no VNNI route (the int8 ops are weight-only here)")
    a8 = _logits(sm(ids))
    assert 0 < (a8 - exact).abs().max() < 0.05 * exact.abs().max()
    prompt = ids[:1, :5]
    want = sm.generate(prompt, max_new_tokens=6, native=False)
    assert torch.equal(sm.generate(prompt, max_new_tokens=6, native=True), want)


# ---- int4 ----


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize(
    ("passes", "ops"),
    [
        (["quantize", "lower"], {P.int4_linear.default}),
        (["magnitude", "quantize", "compress24", "lower"], {P.sparse24_int4_linear.default}),
    ],
    ids=["int4", "2:4+int4"],
)
def test_int4_lowered_model_computes_the_quantized_graph(llama, passes, ops, group):
    """int4 (head int8 by default) lowers onto the int4 ops and computes what the quantized graph
    does; the weights are within int4's error of the unquantized ones and read ~4.5 bits (dense)
    or ~3.3 (2:4) a weight."""
    _, batches = llama
    ids = batches[1][0][0]
    q4 = lambda: Quantize(bits=4, group=group)
    mk = lambda ps: [q4() if p == "quantize" else p for p in ps]
    lowered = _compile(llama, mk(passes), generation=False)
    graph = _compile(
        llama, mk([p for p in passes if p not in ("compress24", "lower")]), generation=False
    )
    targets = _targets(lowered)
    assert ops <= set(targets)
    assert targets.count(P.int8_linear.default) == 1  # the head
    assert torch.ops.aten.linear.default not in targets and P.dense_linear.default not in targets
    torch.testing.assert_close(_logits(lowered(ids)), _logits(graph(ids)), rtol=1e-4, atol=1e-4)
    report = next(r for r in lowered.report if r["pass"] == "quantize")
    assert report["by_bits"] == {"4": 14, "8": 1}
    assert 0.02 < report["relative_weight_error"] < 0.2
    layouts = lowered.gm.meta["pysparse"]["weight_layouts"]
    int4 = [r for r in layouts.values() if r["layout"].startswith("int4")]
    assert len(int4) == 14 and all(r["group"] in (group, 2 * group) for r in int4)
    # the dense weights a report or export reads back are the dequantised ones
    sd = {**dict(lowered.gm.named_parameters()), **dict(lowered.gm.named_buffers())}
    gsd = {**dict(graph.gm.named_parameters()), **dict(graph.gm.named_buffers())}
    for name, rec in layouts.items():
        if rec["layout"].startswith("int4"):
            torch.testing.assert_close(
                formats.dense_weight(sd, name, layouts), gsd[name], rtol=0, atol=0
            )


def test_int4_everywhere_and_the_tied_head():
    model, batches = llama_with_batches()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    sm = pysparse.compile(
        model,
        [Quantize(bits=4, head_bits=4), "lower"],
        (batches[0][0][0][:1, :8],),
        generation=False,
    )
    assert P.int8_linear.default not in _targets(sm)
    table = next(t for n, t in sm.gm.named_parameters() if "embed" in n)
    head = next(n for n in sm.gm.graph.nodes if n.meta.get("pysparse", {}).get("role") == "head")
    record = sm.gm.meta["pysparse"]["weight_layouts"][head.meta["pysparse"]["weight"]]
    assert record["layout"] == "int4" and record["group"] == 32
    packed, scale = sm.gm.get_buffer(record["tensor"]), sm.gm.get_buffer(record["scale"])
    q = formats.unpack_int4(packed, table.shape[1])
    torch.testing.assert_close(table, formats.dequantize_int4(q, scale, 32), rtol=0, atol=0)


@pytest.mark.parametrize(
    "passes",
    [
        [Quantize(bits=4), "lower"],
        ["relu", "magnitude", Quantize(bits=4), "compress24", "lower"],
        ["magnitude", Quantize(), "compress24", "lower"],
    ],
    ids=["int4", "2:4+act+int4", "2:4+int8"],
)
def test_compressed_tensors_export_loads_in_transformers(llama, tmp_path, passes):
    """The compressed-tensors folder: the quantized linears stored as compressed-tensors' own
    unpacker reads them (pack-quantized int4 / int-quantized int8), and transformers' loader
    (which decompresses through compressed-tensors) gives pysparse's logits."""
    ct = pytest.importorskip("compressed_tensors")
    import json

    import transformers
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    _, batches = llama
    ids = batches[1][0][0]
    sm = _compile(llama, passes, generation=False)
    out = pysparse.export(sm, tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"][0] == "lm_head"
    state = load_file(str(out / "model.safetensors"))
    layouts = sm.gm.meta["pysparse"]["weight_layouts"]
    tensors = {**dict(sm.gm.named_parameters()), **dict(sm.gm.named_buffers())}
    checked = 0
    for group in qc["config_groups"].values():
        bits, gs = group["weights"]["num_bits"], group["weights"]["group_size"]
        for module in group["targets"]:
            want = formats.dense_weight(tensors, module + ".weight", layouts)
            scale = state[module + ".weight_scale"]
            if bits == 4:
                shape = torch.Size(state[module + ".weight_shape"].tolist())
                q = unpack_from_int32(state[module + ".weight_packed"], 4, shape)
                got = q.float() * scale.repeat_interleave(gs, dim=1)
            else:
                got = state[module + ".weight"].float() * scale
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            checked += 1
    assert checked >= 8
    if "magnitude" in passes:
        assert len(cfg["pysparse_sparsity"]["modules"]) >= 8
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, _logits(sm(ids)), rtol=1e-4, atol=1e-4)
    assert ct.__version__


def test_compressed_tensors_export_needs_quantized_weights(llama, tmp_path):
    sm = _compile(llama, ["magnitude", "compress24", "lower"], generation=False)
    with pytest.raises(ValueError, match="no quantized linears"):
        pysparse.export(sm, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
