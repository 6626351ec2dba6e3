"""The predictor pass (activation predictors for ReLU/FATReLU FFNs): what it reports, that the
graph computes the exact FFN restricted to the predicted pairs, that ``lower`` hands the mask to
the FFN ops (and the PassManager's spot check finds the lowered model equal), the generation
graph, save / load, and refusals."""

from __future__ import annotations

import pytest
import torch
import transformers
from pysparse.passes import Compress24, Lower, MagnitudePrune, Predictor, ReluSubstitution
from pysparse.passes.predictor import _scores, _shift_for_recall
from tiny_models import bert_config, llama_config

import pysparse
from pysparse.compiler.base import PassError


def _llama(n_batches: int = 8):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(max_position_embeddings=128)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [((torch.randint(0, 96, (4, 32), generator=gen),), {}) for _ in range(n_batches)]
    return model, batches


def _ffn_ops(gm):
    names = ("sparse_ffn", "sparse_ffn24", "sparse_mlp", "sparse_mlp24")
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in names
    ]


def _assert_masks_on_ffn_predict(gm, ops):
    """Each lowered FFN op's mask is a pysparse::ffn_predict node, and the predictor's own
    matmuls and comparison are gone from the graph."""
    assert all(n.args[-1].target is torch.ops.pysparse.ffn_predict.default for n in ops)
    assert not any(n.target is torch.ops.aten.gt.Scalar for n in gm.graph.nodes)


def test_shift_reaches_the_recall_on_its_own_data():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=gen)
    fires = (logits + torch.randn(200, 50, generator=gen)) > 0.5
    mass = torch.rand(200, 50, generator=gen) * fires
    for recall in (0.9, 0.99, 1.0):
        c = _shift_for_recall(logits, fires, mass, recall)
        s = _scores(logits + c, fires, mass)
        assert s["recall"] >= recall and s["recall_mass"] >= recall - 1e-9, (recall, s)
        # the least shift: a slightly smaller one misses the target
        s2 = _scores(logits + c - 1e-2, fires, mass)
        assert min(s2["recall"], s2["recall_mass"]) < recall or recall == 1.0 and s2["recall"] < 1


def test_decoder_predictors_report_mask_and_lower(tmp_path):
    model, batches = _llama()
    sm = pysparse.compile(
        model,
        [ReluSubstitution(), Predictor(data=batches[:6], ranks=(4, 8, 16), max_rows=None), Lower()],
        *batches[0],
        calibration=batches[:6],
        generation=True,
    )
    info = next(r for r in sm.report if r["pass"] == "predictor")
    assert info["ffns"] == 2 and len(info["layers"]) == 2
    for row in info["layers"]:
        assert row["rank"] in (4, 8, 16)
        # held-out 15% of the recorded tokens; the 99% target is met on the calibration slice
        assert row["recall"] > 0.9 and row["recall_mass"] > 0.9, row
        assert 0 < row["predicted"] <= 1 and row["predictor_bytes"] == (
            (row["rank"] * (64 + 176) + 176) * 4
        )
    # lowered: every FFN op got the predictor's mask (spot-checked equal to the graph before)
    ops = _ffn_ops(sm.gm)
    assert len(ops) == 2 and all(len(n.args) == 6 and n.args[5] is not None for n in ops)
    _assert_masks_on_ffn_predict(sm.gm, ops)
    # the generation graph carries the same predictors: it generates what the forward graph
    # predicts token by token (no row cap here: the forward over the sequence predicts too)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(7))
    got = sm.generate(ids, max_new_tokens=6, eos_token_id=[])
    seq = ids
    for _ in range(6):
        out = sm(seq)
        logits = out.logits if hasattr(out, "logits") else out[0]
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)
    assert len(_ffn_ops(sm.step)) == 2
    pysparse.save(sm, tmp_path / "a")
    loaded = pysparse.load(tmp_path / "a")
    x = batches[7][0][0]
    a, b = sm(x), loaded(x)
    a = a.logits if hasattr(a, "logits") else a[0]
    b = b.logits if hasattr(b, "logits") else b[0]
    torch.testing.assert_close(a, b)


