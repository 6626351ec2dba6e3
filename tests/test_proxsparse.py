"""ProxSparse and the shared trainer, for mechanics: the loss falls, the groups become 2:4, the
original weights come back under the learned mask, resume after a crash reproduces the
uninterrupted run, bad settings are refused, 2-D inputs (a plain MLP on [batch, features]) train
like 3-D ones; the objectives against their formulas; and the evaluation harness on a tiny
encoder."""

from __future__ import annotations

import pytest
import torch
from pysparse.passes import Compress24, Lower, ProxSparse
from pysparse.passes.proxsparse import frozen_regularizer
from tiny_models import bert_with_batches, llama_with_batches, sequential_with_batches

import pysparse
from pysparse.reference import is_24_sparse
from pysparse.train import TrainConfig, Trainer


def _llama(seed=0):
    return llama_with_batches(2, seed)


def _bert():
    return bert_with_batches(2)


def test_decoder_loss_falls_and_masks_are_24_with_original_weights():
    model, batches = _llama()
    pass_ = ProxSparse(data=batches, steps=25, lr=3e-3, lam1=5.0, warmup=0.0)
    sm = pysparse.compile(model, [pass_], *batches[0], calibration=batches)
    rep = sm.report[-1]
    assert rep["objective"] == "causal_lm"
    assert rep["last_loss"] < rep["first_loss"] - 0.1, rep
    assert rep["groups_24_before_hard_mask"] > 0.3, rep  # the prox has been at work
    orig = dict(model.named_parameters())
    for info in sm.gm.meta["pysparse"]["linears"].values():
        if not info.get("prunable"):
            continue
        w = sm.gm.get_parameter(info["weight"]).detach()
        assert is_24_sparse(w)
        w0 = orig[info["weight"]].detach()
        kept = w != 0
        torch.testing.assert_close(w[kept], w0[kept])  # W0 under the mask, nothing else learned
        assert (kept.reshape(-1, 4).sum(-1) == 2).float().mean() > 0.99
    # the caller's model is untouched
    assert not is_24_sparse(dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"])


def test_encoder_distillation_then_compress_and_lower():
    model, batches = _bert()
    sm = pysparse.compile(
        model,
        [ProxSparse(data=batches, steps=8, lr=1e-3, lam1=2.0), Compress24(), Lower()],
        *batches[0],
        calibration=batches,
    )
    rep = sm.report[0]
    assert rep["pass"] == "proxsparse" and rep["objective"] == "hidden_mse"
    out = sm(*batches[1][0], **batches[1][1]).last_hidden_state
    assert torch.isfinite(out).all()


class _Objective:
    """A user objective (mean of the last hidden state) that can crash at a chosen call."""

    def __init__(self, crash_at: int | None = None):
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, out, batch):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return out.last_hidden_state.pow(2).mean()


def _prox_weights(sm):
    return {
        i["weight"]: sm.gm.get_parameter(i["weight"]).detach().clone()
        for i in sm.gm.meta["pysparse"]["linears"].values()
        if i.get("prunable")
    }


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path):
    model, batches = _bert()
    kw = {"data": batches, "steps": 12, "lr": 1e-3, "lam1": 1.0, "checkpoint_every": 4}
    clean = pysparse.compile(
        model, [ProxSparse(objective=_Objective(), **kw)], *batches[0], calibration=batches
    )
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        pysparse.compile(
            model,
            [ProxSparse(objective=_Objective(crash_at=10), checkpoint_dir=ckpt, **kw)],
            *batches[0],
            calibration=batches,
        )
    assert (tmp_path / "ckpt" / "learn" / "checkpoint.safetensors").is_file()  # from step 8
    resumed = pysparse.compile(
        model,
        [ProxSparse(objective=_Objective(), checkpoint_dir=ckpt, **kw)],
        *batches[0],
        calibration=batches,
    )
    a, b = _prox_weights(clean), _prox_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Other settings with the same checkpoint dir: refused, naming what differs.
    with pytest.raises(RuntimeError, match="other settings"):
        pysparse.compile(
            model,
            [ProxSparse(objective=_Objective(), checkpoint_dir=ckpt, **{**kw, "lam1": 2.0})],
            *batches[0],
            calibration=batches,
        )


@pytest.mark.parametrize("objective", ["hidden_mse", "pooled_cosine"])
def test_two_dimensional_inputs_train(objective):
    """An nn.Sequential on [batch, features]: no sequence axis, so no token mask to build."""
    model, batches = sequential_with_batches()
    sm = pysparse.compile(
        model,
        [ProxSparse(data=batches, steps=6, lam1=2.0, objective=objective), Compress24(), Lower()],
        *batches[0],
        calibration=batches,
    )
    rep = sm.report[0]
    assert rep["objective"] == objective and rep["layers_pruned"] == 2
    assert 0 <= rep["last_loss"] < 1  # relative error / 1 - cos: small for a 2:4 MLP
    out = sm(*batches[1][0])
    assert out.shape == (4, 16) and torch.isfinite(out).all()


