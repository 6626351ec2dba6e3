"""pysparse.passes: the graph rewrite passes run by ``pysparse.compile``.

This folder sits at the top of the repository and ships inside the wheel as ``pysparse.passes``.
Passes are referred to by object or by name (``PASS_REGISTRY``). A pass subclasses
``pysparse.compiler.Pass``;
what passes share (graph queries, taps, activation edits) lives in ``pysparse.compiler.graph``.

May import: quality, learning, compiler, capture, kernels, util. Never the runtime, artifacts or
the CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from pysparse.compiler.base import Pass

from .baselines import MagnitudePrune, SparseGPTPrune, WandaPrune
from .compress24 import Compress24
from .lower import Lower
from .predictor import Predictor
from .prosparse import ProSparse
from .proxsparse import ProxSparse
from .quantize import Quantize
from .recover import Recover
from .relu import ReluSubstitution

PASS_REGISTRY: dict[str, Callable[[], Pass]] = {
    "relu": ReluSubstitution,
    "magnitude": MagnitudePrune,
    "wanda": WandaPrune,
    "sparsegpt": SparseGPTPrune,
    "compress24": Compress24,
    "lower": Lower,
    "proxsparse": ProxSparse,
    "prosparse": ProSparse,
    "recover": Recover,
    "predictor": Predictor,
    "quantize": Quantize,
}

__all__ = [
    "PASS_REGISTRY",
    "Compress24",
    "Lower",
    "MagnitudePrune",
    "Predictor",
    "ProSparse",
    "ProxSparse",
    "Quantize",
    "Recover",
    "ReluSubstitution",
    "SparseGPTPrune",
    "WandaPrune",
]
