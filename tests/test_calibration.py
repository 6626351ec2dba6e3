"""Block-by-block calibration (passes.baselines.CalibrationStream): SparseGPT and sequential
Wanda carry the calibration batches through the graph layer by layer and give exactly what
re-running the model from its inputs for every layer gives; ProxSparse's learned mask with
SparseGPT's reconstruction; the logit distillation objective."""

from __future__ import annotations

import pytest
import torch
import transformers
from pysparse.passes import ProxSparse, Recover, SparseGPTPrune, WandaPrune
from pysparse.passes.baselines import (
    CalibrationStream,
    maskable_linears,
    observe_linear_inputs,
    sparsegpt_24,
)
from tiny_models import bert_with_batches, llama_config

import pysparse
from pysparse.capture.trace import trace
from pysparse.compiler.base import PassContext, PassError


def _llama(layers: int = 3, n_batches: int = 3):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(num_hidden_layers=layers)).eval()
    gen = torch.Generator().manual_seed(5)
    batches = []
    for i in range(n_batches):
        ids = torch.randint(0, 96, (3, 11 + i), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # a left-padded row
        batches.append(((ids,), {"attention_mask": mask}))
    return model, batches


def _rerun_every_layer(model, batches, prune):
    """The old way, as the reference: for every layer, a forward from the inputs (with the earlier
    layers already pruned) gathers its linears' input statistics."""
    gm = trace(model, *batches[0])
    ctx = PassContext(example_args=batches[0][0], example_kwargs=batches[0][1], calibration=batches)
    targets, _ = maskable_linears(gm)
    layers = sorted({info["layer"] for _, info in targets}, key=lambda x: (x is None, x))
    for layer in layers:
        group = [(n, i) for n, i in targets if i["layer"] == layer]
        hess = observe_linear_inputs(
            gm, ctx, [n for n, _ in group], lambda a, x: x.T @ x if a is None else a + x.T @ x
        )
        for node, info in group:
            w = gm.get_parameter(info["weight"])
            with torch.no_grad():
                w.copy_(prune(w, hess[node.name]))
    return {info["weight"]: gm.get_parameter(info["weight"]).detach() for _, info in targets}


def _pruned_weights(sm):
    return {
        info["weight"]: sm.gm.get_parameter(info["weight"]).detach()
        for _, info in maskable_linears(sm.gm)[0]
    }


@pytest.mark.parametrize("update", [True, False])
def test_sparsegpt_block_by_block_equals_rerunning_the_model_per_layer(update):
    model, batches = _llama()
    want = _rerun_every_layer(
        model, batches, lambda w, h: sparsegpt_24(w, h, update_weights=update)
    )
    sm = pysparse.compile(
        model, [SparseGPTPrune(update_weights=update)], *batches[0], calibration=batches
    )
    got = _pruned_weights(sm)
    assert set(got) == set(want) and len(got) == 21
    for name, w in want.items():
        assert torch.equal(got[name] != 0, w != 0), name  # the same masks
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)


def test_calibration_stream_statistics_and_sharing():
    """The stream's first-layer statistics equal one forward's; q/k/v (one input) share one."""
    model, batches = _llama(layers=2)
    gm = trace(model, *batches[0])
    ctx = PassContext(example_args=batches[0][0], example_kwargs=batches[0][1], calibration=batches)
    targets, _ = maskable_linears(gm)
    first = [n for n, i in targets if i["layer"] == 0]
    fold = lambda a, x: x.double().T @ x.double() + (0 if a is None else a)
    want = observe_linear_inputs(gm, ctx, first, fold)
    stream = CalibrationStream(gm, batches, "test")
    got = stream.observe(first, fold)
    for n in first:
        torch.testing.assert_close(got[n.name], want[n.name], rtol=0, atol=0)
    q, k, v, o, gate, up, down = (n.name for n in first)
    assert got[q] is got[k] is got[v]
    assert got[gate] is got[up]
    assert got[o] is not got[q] and got[down] is not got[gate]
    with pytest.raises(PassError, match="backwards"):
        stream.advance(first[-1])
        stream.advance(first[0])


def test_sequential_wanda_first_layer_matches_one_forward_and_later_layers_see_pruning():
    model, batches = _llama(layers=2)
    seq = _pruned_weights(pysparse.compile(model, [WandaPrune()], *batches[0], calibration=batches))
    one = _pruned_weights(
        pysparse.compile(model, [WandaPrune(sequential=False)], *batches[0], calibration=batches)
    )
    first = [k for k in seq if ".0." in k]
    later = [k for k in seq if ".1." in k]
    assert first and later
    for k in first:
        assert torch.equal(seq[k], one[k]), k
    assert any(not torch.equal(seq[k], one[k]) for k in later)


