"""Baseline 2:4 masks: magnitude, Wanda (arXiv 2306.11695) and SparseGPT (arXiv 2301.00774).
The masked weights stay dense here (Compress24 packs them); the mask is applied to the live
parameters of the captured graph. Linears whose in_features is not a multiple of 4 are skipped
and reported."""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import call_no_grad
from pysparse.compiler.base import Pass, PassContext, PassError, PassResult
from pysparse.compiler.graph import tapped
from pysparse.kernels import ops
from pysparse.learning.distributed import shard_batches, sum_across_ranks_
from pysparse.util.progress import track

_log = logging.getLogger(__name__)
aten = torch.ops.aten


def prunable_linears(gm: fx.GraphModule) -> list[tuple[fx.Node, dict[str, Any]]]:
    return [
        (n, n.meta["pysparse"])
        for n in gm.graph.nodes
        if "pysparse" in n.meta and n.meta["pysparse"].get("prunable")
    ]


def maskable_linears(gm: fx.GraphModule) -> tuple[list[tuple[fx.Node, dict[str, Any]]], list[str]]:
    """The prunable linears a 2:4 mask can apply to, and a report line for each one skipped
    (in_features not a multiple of 4; those are marked not prunable)."""
    keep, skipped = [], []
    for node, info in prunable_linears(gm):
        in_features = gm.get_parameter(info["weight"]).shape[1]
        if in_features % 4:
            skipped.append(f"{info['weight']}: in_features={in_features} is not a multiple of 4")
            info["prunable"] = False
        else:
            keep.append((node, info))
    return keep, skipped


class _Observed(Exception):
    """Raised by the last observer of a calibration forward: nothing after it is needed."""


