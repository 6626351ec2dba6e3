"""Saving and loading compiled models: ``pysparse.save(sm, dir)`` / ``pysparse.load(dir)``.

An artifact directory holds
  * ``program.pt2``       the compiled graph as a ``torch.export`` program whose weights are
                          replaced by zero-size stand-ins (shape/dtype only, a few bytes each),
  * ``weights.safetensors`` every parameter, buffer and lifted constant of that program; packed
                          2:4 weights appear as their plain ``values`` / ``meta`` tensors. Weights
                          shared under several names (tied embeddings) are stored once and the
                          aliases listed in the manifest,
  * ``example_inputs.pt`` the example inputs of the compile (tensors only, loaded with
                          ``weights_only=True``), for re-tracing by export and evaluation,
  * ``tokenizer/``        the tokenizer's files, when one was given (``save(..., tokenizer=)`` or
                          ``sm.tokenizer``),
  * ``manifest.json``     format version, pysparse/torch versions, the source model's class and
                          config, the pass report (passes, settings, times), the call keyword
                          arguments, example input specs, output names, and the sha256 and size
                          of every other file.
Why the split: safetensors is the weight format every serving stack reads and it cannot execute
code on load; the graph stays a torch.export program because that is what reloads onto the
pysparse ops with dynamic shapes.
Hugging Face ``ModelOutput`` results are stored as tuples (their classes cannot be deserialised by
torch.export); the reloaded model returns ``Outputs``, a dict with attribute access.
Writes are atomic: everything goes to a hidden temporary directory next to the target, which is
renamed into place only once complete, so a crash or a full disk never leaves a directory that
loads. Loading verifies the manifest and every checksum before touching the program, and names
what is wrong (missing, truncated or altered file; other format version).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save

import pysparse
from pysparse.pipeline import SparseModel
from pysparse.trace import _drop_guard_module, export_module

_log = logging.getLogger(__name__)

FORMAT_VERSION = 2
PROGRAM = "program.pt2"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.pt"
TOKENIZER = "tokenizer"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, altered or from an incompatible version."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A tensor with ``t``'s shape and dtype over a single element (all strides 0): what the
    program file keeps in place of each weight."""
    s = torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(s, requires_grad=t.requires_grad)
    return s