def test_sparsegpt_block_by_block_encoder_with_attention_mask():
    model, batches = bert_with_batches(3)
    want = _rerun_every_layer(model, batches, lambda w, h: sparsegpt_24(w, h))
    got = _pruned_weights(
        pysparse.compile(model, [SparseGPTPrune()], *batches[0], calibration=batches)
    )
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)


def test_sparsegpt_with_a_fixed_mask_solves_the_update_under_it():
    torch.manual_seed(3)
    x = torch.randn(256, 6) @ torch.randn(6, 32) + 0.05 * torch.randn(256, 32)  # correlated
    h = x.double().T @ x.double()
    w = torch.randn(16, 32)
    keep = torch.zeros(16, 32, dtype=torch.bool)
    keep.view(-1, 4)[:, :2] = True  # not the magnitude choice
    upd = sparsegpt_24(w, h, keep=keep)
    assert torch.equal(upd != 0, keep)
    err_upd = (x @ (upd - w).T).norm()
    err_plain = (x @ (w * keep - w).T).norm()
    assert err_upd < 0.8 * err_plain
    with pytest.raises(ValueError, match="bool mask of the weight's shape"):
        sparsegpt_24(w, h, keep=keep[:, :8])


def test_proxsparse_reconstruct_keeps_the_learned_mask_and_gets_closer_to_dense():
    model, batches = _llama(layers=2)
    kw = {"data": batches, "steps": 4, "lr": 1e-2, "lam1": 0.5}
    plain = pysparse.compile(model, [ProxSparse.mask_only(**kw)], *batches[0], calibration=batches)
    rebuilt = pysparse.compile(
        model, [ProxSparse.mask_only(reconstruct=True, **kw)], *batches[0], calibration=batches
    )
    a, b = _pruned_weights(plain), _pruned_weights(rebuilt)
    for k in a:
        assert torch.equal(a[k] != 0, b[k] != 0), k
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # the reconstruction is a stage of its own, reported after the learning
    assert [r["pass"] for r in rebuilt.report] == ["proxsparse", "proxsparse.reconstruct"]
    assert rebuilt.report[-1]["reconstruct_seconds"] is not None

    def err(sm):
        with torch.no_grad():
            return sum(
                float((sm(*bt[0], **bt[1]).logits - model(*bt[0], **bt[1]).logits).norm())
                for bt in batches
            )

    assert err(rebuilt) < err(plain)


def test_logit_kl_objective_is_zero_for_the_teacher_and_positive_after_a_change():
    from pysparse.learning.objectives import Objective, default_objective

    model, batches = _llama(layers=1)
    gm = trace(model, *batches[0])
    assert default_objective(gm, batches[0]) == "logit_kl"
    obj = Objective(gm, "logit_kl", batches)
    assert float(obj(batches[0])) == pytest.approx(0.0, abs=1e-3)
    targets, _ = maskable_linears(gm)
    with torch.no_grad():
        for _, info in targets:
            gm.get_parameter(info["weight"]).mul_(0.0)
    loss = obj(batches[0])
    assert float(loss) > 1e-3
    loss.backward()  # differentiable (the learning passes train through it)
    from pysparse.capture.inputs import batch_tokens as count_tokens

    assert count_tokens(batches[0]) == int(batches[0][1]["attention_mask"].sum())


# ---- the obs24_sweep_ kernel --------------------------------------------------------------------
def _sweep_case(K, N, seed=0):
    from pysparse.passes.baselines import obs_inverse

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * K, 5, generator=gen) @ torch.randn(5, K, generator=gen)
    x = x + 0.2 * torch.randn(3 * K, K, generator=gen)
    hinv, _ = obs_inverse(x.double().T @ x.double())
    return torch.randn(K, N, dtype=torch.float64, generator=gen), hinv, gen