def test_predictors_restrict_the_exact_ffn():
    """Before lowering the graph computes x1 * (logits > 0): with every prediction forced true
    (a large bias) the model is the exact ReLU model; with every one false, every FFN is 0."""
    model, batches = _llama(4)
    relu = pysparse.compile(model, [ReluSubstitution()], *batches[0])
    sm = pysparse.compile(
        model,
        [ReluSubstitution(), Predictor(data=batches, ranks=(8,), max_rows=None)],
        *batches[0],
        calibration=batches,
    )
    x = batches[3][0][0]
    ref = relu(x)
    ref = ref.logits if hasattr(ref, "logits") else ref[0]
    for name, buf in sm.gm.named_buffers():
        if name.endswith("_c"):
            buf.fill_(1e4)
    out = sm(x)
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out[0], ref)
    for name, buf in sm.gm.named_buffers():
        if name.endswith("_c"):
            buf.fill_(-1e4)
    gm = sm.gm
    from pysparse.quality.evaluate import measure_activation_sparsity

    assert measure_activation_sparsity(gm, [((x,), {})]) == [1.0, 1.0]


def test_max_rows_runs_the_exact_ffn_past_the_cap():
    """Default max_rows=8: a call with more rows (here a 4x32 batch) runs the exact FFN even when
    every prediction is false, while 8 rows or fewer take the predictor's mask, before lowering
    and after (the same op in both graphs)."""
    model, batches = _llama(4)
    relu = pysparse.compile(model, [ReluSubstitution()], *batches[0])
    sm = pysparse.compile(
        model,
        [ReluSubstitution(), Predictor(data=batches, ranks=(8,)), Lower()],
        *batches[0],
        calibration=batches,
    )
    info = next(r for r in sm.report if r["pass"] == "predictor")
    assert info["max_rows"] == 8
    keeps = [n for n in sm.gm.graph.nodes if n.target is torch.ops.pysparse.ffn_predict.default]
    assert len(keeps) == 2 and all(n.args[4] == 8 for n in keeps)
    for name, buf in sm.gm.named_buffers():
        if name.endswith("_c"):
            buf.fill_(-1e4)  # every neuron predicted off
    from pysparse.quality.evaluate import measure_activation_sparsity

    x = batches[3][0][0]
    out, ref = sm(x), relu(x)
    torch.testing.assert_close(
        out.logits if hasattr(out, "logits") else out[0],
        ref.logits if hasattr(ref, "logits") else ref[0],
    )
    assert min(measure_activation_sparsity(sm.gm, [((x,), {})])) < 1.0
    assert measure_activation_sparsity(sm.gm, [((x[:1, :8],), {})]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="max_rows must be >= 0 or None"):
        Predictor(max_rows=-1)


def test_encoder_with_bias_and_24_weights(tmp_path):
    """BERT (plain FFN with biases), 2:4 weights: the predictors are fitted on the pruned weights
    and the lowered op is sparse_mlp24 with the mask."""
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval()
    gen = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(8):
        ids = torch.randint(0, 100, (4, 20), generator=gen)
        mask = torch.ones(4, 20, dtype=torch.long)
        mask[0, 15:] = 0
        batches.append(((ids,), {"attention_mask": mask}))
    sm = pysparse.compile(
        model,
        ["relu", MagnitudePrune(), Predictor(ranks=(4, 8)), Compress24(), Lower()],
        *batches[0],
        calibration=batches,
    )
    info = next(r for r in sm.report if r["pass"] == "predictor")
    assert [r["layer"] for r in info["layers"]] == [0, 1]
    # 8 x 4 x 20 tokens less the padding
    assert info["tokens_per_layer"] == 8 * (4 * 20 - 5)
    ops = _ffn_ops(sm.gm)
    assert len(ops) == 2
    assert all(n.target.__name__.startswith("sparse_mlp24") and n.args[-1] is not None for n in ops)
    _assert_masks_on_ffn_predict(sm.gm, ops)
    # ONNX (standard ops: ffn_predict as two MatMuls and a Greater) runs what the kernels run
    ort = pytest.importorskip("onnxruntime")
    path = pysparse.export(sm, tmp_path / "m.onnx", format="onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = batches[3][0][0][:2, :9], batches[3][1]["attention_mask"][:2, :9]
    names = [i.name for i in sess.get_inputs()]
    # 18 rows: past the default cap (every neuron); 6 rows: the predictor's mask
    for i, m in ((ids, mask), (ids[:1, :6], mask[:1, :6])):
        got = sess.run(None, {names[0]: i.numpy(), names[1]: m.numpy()})[0]
        want = sm(i, attention_mask=m)
        want = want.last_hidden_state if hasattr(want, "last_hidden_state") else want[0]
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_refusals():
    model, batches = _llama(2)
    with pytest.raises(PassError, match="no FFN has a ReLU/FATReLU activation"):
        pysparse.compile(model, [Predictor()], *batches[0], calibration=batches)
    with pytest.raises(ValueError, match="recall must be in"):
        Predictor(recall=1.5)
    with pytest.raises(ValueError, match="ranks must be positive"):
        Predictor(ranks=(0, 4))
