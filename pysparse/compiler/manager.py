"""The PassManager: orders passes by their declared constraints and runs them on a graph.

The order is a stable topological sort (the user's order is kept where it is legal). For each
pass it runs ``requires`` / ``call`` / ``ensures``, lints and recompiles the graph, applies the
pass to the model's other captures (``Pass.mirror``), optionally spot-checks the numerics of passes
that must not change them, and records a report entry (what changed, figures, wall time). A pass
that is a pipeline of others (``Pass.expand``) is run and reported stage by stage. Errors name the
failing pass and the passes that ran before it.

Ordering constraints: relu before prosparse; a mask pass (magnitude, wanda, sparsegpt,
proxsparse) before compress24; compress24 before lower; lower last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import call_no_grad
from pysparse.compiler.base import Pass, PassContext, PassError, PassResult

_log = logging.getLogger(__name__)


def order_passes(passes: Sequence[Pass]) -> list[Pass]:
    """Stable topological order under the declared constraints; errors when they cannot hold."""
    names = [p.name for p in passes]
    if len(set(names)) != len(names):
        raise PassError(f"a pass is listed twice: {names}")
    for p in passes:
        if p.needs_one_of and not any(n in names for n in p.needs_one_of):
            raise PassError(
                f"pass '{p.name}' needs one of {list(p.needs_one_of)} before it; got passes {names}"
            )
    remaining = list(passes)
    ordered: list[Pass] = []
    while remaining:
        for p in remaining:
            deps = set(p.after) | set(p.needs_one_of)
            blocked = any(q.name in deps for q in remaining if q is not p)
            if p.last and len(remaining) > 1:
                blocked = True
            if not blocked:
                ordered.append(p)
                remaining.remove(p)
                break
        else:
            raise PassError(f"the ordering constraints of passes {names} cannot all hold")
    if [p.name for p in ordered] != names:
        _log.info(
            "passes reordered by their constraints: %s -> %s", names, [p.name for p in ordered]
        )
    return ordered


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    if not leaves and hasattr(out, "to_tuple"):
        leaves, _ = torch.utils._pytree.tree_flatten(out.to_tuple())
    return [t for t in leaves if isinstance(t, torch.Tensor)]


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = order_passes(passes)
        # What runs: each pass, or the stages of one that is a pipeline of others (Pass.expand)
        self.stages = [s for p in self.passes for s in (p.expand() or [p])]
        self.report: list[dict[str, Any]] = []

    def run(
        self,
        gm: fx.GraphModule,
        ctx: PassContext,
        mirrors: Sequence[fx.GraphModule] = (),
    ) -> fx.GraphModule:
        """Runs the passes on ``gm``; after each, ``Pass.mirror`` applies it to every graph of
        ``mirrors`` (other captures of the same model, such as the generation step graph)."""
        done: list[str] = []
        for p in self.stages:
            before = None
            if ctx.check_numerics and p.preserves_numerics:
                before = _flat_tensors(call_no_grad(gm, ctx.example_args, ctx.example_kwargs))
            t0 = time.perf_counter()
            result = self._run_one(p, gm, ctx, mirrors, done)
            gm = result.gm
            seconds = time.perf_counter() - t0
            entry = {
                "pass": p.name,
                "settings": p.settings(),
                "modified": result.modified,
                "seconds": round(seconds, 3),
                **result.info,
            }
            if before is not None:
                entry.update(_spot_check(p, gm, ctx, before, done))
            # DEBUG: the report holds the same facts, and the CLI prints the report
            _log.debug(
                "pass %s: modified=%s in %.2fs %s",
                p.name,
                result.modified,
                seconds,
                {k: v for k, v in result.info.items() if not isinstance(v, (list, dict))},
            )
            self.report.append(entry)
            done.append(p.name)
        return gm

    @staticmethod
    def _run_one(
        p: Pass,
        gm: fx.GraphModule,
        ctx: PassContext,
        mirrors: Sequence[fx.GraphModule],
        done: list[str],
    ) -> PassResult:
        """requires / call / lint / ensures, then the mirrors; any failure as a PassError naming
        the pass and the passes run before it."""
        try:
            p.requires(gm)
            result = p.call(gm, ctx)
            result.gm.graph.lint()
            result.gm.recompile()
            p.ensures(result.gm)
            for other in mirrors:
                result.info.update(p.mirror(result.gm, other, ctx) or {})
                other.graph.lint()
                other.recompile()
        except Exception as exc:
            raise PassError(
                f"pass '{p.name}' failed (passes run before it: {done or 'none'}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return result


def _spot_check(
    p: Pass, gm: fx.GraphModule, ctx: PassContext, before: list[torch.Tensor], done: list[str]
) -> dict[str, Any]:
    """Compares the graph's outputs on the example inputs with ``before`` (for a pass that must
    not change them): raises when they differ past rounding, or says so for FATReLU graphs.

    The int8 linears run weight-only here (PYSPARSE_DISABLE_VNNI): their VNNI route also
    quantises x (per block of 32, a measured +0.2% perplexity on SmolLM2), a kernel's choice of
    arithmetic, not the rewrite this check is for."""
    with _env("PYSPARSE_DISABLE_VNNI", "1"):
        after = _flat_tensors(call_no_grad(gm, ctx.example_args, ctx.example_kwargs))
    err = max(
        ((a.double() - b.double()).abs().max().item() for a, b in zip(after, before)),
        default=0.0,
    )
    scale = max((b.double().abs().max().item() for b in before), default=1.0)
    out: dict[str, Any] = {"spot_check_max_abs_err": err}
    # a few units in the last place of the outputs' dtype per sqrt(layer) — rounding differences
    # of the layers add up like a random walk (bf16 keeps 8 bits: SmolLM2 2:4 in bf16 differs by
    # 1.34 at logit scale 25.6 after 30 layers) — and never tighter than 1e-3
    eps = max((torch.finfo(b.dtype).eps for b in before if b.is_floating_point()), default=0.0)
    depth = max(len(gm.meta.get("pysparse", {}).get("ffns", [])), 1)
    if err <= max(1e-3, 4 * eps * depth**0.5) * max(scale, 1.0):
        return out
    msg = (
        f"pass '{p.name}' changed the model's outputs (max abs err {err:.3g}, "
        f"output scale {scale:.3g}); passes run before it: {done or 'none'}"
    )
    if not _has_fatrelu(gm):
        raise PassError(msg)
    # FATReLU is discontinuous at its threshold t: a gate value within rounding of t that one
    # summation order puts above and another below moves an output by ~t * up * down, and 30
    # layers amplify that. Not a wrong rewrite; said.
    out["spot_check"] = "exceeded at FATReLU thresholds (see the log)"
    _log.warning(
        "%s. The graph has FATReLU activations (threshold > 0), whose output jumps at the "
        "threshold, so rounding differences between the dense and the sparse kernels switch "
        "neurons on or off; compare the two on your data (pysparse eval) before relying on it",
        msg,
    )
    return out


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _has_fatrelu(gm: fx.GraphModule) -> bool:
    return any(b.get("threshold") for b in gm.meta.get("pysparse", {}).get("ffns", []))
