"""The pass interface: ``Pass``, what a pass returns (``PassResult``), what passes share
(``PassContext``), and the error every pass failure becomes (``PassError``).

A pass takes the annotated GraphModule (see pysparse.capture) and returns a PassResult whose
``modified`` is honest; the PassManager (pysparse.compiler.manager) orders and runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from pysparse.capture.inputs import batch_tokens
from pysparse.compiler.graph import sync_graph

_log = logging.getLogger(__name__)

MASK_PASSES = ("magnitude", "wanda", "sparsegpt", "proxsparse")


class PassError(RuntimeError):
    """A pass failed or the requested passes cannot run; the message says which and why."""


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share: example inputs, calibration batches, settings."""

    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    calibration: list[tuple[tuple, dict]] = field(default_factory=list)
    check_numerics: bool = True

    def calibration_batches(self) -> list[tuple[tuple, dict]]:
        return self.calibration or [(self.example_args, self.example_kwargs)]

    def data_for(self, who: str, data: Any = None) -> list[tuple[tuple, dict]]:
        """The batches a data pass learns or calibrates on: its own ``data`` when given, else the
        calibration batches; warns (once per pass) when they hold fewer than
        ``MIN_CALIBRATION_TOKENS`` tokens, with the count and how to pass more."""
        batches = list(data) if data is not None else self.calibration_batches()
        n = count_tokens(batches)
        if n is not None and n < MIN_CALIBRATION_TOKENS:
            source = (
                "its data="
                if data is not None
                else "the calibration batches"
                if self.calibration
                else "the example inputs alone (no calibration= given)"
            )
            _log.warning(
                "%s: %s hold only %d tokens (fewer than %d): statistics and training on so little "
                "text fit it and not the model's use; pass more text: calibration=[(args, kwargs), "
                "...] to pysparse.compile (or tokenizer=tok for pysparse.quality.corpus's training text), "
                "or the pass's data=",
                who,
                source,
                n,
                MIN_CALIBRATION_TOKENS,
            )
        return batches


# Fewer tokens than this in a data pass's batches draws a warning (the CLI's default calibration,
# 256 corpus sentences, holds ~5-6k tokens; the reference Wanda / SparseGPT setting is 128 x 2048).
MIN_CALIBRATION_TOKENS = 4096


def count_tokens(batches: Sequence[tuple[tuple, dict]]) -> int | None:
    """Real (unpadded) tokens in token-id batches (``batch_tokens`` summed); None when the
    batches' inputs are not token ids (e.g. float features)."""
    for args, kwargs in batches:
        x = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(x, torch.Tensor) or x.is_floating_point():
            return None
    return sum(batch_tokens(b) for b in batches)


class Pass:
    """Base class. Subclasses set ``name``, optionally ``after`` (names that must run earlier when
    present), ``needs_one_of`` (at least one of these must run earlier), ``last``, and
    ``preserves_numerics`` (the graph's outputs must not change, up to float rounding)."""

    name: str = "pass"
    after: tuple[str, ...] = ()
    needs_one_of: tuple[str, ...] = ()
    last: bool = False
    preserves_numerics: bool = False

    def requires(self, gm: fx.GraphModule) -> None:
        if "pysparse" not in gm.meta:
            raise PassError(
                f"{self.name}: the graph is not annotated; capture it with pysparse.trace"
            )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        pass

    def mirror(
        self, primary: fx.GraphModule, secondary: fx.GraphModule, ctx: PassContext
    ) -> dict[str, Any] | None:
        """Makes ``secondary`` (another capture of the same model, e.g. the generation step graph
        of pysparse.runtime.generate) what this pass made of ``primary``. The default suits passes that
        change weights (shared tensors), records and activations: ``sync_graph``. A pass that
        rewrites other parts of the graph overrides this and runs itself on ``secondary``; what
        it returns (entries only the mirror can count) joins the pass's report."""
        sync_graph(primary, secondary)
        return None

    def expand(self) -> list[Pass] | None:
        """A pass that is a pipeline of others returns its stages (each a Pass): the PassManager
        runs them in this pass's place, after ordering, and reports each on its own. None (the
        default): the pass runs as itself."""
        return None

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _plain(v)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def _plain(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool, type(None), tuple, list))
