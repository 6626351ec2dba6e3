"""``pysparse.export(sm, path, format=...)``: a compiled model as a file other runtimes load.

  * ``"pt2"``:          a torch.export program with dynamic batch/sequence dims
                        (``torch.export.load(path).module()`` after ``import pysparse``),
  * ``"torchscript"``:  a traced TorchScript module (``torch.jit.load`` after ``import pysparse``;
                        the custom ops resolve once the extension is loaded); static shapes:
                        it accepts inputs shaped like the compile's examples.
Both take every input positionally: the positional example inputs, then the keyword ones in
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
from pysparse.trace import _drop_guard_module, export_module

FORMATS = ("pt2", "torchscript")


class _Positional(torch.nn.Module):
    """Exported files take every input positionally: the compiled model's positional example
    inputs, then its keyword ones in example order. ``forward`` gets explicit parameter names
    (not ``*args``): dynamic-shape programs with variadic signatures reload with broken shape
    guards in torch 2.14 ("name 'L' is not defined")."""

    def __init__(self, inner: torch.nn.Module, n_args: int, kw_names: list[str]):
        super().__init__()
        self.inner = inner
        self.n_args = n_args
        self.kw_names = kw_names

    def forward(self, *inputs: torch.Tensor):
        kwargs = dict(zip(self.kw_names, inputs[self.n_args :]))
        return self.inner(*inputs[: self.n_args], **kwargs)


def _named(inner: torch.nn.Module, n_args: int, kw_names: list[str]) -> torch.nn.Module:
    """A ``_Positional`` whose forward has one named parameter per input."""
    names = [f"input{i}" for i in range(n_args)] + [f"kw_{k}" for k in kw_names]
    src = f"def forward(self, {', '.join(names)}):\n    return _Positional.forward(self, {', '.join(names)})\n"
    scope: dict = {"_Positional": _Positional}
    exec(src, scope)  # noqa: S102 - generated from identifiers we built above
    cls = type("PositionalInputs", (_Positional,), {"forward": scope["forward"]})
    return cls(inner, n_args, kw_names)


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
        names = list(sm.example_kwargs)
        inputs = (*sm.example_args, *(sm.example_kwargs[k] for k in names))
        if format == "pt2":
            ep = export_module(_named(wrapper, len(sm.example_args), names), inputs, {})
            torch.export.save(ep, tmp)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
                # The compiled graph has symbolic sizes (dynamic capture), which the TorchScript
                # tracer refuses: specialise it with a static export first, then trace that.
                positional = _Positional(wrapper, len(sm.example_args), names)
                static = torch.export.export(positional, inputs, strict=False).module()
                _drop_guard_module(static)
                traced = torch.jit.trace(static, inputs, check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp))
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
