"""Data-parallel calibration over ``torch.distributed``: when the caller has started a process group
(``torchrun --nproc-per-node N ...`` then ``torch.distributed.init_process_group``), the
calibration passes (Wanda, SparseGPT, and every pass built on their statistics) take a share of
the calibration batches per rank and sum their statistics (input norms, Hessians) across ranks
before choosing masks, so every rank prunes from the statistics of the whole calibration set and
ends with the same masks and weights as one process would (up to the order of float64 sums).

Without a process group (or with one rank) nothing here changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks); (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_batches(batches: Sequence[Any], who: str) -> list[Any]:
    """This rank's share of ``batches``: every world-th batch from its rank (all of them on one
    rank). Refuses fewer batches than ranks: a rank with no data has no statistics to add."""
    rank, world = rank_and_world()
    batches = list(batches)
    if world == 1:
        return batches
    if len(batches) < world:
        from pysparse.pipeline import PassError

        raise PassError(
            f"{who}: {len(batches)} calibration batches for {world} ranks; every rank needs at "
            f"least one: pass more calibration text or a smaller batch size"
        )
    return batches[rank::world]


def sum_across_ranks_(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums every statistic over the ranks in place (in key order, the same on every rank);
    returns ``stats``."""
    _, world = rank_and_world()
    if world > 1:
        import torch.distributed as dist

        for key in sorted(stats):
            dist.all_reduce(stats[key], op=dist.ReduceOp.SUM)
    return stats
