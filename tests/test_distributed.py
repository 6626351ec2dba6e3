"""Data-parallel calibration over torch.distributed, launched for real: torchrun starts two ranks
on the CPU with the gloo backend (tests/dist_worker.py), each holding the whole calibration set as
a user's script would; the passes shard it and sum their statistics. Wanda (block by block and in
one forward) and SparseGPT over 2 ranks end with the masks of one process and the same weights
(Wanda exactly; SparseGPT's updated weights within 1e-6: its float64 Hessians are summed in
another order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from dist_cases import PASSES, prune

WORKER = Path(__file__).with_name("dist_worker.py")


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
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