def observe_linear_inputs(
    gm: fx.GraphModule, ctx: PassContext, nodes: list[fx.Node], fold: Any, desc: str = "calibration"
) -> dict[str, torch.Tensor]:
    """Runs the calibration batches through ``gm`` with temporary observer nodes on the inputs of
    ``nodes`` (removed afterwards); ``fold(acc, x2)`` accumulates a statistic of the float64
    ``[tokens, in_features]`` inputs, ``acc`` None on the first batch. Returns node name -> acc.

    Each forward stops at the last observed input: the rest of the graph (later layers, a 49k-token
    lm_head) cannot change the statistics. SparseGPT observes one layer at a time, so without the
    stop every layer paid a whole forward over the calibration set, lm_head included."""
    stats: dict[str, torch.Tensor] = {}
    weights = {n.name: n.meta.get("pysparse", {}).get("weight", n.name) for n in nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(nodes, key=lambda n: order[n]).name if nodes else None

    def observe(x: torch.Tensor, key: str) -> torch.Tensor:
        stats[key] = fold(stats.get(key), x.detach().reshape(-1, x.shape[-1]).double())
        if key == last:
            raise _Observed
        return x

    # under torch.distributed each rank folds its share of the batches, then the sums are added
    batches = shard_batches(ctx.data_for(desc), desc)
    with tapped(gm, [(node, observe, (node.name,), "input") for node in nodes]):
        for args, kwargs in track(batches, desc, unit="batch"):
            try:
                call_no_grad(gm, args, kwargs)
            except _Observed:
                pass
    sum_across_ranks_(stats)
    for key, stat in stats.items():  # NaN/Inf anywhere in an input reaches its statistic
        if not torch.isfinite(stat).all():
            raise PassError(
                f"{desc}: the inputs of the linear with weight {weights[key]} contain NaN or Inf "
                f"on the calibration data; nothing was pruned. Check the calibration batches (and "
                f"the model's activations on them)"
            )
    return stats


class _MaskPass(Pass):
    """Shared loop: score each prunable weight, keep the top 2 of every group of 4.

    ``down_along``: ``"d_ff"`` (default) groups the FFN down projections' weights along their
    in_features like every other linear (the pattern cuSPARSELt and ``sparse24_linear`` run);
    ``"d_model"`` groups them along their out_features instead, the by-row layout of the 2:4
    activation-sparse FFN kernels: each active neuron's down row is read at half size and nothing
    else (bench/ffn.py --down-rows: LLaMA-7B shape, batch 1, 90% sparse, fp32: 4.2x torch dense
    against 3.6x for the d_ff grouping; but slower from 4 rows when most neurons fire). Such down
    projections run only inside FFNs that ``lower`` maps to ``sparse_ffn24``/``sparse_mlp24``
    (ReLU/FATReLU FFNs); elsewhere they stay dense (masked)."""

    def __init__(self, down_along: str = "d_ff"):
        if down_along not in ("d_ff", "d_model"):
            raise ValueError(
                f"{self.name}: down_along must be 'd_ff' or 'd_model', got {down_along!r}"
            )
        self.down_along = down_along

    def settings(self) -> dict[str, Any]:
        return {"down_along": self.down_along}

    def scores(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, torch.Tensor | None]:
        return {}

    def prune_one(
        self, gm: fx.GraphModule, info: dict[str, Any], score: torch.Tensor | None
    ) -> None:
        """Keeps the top 2 of ``score`` (None: of |w|) in every group of 4 of one weight."""
        w = gm.get_parameter(info["weight"])
        along_out = (
            self.down_along == "d_model" and info.get("role") == "down" and w.shape[0] % 4 == 0
        )
        with torch.no_grad():
            if along_out:  # groups of 4 along out_features: prune the transpose
                t = None if score is None else score.T.contiguous()
                w.copy_(ops.prune24(w.detach().T.contiguous(), t).T)
            else:
                w.copy_(ops.prune24(w.detach(), score))
        info["masked"] = self.name
        info["mask_axis"] = "out" if along_out else "in"

    def prune_all(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, float] | None:
        scores = self.scores(gm, ctx, targets)
        for node, info in targets:
            self.prune_one(gm, info, scores.get(node.name))
        return None

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets, skipped = maskable_linears(gm)
        split = self.prune_all(gm, ctx, targets)
        kept = total = 0
        for _, info in targets:
            w = gm.get_parameter(info["weight"])
            kept += int((w != 0).sum())
            total += w.numel()
        for line in skipped:
            _log.warning("%s: skipped %s", self.name, line)
        info: dict[str, Any] = {
            "layers_pruned": len(targets),
            "skipped": skipped,
            "weight_density": round(kept / max(total, 1), 4),
        }
        if split:
            info["seconds_split"] = split
        return PassResult(gm, bool(targets), info)


class MagnitudePrune(_MaskPass):
    """Keep the 2 largest |w| of each group of 4 along in_features."""

    name = "magnitude"


def _sum_squares(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x * x).sum(0) if acc is None else acc + (x * x).sum(0)


def _gram(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """XᵀX of one batch in the input's precision (fp32: a sum over one batch's tokens), summed
    over batches in float64. Twice the speed of float64 products (SmolLM2: 27 s of SparseGPT's
    126 s were float64 XᵀX); the Hessians differ from all-float64 ones by fp32 rounding. Wide
    inputs (>= 1024 features, the FFN's down projection) are done in blocks of 512 on and above
    the diagonal only, mirrored below (2/3 of the products at 1536)."""
    K = x.shape[1]
    if K < 1024:
        g = (x.T @ x).double()
    else:
        g = torch.empty(K, K, dtype=torch.float64)
        edges = list(range(0, K, 512)) + [K]
        for a0, a1 in itertools.pairwise(edges):
            xa = x[:, a0:a1]
            for b0, b1 in itertools.pairwise(edges[edges.index(a0) :]):
                blk = xa.T @ x[:, b0:b1]
                g[a0:a1, b0:b1] = blk
                if b0 != a0:
                    g[b0:b1, a0:a1] = blk.T
    return g if acc is None else acc.add_(g)


class WandaPrune(_MaskPass):
    """Score |W_ij| * ||X_j||_2, with X the inputs of each linear over the calibration batches.

    ``sequential``: True (the reference implementation's way) carries the calibration batches
    through the graph block by block and prunes each layer before the next one's inputs are
    taken, so later layers' norms see the pruned earlier ones; False takes every norm from the
    dense model in one forward (observe_linear_inputs)."""

    name = "wanda"

    def __init__(self, down_along: str = "d_ff", sequential: bool = True):
        super().__init__(down_along)
        self.sequential = sequential

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "sequential": self.sequential}

    def prune_all(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, float] | None:
        if not self.sequential:
            return super().prune_all(gm, ctx, targets)

        def prune(group: list[tuple[fx.Node, dict[str, Any]]], stats: dict[str, Any]) -> None:
            for node, info in group:
                self.prune_one(gm, info, self._score(gm, info, stats[node.name]))

        return prune_by_groups(gm, ctx, targets, _sum_squares, prune, "wanda")

    @staticmethod
    def _score(gm: fx.GraphModule, info: dict[str, Any], sumsq: torch.Tensor) -> torch.Tensor:
        w = gm.get_parameter(info["weight"]).detach().abs().double()
        return (w * sumsq.sqrt()).float()

    def scores(
        self, gm: fx.GraphModule, ctx: PassContext, targets: list[tuple[fx.Node, dict[str, Any]]]
    ) -> dict[str, torch.Tensor | None]:
        sumsq = observe_linear_inputs(
            gm, ctx, [n for n, _ in targets], _sum_squares, desc="wanda: calibration"
        )
        return {n.name: self._score(gm, info, sumsq[n.name]) for n, info in targets}


class CalibrationStream:
    """The calibration batches carried through the graph stage by stage, as the reference SparseGPT
    and Wanda carry them through a transformer block by block.

    The stream holds, per batch, the values live at its position in the graph (the residual
    stream, rotary tables, masks: a few MB per batch), nothing else. ``observe(nodes, fold)``
    runs a copy of every batch from the position up to the last of ``nodes`` and folds the
    inputs those linears see; ``advance(node)`` runs the batches on to ``node`` (with the weights
    as they are then, e.g. just pruned) and moves the position there. A pass that prunes group by
    group thus runs each node of the graph twice per batch in all (observe, then advance over the
    pruned weights), where running the model from its inputs for every group cost a forward over
    all earlier groups each time (SmolLM2, 30 layers: ~15 forwards).

    Linears that read the same tensor (q/k/v, gate/up) share one statistic: it is folded once per
    distinct input and handed to each of them.

    Weights are read when a node runs (``get_attr`` or the parameter itself), so pruning a group in
    place is seen by everything run afterwards; values computed before the position never depend
    on the weights of a group not yet reached (groups are taken in graph order)."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[tuple, dict]], desc: str):
        self.gm = gm
        self.desc = desc
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.interp = fx.Interpreter(gm)
        # under torch.distributed each rank carries its share; observe() adds the statistics
        batches = shard_batches(batches, desc)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        signature = inspect.signature(gm.forward)
        fixed = gm.meta.get("pysparse", {}).get("call_kwargs", {})
        spec = gm.meta.get("pysparse", {}).get("inputs")  # batches laid out as the original's call
        self.envs: list[dict[fx.Node, Any]] = []
        for args, kwargs in batches:
            if spec is not None:
                args, kwargs = spec.bind(args, kwargs)
            bound = signature.bind(*args, **{**fixed, **kwargs})
            bound.apply_defaults()
            flat = gm.graph.process_inputs(*bound.args, **bound.kwargs)
            if len(flat) != len(placeholders):
                raise PassError(
                    f"{desc}: a calibration batch gives {len(flat)} inputs, the graph takes "
                    f"{len(placeholders)}; pass batches shaped like the example inputs"
                )
            self.envs.append(dict(zip(placeholders, flat)))
        self.at = 0  # placeholders are bound above; _run skips them
        self.seconds = {"forward": 0.0, "statistics": 0.0}

    def _run(self, env: dict[fx.Node, Any], stop: int, visit: Any = None) -> None:
        """Runs nodes[self.at:stop] in ``env``, dropping each value after its last use before
        ``stop`` (values used at or after ``stop`` stay). ``visit(node, env)`` is called before a
        node runs."""
        interp = self.interp
        interp.env = env
        for i in range(self.at, stop):
            node = self.nodes[i]
            if visit is not None:
                visit(node, env)
            if node.op == "output":
                raise PassError(f"{self.desc}: the stream ran past the graph's output")
            if node.op != "placeholder":
                env[node] = interp.run_node(node)
            for a in node.all_input_nodes:
                if self.last_use.get(a, -1) == i:
                    del env[a]
            if node not in self.last_use:  # nothing reads it
                del env[node]

    def observe(self, nodes: list[fx.Node], fold: Any) -> dict[str, torch.Tensor]:
        """``fold(acc, x2)`` over every batch's ``[tokens, in_features]`` input of each of ``nodes``
        (``acc`` None at first; ``x2`` in the model's dtype, at least float32: the fold chooses
        its accumulation precision), computed once per distinct input tensor. The stream's
        position does not move. Returns node name -> statistic."""
        targets = set(nodes)
        stop = max(self.index[n] for n in nodes)
        stats: dict[str, torch.Tensor] = {}
        share: dict[str, str] = {}  # node name -> the node whose statistic it shares

        def visit(node: fx.Node, env: dict[fx.Node, Any]) -> None:
            if node not in targets:
                return
            x = env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0]
            # The same data seen again (another view of one tensor): share. ``seen`` holds the
            # tensor, so its memory cannot be reused by a later one with the same address.
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            if key in seen:
                share[node.name] = seen[key][0]
                return
            seen[key] = (node.name, x)
            x2 = x.detach().reshape(-1, x.shape[-1])
            if x2.dtype not in (torch.float32, torch.float64):
                x2 = x2.float()
            tic = time.perf_counter()
            stats[node.name] = fold(stats.get(node.name), x2)
            folding[0] += time.perf_counter() - tic

        folding = [0.0]
        tic = time.perf_counter()
        with torch.no_grad():
            for env in self.envs:
                seen: dict[tuple, tuple[str, torch.Tensor]] = {}
                self._run(dict(env), stop + 1, visit)
        sum_across_ranks_(stats)
        self.seconds["statistics"] += folding[0]
        self.seconds["forward"] += time.perf_counter() - tic - folding[0]
        for node in nodes:  # NaN/Inf anywhere in an input reaches its statistic
            if node.name in stats and not torch.isfinite(stats[node.name]).all():
                weight = node.meta.get("pysparse", {}).get("weight", node.name)
                raise PassError(
                    f"{self.desc}: the inputs of the linear with weight {weight} contain NaN or "
                    f"Inf on the calibration data; nothing was pruned. Check the calibration "
                    f"batches (and the model's activations on them)"
                )
        return {n.name: stats[share.get(n.name, n.name)] for n in nodes}

    def advance(self, node: fx.Node) -> None:
        """Runs every batch up to (not including) ``node`` and moves the position there."""
        stop = self.index[node]
        if stop < self.at:
            raise PassError(f"{self.desc}: cannot move the calibration stream backwards")
        tic = time.perf_counter()
        with torch.no_grad():
            for env in self.envs:
                self._run(env, stop)
        self.seconds["forward"] += time.perf_counter() - tic
        self.at = stop


def prune_by_groups(
    gm: fx.GraphModule,
    ctx: PassContext,
    targets: list[tuple[fx.Node, dict[str, Any]]],
    fold: Any,
    prune: Any,
    desc: str,
    batches: list[tuple[tuple, dict]] | None = None,
) -> dict[str, float]:
    """The block-by-block calibration loop shared by SparseGPT and sequential Wanda: the targets
    are grouped by transformer layer and taken in graph order; for each group the statistic
    ``fold`` of its linears' inputs is gathered over the calibration stream (earlier groups
    already pruned), ``prune(group, stats)`` prunes its linears in place (``stats``: node name ->
    statistic; linears of one input share the same tensor), then the stream
    advances over the pruned group to the next one. Returns the seconds spent running the model
    (``forward``), folding statistics and pruning (``solve``)."""
    groups: dict[Any, list[tuple[fx.Node, dict[str, Any]]]] = {}
    for node, info in targets:
        groups.setdefault(info.get("layer"), []).append((node, info))
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = sorted(groups.values(), key=lambda g: min(index[n] for n, _ in g))
    stream = CalibrationStream(gm, ctx.data_for(desc, batches or None), desc)
    solve = 0.0
    for k, group in enumerate(track(order, f"{desc}: layers", unit="layer")):
        stats = stream.observe([n for n, _ in group], fold)
        tic = time.perf_counter()
        prune(group, stats)
        solve += time.perf_counter() - tic
        if k + 1 < len(order):
            stream.advance(min((n for n, _ in order[k + 1]), key=index.__getitem__))
    return {**{k: round(v, 1) for k, v in stream.seconds.items()}, "solve": round(solve, 1)}


def sparsegpt_24(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    block: int = 32,
    damp: float = 0.01,
    update_weights: bool = True,
    along_out: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """SparseGPT for one layer at 2:4 (arXiv 2301.00774): H = XᵀX + damping (1% of the mean diagonal),
    then an OBS sweep over the columns in lazy blocks of ``block`` (the result does not depend on
    it but for rounding; 32 measured faster than the reference's 128 on SmolLM2's shapes, the
    per-column updates stay in cache): at the first column of every group of
    4 choose the 2 weights per row with the smallest w² / [H⁻¹]_jj² to prune, zero them, and spread
    each column's error over the columns not yet visited (through the upper Cholesky factor of H⁻¹).

    ``along_out``: the groups of 4 run along out_features instead (``down_along="d_model"``). The
    OBS update is per row, so only the choice changes: at every column, within each group of 4
    rows, the 2 with the smallest w² / [H⁻¹]_ii² — the same [H⁻¹]_ii for all of them, so the 2
    smallest |w| of the (already updated) column.

    Args:
        w: ``[out, in]`` weight, ``in % 4 == 0`` (``along_out``: ``out % 4 == 0``).
        hessian: ``[in, in]`` XᵀX over the calibration tokens of this layer's input.
        update_weights: False keeps the original weights under the chosen mask (mask-only variant).
        keep: a fixed mask (bool ``[out, in]``, True = kept; e.g. one ProxSparse learned): no
            choice is made, the sweep only solves the OBS least-squares update of the kept weights
            under it (the reconstruction of SparseGPT with another method's mask).

    Returns:
        The pruned weight (same dtype as ``w``), 2:4 along in_features (``along_out``: along
        out_features).
    """
    N, K = w.shape
    hinv, dead = obs_inverse(hessian, damp)
    # Transposed: the sweep walks the columns of W, which are rows here (contiguous); the sweep
    # itself is the ``obs24_sweep_`` op (C++: in Python its ~10 torch calls per column were 22 s
    # of SparseGPT's 81 s on SmolLM2).
    Wt = w.detach().T.to(torch.float64).contiguous()  # [in, out]
    Wt[dead] = 0.0
    fixed = keep is not None
    if fixed:
        if tuple(keep.shape) != (N, K) or keep.dtype != torch.bool:
            raise ValueError(
                f"sparsegpt_24: keep must be a bool mask of the weight's shape {(N, K)}, got "
                f"{keep.dtype} {tuple(keep.shape)}"
            )
        P = (~keep).T.contiguous()
    else:
        P = torch.zeros(K, N, dtype=torch.bool)
    ops.obs24_sweep_(Wt, P, hinv, block, 2 if fixed else 1 if along_out else 0)
    prune = P.T
    if not update_weights:
        return w.detach().masked_fill(prune, 0.0)
    return Wt.T.masked_fill(prune, 0.0).to(w.dtype)


def obs_inverse(hessian: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's inverse of a layer's Hessian: the upper Cholesky factor of (H + damping)^-1
    (damping: ``damp`` x the mean diagonal; inputs that are always 0 get a unit diagonal) and the
    mask of those dead inputs."""
    K = hessian.shape[0]
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return hinv, dead


def sparsegpt_graph(
    gm: fx.GraphModule,
    ctx: PassContext,
    targets: list[tuple[fx.Node, dict[str, Any]]],
    *,
    block: int = 32,
    damp: float = 0.01,
    update_weights: bool = True,
    down_along: str = "d_ff",
    keep: dict[str, torch.Tensor] | None = None,
    batches: list[tuple[tuple, dict]] | None = None,
    desc: str = "sparsegpt",
) -> dict[str, float]:
    """SparseGPT over the graph's ``targets`` layer by layer on the calibration stream (each
    layer's Hessians taken with the earlier layers already pruned and updated). ``keep``: weight
    name -> a fixed mask to reconstruct under instead of choosing one (see ``sparsegpt_24``)."""

    def prune(group: list[tuple[fx.Node, dict[str, Any]]], stats: dict[str, Any]) -> None:
        # Linears that read one input (q/k/v, gate/up) share its Hessian: one inverse, and one
        # sweep over their weights stacked by rows (OBS treats every row on its own, so stacking
        # changes nothing but the number of column steps, which is what the sweep's time is).
        sweeps: dict[tuple[int, bool], list[dict[str, Any]]] = {}
        for node, info in group:
            w = gm.get_parameter(info["weight"])
            along_out = (
                down_along == "d_model" and info.get("role") == "down" and w.shape[0] % 4 == 0
            )
            info["mask_axis"] = "out" if along_out else "in"
            # Grouped along out_features, rows are not independent (groups of 4 rows): alone.
            key = (id(stats[node.name]), along_out, id(w) if along_out else 0)
            sweeps.setdefault(key, []).append(info)
        for (_, along_out, _), infos in sweeps.items():
            hessian = stats[next(n.name for n, i in group if i is infos[0])]
            ws = [gm.get_parameter(i["weight"]) for i in infos]
            stacked = torch.cat([w.detach() for w in ws]) if len(ws) > 1 else ws[0].detach()
            fixed = None
            if keep is not None:
                fixed = torch.cat([keep[i["weight"]] for i in infos])
            out = sparsegpt_24(
                stacked,
                hessian,
                block=block,
                damp=damp,
                update_weights=update_weights,
                along_out=along_out,
                keep=fixed,
            )
            with torch.no_grad():
                for w, part in zip(ws, out.split([w.shape[0] for w in ws])):
                    w.copy_(part)

    return prune_by_groups(
        gm,
        ctx,
        targets,
        _gram,
        prune,
        desc,
        batches,
    )


def masks_from(src: Any, gm: fx.GraphModule, targets: list, who: str) -> dict[str, torch.Tensor]:
    """2:4 keep-masks (True = kept) for every target weight, read from ``src``: a model compiled by
    a mask pass (the zero pattern of its weights) or a mapping weight name -> bool mask. Each mask
    must have the weight's shape and keep at most 2 of every 4 along in_features, or along
    out_features (down projections grouped along d_model)."""
    if hasattr(src, "gm"):
        src = {n: p.detach() != 0 for n, p in src.gm.named_parameters()}
    if not isinstance(src, dict):
        raise PassError(
            f"{who}: masks must come from a compiled model or a mapping weight name -> bool "
            f"mask, got {type(src).__name__}"
        )
    keep = {}
    for _, info in targets:
        name = info["weight"]
        w = gm.get_parameter(name)
        m = src.get(name)
        if m is None or tuple(m.shape) != tuple(w.shape):
            raise PassError(
                f"{who}: the masks given have none of shape {tuple(w.shape)} for {name}"
                + ("" if m is None else f" (got {tuple(m.shape)})")
            )
        m = m.to(torch.bool)
        along_in = int(m.reshape(-1, 4).sum(-1).max()) <= 2
        if not (along_in or (w.shape[0] % 4 == 0 and int(m.T.reshape(-1, 4).sum(-1).max()) <= 2)):
            raise PassError(
                f"{who}: the mask given for {name} keeps more than 2 of some group of 4; "
                "give 2:4 masks"
            )
        keep[name] = m
    return keep


class SparseGPTPrune(Pass):
    """SparseGPT (with weight update by default; ``update_weights=False`` keeps the original
    weights under its mask), layer by layer: the calibration batches are carried through the graph
    block by block (``CalibrationStream``), so each layer's Hessians are taken with the earlier
    layers already pruned, as the method prescribes, and the model runs about twice over the
    calibration set in all (SmolLM2, 256 sentences: 469 s when every layer re-ran the model from
    its inputs; 82 s now, capture included).

    ``mask_from``: reconstruct under masks chosen elsewhere instead of choosing them — a model
    compiled by another mask pass (e.g. ProxSparse's learned masks: its zero pattern is taken)
    or a mapping weight name -> bool mask (True = kept). The weights reconstructed are this
    graph's (the dense original's), so ``pysparse.compile(model, [SparseGPTPrune(mask_from=
    learned)])`` gives the learned mask with SparseGPT's least-squares update under it.
    ``ProxSparse(reconstruct=True)`` does both in one pass."""

    name = "sparsegpt"

    def __init__(
        self,
        update_weights: bool = True,
        block: int = 32,
        damp: float = 0.01,
        down_along: str = "d_ff",
        mask_from: Any = None,
    ):
        if down_along not in ("d_ff", "d_model"):
            raise ValueError(
                f"sparsegpt: down_along must be 'd_ff' or 'd_model', got {down_along!r}"
            )
        if block < 4 or block % 4:
            raise ValueError(f"sparsegpt: block must be a positive multiple of 4, got {block}")
        self.update_weights = update_weights
        self.block = block
        self.damp = damp
        self.down_along = down_along
        self.mask_from = mask_from

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        if self.mask_from is not None:
            s["mask_from"] = type(self.mask_from).__name__
        return s

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        targets, skipped = maskable_linears(gm)
        split = sparsegpt_graph(
            gm,
            ctx,
            targets,
            block=self.block,
            damp=self.damp,
            update_weights=self.update_weights,
            down_along=self.down_along,
            keep=None
            if self.mask_from is None
            else masks_from(self.mask_from, gm, targets, self.name),
        )
        for _, info in targets:
            info["masked"] = self.name
        return PassResult(
            gm,
            bool(targets),
            {
                "layers_pruned": len(targets),
                "skipped": skipped,
                "update_weights": self.update_weights,
                "seconds_split": split,
            },
        )
