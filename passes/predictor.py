"""Predictor: activation predictors for ReLU/FATReLU FFNs (the PowerInfer / Deja Vu idea on top of
ProSparse's activation sparsity), so the FFN kernels read gate, up and down rows only for the
neurons a small network expects to fire.

For every FFN whose activation is ReLU or FATReLU (after ``relu`` / ``prosparse``) the pass fits a
low-rank predictor ``logits = (x A^T) B^T + c`` (``A`` ``[r, d_model]``, ``B`` ``[d_ff, r]``) of
which (token, neuron) pairs fire, on the FFN inputs and intermediates recorded from the calibration
batches (real tokens only), and rewrites the block to ``x1 * keep`` with ``keep =
pysparse::ffn_predict(x, A, B, c, max_rows)`` (``logits > 0``): the exact FFN restricted to the
predicted pairs. ``lower`` then hands that mask to the FFN ops (``predicted=``), which compute only
the predicted neurons (a firing neuron the predictor misses is lost; a predicted one that does not
fire contributes 0, as in the exact FFN).

Predictors pay where a token reads few FFN rows: decoding a few sequences. Over more rows the
union of the rows' predicted sets is nearly every neuron and the FFN runs its exact route anyway,
where a predictor is pure cost (LLaMA-7B FFN, 16 rows: 5% slower with it than without). So a batch
of more than ``max_rows`` rows (default 8: tokens in one call, e.g. a prefill) predicts every
neuron without running the predictor, and runs the exact FFN; ``max_rows=None`` applies the
predictors at every batch size (what the quality benchmarks measure, per token).

Per layer (tokens split 70 / 15 / 15 into fit, calibration and test slices):

1. ``A``, ``B``, ``c`` start from the truncated SVD of the gate weight (``c`` = gate bias minus
   the FATReLU threshold): the rank-r approximation of the gate's own pre-activation. They are
   then fitted with a weighted logistic loss where a missed firing pair costs ``miss_weight``
   times a false alarm.
2. ``c`` is shifted by one scalar, on the calibration slice, to the least that predicts at least
   ``recall`` of the firing pairs and of their |x1| mass (x1 = the down projection's input).
3. Ranks come from a ladder (``ranks``, default d_model/32 .. d_model/4); each rung is scored by
   the bytes a token reads — the predictor, plus the gate/up/down rows of the neurons it predicts —
   and the ladder stops at the first rung that reads more than the one before. The cheapest rung
   is kept.

The report gives per layer the rank, recall (pairs and |x1| mass), precision and predicted-active
share on the test slice, and the predictor's bytes. The predictor weights are buffers of the graph
(saved in the artifact); ONNX exports run them as plain matmuls (with the ``max_rows`` test),
TorchScript and torch.export as the op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pysparse.compiler.base import Pass, PassContext, PassError, PassResult
from pysparse.compiler.graph import activation_threshold, linear_parts, module_tensor, tapped
from pysparse.kernels.extension import require_extension
from pysparse.util.progress import track

aten = torch.ops.aten
_log = logging.getLogger(__name__)

LADDER = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # ranks as shares of d_model


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _blocks(gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> list[dict[str, Any]]:
    """The FFN blocks a predictor fits: ReLU/FATReLU activation, a plain linear up projection."""
    out = []
    for block in gm.meta["pysparse"]["ffns"]:
        act, up, down = (nodes.get(block.get(k) or "") for k in ("act", "up", "down"))
        if act is None or up is None or down is None or block.get("gate_up"):
            continue
        if activation_threshold(act) is None or up.target is not aten.linear.default:
            continue
        out.append(block)
    return out


def _gate_weight(
    gm: fx.GraphModule, nodes: dict[str, fx.Node], block: dict
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate's weight and bias (a plain FFN's first linear), as the graph holds them now."""
    parts = linear_parts(nodes[block["gate"] if block["kind"] == "gated" else block["up"]])
    if parts is None:
        raise PassError(f"predictor: the gate of FFN layer {block['layer']} is not a module weight")
    _, w, b = parts
    bias = module_tensor(gm, b.target).detach() if b is not None else None
    return module_tensor(gm, w.target).detach(), bias


