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
        from pysparse.compiler.base import PassError

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


# ---- training under FSDP2 ------------------------------------------------------------------------
def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a tensor FSDP2 sharded (a DTensor); any other tensor as it is. In-place
    changes to the result change the shard."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every value averaged over the ranks (the ranks must report the same keys)."""
    _, world = rank_and_world()
    if world == 1 or not metrics:
        return metrics
    import torch.distributed as dist

    keys = sorted(metrics)
    v = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return {k: float(x) / world for k, x in zip(keys, v.tolist())}


def sum_counts(*counts: int) -> list[int]:
    """Integer counts summed over the ranks."""
    _, world = rank_and_world()
    if world == 1:
        return list(counts)
    import torch.distributed as dist

    v = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return [int(x) for x in v.tolist()]


def shard_for_training(
    twin: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    group_dims: dict[str, int],
    who: str,
) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``twin`` (a copy of the graph with containers of its own around the graph's tensors, cut
    per layer: ``pysparse.learning.train._twin``) sharded with FSDP2 ``fully_shard`` over every rank: each
    piece of it an FSDP unit (its parameters gathered only while it runs; a piece that shares a
    parameter with another, tied embeddings, stays in the root unit), gradients and the optimiser
    state sharded. Returns the sharded twin, the trained parameters as its DTensor parameters (by
    the names of ``params``), and (parameter of the graph, its DTensor) for every parameter.

    ``group_dims``: for a 2:4-learned weight, the dimension its groups of 4 run along (1: along
    in_features, the usual; 0: a down projection pruned along d_model). Each weight is sharded
    along the other dimension, so every group of 4 lives whole on one rank and the proximal step
    runs on the local shard without communication; a layout that would split groups is refused.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    _, world = rank_and_world()
    fqn = {id(p): k for k, p in twin.named_parameters()}  # the graph's own tensors, pre-shard
    originals = [(p, k) for k, p in twin.named_parameters()]
    trained = {id(p): k for k, p in params.items()}
    for k, p in params.items():
        if id(p) not in fqn:
            raise ValueError(f"{who}: trained tensor {k} is not a parameter of the graph")
        if group_dims.get(k, 1) not in (0, 1) or (k in group_dims and p.dim() != 2):
            raise ValueError(f"{who}: {k}: groups of 4 must run along dim 0 or 1 of a 2-D weight")

    def placement(p: torch.nn.Parameter) -> Shard:
        k = trained.get(id(p))
        return Shard(1 if k is not None and group_dims.get(k) == 0 else 0)

    device = next(iter(params.values())).device.type
    mesh = init_device_mesh(device, (world,))
    called = {n.target for n in twin.graph.nodes if n.op == "call_module"}
    pieces = [m for name, m in twin.named_children() if name in called]  # units run as modules
    seen: dict[int, int] = {}
    for m in pieces:
        for p in m.parameters():
            seen[id(p)] = seen.get(id(p), 0) + 1
    for m in pieces:
        ids = [id(p) for p in m.parameters()]
        if ids and all(seen[i] == 1 for i in ids):
            fully_shard(m, mesh=mesh, shard_placement_fn=placement)
    fully_shard(twin, mesh=mesh, shard_placement_fn=placement)
    sharded = {k: twin.get_parameter(fqn[id(p)]) for k, p in params.items()}
    for k, p in sharded.items():
        g = group_dims.get(k)
        if g is not None and local(p).shape[g] != params[k].shape[g]:
            raise ValueError(
                f"{who}: the sharding of {k} {tuple(params[k].shape)} splits its groups of 4 "
                f"(shard {tuple(local(p).shape)}); shard it along dim {1 - g}"
            )
    pairs = [(p, twin.get_parameter(k)) for p, k in originals]
    return twin, sharded, pairs


def unshard(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose shards are every rank's ``part``, sharded as the DTensor ``like``
    (all-gathered); ``part`` itself where ``like`` is a plain tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return part
    whole = DTensor.from_local(
        part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
    return whole.full_tensor()


def save_sharded(tensors: dict[str, torch.Tensor], path: str) -> None:
    """``torch.distributed.checkpoint`` save of ``tensors`` (DTensor shards and plain tensors) as
    safetensors files, one per rank, with the shards' offsets in their JSON headers (the storage
    of Hugging Face's format: no pickle anywhere, so reading a checkpoint runs no code)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    _, world = rank_and_world()
    dcp.save(
        tensors,
        storage_writer=HuggingFaceStorageWriter(path, save_distributed=world > 1),
        no_dist=world == 1,
    )


def load_sharded(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Loads a :func:`save_sharded` checkpoint into ``tensors`` in place, whatever the number of
    ranks that wrote it (each rank reads the slices of its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    _, world = rank_and_world()
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(path), no_dist=world == 1)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` where ``like`` is a DTensor of its shape (sharded the same
    way); ``full`` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements).to_local()