@pytest.mark.parametrize("K,N,block", [(8, 4, 4), (36, 20, 8), (64, 24, 32), (100, 12, 32)])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_obs24_sweep_matches_the_float64_reference(K, N, block, mode):
    """Odd shapes (K not a multiple of the block, N = 4 and 12), every mode: the same mask and the
    same weights as the float64 reference, to 1e-12."""
    from pysparse.kernels import ops
    from pysparse.kernels.reference import reference_obs24_sweep

    wt, hinv, gen = _sweep_case(K, N)
    p0 = torch.rand(K, N, generator=gen) < 0.5 if mode == 2 else torch.zeros(K, N, dtype=torch.bool)
    want_w, want_p = reference_obs24_sweep(wt, p0, hinv, block, mode)
    w, p = wt.clone(), p0.clone()
    ops.obs24_sweep_(w, p, hinv, block, mode)
    assert torch.equal(p, want_p)
    torch.testing.assert_close(w, want_w, rtol=1e-12, atol=1e-12)
    if mode == 0:
        assert torch.equal(p.view(K // 4, 4, N).sum(1), torch.full((K // 4, N), 2))
    if mode == 1:
        assert torch.equal(p.view(K, N // 4, 4).sum(2), torch.full((K, N // 4), 2))
    assert float(w[p].abs().max()) < 1e-9  # pruned entries end at zero (up to rounding)


def test_obs24_sweep_thread_count_invariant_and_opcheck():
    from torch.library import opcheck

    from pysparse.kernels import ops

    wt, hinv, _ = _sweep_case(48, 520)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            w, p = wt.clone(), torch.zeros(48, 520, dtype=torch.bool)
            ops.obs24_sweep_(w, p, hinv, 16, 0)
            outs.append((w, p))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    opcheck(
        torch.ops.pysparse.obs24_sweep_.default,
        (wt.clone(), torch.zeros(48, 520, dtype=torch.bool), hinv, 16, 0),
    )


def test_obs24_sweep_bad_input_names_the_problem():
    from pysparse.kernels import ops

    wt, hinv, _ = _sweep_case(8, 4)
    p = torch.zeros(8, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="wt must be a contiguous float64"):
        ops.obs24_sweep_(wt.float(), p, hinv)
    with pytest.raises(RuntimeError, match="prune must be a contiguous bool"):
        ops.obs24_sweep_(wt, p[:, :2], hinv)
    with pytest.raises(RuntimeError, match="hinv must be a float64 \\[8, 8\\]"):
        ops.obs24_sweep_(wt, p, hinv[:4, :4])
    with pytest.raises(RuntimeError, match="block must be a positive multiple of 4"):
        ops.obs24_sweep_(wt, p, hinv, 6)
    with pytest.raises(RuntimeError, match="choose must be 0"):
        ops.obs24_sweep_(wt, p, hinv, 4, 3)
    with pytest.raises(RuntimeError, match="choosing along N needs N % 4 == 0"):
        ops.obs24_sweep_(wt[:, :3].contiguous(), p[:, :3].contiguous(), hinv, 4, 1)


def test_sparsegpt_mask_from_a_compiled_model_equals_proxsparse_reconstruct():
    """SparseGPTPrune(mask_from=<ProxSparse's model>) is the same reconstruction as
    ProxSparse.mask_only(reconstruct=True) with the same data; bad masks are refused by name."""
    model, batches = _llama(layers=2)
    kw = {"data": batches, "steps": 3, "lr": 1e-2, "lam1": 0.5}
    learned = pysparse.compile(
        model, [ProxSparse.mask_only(**kw)], *batches[0], calibration=batches
    )
    both = pysparse.compile(
        model, [ProxSparse.mask_only(reconstruct=True, **kw)], *batches[0], calibration=batches
    )
    via = pysparse.compile(
        model, [SparseGPTPrune(mask_from=learned)], *batches[0], calibration=batches
    )
    a, b = _pruned_weights(both), _pruned_weights(via)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    name = next(iter(a))
    with pytest.raises(PassError, match=f"masks given have none of shape .* for {name}"):
        pysparse.compile(model, [SparseGPTPrune(mask_from={})], *batches[0], calibration=batches)
    dense = {k: torch.ones_like(v, dtype=torch.bool) for k, v in a.items()}
    with pytest.raises(PassError, match="keeps more than 2 of some group of 4"):
        pysparse.compile(model, [SparseGPTPrune(mask_from=dense)], *batches[0], calibration=batches)


def test_proxsparse_init_mask_starts_from_another_pass_masks():
    """ProxSparse.mask_only(init_mask=<Wanda's model>): with nothing learned (lr 1e-12, lam1 0) the masks and
    weights are Wanda's exactly (a magnitude start would differ); with learning, the masks move
    from Wanda's, the report counts it, and the weights are the original ones under them."""
    model, batches = _llama(layers=2)
    wanda = pysparse.compile(model, [WandaPrune()], *batches[0], calibration=batches)
    still = pysparse.compile(
        model,
        [
            ProxSparse.mask_only(
                data=batches, steps=2, lr=1e-12, lam1=0.0, lam2=0.0, init_mask=wanda
            )
        ],
        *batches[0],
        calibration=batches,
    )
    a, b = _pruned_weights(wanda), _pruned_weights(still)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    info = next(r for r in still.report if r["pass"] == "proxsparse")
    assert info["groups_differing_from_init_mask"] == 0
    assert info["groups_differing_from_magnitude"] > 0  # Wanda's masks are not magnitude's
    moved = pysparse.compile(
        model,
        [ProxSparse.mask_only(data=batches, steps=3, lr=5e-2, lam1=0.5, init_mask=wanda)],
        *batches[0],
        calibration=batches,
    )
    info = next(r for r in moved.report if r["pass"] == "proxsparse")
    assert info["groups_differing_from_init_mask"] > 0
    dense = dict(model.named_parameters())
    for k, w in _pruned_weights(moved).items():
        w0 = dense[k].detach()
        kept = w != 0
        torch.testing.assert_close(w[kept], w0[kept])
        assert int(kept.reshape(-1, 4).sum(-1).max()) <= 2
    with pytest.raises(PassError, match="masks given have none of shape"):
        pysparse.compile(
            model,
            [ProxSparse.mask_only(data=batches, steps=1, init_mask={})],
            *batches[0],
            calibration=batches,
        )


def test_proxsparse_defaults_are_the_tuned_pipeline():
    """ProxSparse() = SparseGPT's mask as the start, learning, SparseGPT's reconstruction under
    the learned mask, recovery. With nothing learned (lr 1e-12, lam1 0, lam2 0, no recovery) the
    result is SparseGPT's reconstruction under SparseGPT's own mask-only choice, exactly the
    two-pass composition; the defaults resolve by model kind; a bad start is refused by name."""
    model, batches = _llama(layers=2)
    frozen = {"data": batches, "steps": 2, "lr": 1e-12, "lam1": 0.0, "lam2": 0.0}
    still = pysparse.compile(
        model, [ProxSparse(recover_steps=0, **frozen)], *batches[0], calibration=batches
    )
    chosen = pysparse.compile(
        model, [SparseGPTPrune(update_weights=False)], *batches[0], calibration=batches
    )
    via = pysparse.compile(
        model, [SparseGPTPrune(mask_from=chosen)], *batches[0], calibration=batches
    )
    a, b, m = _pruned_weights(still), _pruned_weights(via), _pruned_weights(chosen)
    assert a.keys() == b.keys() == m.keys()
    for k in a:
        assert torch.equal(a[k] != 0, m[k] != 0), k  # the start mask is SparseGPT's
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(a[k], m[k]), k  # reconstructed, not W0 under the mask
    info = next(r for r in still.report if r["pass"] == "proxsparse")
    assert info["groups_differing_from_init_mask"] == 0
    stages = [r["pass"] for r in still.report]
    assert stages == ["proxsparse.init", "proxsparse", "proxsparse.reconstruct"], stages
    assert still.report[-1]["reconstruct_seconds"] is not None
    full = pysparse.compile(
        model,
        [ProxSparse(data=batches, steps=2, recover_steps=3)],
        *batches[0],
        calibration=batches,
    )
    info = next(r for r in full.report if r["pass"] == "proxsparse")
    assert info["objective"] == "logit_kl" and info["lr"] == 1e-4 and info["lam2"] == 1.0
    recover = full.report[-1]
    assert recover["pass"] == "proxsparse.recover" and recover["steps"] == 3, recover
    assert recover["settings"]["lr"] == 1e-4  # the decoder's tuned recovery rate
    p = ProxSparse()
    assert p.tuned("logit_kl")["recover_steps"] == 100 and p.tuned("logit_kl")["recover_lr"] == 1e-4
    assert p.tuned("hidden_mse")["lr"] == 1e-3 and p.tuned("hidden_mse")["recover_lr"] == 5e-5
    with pytest.raises(ValueError, match="init_mask must be one of"):
        ProxSparse(init_mask="wand")


def _kl_to(model, sm, batches):
    """Mean next-token KL of ``sm`` to ``model`` over the batches' real tokens."""
    total = 0.0
    with torch.no_grad():
        for args, kw in batches:
            t = torch.log_softmax(model(*args, **kw).logits.float(), -1)
            s = torch.log_softmax(sm(*args, **kw).logits.float(), -1)
            m = kw["attention_mask"].bool()
            total += float((t.exp() * (t - s)).sum(-1)[m].mean())
    return total / len(batches)


def test_recover_trains_the_kept_weights_under_fixed_masks():
    """Recover after Wanda: the zero pattern stays, the kept weights move, and the model gets
    closer to its dense teacher on the training batches; without a teacher a distillation
    objective is refused, and without a mask pass the pass cannot run."""
    model, batches = _llama(layers=2)
    wanda = pysparse.compile(model, [WandaPrune()], *batches[0], calibration=batches)
    rec = pysparse.compile(
        model,
        [WandaPrune(), Recover(data=batches, steps=20, lr=1e-3, teacher=model)],
        *batches[0],
        calibration=batches,
    )
    a, b = _pruned_weights(wanda), _pruned_weights(rec)
    for k in a:
        assert torch.equal(a[k] != 0, b[k] != 0), k
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert _kl_to(model, rec, batches) < 0.5 * _kl_to(model, wanda, batches)
    info = next(r for r in rec.report if r["pass"] == "recover")
    assert info["objective"] == "logit_kl" and info["layers_trained"] == len(a)
    flags = [p.requires_grad for p in rec.gm.parameters()]
    assert flags == [p.requires_grad for p in wanda.gm.parameters()]  # put back as they were
    with pytest.raises(PassError, match="pass teacher="):
        pysparse.compile(
            model, [WandaPrune(), Recover(data=batches, steps=1)], *batches[0], calibration=batches
        )
    with pytest.raises(PassError, match="needs one of"):
        pysparse.compile(model, [Recover(data=batches, teacher=model)], *batches[0])


def test_proxsparse_recover_steps_keep_the_learned_masks():
    model, batches = _llama(layers=2)
    kw = {"data": batches, "steps": 3, "lr": 1e-2, "lam1": 0.5}
    plain = pysparse.compile(model, [ProxSparse.mask_only(**kw)], *batches[0], calibration=batches)
    rec = pysparse.compile(
        model,
        [ProxSparse.mask_only(recover_steps=10, recover_lr=1e-3, **kw)],
        *batches[0],
        calibration=batches,
    )
    a, b = _pruned_weights(plain), _pruned_weights(rec)
    for k in a:
        assert torch.equal(a[k] != 0, b[k] != 0), k
    assert _kl_to(model, rec, batches) < _kl_to(model, plain, batches)
    info = next(r for r in rec.report if r["pass"] == "proxsparse.recover")
    assert info["steps"] == 10 and info["objective"] == "logit_kl"


def test_checkpoint_layers_same_loss_and_gradients_fewer_saved_activations():
    """checkpoint_layers: the graph cut per layer under activation checkpointing gives the same
    loss and gradients, shares the parameters, and keeps a fraction of the activations the
    plain graph saves for backward (counted through saved-tensor hooks)."""
    from pysparse.learning.train import checkpoint_layers

    model, batches = _llama(layers=4)
    sm = pysparse.compile(model, [], *batches[0])
    gm = sm.gm
    ck = checkpoint_layers(gm)
    params = list(gm.parameters())
    assert {id(p) for p in ck.parameters()} == {id(p) for p in params}
    from pysparse.capture.inputs import call

    def run(mod):
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        args, kw = batches[1]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call(mod, args, kw)
        loss = out.logits.float().pow(2).mean() if hasattr(out, "logits") else out[0].pow(2).mean()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), grads, sum(saved)

    for p in params:
        p.requires_grad_(True)
    l0, g0, b0 = run(gm)
    l1, g1, b1 = run(ck)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for a, b in zip(g0, g1):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert b1 < 0.5 * b0, (b1, b0)
    with pytest.raises(ValueError, match="cuts the graph after each FFN"):
        gm2 = pysparse.compile(torch.nn.Linear(8, 8), [], torch.randn(2, 8)).gm
        checkpoint_layers(gm2)


def test_learning_passes_with_activation_checkpointing_learn_the_same():
    """ProSparse and Recover with activation_checkpointing=True end with the weights of the
    plain runs (same arithmetic, recomputed)."""
    from pysparse.passes import ProSparse, ReluSubstitution

    model, batches = _llama(layers=2)
    for passes in (
        lambda ck: [
            ReluSubstitution(),
            ProSparse(
                data=batches, steps=3, lr=1e-3, lam=0.5, threshold=None, activation_checkpointing=ck
            ),
        ],
        lambda ck: [
            WandaPrune(),
            Recover(data=batches, steps=3, lr=1e-3, teacher=model, activation_checkpointing=ck),
        ],
    ):
        a = pysparse.compile(model, passes(False), *batches[0], calibration=batches)
        b = pysparse.compile(model, passes(True), *batches[0], calibration=batches)
        pa, pb = dict(a.gm.named_parameters()), dict(b.gm.named_parameters())
        for k, w in pa.items():
            torch.testing.assert_close(pb[k], w, rtol=1e-5, atol=1e-6)
        dense = dict(model.named_parameters())
        assert any(not torch.equal(w, dense[k]) for k, w in pb.items())  # it did train
        assert a.report[-1]["pass"] == b.report[-1]["pass"]
