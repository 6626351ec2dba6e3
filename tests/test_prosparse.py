"""ProSparse: the staged sine schedule against its formula, the penalty's gradient reaching the
FFN weights (loss mode and the gradient-injection mode used by the HF callback, which must agree),
sparsity rising over a short run, the callback inside a Hugging Face Trainer, FATReLU at t = 0
equal to ReLU, the threshold sweep, 2-D inputs (a plain MLP on [batch, features]), and errors."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from pysparse.passes import ProSparse, ReluSubstitution
from pysparse.passes.prosparse import Constant, StagedSine, regularizer, set_threshold
from tiny_models import bert_with_batches, llama_with_batches, sequential_with_batches

import pysparse
from pysparse.evaluate import measure_activation_sparsity


def _llama(seed=0):
    return llama_with_batches(3, seed)


def _bert():
    return bert_with_batches(5)


def test_staged_sine_matches_the_formula():
    s = StagedSine([(0, 50), (5e-3, 60), (5e-2, 100), (5e-2, 120), (2e-1, 160), (2e-1, 165)])
    assert s(1) == 0 and s(50) == 0  # stage 0
    assert s(51) == 5e-3 and s(60) == 5e-3  # flat warm-up
    for t in (61, 75, 80, 99, 100):  # sine ramp 5e-3 -> 5e-2 over (60, 100]
        eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - 60) / 40) + 1)
        assert s(t) == pytest.approx(5e-3 + eta * (5e-2 - 5e-3), rel=1e-12)
    assert s(80) == pytest.approx((5e-3 + 5e-2) / 2)  # the ramp's midpoint
    assert s(110) == pytest.approx(5e-2)  # plateau
    eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * 20 / 40) + 1)
    assert s(140) == pytest.approx(5e-2 + eta * 0.15)
    assert s(165) == pytest.approx(0.2) and s(10_000) == pytest.approx(0.2)
    scaled = StagedSine.scaled(100, 0.4)
    assert [t for _, t in scaled.stages] == [30, 36, 60, 72, 96, 100]
    assert scaled(100) == pytest.approx(0.4) and scaled(30) == 0 and scaled(33) == 0.01
    assert Constant(0.3)(7) == 0.3
    with pytest.raises(ValueError, match="must increase"):
        StagedSine([(0, 10), (0.1, 10)])
    with pytest.raises(ValueError, match="must not decrease"):
        StagedSine([(0.2, 10), (0.1, 20)])


def test_penalty_gradient_reaches_ffn_weights_and_inject_mode_agrees():
    model, batches = _llama()
    sm = pysparse.compile(model, ["relu"], *batches[0])
    reg = regularizer(sm, 0.7)
    out = sm(*batches[0][0])
    penalty = reg.loss()
    assert penalty.item() > 0
    penalty.backward()
    up = sm.gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    gate = sm.gm.get_parameter("model.layers.1.mlp.gate_proj.weight")
    down = sm.gm.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert up.grad.abs().sum() > 0 and gate.grad.abs().sum() > 0
    assert down.grad is None or down.grad.abs().sum() == 0  # no x1 depends on the last W_down
    loss_grad = up.grad.clone()
    for p in sm.gm.parameters():
        p.grad = None
    # Inject mode: same gradient from the backward of any loss (here a zero-weighted output).
    reg.mode = "inject"
    out = sm(*batches[0][0])
    (out.logits.sum() * 0).backward()
    torch.testing.assert_close(up.grad, loss_grad, rtol=1e-5, atol=1e-8)
    reg.remove()
    assert not any("_tap" in str(n.target) for n in sm.gm.graph.nodes)


def test_sparsity_rises_over_a_short_run(tmp_path):
    model, batches = _llama()
    base = pysparse.compile(model, ["relu"], *batches[0])
    before = measure_activation_sparsity(base.gm, batches, base.gm.meta["pysparse"]["call_kwargs"])
    sm = pysparse.compile(
        model,
        [
            "relu",
            ProSparse(data=batches, steps=30, lam=100.0, lr=1e-2, plot=str(tmp_path / "p.png")),
        ],
        *batches[0],
        calibration=batches,
    )
    after = measure_activation_sparsity(sm.gm, batches, sm.gm.meta["pysparse"]["call_kwargs"])
    assert sum(after) / 2 > sum(before) / 2 + 0.1, (before, after)
    rep = sm.report[-1]
    assert rep["pass"] == "prosparse" and rep["objective"] == "causal_lm"
    assert rep["schedule"].startswith("StagedSine(")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not any("_tap" in str(n.target) for n in sm.gm.graph.nodes)  # taps removed


def test_fatrelu_at_zero_equals_relu_and_threshold_adds_zeros():
    model, batches = _llama()
    relu = pysparse.compile(model, ["relu"], *batches[0])
    fat0 = pysparse.compile(model, [ReluSubstitution(threshold=0.0)], *batches[0])
    torch.testing.assert_close(relu(*batches[0][0]).logits, fat0(*batches[0][0]).logits)
    s0 = measure_activation_sparsity(relu.gm, batches)
    set_threshold(relu.gm, 0.05)
    s1 = measure_activation_sparsity(relu.gm, batches)
    assert all(b > a for a, b in zip(s0, s1))
    set_threshold(relu.gm, 0.0)
    torch.testing.assert_close(relu(*batches[0][0]).logits, fat0(*batches[0][0]).logits)


def test_encoder_distills_to_the_original_activation_and_sweeps_threshold():
    model, batches = _bert()
    sm = pysparse.compile(
        model,
        ["relu", ProSparse(data=batches, steps=6, lam=1.0, lr=1e-3, threshold="sweep")],
        *batches[0],
        calibration=batches,
    )
    rep = sm.report[-1]
    assert rep["objective"] == "hidden_mse"
    sweep = rep["threshold_sweep"]
    assert sweep["rows"][0]["t"] == 0 and sweep["rows"][0]["ok"]
    ts = [r["t"] for r in sweep["rows"]]
    assert ts == sorted(ts) and rep["threshold"] in ts
    sparsities = [r["sparsity"] for r in sweep["rows"]]
    assert sparsities[-1] >= sparsities[0]
    assert all(
        r["ok"] == (r["quality"] >= sweep["rows"][0]["quality"] - 0.01) for r in sweep["rows"]
    )


@pytest.mark.parametrize("objective", ["hidden_mse", "pooled_cosine"])
def test_two_dimensional_inputs_train_and_sweep(objective):
    """An nn.Sequential on [batch, features]: the objective, the penalty and the threshold sweep's
    quality (pooled embeddings) all take rows as items."""
    model, batches = sequential_with_batches(4)
    sm = pysparse.compile(
        model,
        [
            "relu",
            ProSparse(
                data=batches, steps=4, lam=0.5, lr=1e-3, objective=objective, threshold="sweep"
            ),
        ],
        *batches[0],
        calibration=batches,
    )
    rep = sm.report[-1]
    assert rep["objective"] == objective
    rows = rep["threshold_sweep"]["rows"]
    assert rows[0]["t"] == 0 and 0.9 < rows[0]["quality"] <= 1.0 + 1e-6  # cosine to the original
    out = sm(*batches[0][0])
    assert out.shape == (4, 16) and torch.isfinite(out).all()


def test_callback_inside_a_hugging_face_trainer(tmp_path):
    model, batches = _llama()
    sm = pysparse.compile(model, ["relu"], *batches[0])
    reg = regularizer(sm, StagedSine([(0, 1), (0.5, 2), (2.0, 6)]))

    class LM(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels=None):
            logits = self.inner(input_ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
            return {"loss": loss}

    data = [{"input_ids": b[0][0][i], "labels": b[0][0][i]} for b in batches for i in range(4)]
    w = sm.gm.get_parameter("model.layers.0.mlp.up_proj.weight")
    before = w.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=LM(sm), args=args, train_dataset=data, callbacks=[reg.callback()]
    )
    trainer.train()
    assert reg.t == 6 and reg.mode == "inject"
    assert not torch.equal(before, w.detach())
    logged = [h for h in trainer.state.log_history if "prosparse_lambda" in h]
    assert len(logged) == 6 and logged[-1]["prosparse_lambda"] == pytest.approx(2.0)
    reg.remove()


def test_errors():
    model, batches = _llama()
    with pytest.raises(Exception, match="relu"):
        pysparse.compile(model, [ProSparse(data=batches, steps=2)], *batches[0])
    with pytest.raises(ValueError, match="threshold"):
        ProSparse(threshold=-1)
    with pytest.raises(TypeError, match="pysparse.compile"):
        regularizer(model, 0.1)
