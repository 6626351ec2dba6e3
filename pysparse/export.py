"""``pysparse.export(sm, path, format=...)``: a compiled model as a file other runtimes load.

  * ``"pt2"``:          a torch.export program (``torch.export.load`` after ``import pysparse``),
  * ``"torchscript"``:  a traced TorchScript module (``torch.jit.load`` after ``import pysparse``;
                        the custom ops resolve once the extension is loaded). It takes every input
                        positionally: the positional example inputs, then the keyword ones in
                        their example order (e.g. ``m(input_ids, attention_mask)``).
Both keep the pysparse ops, so both run on the sparse kernels. Outputs are plain tuples (Hugging
Face ``ModelOutput`` classes do not survive either format). ONNX is not offered yet: it needs a
translation of the custom op (or a decomposition to standard ops over the masked weights).
Files are written to a temporary name and renamed into place, so a failure never leaves a partial
file at ``path``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from pysparse.artifact import _PlainOutputs
from pysparse.pipeline import SparseModel

FORMATS = ("pt2", "torchscript")


class _Positional(torch.nn.Module):
    """TorchScript tracing takes positional inputs only: the compiled model's keyword inputs are
    appended, in the order of the example kwargs (the saved module is called that way)."""

    def __init__(self, inner: torch.nn.Module, n_args: int, kw_names: list[str]):
        super().__init__()
        self.inner = inner
        self.n_args = n_args
        self.kw_names = kw_names

    def forward(self, *inputs: torch.Tensor):
        kwargs = dict(zip(self.kw_names, inputs[self.n_args :]))
        return self.inner(*inputs[: self.n_args], **kwargs)


def export(sm: SparseModel, path: str | os.PathLike, format: str = "pt2") -> Path:
    """Writes ``sm`` (from ``pysparse.compile``) to ``path`` in ``format``; returns the path."""
    if format not in FORMATS:
        raise ValueError(f"export: unknown format {format!r}; choose one of {list(FORMATS)}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        wrapper = _PlainOutputs(sm)
        if format == "pt2":
            ep = torch.export.export(wrapper, sm.example_args, sm.example_kwargs, strict=False)
            torch.export.save(ep, tmp)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
                names = list(sm.example_kwargs)
                positional = _Positional(wrapper, len(sm.example_args), names)
                inputs = (*sm.example_args, *(sm.example_kwargs[k] for k in names))
                traced = torch.jit.trace(positional, inputs, check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
