"""Saving and loading compiled models: ``pysparse.save(sm, dir)`` / ``pysparse.load(dir)``.

An artifact directory holds
  * ``program.pt2``   the compiled model as a ``torch.export`` program (graph + packed weights);
                      it reloads wherever ``import pysparse`` registered the ops,
  * ``example_inputs.pt`` the example inputs of the compile (tensors only), for re-tracing,
  * ``manifest.json`` format version, pysparse/torch versions, the pass report, the call keyword
                      arguments, example input specs, output names, and the sha256 and size of
                      every file.
Hugging Face ``ModelOutput`` results are stored as tuples (their classes cannot be deserialised by
torch.export); the reloaded model returns ``Outputs``, a dict with attribute access.
Writes are atomic: everything goes to a hidden temporary directory next to the target, which is
renamed into place only once complete, so a crash or a full disk never leaves a directory that
loads. Loading verifies the manifest and every checksum before touching the program, and names
what is wrong (missing, truncated or altered file; other format version).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import pysparse
from pysparse.pipeline import SparseModel
from pysparse.trace import _drop_guard_module, export_module

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROGRAM = "program.pt2"
MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.pt"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, altered or from an incompatible version."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    return repr(x)


def _is_model_output(out: Any) -> bool:
    return hasattr(out, "to_tuple") and hasattr(out, "keys")


class _PlainOutputs(torch.nn.Module):
    """Exports a compiled model with plain tuple outputs: Hugging Face ``ModelOutput`` classes are
    not registered for torch.export (de)serialization. Their field names go in the manifest and
    ``LoadedModel`` gives attribute access back."""

    def __init__(self, sm: SparseModel):
        super().__init__()
        self.sm = sm
        # Read from one eager call: attributes set during export tracing do not survive it.
        with torch.no_grad():
            out = sm(*sm.example_args, **sm.example_kwargs)
        self.output_names = list(out.keys()) if _is_model_output(out) else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.sm(*args, **kwargs)
        return out.to_tuple() if _is_model_output(out) else out


class Outputs(dict):
    """Named outputs of a reloaded model (``out.last_hidden_state`` or ``out["logits"]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def save(sm: SparseModel, directory: str | os.PathLike) -> Path:
    """Writes ``sm`` (from ``pysparse.compile``) to ``directory`` atomically; returns the path.

    An existing artifact directory is replaced only after the new one is complete.
    """
    target = Path(directory)
    if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
        raise ArtifactError(
            f"{target} exists and is not a pysparse artifact; refusing to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        wrapper = _PlainOutputs(sm)
        ep = export_module(wrapper, sm.example_args, sm.example_kwargs)
        torch.export.save(ep, tmp / PROGRAM)
        # Kept so that export and evaluation can re-trace the loaded model.
        torch.save({"args": list(sm.example_args), "kwargs": sm.example_kwargs}, tmp / EXAMPLES)
        manifest = {
            "format": "pysparse-artifact",
            "format_version": FORMAT_VERSION,
            "pysparse_version": pysparse.__version__,
            "torch_version": torch.__version__,
            "passes": sm.report,
            "call_kwargs": sm.gm.meta.get("pysparse", {}).get("call_kwargs", {}),
            "output_names": wrapper.output_names,
            "example_args": [_spec(a) for a in sm.example_args],
            "example_kwargs": {k: _spec(v) for k, v in sm.example_kwargs.items()},
            "files": {
                PROGRAM: {"sha256": _sha256(tmp / PROGRAM), "bytes": (tmp / PROGRAM).stat().st_size}
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("saved %s (%.1f MB)", target, manifest["files"][PROGRAM]["bytes"] / 1e6)
    return target


class LoadedModel(torch.nn.Module):
    """A reloaded artifact: call it like the compiled model; ``manifest`` holds its record."""

    def __init__(self, module: torch.nn.Module, manifest: dict[str, Any]):
        super().__init__()
        self.module = module
        self.manifest = manifest
        self.report = manifest.get("passes", [])
        self.example_args: tuple = ()
        self.example_kwargs: dict = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        names = self.manifest.get("output_names")
        if names and isinstance(out, (tuple, list)) and len(names) == len(out):
            return Outputs(zip(names, out))
        return out


def load(directory: str | os.PathLike) -> LoadedModel:
    """Verifies and loads an artifact written by ``pysparse.save``."""
    pysparse.require_extension()
    root = Path(directory)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a pysparse artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{mpath} is corrupt (not valid JSON: {exc}); re-save the model"
        ) from exc
    if (
        manifest.get("format") != "pysparse-artifact"
        or manifest.get("format_version") != FORMAT_VERSION
    ):
        raise ArtifactError(
            f"{root}: artifact format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} is not supported by pysparse {pysparse.__version__} "
            f"(expects version {FORMAT_VERSION}); re-save it with this version"
        )
    for name, rec in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ArtifactError(
                f"{root}: {name} is {size} bytes, the manifest says {rec['bytes']} (truncated?)"
            )
        if _sha256(path) != rec["sha256"]:
            raise ArtifactError(f"{root}: {name} does not match its checksum (altered or corrupt)")
    ep = torch.export.load(root / PROGRAM)
    module = ep.module()
    _drop_guard_module(module)
    loaded = LoadedModel(module, manifest)
    if (root / EXAMPLES).is_file():
        ex = torch.load(root / EXAMPLES, weights_only=True)
        loaded.example_args, loaded.example_kwargs = tuple(ex["args"]), dict(ex["kwargs"])
    return loaded