def _record(
    gm: fx.GraphModule,
    nodes: dict[str, fx.Node],
    blocks: list[dict],
    batches: Sequence[tuple[tuple, dict]],
    max_tokens: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block: the FFN inputs x [N, D] (fp32) and intermediates x1 [N, F] (bf16) of the
    batches' real tokens, at most ``max_tokens`` of them."""
    xs: list[list[torch.Tensor]] = [[] for _ in blocks]
    x1s: list[list[torch.Tensor]] = [[] for _ in blocks]
    seen = [0] * len(blocks)
    current: dict[str, Any] = {}

    def keep_rows(v: torch.Tensor) -> torch.Tensor:
        rows = v.detach().reshape(-1, v.shape[-1])
        mask = current.get("mask")
        if mask is not None and mask.numel() == rows.shape[0]:
            rows = rows[mask.reshape(-1).bool()]
        return rows

    def take_x(v: torch.Tensor, i: int) -> torch.Tensor:
        if seen[i] < max_tokens:
            xs[i].append(keep_rows(v)[: max_tokens - seen[i]].float())
        return v

    def take_x1(v: torch.Tensor, i: int) -> torch.Tensor:
        if seen[i] < max_tokens:
            rows = keep_rows(v)[: max_tokens - seen[i]]
            x1s[i].append(rows.to(torch.bfloat16))
            seen[i] += rows.shape[0]
        return v

    taps = []
    for i, block in enumerate(blocks):
        taps.append((nodes[block["up"]], take_x, (i,), "input"))
        taps.append((nodes[block["down"]], take_x1, (i,), "input"))
    call_kwargs = gm.meta.get("pysparse", {}).get("call_kwargs", {})
    with tapped(gm, taps), torch.no_grad():
        for args, kwargs in batches:
            current["mask"] = kwargs.get("attention_mask")
            gm(*args, **{**call_kwargs, **kwargs})
            if min(seen) >= max_tokens:
                break
    return [(torch.cat(x), torch.cat(x1)) for x, x1 in zip(xs, x1s)]


def _shift_for_recall(
    logits: torch.Tensor, fires: torch.Tensor, mass: torch.Tensor, recall: float
) -> float:
    """The least c such that ``logits + c > 0`` holds for at least ``recall`` of the firing pairs
    and of their mass."""
    lp = logits[fires]
    if lp.numel() == 0:
        return 0.0
    order = torch.argsort(lp, descending=True)
    lp, mp = lp[order].double(), mass[fires][order].double()
    need_pairs = math.ceil(recall * lp.numel())
    cum = torch.cumsum(mp, 0)
    need_mass = int(torch.searchsorted(cum, recall * float(cum[-1])).item()) + 1
    k = min(max(need_pairs, need_mass, 1), lp.numel())
    thr = float(lp[k - 1])
    return -thr + 1e-4 * max(abs(thr), 1.0)


def _scores(logits: torch.Tensor, fires: torch.Tensor, mass: torch.Tensor) -> dict[str, float]:
    pred = logits > 0
    hit = pred & fires
    return {
        "recall": float(hit.sum()) / max(int(fires.sum()), 1),
        "recall_mass": float(mass[hit].double().sum())
        / max(float(mass[fires].double().sum()), 1e-30),
        "precision": float(hit.sum()) / max(int(pred.sum()), 1),
        "predicted": float(pred.float().mean()),
        "firing": float(fires.float().mean()),
    }


class Predictor(Pass):
    """Low-rank activation predictors per ReLU/FATReLU FFN (see the module docstring).

    Args:
        data: calibration batches (default: the compile's calibration).
        recall: share of the firing (token, neuron) pairs, and of their |x1| mass, the predictor
            must keep on the calibration slice (default 0.99).
        ranks: the ladder of ranks (default: d_model x 1/32, 1/16, 1/8, 1/4).
        steps, lr, batch_tokens: the fit of each rung (Adam, from the gate's truncated SVD).
        miss_weight: a missed firing pair costs this many false alarms in the fit's loss.
        max_tokens: tokens recorded per layer.
        max_rows: batches of more rows than this (tokens in one call) run the exact FFN without
            the predictor (default 8; None: predict at every batch size).
    """

    name = "predictor"
    # fitted on the final weights: after every pass that changes them
    after = ("relu", "prosparse", "magnitude", "wanda", "sparsegpt", "proxsparse", "recover")

    def __init__(
        self,
        data: Sequence[tuple[tuple, dict]] | None = None,
        recall: float = 0.99,
        ranks: Sequence[int] | None = None,
        steps: int = 100,
        lr: float = 2e-3,
        batch_tokens: int = 512,
        miss_weight: float = 4.0,
        max_tokens: int = 16384,
        seed: int = 0,
        max_rows: int | None = 8,
    ):
        if not 0 < recall <= 1:
            raise ValueError(f"predictor: recall must be in (0, 1], got {recall}")
        if ranks is not None and (not ranks or min(ranks) < 1):
            raise ValueError(f"predictor: ranks must be positive integers, got {ranks}")
        self.data = data
        self.recall = recall
        self.ranks = tuple(int(r) for r in ranks) if ranks is not None else None
        self.steps, self.lr, self.batch_tokens = steps, lr, batch_tokens
        self.miss_weight = miss_weight
        self.max_tokens = max_tokens
        self.seed = seed
        if max_rows is not None and max_rows < 0:
            raise ValueError(f"predictor: max_rows must be >= 0 or None, got {max_rows}")
        self.max_rows = max_rows

    def settings(self) -> dict[str, Any]:
        s = super().settings()
        s.pop("data", None)
        return s

    def ladder(self, d_model: int, d_ff: int) -> list[int]:
        if self.ranks is not None:
            return sorted({min(r, d_model, d_ff) for r in self.ranks})
        return sorted({max(8, min(int(d_model * f), d_ff)) for f in LADDER})

    # ---- fitting ---------------------------------------------------------------------------
    def _fit(
        self,
        rank: int,
        gate: tuple[torch.Tensor, torch.Tensor | None],
        svd: tuple,
        t: float,
        fit: tuple,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One rung: from the gate's truncated SVD (``svd``: torch.linalg.svd of the gate, once
        per layer), Adam on the weighted logistic loss over the ``fit`` slice (x, fires)."""
        w, b = gate
        u, s, vh = svd
        root = s[:rank].sqrt()
        a = (vh[:rank] * root[:, None]).clone().requires_grad_(True)  # [r, D]
        bb = (u[:, :rank] * root[None, :]).clone().requires_grad_(True)  # [F, r]
        c0 = (b.float() if b is not None else torch.zeros(w.shape[0])) - t
        c = c0.clone().requires_grad_(True)
        x, fires = fit
        opt = torch.optim.Adam([a, bb, c], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed + rank)
        pos = torch.tensor(self.miss_weight)
        n = x.shape[0]
        for _ in range(self.steps):
            idx = torch.randint(0, n, (min(self.batch_tokens, n),), generator=gen)
            logits = (x[idx] @ a.T) @ bb.T + c
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, fires[idx].float(), pos_weight=pos
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return a.detach(), bb.detach(), c.detach()

    def _layer(self, gm, nodes, block, x: torch.Tensor, x1: torch.Tensor) -> dict[str, Any]:
        t = activation_threshold(nodes[block["act"]]) or 0.0
        gate = _gate_weight(gm, nodes, block)
        D, F = gate[0].shape[1], gate[0].shape[0]
        n = x.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_fit, n_cal = int(0.7 * n), int(0.15 * n)
        parts = perm[:n_fit], perm[n_fit : n_fit + n_cal], perm[n_fit + n_cal :]
        fires, mass = x1 != 0, x1.float().abs()
        mats = 3 if block["kind"] == "gated" else 2
        elt = gate[0].element_size()
        best = None
        last_cost = math.inf
        svd = torch.linalg.svd(gate[0].float(), full_matrices=False)
        fit = (x[parts[0]], fires[parts[0]])
        for rank in self.ladder(D, F):
            a, b, c = self._fit(rank, gate, svd, t, fit)

            def logits(rows, a=a, b=b, c=c):
                return (x[rows] @ a.T) @ b.T + c

            cal = parts[1]
            c = c + _shift_for_recall(logits(cal), fires[cal], mass[cal], self.recall)
            test = parts[2]
            score = _scores(logits(test, c=c), fires[test], mass[test])
            pred_bytes = (rank * (D + F) + F) * elt
            cost = pred_bytes + score["predicted"] * mats * D * elt * F
            row = {"rank": rank, **{k: round(v, 4) for k, v in score.items()}}
            row["predictor_bytes"] = pred_bytes
            row["bytes_per_token"] = round(cost)
            if best is None or cost < best[0]:
                best = (cost, row, (a, b, c))
            if cost > last_cost:
                break
            last_cost = cost
        cost, row, weights = best
        row["dense_bytes_per_token"] = mats * D * F * elt
        return {"row": row, "weights": weights}

    # ---- graph -------------------------------------------------------------------------------
    def insert(
        self, gm: fx.GraphModule, nodes: dict[str, fx.Node], block: dict, layer: int | None = None
    ) -> None:
        """``x1 -> x1 * ffn_predict(x, a, b, c, max_rows)`` in ``gm`` for ``block``, reading the
        predictor buffers ``pysparse__pred{layer}_{a,b,c}`` (already registered on ``gm``; layer:
        the block's). ``nodes``: ``gm``'s nodes by name (the nodes this inserts are not added)."""
        act, up = nodes[block["act"]], nodes[block["up"]]
        x = up.args[0]
        prefix = f"pysparse__pred{block['layer'] if layer is None else layer}"
        graph = gm.graph
        with graph.inserting_before(act.next):  # in order, right after the activation
            a = graph.get_attr(f"{prefix}_a")
            b = graph.get_attr(f"{prefix}_b")
            c = graph.get_attr(f"{prefix}_c")
            cap = -1 if self.max_rows is None else self.max_rows
            keep = graph.call_function(torch.ops.pysparse.ffn_predict.default, (x, a, b, c, cap))
            kept = graph.call_function(aten.mul.Tensor, (act, keep))
        act.replace_all_uses_with(kept, delete_user_cb=lambda u: u is not kept)
        kept.meta = dict(act.meta)
        block["predictor"] = {"keep": keep.name, "kept": kept.name}

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        require_extension()  # the mask is pysparse::ffn_predict
        nodes = _nodes(gm)
        blocks = [b for b in _blocks(gm, nodes) if "predictor" not in b]
        if not blocks:
            raise PassError(
                "predictor: no FFN has a ReLU/FATReLU activation; run relu (and prosparse) first"
            )
        batches = ctx.data_for(self.name, self.data)
        recorded = _record(gm, nodes, blocks, batches, self.max_tokens)
        rows = []
        dtype = _gate_weight(gm, nodes, blocks[0])[0].dtype
        for block, (x, x1) in track(
            list(zip(blocks, recorded)), desc="predictor: fit", unit="layer"
        ):
            if x.shape[0] < 64:
                raise PassError(
                    f"predictor: only {x.shape[0]} tokens reached FFN layer {block['layer']}; "
                    "pass more calibration text"
                )
            got = self._layer(gm, nodes, block, x, x1)
            a, b, c = (w.to(dtype).contiguous() for w in got["weights"])
            prefix = f"pysparse__pred{block['layer']}"
            gm.register_buffer(f"{prefix}_a", a)
            gm.register_buffer(f"{prefix}_b", b)
            gm.register_buffer(f"{prefix}_c", c)
            self.insert(gm, nodes, block)
            rows.append({"layer": block["layer"], **got["row"]})
        gm.graph.lint()
        gm.recompile()
        mean = {
            k: round(sum(r[k] for r in rows) / len(rows), 4)
            for k in ("recall", "recall_mass", "precision", "predicted", "firing")
        }
        read = sum(r["bytes_per_token"] for r in rows) / sum(
            r["dense_bytes_per_token"] for r in rows
        )
        info = {
            "ffns": len(rows),
            "tokens_per_layer": int(recorded[0][0].shape[0]),
            "recall_target": self.recall,
            "max_rows": self.max_rows,
            "mean": mean,
            "ffn_bytes_read_vs_dense": round(read, 4),
            "layers": rows,
        }
        return PassResult(gm, True, info)

    def mirror(self, primary: fx.GraphModule, secondary: fx.GraphModule, ctx: PassContext) -> None:
        """The same predictors in ``secondary`` (its FFN blocks matched by down weight)."""
        from pysparse.compiler.graph import sync_graph

        sync_graph(primary, secondary)  # shares the pysparse__pred* buffers
        pmeta, smeta = primary.meta["pysparse"], secondary.meta["pysparse"]

        def down_weight(meta: dict, block: dict) -> str | None:
            return meta["linears"].get(block["down"], {}).get("weight")

        fitted = {down_weight(pmeta, b): b["layer"] for b in pmeta["ffns"] if "predictor" in b}
        nodes = _nodes(secondary)
        for block in smeta["ffns"]:
            layer = fitted.get(down_weight(smeta, block))
            if "predictor" not in block and layer is not None:
                self.insert(secondary, nodes, block, layer)
        secondary.recompile()