def test_objectives_match_their_formulas_on_2d_and_3d_outputs():
    from pysparse.objectives import Objective, mean_pool

    model, batches = sequential_with_batches()
    gm = pysparse.trace(model, batches[0][0], copy_model=True)
    objectives = {k: Objective(gm, k, batches) for k in ("hidden_mse", "pooled_cosine")}
    with torch.no_grad():
        teacher = model(batches[0][0][0])
        gm.get_parameter("2.weight").mul_(0.9)  # the student drifts from the teacher
        h = gm(batches[0][0][0])
    # [batch, d]: every row is one item
    mse = ((h - teacher) ** 2).sum(-1).mean() / (teacher**2).sum(-1).mean()
    torch.testing.assert_close(objectives["hidden_mse"](batches[0]), mse)
    cos = 1 - torch.nn.functional.cosine_similarity(h, teacher, dim=-1).mean()
    torch.testing.assert_close(objectives["pooled_cosine"](batches[0]), cos)
    # [batch, seq, d] with padding: the mean over the real tokens only
    h3 = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(h3, ((), {"attention_mask": mask}))
    torch.testing.assert_close(pooled[0], h3[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], h3[1].mean(0))
    torch.testing.assert_close(mean_pool(h, ((), {})), h)


def test_trainer_schedule_clipping_accumulation():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=0.2, schedule="linear")
    assert [round(cfg.lr_at(s), 3) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.125]
    cos = TrainConfig(steps=10, lr=1.0, warmup=0.0, schedule="cosine")
    assert cos.lr_at(0) == 1.0 and abs(cos.lr_at(5)) < 0.51
    w = torch.nn.Parameter(torch.tensor([3.0]))
    hist = Trainer(
        {"w": w},
        lambda b: ((w - b) ** 2, {}),
        [torch.tensor([1.0]), torch.tensor([2.0])],
        TrainConfig(steps=60, lr=0.1, warmup=0.0, schedule="constant", accum=2),
    ).run()
    assert abs(float(w.detach()) - 1.5) < 0.1 and hist[-1]["loss"] < hist[0]["loss"]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(steps=1, lr=1.0, schedule="step")
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainConfig(steps=1, lr=0.0)


def test_frozen_regularizer_is_zero_at_original_or_zero():
    w0 = torch.tensor([[0.5, -0.2, 0.0, 0.3]])
    assert frozen_regularizer(w0, w0, 0.1) == 0
    assert frozen_regularizer(torch.zeros_like(w0), w0, 0.1) == 0
    assert frozen_regularizer(w0 * 0.5, w0, 0.1) > 0


def test_bad_settings_and_weights_are_refused():
    with pytest.raises(ValueError, match="prox_scale"):
        ProxSparse(prox_scale="sqrt")
    with pytest.raises(ValueError, match="lam1 and lam2"):
        ProxSparse(lam1=-1)
    model, batches = _bert()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    with pytest.raises(Exception, match=r"encoder.layer.1.output.dense.weight contains NaN"):
        pysparse.compile(model, [ProxSparse(data=batches, steps=2)], *batches[0])


def test_evaluate_encoder_and_activation_sparsity():
    from pysparse.evaluate import encoder_quality, measure_activation_sparsity

    model, batches = _bert()
    same = encoder_quality(model, model, batches)
    assert same["mean_cosine_to_dense"] == 1.0 and same["spearman_pairwise_similarity"] == 1.0
    sm = pysparse.compile(model, ["relu", "magnitude"], *batches[0])
    q = encoder_quality(sm, model, batches)
    assert q["mean_cosine_to_dense"] < 1.0
    per_layer = measure_activation_sparsity(sm.gm, batches, sm.gm.meta["pysparse"]["call_kwargs"])
    assert per_layer is not None and len(per_layer) == 2
    # Same figure by hand from the relu inputs: zeros of relu(x1_pre) per real token.
    assert all(0.2 < s < 0.8 for s in per_layer), per_layer
    dense = pysparse.compile(model, ["magnitude"], *batches[0])
    assert measure_activation_sparsity(dense.gm, batches) is None  # GELU FFNs: not measured


def test_perplexity_sliding_windows_match_a_single_window():
    from pysparse.evaluate import perplexity

    model, _ = _llama()
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(3))
    whole = perplexity(model, ids, max_length=64)  # one window covers everything
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    direct = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).exp().item()
    assert abs(whole - direct) < 1e-3 * direct
    windowed = perplexity(model, ids, max_length=16, stride=8)
    assert 0.5 * direct < windowed < 2 * direct
