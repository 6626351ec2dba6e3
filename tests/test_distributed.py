"""pysparse over torch.distributed, launched for real: torchrun starts two ranks on the CPU with
the gloo backend (tests/dist_worker.py), each holding the whole calibration set as a user's script
would.

Calibration: the passes shard the batches and sum their statistics. Wanda (block by block and in
one forward) and SparseGPT over 2 ranks end with the masks of one process and the same weights
(Wanda exactly; SparseGPT's updated weights within 1e-6: its float64 Hessians are summed in
another order).

Learning (ProxSparse, with the down projection's groups along d_ff and along d_model; ProSparse;
Recover): FSDP2 shards the graph over the ranks, each rank runs its share of every global batch.
2 ranks with accum 1 against one process with accum 2 (the same global batch): the same masks, and
weights and training curves within 1e-6 (FSDP averages the two ranks' gradients, one process sums
halves: equal up to float rounding; in practice bit for bit with 2 ranks). A run killed on rank 1
right after its step-2 checkpoint resumes from the sharded checkpoint in one process and ends
where the uninterrupted run ends; a single-process checkpoint resumes over 2 ranks the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from dist_cases import LEARNING, PASSES, learn, prune

WORKER = Path(__file__).with_name("dist_worker.py")


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """tests/dist_worker.py on 2 ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, str(WORKER), str(out), *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_calibration_over_two_ranks_equals_one_process(tmp_path):
    res = _torchrun(tmp_path / "rank0.pt")
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "rank0.pt")
    # every calibration pass took its share on each rank: 5 batches -> 3 on rank 0, 2 on rank 1
    shards = two.pop("_shards")
    assert all(n == 3 for n in shards[0]) and all(n == 2 for n in shards[1]), shards
    assert len(shards[0]) >= len(PASSES)
    for name in PASSES:
        one = prune(name)
        assert one.keys() == two[name].keys()
        pruned = 0
        for k, w in one.items():
            if w.dim() != 2 or "embed" in k or "lm_head" in k:
                continue
            assert torch.equal(w != 0, two[name][k] != 0), (name, k)  # the same masks
            pruned += int((w == 0).sum())
            if name == "sparsegpt":
                torch.testing.assert_close(two[name][k], w, atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(two[name][k], w), (name, k)
        assert pruned > 0, name


def test_fewer_batches_than_ranks_is_refused(tmp_path):
    out = tmp_path / "none.pt"
    res = _torchrun(out, "--batches", "1")
    assert res.returncode != 0
    for rank in (0, 1):
        msg = (tmp_path / f"none.pt.error{rank}").read_text()
        assert "1 calibration batches for 2 ranks" in msg, msg


def _one_process(name: str, checkpoint: Path | None = None) -> dict:
    threads = torch.get_num_threads()
    try:
        return learn(name, 2, str(checkpoint) if checkpoint else None)
    finally:
        torch.set_num_threads(threads)


def _assert_same_training(one: dict, two: dict, name: str, skip: tuple[str, ...] = ()) -> None:
    """The same masks, weights within 1e-6, the same training curve (but ``skip``'s columns)."""
    for k, w in one.items():
        if k.startswith("_"):
            continue
        if w.dim() == 2 and "embed" not in k and "lm_head" not in k:
            assert torch.equal(w != 0, two[k] != 0), (name, k)
        torch.testing.assert_close(two[k], w, atol=1e-6, rtol=1e-6, msg=f"{name} {k}")
    c1, c2 = one["_curve"], two["_curve"]
    assert len(c1) == len(c2) > 0 and c1[0].keys() == c2[0].keys()
    for a, b in zip(c1, c2):
        for key in set(a) - set(skip):
            # the curve keeps 5 significant digits: a value on a rounding edge moves by one
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-7), (name, key, a, b)


@pytest.mark.parametrize("name", LEARNING)
def test_learning_over_two_ranks_equals_one_process(tmp_path, name):
    res = _torchrun(tmp_path / "rank0.pt", "--learn", name, "--accum", "1")
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "rank0.pt")[name]
    one = _one_process(name)
    _assert_same_training(one, two, name)
    if name.startswith("proxsparse"):  # the learned 2:4 pattern is there, and logged
        assert two["_curve"][-1]["groups_24"] > 0 and two["_curve"][-1]["r_frozen"] > 0


def test_killed_run_resumes_from_its_sharded_checkpoint_on_one_process(tmp_path):
    ck = tmp_path / "ck"
    res = _torchrun(
        tmp_path / "dead.pt", "--learn", "proxsparse", "--checkpoint", str(ck), "--die-at", "2"
    )
    assert res.returncode != 0 and not (tmp_path / "dead.pt").exists()
    record = json.loads((ck / "learn" / "checkpoint.json").read_text())
    assert record["step"] == 2 and record["ranks"] == 2
    assert len(list((ck / "learn" / record["sharded"]).glob("*.safetensors"))) == 2  # one per rank
    resumed = _one_process("proxsparse", ck)
    assert resumed["_curve"][0]["step"] == 0 and len(resumed["_curve"]) == 6  # history kept
    # groups_24 is sampled every few steps, and on a run's first: a resumed run samples at its
    # first step where the uninterrupted one shows an older value
    _assert_same_training(_one_process("proxsparse"), resumed, "resumed", skip=("groups_24",))


def test_single_process_checkpoint_resumes_over_two_ranks(tmp_path, monkeypatch):
    from pysparse.learning.train import Trainer

    ck = tmp_path / "ck"
    save = Trainer.save_checkpoint

    def stop_after_four(self):
        save(self)
        if self.step == 4:
            raise KeyboardInterrupt  # as if stopped by hand

    monkeypatch.setattr(Trainer, "save_checkpoint", stop_after_four)
    with pytest.raises(KeyboardInterrupt):
        _one_process("proxsparse", ck)
    monkeypatch.undo()
    assert (ck / "learn" / "checkpoint.safetensors").is_file()
    res = _torchrun(tmp_path / "rank0.pt", "--learn", "proxsparse", "--checkpoint", str(ck))
    assert res.returncode == 0, res.stderr[-4000:]
    two = torch.load(tmp_path / "rank0.pt")["proxsparse"]
    _assert_same_training(
        _one_process("proxsparse"), two, "resumed over 2 ranks", skip=("groups_24",)
    )


def test_cli_compile_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 -m pysparse compile``: ProxSparse's learning (FSDP2) and its
    SparseGPT start mask and reconstruction (statistics summed) over the ranks on the embedded
    MiniLM; rank 0 alone prints and saves, and the artifact loads and runs."""
    import pysparse

    art = tmp_path / "art"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "pysparse", "compile", "--passes", "proxsparse,compress24,lower"]
    cmd += ["--set", "proxsparse.steps=3", "--set", "proxsparse.recover_steps=2"]
    cmd += ["--calib-lines", "64", "--batch-size", "16", "--no-eval", "--out", str(art)]
    res = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=600, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("compiled in") == 1 and "over 2 ranks" in res.stdout
    sm = pysparse.load(art)
    stages = {r["pass"]: r for r in sm.report}
    assert list(stages)[:4] == [
        "proxsparse.init",
        "proxsparse",
        "proxsparse.reconstruct",
        "proxsparse.recover",
    ]
    assert stages["proxsparse"]["ranks"] == 2 and stages["proxsparse.recover"]["steps"] == 2
    ids = torch.randint(0, 1000, (2, 9))
    out = sm(ids, attention_mask=torch.ones(2, 9, dtype=torch.long))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert hidden.shape == (2, 9, 384) and torch.isfinite(hidden).all()
