"""``pysparse.export(model, path, format=...)``: a compiled model as a file other runtimes load.

``model`` is what ``pysparse.compile`` returns or what ``pysparse.load`` returns.

  * ``"pt2"``:          a torch.export program with dynamic batch/sequence dims
                        (``torch.export.load(path).module()`` after ``import pysparse``),
  * ``"torchscript"``:  a traced TorchScript module (``torch.jit.load`` after ``import pysparse``;
                        the custom ops resolve once the extension is loaded); static shapes:
                        it accepts inputs shaped like the compile's examples.
  * ``"onnx"``:         an ONNX model (opset 18, dynamic batch/sequence dims) written by torch's
                        dynamo exporter; pysparse's ops become standard ONNX ops over the packed
                        2:4 tensors (see ``pysparse.kernels.onnx_ops``), so any runtime runs it with no
                        plugin and the file holds the packed weights. Needs the ``onnx`` extra
                        (``pip install 'pysparse[onnx]'``). Tested with onnxruntime: equal to the
                        compiled model within 1e-4 absolute on float32 (ordinary reordering of
                        float sums; the runtime multiplies densely).
  * ``"hf"``:           a Hugging Face folder (``path`` is a directory) that ``transformers``
                        loads without pysparse: the weights dense, 2:4 layers masked, the
                        activation in the config (``pysparse.artifacts.hf``).
  * ``"compressed-tensors"``: the Hugging Face folder with the quantize pass's int8 / int4
                        weights stored quantized, as vLLM and llm-compressor read them
                        (``pysparse.artifacts.compressed``).
The three file formats take their inputs positionally: the positional example inputs, then the keyword
ones in their example order (e.g. ``m(input_ids, attention_mask)``; ONNX names them ``input0``,
``kw_attention_mask``). pt2 and TorchScript keep the pysparse ops, so both run on the sparse
kernels. Outputs are plain tuples (Hugging Face ``ModelOutput`` classes do not survive any of the
formats); ONNX outputs carry the model's output names (``last_hidden_state``, ``logits``).
Files are written to a temporary name and renamed into place, so a failure never leaves a partial
file at ``path``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pysparse.artifacts.store import _PlainOutputs
from pysparse.capture.trace import _drop_guard_module, export_module
from pysparse.runtime import native
from pysparse.runtime.generate import export_step
from pysparse.util.files import atomic_path

FORMATS = ("pt2", "torchscript", "onnx")


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
    # The keyword names come from the model's example inputs (for a loaded artifact: from its
    # files); only plain identifiers may reach the source below.
    for k in kw_names:
        if not (isinstance(k, str) and f"kw_{k}".isidentifier()):
            raise ValueError(
                f"export: keyword input {k!r} is not a Python name; pass it under a plain "
                "identifier"
            )
    src = f"def forward(self, {', '.join(names)}):\n    return _Positional.forward(self, {', '.join(names)})\n"
    scope: dict = {"_Positional": _Positional}
    exec(src, scope)  # noqa: S102 - generated from identifiers checked above
    cls = type("PositionalInputs", (_Positional,), {"forward": scope["forward"]})
    return cls(inner, n_args, kw_names)


def _onnx(wrapper: _PlainOutputs, n_args: int, names: list[str], inputs: tuple, tmp: Path) -> None:
    try:
        from pysparse.kernels.onnx_ops import translation_table
    except ImportError as exc:
        raise RuntimeError(
            f"ONNX export needs onnx and onnxscript ({exc}); install them with "
            "pip install 'pysparse[onnx]'"
        ) from exc
    ep = export_module(_named(wrapper, n_args, names), inputs, {})
    # The exporter's chatter ("torchvision is not installed", optimizer pass notes) is not for
    # pysparse users; errors still surface as exceptions.
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            ep,
            dynamo=True,
            custom_translation_table=translation_table(),
            verbose=False,
            optimize=False,
        )
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    out_names = wrapper.output_names
    if out_names and len(out_names) == len(program.model.graph.outputs):
        for value, name in zip(program.model.graph.outputs, out_names):
            value.name = name
    program.save(str(tmp))


def _export_step(model: Any, target: Path, format: str) -> Path:
    if format != "pt2":
        raise ValueError(
            f"export: the generation step graph exports as pt2 only (got {format!r}): its KV "
            "cache is updated in place, which TorchScript tracing and ONNX do not keep"
        )
    if not getattr(model, "can_generate", False):
        raise ValueError(
            "export: this model has no generation step graph (only compiled decoders have one)"
        )
    with atomic_path(target) as tmp:
        torch.export.save(export_step(model.step, model.cache_spec), tmp)
    return target


def export(model: Any, path: str | os.PathLike, format: str = "pt2", part: str = "forward") -> Path:
    """Writes ``model`` (from ``pysparse.compile`` or ``pysparse.load``) to ``path`` in
    ``format``; returns the path. ``part="step"`` (decoders, pt2 only) writes the generation step
    graph instead: ``torch.export.load(path).module()(input_ids, position_ids, cache_position,
    attention_mask, keys, values)`` with the KV cache as two lists of [B, kv_heads, S, head_dim]
    tensors updated in place (pysparse.runtime.generate describes the inputs)."""
    if format in ("hf", "compressed-tensors"):
        if part != "forward":
            raise ValueError("export: a Hugging Face folder holds the model, not its step graph")
        if format == "compressed-tensors":
            from pysparse.artifacts.compressed import export_compressed_tensors

            return export_compressed_tensors(model, path)
        from pysparse.artifacts.hf import export_hf

        return export_hf(model, path)
    if format not in FORMATS:
        raise ValueError(
            f"export: unknown format {format!r}; choose one of "
            f"{[*FORMATS, 'hf', 'compressed-tensors']}"
        )
    if part not in ("forward", "step"):
        raise ValueError(f"export: unknown part {part!r}; choose 'forward' or 'step'")
    if part == "step":
        return _export_step(model, Path(path), format)
    if not hasattr(model, "example_args") or not hasattr(model, "example_kwargs"):
        raise TypeError(
            f"export: expected a model from pysparse.compile or pysparse.load, got "
            f"{type(model).__name__}; compile it first"
        )
    target = Path(path)
    # the exporters trace the graph itself (some under no_grad), never its native build
    with atomic_path(target) as tmp, native.off():
        wrapper = _PlainOutputs(model)
        names = list(model.example_kwargs)
        n_args = len(model.example_args)
        inputs = (*model.example_args, *(model.example_kwargs[k] for k in names))
        if format == "pt2":
            ep = export_module(_named(wrapper, n_args, names), inputs, {})
            torch.export.save(ep, tmp)
        elif format == "onnx":
            _onnx(wrapper, n_args, names, inputs, tmp)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
                # The compiled graph has symbolic sizes (dynamic capture), which the TorchScript
                # tracer refuses: specialise it with a static export first, then trace that.
                positional = _Positional(wrapper, n_args, names)
                static = torch.export.export(positional, inputs, strict=False).module()
                _drop_guard_module(static)
                traced = torch.jit.trace(static, inputs, check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp))
    return target
