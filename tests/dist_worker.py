"""One rank of tests/test_distributed.py, started by torchrun: joins the gloo process group from
torchrun's environment and runs the calibration passes on the tiny LLaMA, every rank with the whole
calibration set (the passes shard it), or with --learn one learning pass (FSDP2 over the ranks);
rank 0 saves the compiled weights. --die-at K: rank 1 exits right after its checkpoint of step K.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py OUT
        [--batches N] [--learn NAME --accum A --checkpoint DIR --die-at K]
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.distributed as dist
from pysparse.passes import baselines

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_cases import PASSES, learn, prune

SHARDS: list[int] = []  # batches this rank calibrated on, per sharding


def _recording(shard):
    def wrapped(batches, who):
        mine = shard(batches, who)
        SHARDS.append(len(mine))
        return mine

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--learn", default=None)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--die-at", type=int, default=None)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    baselines.shard_batches = _recording(baselines.shard_batches)
    if args.die_at is not None:
        from pysparse.learning.train import Trainer

        save = Trainer.save_checkpoint

        def dying(self):
            save(self)
            if self.step == args.die_at and self.rank == 1:
                os._exit(3)  # killed: no cleanup, rank 0 is left waiting in a collective

        Trainer.save_checkpoint = dying
    try:
        if args.learn:
            got = {args.learn: learn(args.learn, args.accum, args.checkpoint)}
        else:
            got = {name: prune(name, args.batches) for name in PASSES}
            shards: list[list[int]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(shards, SHARDS)
            got["_shards"] = shards
        if rank == 0:
            torch.save(got, args.out)
    except Exception as exc:  # every rank reports what stopped it
        with open(f"{args.out}.error{rank}", "w") as f:
            f.write(f"{exc}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