def _split_weights(
    ep: torch.export.ExportedProgram,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Moves every tensor of ``ep`` (state_dict and constants) out, leaving stand-ins; returns the
    tensors by key (``state:NAME`` / ``const:NAME``) and the aliases of shared tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for prefix, table in (("state", ep.state_dict), ("const", ep.constants)):
        for name, t in list(table.items()):
            if not isinstance(t, torch.Tensor):
                continue  # script objects stay in the program
            key = f"{prefix}:{name}"
            ident = (
                (
                    t.untyped_storage().data_ptr(),
                    t.storage_offset(),
                    tuple(t.shape),
                    t.stride(),
                    t.dtype,
                )
                if t.numel()
                else None
            )
            if ident is not None and ident in seen:
                aliases[key] = seen[ident]
            else:
                if ident is not None:
                    seen[ident] = key
                tensors[key] = t.detach().to("cpu").contiguous()
            table[name] = _stand_in(t)
    return tensors, aliases


def _restore_weights(
    ep: torch.export.ExportedProgram, tensors: dict[str, torch.Tensor], aliases: dict[str, str]
) -> None:
    for prefix, table in (("state", ep.state_dict), ("const", ep.constants)):
        for name, stub in list(table.items()):
            if not isinstance(stub, torch.Tensor):
                continue
            key = f"{prefix}:{name}"
            t = tensors.get(aliases.get(key, key))
            if t is None or tuple(t.shape) != tuple(stub.shape) or t.dtype != stub.dtype:
                raise ArtifactError(
                    f"{WEIGHTS} has no tensor matching {name} "
                    f"({tuple(stub.shape)}, {stub.dtype}); the artifact is inconsistent, re-save it"
                )
            table[name] = (
                torch.nn.Parameter(t, requires_grad=stub.requires_grad)
                if isinstance(stub, torch.nn.Parameter)
                else t
            )


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

    def __init__(self, sm: torch.nn.Module):
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


def save(sm: SparseModel, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Writes ``sm`` (from ``pysparse.compile``) to ``directory`` atomically; returns the path.

    ``tokenizer`` (default ``sm.tokenizer`` when set): a Hugging Face tokenizer whose files are
    stored under ``tokenizer/``. An existing artifact directory is replaced only after the new one
    is complete.
    """
    target = Path(directory)
    if target.exists() and not (target / MANIFEST).exists() and any(target.iterdir()):
        raise ArtifactError(
            f"{target} exists and is not a pysparse artifact; refusing to replace it"
        )
    tokenizer = tokenizer if tokenizer is not None else getattr(sm, "tokenizer", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        wrapper = _PlainOutputs(sm)
        ep = export_module(wrapper, sm.example_args, sm.example_kwargs)
        tensors, aliases = _split_weights(ep)
        _st_save(tensors, str(tmp / WEIGHTS), metadata={"format": "pysparse-artifact"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the archive writer remarks on the stand-ins
            torch.export.save(ep, tmp / PROGRAM)
        # Kept so that export and evaluation can re-trace the loaded model.
        torch.save({"args": list(sm.example_args), "kwargs": sm.example_kwargs}, tmp / EXAMPLES)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        meta = sm.gm.meta.get("pysparse", {})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        # mkdtemp and some writers create owner-only entries: give the artifact the permissions
        # an ordinary directory would have.
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        manifest = {
            "format": "pysparse-artifact",
            "format_version": FORMAT_VERSION,
            "pysparse_version": pysparse.__version__,
            "torch_version": torch.__version__,
            "model": meta.get("model", {}),
            "passes": sm.report,
            "call_kwargs": meta.get("call_kwargs", {}),
            "output_names": wrapper.output_names,
            "example_args": [_spec(a) for a in sm.example_args],
            "example_kwargs": {k: _spec(v) for k, v in sm.example_kwargs.items()},
            "weights": {"file": WEIGHTS, "tensors": len(tensors), "aliases": aliases},
            "tokenizer": TOKENIZER if tokenizer is not None else None,
            "files": {
                p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
                for p in files
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
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ArtifactError(
                f"save {target}: no space left on the device while writing the artifact; nothing "
                f"was written{' and the existing artifact is unchanged' if target.exists() else ''}. "
                f"Free space under {target.parent} (the artifact needs about its weights' size) "
                f"and save again"
            ) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in manifest["files"].values())
    _log.info("saved %s (%.1f MB)", target, total / 1e6)
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
        self.root: Path | None = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer stored with the artifact (loaded with transformers), or None."""
        if self.root is None or not self.manifest.get("tokenizer"):
            return None
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.root / TOKENIZER))
        return self._tokenizer

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
    files = manifest.get("files", {})
    for required in (PROGRAM, WEIGHTS):
        if required not in files:
            raise ArtifactError(f"{root}: the manifest lists no {required}; re-save the model")
    for name, rec in files.items():
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
    try:
        tensors = _st_load(str(root / WEIGHTS))
    except Exception as exc:
        raise ArtifactError(f"{root}: {WEIGHTS} cannot be read ({exc}); re-save the model") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.load(root / PROGRAM)
    _restore_weights(ep, tensors, manifest.get("weights", {}).get("aliases", {}))
    module = ep.module()
    _drop_guard_module(module)
    loaded = LoadedModel(module, manifest)
    loaded.root = root
    if (root / EXAMPLES).is_file():
        ex = torch.load(root / EXAMPLES, weights_only=True)
        loaded.example_args, loaded.example_kwargs = tuple(ex["args"]), dict(ex["kwargs"])
    return loaded
