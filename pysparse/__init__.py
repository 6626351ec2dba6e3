"""pysparse: a compiler-style toolchain for serving sparse LLMs.

Two kinds of sparsity, on kernels of our own: 2:4 weight sparsity (ProxSparse masks, compressed to
the packed 2:4 layout) and activation sparsity (ProSparse ReLU FFNs).

The package follows the data, each folder a layer that imports only the layers below it (kept so
by tests/test_layers.py)::

    kernels/    ops on the compiled extension, packed formats, float64 references, ONNX forms
    util/       progress bars, atomic files, the version
    capture/    model -> annotated torch.fx graph; calling it like the model
    compiler/   Pass, PassManager, graph queries and taps that passes share
    learning/   the trainer, objectives, torch.distributed
    quality/    evaluation and the built-in corpus
    passes/     the rewrite passes (shipped as pysparse.passes)
    runtime/    the compiled model, generation with a KV cache
    api.py      pysparse.compile
    artifacts/  save / load / export / reports
    cli/        the pysparse command

This module is the public surface.

May import: every layer but the CLI.
"""

from __future__ import annotations

from pysparse import passes
from pysparse.api import compile
from pysparse.artifacts.export import export
from pysparse.artifacts.store import load, save
from pysparse.capture.trace import trace
from pysparse.kernels import ops
from pysparse.kernels.extension import (
    build_info,
    extension_error,
    pin_threads,
    require_extension,
)
from pysparse.kernels.formats import Sparse24Weight
from pysparse.runtime.model import SparseModel
from pysparse.util.version import __version__

__all__ = [
    "Sparse24Weight",
    "SparseModel",
    "__version__",
    "build_info",
    "compile",
    "export",
    "extension_error",
    "load",
    "ops",
    "passes",
    "pin_threads",
    "require_extension",
    "save",
    "trace",
]
