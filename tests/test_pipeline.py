"""The compiler pipeline the torch.fx way: tiny models (HF LLaMA / Mistral / Qwen2 / BERT configs
built in code, and plain nn.Modules), capture + structural annotation, each pass on its own
(graph.lint, numerics, structure), masked-dense == compiled-sparse, ordering and errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from pysparse.passes import Compress24, Lower, MagnitudePrune, ReluSubstitution
from tiny_models import bert_config

import pysparse
from pysparse.capture.trace import TraceError, trace
from pysparse.compiler.base import PassError
from pysparse.kernels.reference import is_24_sparse

aten = torch.ops.aten


def _decoder(name: str):
    common = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),  # fused qkv and gate_up
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),  # GELU gate, tied head
    }[name]
    if name == "phi3":
        common["pad_token_id"] = 0
    if name == "gemma":
        common["head_dim"] = 16
    torch.manual_seed(0)
    return model_cls(cfg_cls(**common)).eval(), (torch.randint(0, 96, (2, 9)),), {}


def _bert():
    cfg = bert_config()
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    return (
        transformers.BertModel(cfg).eval(),
        (ids,),
        {"attention_mask": torch.ones(2, 7, dtype=torch.long)},
    )


class FusedGateUp(torch.nn.Module):
    """A plain module with a fused gate_up projection and a GELU outside the FFN."""

    def __init__(self, d=32, f=48):
        super().__init__()
        self.pre = torch.nn.Linear(d, d)
        self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.pre(x))  # not an FFN activation
        g, u = self.gate_up(h).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(g) * u)


def _roles(gm):
    return [(i["role"], i["layer"]) for i in gm.meta["pysparse"]["linears"].values()]


def _out(o):
    if hasattr(o, "logits"):
        return o.logits
    if hasattr(o, "last_hidden_state"):
        return o.last_hidden_state
    return o


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_trace_annotates_decoders_by_structure(name):
    model, args, kwargs = _decoder(name)
    gm = trace(model, args, kwargs)
    gm.graph.lint()
    ffns = gm.meta["pysparse"]["ffns"]
    assert [f["kind"] for f in ffns] == ["gated", "gated"]
    assert [f["act_op"] for f in ffns] == ["aten.silu.default"] * 2
    expected = [("qkv", 0)] * 3 + [("o", 0), ("gate", 0), ("up", 0), ("down", 0)]
    expected += [("qkv", 1)] * 3 + [("o", 1), ("gate", 1), ("up", 1), ("down", 1), ("head", None)]
    assert _roles(gm) == expected
    head = list(gm.meta["pysparse"]["linears"].values())[-1]
    assert head["prunable"] is False
    torch.testing.assert_close(
        _out(gm(*args, use_cache=False)), _out(model(*args, use_cache=False))
    )


def test_trace_annotates_fused_projections_and_tied_heads():
    model, args, _ = _decoder("phi3")
    gm = trace(model, args)
    assert [(f["kind"], f["gate_up"] is not None) for f in gm.meta["pysparse"]["ffns"]] == [
        ("gated", True)
    ] * 2
    layer0 = [("qkv", 0), ("o", 0), ("gate_up", 0), ("down", 0)]
    assert _roles(gm) == layer0 + [(r, 1) for r, _ in layer0] + [("head", None)]
    model, args, _ = _decoder("gemma")
    gm = trace(model, args)
    assert [f["act_op"] for f in gm.meta["pysparse"]["ffns"]] == ["aten.gelu.default"] * 2
    assert _roles(gm)[-1] == ("head", None)


def test_trace_annotates_bert_and_skips_pooler():
    model, args, kwargs = _bert()
    gm = trace(model, args, kwargs)
    assert [f["kind"] for f in gm.meta["pysparse"]["ffns"]] == ["plain", "plain"]
    roles = _roles(gm)
    assert roles[:6] == [("qkv", 0)] * 3 + [("o", 0), ("up", 0), ("down", 0)]
    assert roles[-1] == ("head", None)


def test_trace_finds_fused_gate_up_and_leaves_other_gelu():
    gm = trace(FusedGateUp(), (torch.randn(3, 32),))
    (ffn,) = gm.meta["pysparse"]["ffns"]
    assert ffn["gate_up"] is not None and ffn["kind"] == "gated"
    sm = pysparse.compile(FusedGateUp(), ["relu"], (torch.randn(3, 32),))
    targets = [n.target for n in sm.gm.graph.nodes if n.op == "call_function"]
    assert aten.gelu.default in targets  # the GELU outside the FFN stays
    assert aten.silu.default not in targets


def test_captured_graph_shares_and_trains_the_models_parameters():
    model, args, _ = _decoder("llama")
    gm = trace(model, args)
    name = "model.layers.0.mlp.up_proj.weight"
    assert gm.get_parameter(name).data_ptr() == model.get_parameter(name).data_ptr()
    _out(gm(*args, use_cache=False)).sum().backward()
    assert model.get_parameter(name).grad is not None


def test_relu_pass_replaces_only_ffn_activations_and_keeps_attention():
    model, args, kwargs = _decoder("llama")
    base = trace(model, args, kwargs, copy_model=True)
    sm = pysparse.compile(model, [ReluSubstitution()], args, kwargs)
    count = lambda gm, t: sum(1 for n in gm.graph.nodes if n.target is t)
    assert count(sm.gm, aten.silu.default) == 0 and count(sm.gm, aten.relu.default) == 2
    sdpa = aten.scaled_dot_product_attention.default
    assert count(sm.gm, sdpa) == count(base, sdpa) == 2
    assert sm.report[0]["ffn_activations_replaced"] == 2


def test_fatrelu_threshold_semantics():
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(5, 8)
    sm = pysparse.compile(m, [ReluSubstitution(threshold=0.1)], (x,))
    h = m[0](x)
    expected = m[2](torch.where(h >= 0.1, h, torch.zeros_like(h)))
    torch.testing.assert_close(sm(x), expected)


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("build", ["llama", "qwen2", "phi3", "bert"])
def test_masked_dense_equals_compiled_sparse(mask, build):
    model, args, kwargs = _bert() if build == "bert" else _decoder(build)
    dense = pysparse.compile(model, ["relu", mask], args, kwargs)
    sparse = pysparse.compile(model, ["relu", mask, "compress24", "lower"], args, kwargs)
    targets = [n.target for n in sparse.gm.graph.nodes]
    p = torch.ops.pysparse
    # every prunable linear runs on a 2:4 kernel: alone, or inside a lowered ReLU FFN (3 linears
    # per gated block, 2 per plain one; Phi-3's fused gate_up stays on sparse24_linear), q, k
    # and v as one op over their stacked weights
    covered = (
        sum(
            len(n.meta["pysparse"].get("fused", [n]))
            for n in sparse.gm.graph.nodes
            if n.target is p.sparse24_linear.default
        )
        + 3 * targets.count(p.sparse_ffn24.default)
        + 2 * targets.count(p.sparse_mlp24.default)
    )
    assert covered == {"bert": 12, "phi3": 8}.get(build, 14)
    assert (p.sparse_ffn24.default in targets) == (build in ("llama", "qwen2"))
    assert (p.sparse_mlp24.default in targets) == (build == "bert")
    assert not any(
        n.target is aten.linear.default and n.meta.get("pysparse", {}).get("prunable")
        for n in sparse.gm.graph.nodes
    )
    # fp32 accumulation in a different order: agreement to float32 rounding.
    torch.testing.assert_close(
        _out(sparse(*args, **kwargs)), _out(dense(*args, **kwargs)), rtol=1e-4, atol=1e-5
    )
    assert sparse.report[-1]["spot_check_max_abs_err"] < 1e-4


@pytest.mark.parametrize("threshold", [None, 0.05])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("build", ["llama", "qwen2", "bert"])
def test_lowered_ffn_equals_unlowered_graph(build, packed, threshold):
    """Lower turns ReLU/FATReLU FFNs into the activation-sparse ops; outputs equal the graph
    lowered without them, at decode size (1 row: the sparse kernels) and at the capture size (more
    than 16 rows: the dense route), and activation sparsity is measured alike on both."""
    from pysparse.quality.evaluate import measure_activation_sparsity

    model, args, kwargs = _bert() if build == "bert" else _decoder(build)
    head = [ReluSubstitution(threshold)] + (["magnitude", "compress24"] if packed else [])
    plain = pysparse.compile(model, [*head, Lower(ffn=False)], args, kwargs)
    fused = pysparse.compile(model, [*head, Lower(ffn=True)], args, kwargs)
    op = {
        (False, False): "sparse_ffn",
        (False, True): "sparse_ffn24",
        (True, False): "sparse_mlp",
        (True, True): "sparse_mlp24",
    }[(build == "bert", packed)]
    want = getattr(torch.ops.pysparse, op).default
    assert sum(n.target is want for n in fused.gm.graph.nodes) == 2
    assert not any(n.target is aten.relu.default for n in fused.gm.graph.nodes)
    assert fused.report[-1]["ffns_lowered"] == {f"pysparse::{op}": 2}
    decode_args = tuple(a[:1, :1] for a in args)
    decode_kwargs = {k: v[:1, :1] for k, v in kwargs.items()}
    for a, k in ((args, kwargs), (decode_args, decode_kwargs)):
        torch.testing.assert_close(_out(fused(*a, **k)), _out(plain(*a, **k)), rtol=1e-4, atol=1e-5)
    batches = [(decode_args, decode_kwargs), (args, kwargs)]
    s_fused = measure_activation_sparsity(fused.gm, batches)
    s_plain = measure_activation_sparsity(plain.gm, batches)
    assert s_fused is not None and len(s_fused) == 2
    assert s_fused == pytest.approx(s_plain, abs=1e-6)


@pytest.mark.parametrize("mask", ["magnitude", "wanda", "sparsegpt", "proxsparse"])
@pytest.mark.parametrize("build", ["llama", "bert"])
def test_down_masked_along_d_model_runs_on_the_by_row_ffn_kernel(build, mask):
    """down_along="d_model": the down projections' 2:4 groups run along out_features; compress24
    packs them transposed, lower feeds them to the FFN op as the by-row layout, and the compiled
    model equals the masked dense one (at decode size and at the capture size). Without FFN
    lowering they stay dense."""
    from pysparse.passes import ProxSparse, SparseGPTPrune, WandaPrune

    model, args, kwargs = _bert() if build == "bert" else _decoder(build)
    make = {
        "magnitude": MagnitudePrune,
        "wanda": WandaPrune,
        "sparsegpt": SparseGPTPrune,
        "proxsparse": lambda **kw: ProxSparse.mask_only(
            steps=3, **kw
        ),  # learned masks, a few steps
    }[mask]
    dense = pysparse.compile(model, ["relu", make(down_along="d_model")], args, kwargs)
    for name, info in dense.gm.meta["pysparse"]["linears"].items():
        if info.get("role") == "down":
            w = dense.gm.get_parameter(info["weight"])
            assert is_24_sparse(w.T) and not is_24_sparse(w), name
    sparse = pysparse.compile(
        model, ["relu", make(down_along="d_model"), "compress24", "lower"], args, kwargs
    )
    op = torch.ops.pysparse.sparse_mlp24 if build == "bert" else torch.ops.pysparse.sparse_ffn24
    ffn_nodes = [n for n in sparse.gm.graph.nodes if n.target is op.default]
    assert len(ffn_nodes) == 2
    down_values = ffn_nodes[0].args[4 if build == "bert" else 5]
    assert getattr(sparse.gm, down_values.target).dim() == 2  # the by-row layout
    decode_args = tuple(a[:1, :1] for a in args)
    decode_kwargs = {k: v[:1, :1] for k, v in kwargs.items()}
    for a, k in ((args, kwargs), (decode_args, decode_kwargs)):
        torch.testing.assert_close(
            _out(sparse(*a, **k)), _out(dense(*a, **k)), rtol=1e-4, atol=1e-5
        )
    kept = pysparse.compile(
        model, ["relu", make(down_along="d_model"), "compress24", Lower(ffn=False)], args, kwargs
    )
    assert kept.report[-1]["down_along_d_model_left_dense"] == 2
    torch.testing.assert_close(_out(kept(*args, **kwargs)), _out(dense(*args, **kwargs)))


def test_compiled_graph_exports():
    model, args, kwargs = _decoder("llama")
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], args, kwargs)
    ep = torch.export.export(sm, args, strict=False)
    torch.testing.assert_close(_out(ep.module()(*args)), _out(sm(*args)))


def test_pass_order_is_resolved_and_errors_name_the_problem():
    model, args, kwargs = _decoder("llama")
    sm = pysparse.compile(model, [Lower(), Compress24(), MagnitudePrune()], args, kwargs)
    assert [e["pass"] for e in sm.report] == ["magnitude", "compress24", "lower"]
    with pytest.raises(PassError, match="unknown pass 'sparsify'.*known passes"):
        pysparse.compile(model, ["sparsify"], args, kwargs)
    with pytest.raises(PassError, match="'compress24' needs one of .*magnitude"):
        pysparse.compile(model, ["compress24", "lower"], args, kwargs)


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return x * 2
            return x

    with pytest.raises(TraceError, match="could not capture DataDependent.*example inputs"):
        trace(DataDependent(), (torch.randn(3),))


def test_compile_does_not_touch_the_callers_weights():
    model, args, kwargs = _decoder("llama")
    before = model.get_parameter("model.layers.0.mlp.up_proj.weight").clone()
    pysparse.compile(model, ["magnitude"], args, kwargs)
    assert torch.equal(model.get_parameter("model.layers.0.mlp.up_proj.weight"), before)


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    # H = c*I: every column's inverse-Hessian weight is equal, no error is propagated, so the
    # OBS sweep reduces to keeping the 2 largest |w| per group.
    from pysparse.passes.baselines import sparsegpt_24

    from pysparse.kernels import ops

    w = torch.randn(12, 64)
    out = sparsegpt_24(w, 3.0 * torch.eye(64), block=16)
    torch.testing.assert_close(out, ops.prune24(w), rtol=1e-6, atol=1e-6)


def test_sparsegpt_update_beats_magnitude_on_correlated_inputs():
    from pysparse.passes.baselines import sparsegpt_24

    from pysparse.kernels import ops
    from pysparse.kernels.reference import is_24_sparse

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=gen)
    x = torch.randn(512, 64, generator=gen) @ mix  # strongly correlated features
    w = torch.randn(24, 64, generator=gen)
    h = x.double().T @ x.double()
    upd = sparsegpt_24(w, h, block=32)
    mask_only = sparsegpt_24(w, h, block=32, update_weights=False)
    assert is_24_sparse(upd) and is_24_sparse(mask_only)
    assert torch.equal(mask_only != 0, (mask_only != 0) & (w != 0))
    ref = x @ w.T
    err = lambda wp: float((x @ wp.T - ref).norm())
    assert err(upd) < err(ops.prune24(w))
    assert err(upd) < err(mask_only)


def test_sparsegpt_along_out_features():
    """down_along="d_model": groups of 4 along out_features. Identity Hessian: the top 2 |w| of each
    group of 4 rows per column; correlated inputs: the OBS update still beats magnitude pruning
    along the same axis."""
    from pysparse.passes.baselines import sparsegpt_24

    from pysparse.kernels import ops
    from pysparse.kernels.reference import is_24_sparse

    w = torch.randn(12, 64)
    out = sparsegpt_24(w, 3.0 * torch.eye(64), block=16, along_out=True)
    torch.testing.assert_close(out, ops.prune24(w.T.contiguous()).T, rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    w = torch.randn(24, 64, generator=gen)
    upd = sparsegpt_24(w, x.double().T @ x.double(), block=32, along_out=True)
    assert is_24_sparse(upd.T) and not is_24_sparse(upd)
    ref = x @ w.T
    err = lambda wp: float((x @ wp.T - ref).norm())
    assert err(upd) < err(ops.prune24(w.T.contiguous()).T)


def _check_weight_split(sm, out):
    """The weights live in safetensors (packed 2:4 tensors as plain values/meta) and the program
    file keeps none of them; the manifest records the model and every file."""
    import json

    from safetensors.torch import load_file

    weights = load_file(str(out / "weights.safetensors"))
    packed = [k for k in weights if k.endswith("values")]
    assert packed and all(weights[k.replace("values", "meta")].dtype == torch.uint8 for k in packed)
    import zipfile

    with zipfile.ZipFile(out / "program.pt2") as z:
        blobs = [
            i.file_size
            for i in z.infolist()
            if ("/data/weights/" in i.filename or "/data/constants/" in i.filename)
            and not i.filename.endswith(".json")
        ]
    assert blobs and max(blobs) <= 8  # one element per stand-in, nothing of the real weights
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["class"].endswith(type(sm).__name__) or "config" in manifest["model"]
    assert set(manifest["files"]) >= {
        "program.pt2",
        "weights.safetensors",
        "example_inputs.safetensors",
    }


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model, args, kwargs = _bert()
    sm = pysparse.compile(model, ["relu", "magnitude", "compress24", "lower"], args, kwargs)
    out = tmp_path / "artifact"
    pysparse.save(sm, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "example_inputs.safetensors",
        "manifest.json",
        "program.pt2",
        "report.html",
        "report.json",
        "report.md",
        "weights.safetensors",
    ]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left
    _check_weight_split(sm, out)
    torch.save(
        {"args": args, "kwargs": kwargs, "expected": _out(sm(*args, **kwargs))}, tmp_path / "io.pt"
    )
    code = (
        "import sys, torch, pysparse\n"
        "io = torch.load(sys.argv[2])\n"
        "m = pysparse.load(sys.argv[1])\n"
        "o = m(*io['args'], **io['kwargs'])\n"
        "o = o.last_hidden_state\n"
        "torch.testing.assert_close(o, io['expected'])\n"
        "assert [e['pass'] for e in m.report] == ['relu', 'magnitude', 'compress24', 'lower']\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_load_refuses_damaged_artifacts(tmp_path):
    from pysparse.artifacts.store import ArtifactError

    model, args, kwargs = _bert()
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], args, kwargs)
    good = pysparse.save(sm, tmp_path / "a")
    prog = good / "program.pt2"
    data = prog.read_bytes()
    prog.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        pysparse.load(good)
    prog.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="checksum"):
        pysparse.load(good)
    prog.unlink()
    with pytest.raises(ArtifactError, match="program.pt2 is missing"):
        pysparse.load(good)
    (good / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        pysparse.load(good)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        pysparse.load(tmp_path / "nowhere")
    other = pysparse.save(sm, tmp_path / "b")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["format_version"] = 999
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="999 is not supported"):
        pysparse.load(other)


def test_nan_in_calibration_data_is_refused_naming_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    bad = x.clone()
    bad[1, 3] = float("nan")
    for mask in ("wanda", "sparsegpt"):
        with pytest.raises(
            PassError, match=r"weight 0.weight contain NaN or Inf.*nothing was pruned"
        ):
            pysparse.compile(model, [mask], (x,), calibration=[((bad,), {})])


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_export_formats_reload_in_a_fresh_process(tmp_path, fmt):
    import subprocess
    import sys

    model, args, kwargs = _bert()
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], args, kwargs)
    path = pysparse.export(sm, tmp_path / f"model.{fmt}", format=fmt)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    torch.save(
        {"args": args, "kwargs": kwargs, "expected": _out(sm(*args, **kwargs))}, tmp_path / "io.pt"
    )
    load = (
        "torch.export.load(sys.argv[1]).module()" if fmt == "pt2" else "torch.jit.load(sys.argv[1])"
    )
    code = (
        "import sys, torch, pysparse\n"
        "io = torch.load(sys.argv[2])\n"
        f"m = {load}\n"
        "o = m(*io['args'], *io['kwargs'].values())\n"
        "torch.testing.assert_close(o[0], io['expected'])\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "io.pt"), fmt],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        pysparse.export(sm, tmp_path / "m.tflite", format="tflite")


@pytest.mark.parametrize("family", ["bert", "llama", "phi3"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, family):
    """ONNX: the packed 2:4 tensors travel as initializers and are decoded by standard ops; the
    model runs in onnxruntime at other batch/sequence sizes than compiled, within 1e-4 of the
    compiled model (fp32: the runtime's dense products sum in another order)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    if family == "bert":
        model, args, kwargs = _bert()
    else:
        model, args, kwargs = _decoder(family)
    sm = pysparse.compile(model, ["magnitude", "compress24", "lower"], args, kwargs)
    path = pysparse.export(sm, tmp_path / "m.onnx", format="onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    proto = onnx.load(str(path))
    # Weights of ~8k elements and more keep their packed form (the exporter folds tiny ones, as in
    # this BERT, to dense initializers).
    if family != "bert":
        assert any(n.op_type == "ScatterElements" for n in proto.graph.node)
    assert not any(n.domain not in ("", "ai.onnx") for n in proto.graph.node)  # standard ops only
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    torch.manual_seed(1)
    ids = torch.randint(0, 90, (3, 5))
    feeds = {names[0]: ids.numpy()}
    call_kwargs = {}
    if "attention_mask" in kwargs:
        mask = torch.ones(3, 5, dtype=torch.long)
        mask[1, 3:] = 0
        feeds[names[1]] = mask.numpy()
        call_kwargs["attention_mask"] = mask
    got = sess.run(None, feeds)
    want = _out(sm(ids, **call_kwargs))
    out_name = sess.get_outputs()[0].name
    assert out_name == ("last_hidden_state" if family == "bert" else "logits")
    torch.testing.assert_close(torch.from_numpy(got[0]), want, atol=1e-4, rtol=1e-4)


def test_calibration_stops_after_the_last_observed_input():
    """observe_linear_inputs ends each forward at the last observed linear (SparseGPT observes one
    layer at a time: without the stop every layer paid a whole forward, lm_head included). The
    statistics of the first layer alone equal those taken while observing every layer, and the
    graph's last op (after the lm_head) is never reached."""
    from pysparse.passes.baselines import maskable_linears, observe_linear_inputs

    from pysparse.compiler.base import PassContext

    model, args, kwargs = _decoder("llama")
    gm = trace(model, args, kwargs)
    targets, _ = maskable_linears(gm)
    first = [n for n, info in targets if info["layer"] == min(i["layer"] for _, i in targets)]
    gen = torch.Generator().manual_seed(4)
    ctx = PassContext(
        example_args=args,
        example_kwargs=kwargs,
        calibration=[((torch.randint(0, 96, (2, 9), generator=gen),), {}) for _ in range(3)],
    )
    fold = lambda acc, x: x.T @ x if acc is None else acc + x.T @ x
    everything = observe_linear_inputs(gm, ctx, [n for n, _ in targets], fold)
    head = [n for n in gm.graph.nodes if n.op == "call_function"][-1]  # the graph's last op
    reached = []
    with gm.graph.inserting_after(head):
        probe = gm.graph.call_function(lambda t: reached.append(1) or t, (head,))
    head.replace_all_uses_with(probe, delete_user_cb=lambda u: u is not probe)
    gm.recompile()
    alone = observe_linear_inputs(gm, ctx, first, fold)
    assert not reached
    assert set(alone) == {n.name for n in first}
    for name, h in alone.items():
        torch.testing.assert_close(h, everything[name], rtol=0, atol=0)
