"""Saving and loading compiled models: ``pysparse.save(sm, dir)`` / ``pysparse.load(dir)``.

An artifact directory holds
  * ``program.pt2``       the compiled graph as a ``torch.export`` program whose weights are
                          replaced by zero-size stand-ins (shape/dtype only, a few bytes each),
                          with no sample inputs and no guard code (see "Loading files from
                          others" below),
  * ``step.pt2``          decoders: the generation step graph (pysparse.runtime.generate), written the
                          same way; its weights are the forward graph's, stored once,
  * ``weights.safetensors`` every parameter, buffer and lifted constant of the programs; packed
                          2:4 weights appear as their plain ``values`` / ``meta`` tensors. Weights
                          shared under several names (tied embeddings) are stored once and the
                          aliases listed in the manifest,
  * ``example_inputs.safetensors`` the example inputs of the compile, for re-tracing by export
                          and evaluation: the tensors, and their arrangement (args, kwargs, nested
                          lists/tuples/dicts, plain values) as JSON in the header,
  * ``tokenizer/``        the tokenizer's files, when one was given (``save(..., tokenizer=)`` or
                          ``sm.tokenizer``),
  * ``report.json``, ``report.md``, ``report.html``  what the model is and how it was made
                          (pysparse.artifacts.report); the CLI adds held-out quality and speed,
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

Loading files from others. Artifacts get shared, and a checksum protects against corruption, not
against someone who rewrites the manifest too: ``load`` must not run code an artifact carries.
What ``torch.export.load`` (torch 2.14) executes from a ``.pt2`` archive, read from its code
(``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``,
``torch/export/_unlift.py``, ``torch/fx/graph.py``); a hostile archive made plain
``torch.export.load(f).module()`` create a file through a ``use_pickle`` weight, the sample
inputs, a shape expression, an input name and guard code (tests/test_hostile_files.py keeps the
first four as tests):
  * weights / constants configs carry a per-tensor ``use_pickle`` flag (torch sets it for tensor
    subclasses); a flagged entry's file goes to ``torch.load(..., weights_only=False)``: arbitrary
    unpickling, any code runs. Constants named ``opaque_obj_*`` go to ``pickle.loads``;
    ``custom_obj_*`` ones to TorchScript's unpickler (any registered TorchBind class).
  * ``data/sample_inputs/model.pt`` is read with ``weights_only=True`` and, when that fails, again
    with ``weights_only=False``; the legacy members ``data/weights/model.pt`` /
    ``data/constants/model.pt``, and a whole archive without ``archive_version`` (torch's 2.7
    format), take the same fallback.
  * members under ``data/aotinductor/`` make torch load the shared library they hold.
  * no pickle needed: every symbolic-shape ``expr_str`` goes through ``sympy.sympify``, which
    ``eval``s it; graph input names and the input treespec's dict keys are written into the
    Python source fx generates and ``exec``s (an input named ``x=open(...)`` runs on load), so
    any name of the graph is treated as possible source; and
    ``guards_code`` becomes the body of a function ``ep.module()`` ``exec``s when the archive has
    sample inputs.
What torch does check: its verifier accepts only operators (and a few builtins) as call targets.
So ``load`` reads ``program.pt2`` once, verifies that very byte string's checksum, has
``pysparse.artifacts.pt2check`` refuse anything but a plain program (no pickled or non-raw tensor entry,
empty sample inputs, no guard code, shape expressions that are plain sympy, names that are plain
names, call targets that are operators; the error names the member) and only then hands the same
bytes to torch. ``save`` writes programs that pass. The other files are safetensors and JSON; the
tokenizer is read by transformers with ``trust_remote_code=False``. Not covered: what the
operators in a graph do (aten's, pysparse's, and those of any other extension loaded in the
process), and a file built to make loading slow or large.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import keyword
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as _st_load
from safetensors.torch import save_file as _st_save

from pysparse.artifacts import report
from pysparse.artifacts.layout import (
    EXAMPLES,
    FORMAT_VERSION,
    MANIFEST,
    PROGRAM,
    STEP,
    STEP_PROGRAM,
    TOKENIZER,
    WEIGHTS,
    ArtifactError,
)
from pysparse.artifacts.pt2check import UnsafeProgramError, check_program
from pysparse.capture.inputs import InputSpec
from pysparse.capture.trace import _drop_guard_module, export_module
from pysparse.kernels.extension import require_extension
from pysparse.runtime import native
from pysparse.runtime.generate import CacheSpec, Generates, drop_input_checks, export_step
from pysparse.runtime.model import SparseModel
from pysparse.util.files import sha256_file
from pysparse.util.version import __version__

_log = logging.getLogger(__name__)


def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A tensor with ``t``'s shape and dtype over a single element (all strides 0): what the
    program file keeps in place of each weight."""
    s = torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(s, requires_grad=t.requires_grad)
    return s


def _split_weights(
    programs: dict[str, torch.export.ExportedProgram],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Moves every tensor of each program (state_dict and constants) out, leaving stand-ins;
    returns the tensors by key (``state:NAME`` / ``const:NAME``, prefixed ``PROGRAM/`` for every
    program but the main one, keyed "") and the aliases of tensors shared within or across the
    programs (tied embeddings; the step graph's weights, which are the forward graph's)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    tables = [
        (f"{program}/{kind}" if program else kind, table)
        for program, ep in programs.items()
        for kind, table in (("state", ep.state_dict), ("const", ep.constants))
    ]
    for prefix, table in tables:
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
    ep: torch.export.ExportedProgram,
    tensors: dict[str, torch.Tensor],
    aliases: dict[str, str],
    program: str = "",
) -> None:
    for kind, table in (("state", ep.state_dict), ("const", ep.constants)):
        prefix = f"{program}/{kind}" if program else kind
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


def _pack_inputs(args: tuple, kwargs: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The example inputs as safetensors tensors plus a JSON layout that says where each goes:
    ``{"tensor": key, "device": ...}``, ``{"list"|"tuple": [...]}``, ``{"dict": {...}}`` or
    ``{"value": plain JSON}``."""
    tensors: dict[str, torch.Tensor] = {}

    def pack(x: Any, path: str) -> dict[str, Any]:
        if isinstance(x, torch.Tensor):
            # a copy of its own: safetensors refuses tensors that share memory
            tensors[path] = x.detach().to("cpu").clone().contiguous()
            return {"tensor": path, "device": str(x.device)}
        if isinstance(x, (list, tuple)):
            kind = "tuple" if isinstance(x, tuple) else "list"
            return {kind: [pack(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return {"dict": {k: pack(v, f"{path}.{k}") for k, v in x.items()}}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise ArtifactError(
            f"save: example input {path} is a {type(x).__name__}; an artifact stores tensors, "
            "numbers, strings and lists, tuples or dicts of them"
        )

    layout = {
        "args": [pack(a, f"args.{i}") for i, a in enumerate(args)],
        "kwargs": {k: pack(v, f"kwargs.{k}") for k, v in kwargs.items()},
    }
    return tensors, layout


def _unpack_inputs(path: Path) -> tuple[tuple, dict]:
    """Reads ``example_inputs.safetensors`` (tensors and JSON only) back into ``(args, kwargs)``;
    keyword names must be Python identifiers (export writes them into a generated signature)."""

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{path} is not valid example inputs ({why}); re-save the model")

    try:
        with safe_open(str(path), framework="pt") as f:
            layout = json.loads((f.metadata() or {}).get("layout", ""))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as exc:  # safetensors' and json's own errors for a bad file
        raise bad(str(exc)) from exc

    def unpack(node: Any) -> Any:
        if not isinstance(node, dict) or not node:
            raise bad(f"entry {node!r}")
        if "tensor" in node:
            t = tensors.get(node["tensor"])
            if t is None:
                raise bad(f"no tensor {node['tensor']!r}")
            try:
                device = torch.device(node.get("device", "cpu"))
            except (RuntimeError, TypeError) as exc:
                raise bad(f"device {node.get('device')!r}") from exc
            # Back on the GPU it was saved from when this machine has it, else on the CPU.
            if device.type == "cuda" and (device.index or 0) < torch.cuda.device_count():
                return t.to(device)
            return t
        (kind, value), *rest = node.items()
        if rest or kind not in ("list", "tuple", "dict", "value"):
            raise bad(f"entry {node!r}")
        if kind == "value":
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise bad(f"value {value!r}")
            return value
        if kind == "dict":
            if not isinstance(value, dict):
                raise bad(f"entry {node!r}")
            return {k: unpack(v) for k, v in value.items()}
        if not isinstance(value, list):
            raise bad(f"entry {node!r}")
        items = [unpack(v) for v in value]
        return tuple(items) if kind == "tuple" else items

    if not isinstance(layout, dict):
        raise bad("no layout")
    args, kwargs = layout.get("args"), layout.get("kwargs")
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise bad("no args / kwargs")
    for k in kwargs:
        if not k.isidentifier() or keyword.iskeyword(k):
            raise bad(f"keyword input {k!r} is not a Python name")
    try:
        return tuple(unpack(a) for a in args), {k: unpack(v) for k, v in kwargs.items()}
    except RecursionError as exc:
        raise bad("nested too deeply") from exc


def _is_model_output(out: Any) -> bool:
    return hasattr(out, "to_tuple") and hasattr(out, "keys")


class _PlainOutputs(torch.nn.Module):
    """Exports a compiled model with plain tuple outputs: Hugging Face ``ModelOutput`` classes are
    not registered for torch.export (de)serialization. Their field names go in the manifest and
    ``LoadedModel`` gives attribute access back."""

    def __init__(self, sm: torch.nn.Module):
        super().__init__()
        # Only the forward graph is a submodule here: the step graph of a decoder is a program of
        # its own (step.pt2) and has no place among this program's weights.
        self.compiled = sm.gm if isinstance(sm, SparseModel) else sm.module
        object.__setattr__(self, "sm", sm)
        # Read from one eager call: attributes set during export tracing do not survive it.
        with torch.no_grad(), native.off():
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


def save(
    sm: SparseModel,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """Writes ``sm`` (from ``pysparse.compile``) to ``directory`` atomically; returns the path.

    ``files``: more files to keep in the artifact, by name (listed and checksummed like the
    rest; the CLI keeps the recipe it ran as ``recipe.yaml``).

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
        manifest = _write_contents(sm, tmp, tokenizer, files)
        written = sorted(p for p in tmp.rglob("*") if p.is_file())
        # mkdtemp and some writers create owner-only entries: give the artifact the permissions
        # an ordinary directory would have.
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in written
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _swap_in(tmp, target)
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


def _write_contents(
    sm: SparseModel, tmp: Path, tokenizer: Any, files: dict[str, str | bytes] | None
) -> dict[str, Any]:
    """Writes the programs, weights, example inputs, tokenizer and extra files into ``tmp``;
    returns the manifest without its table of files."""
    wrapper = _PlainOutputs(sm)
    programs = {"": export_module(wrapper, sm.example_args, sm.example_kwargs)}
    generation = None
    if getattr(sm, "can_generate", False):
        programs[STEP] = export_step(sm.step, sm.cache_spec)
        generation = {"program": STEP_PROGRAM, "cache": sm.cache_spec.to_dict()}
    tensors, aliases = _split_weights(programs)
    _st_save(tensors, str(tmp / WEIGHTS), metadata={"format": "pysparse-artifact"})
    for name, ep in programs.items():
        # The programs carry neither of these (both end up as code or a pickle on load, see
        # the module docstring), so that pysparse.artifacts.pt2check can refuse any program that
        # does.
        ep.example_inputs = None
        ep._guards_code = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the archive writer remarks on the stand-ins
            torch.export.save(ep, tmp / (STEP_PROGRAM if name else PROGRAM))
    # Kept so that export and evaluation can re-trace the loaded model.
    ex_tensors, ex_layout = _pack_inputs(sm.example_args, sm.example_kwargs)
    _st_save(ex_tensors, str(tmp / EXAMPLES), metadata={"layout": json.dumps(ex_layout)})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / TOKENIZER))
    extra = dict(files or {})
    if not any(name in extra for name in report.REPORT_FILES):
        extra.update(report.files(report.collect(sm)))
    for name, data in extra.items():
        if "/" in name or name.startswith(".") or (tmp / name).exists() or name == MANIFEST:
            raise ArtifactError(f"save: extra file name {name!r} is taken or not a plain name")
        (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
    meta = sm.gm.meta.get("pysparse", {})
    return {
        "format": "pysparse-artifact",
        "format_version": FORMAT_VERSION,
        "pysparse_version": __version__,
        "torch_version": torch.__version__,
        "model": meta.get("model", {}),
        "passes": sm.report,
        "call_kwargs": meta.get("call_kwargs", {}),
        "inputs": meta["inputs"].to_dict() if meta.get("inputs") else None,
        "output_names": wrapper.output_names,
        "example_args": [_spec(a) for a in sm.example_args],
        "example_kwargs": {k: _spec(v) for k, v in sm.example_kwargs.items()},
        "weights": {"file": WEIGHTS, "tensors": len(tensors), "aliases": aliases},
        "tokenizer": TOKENIZER if tokenizer is not None else None,
        "generation": generation,
        # weights packed or re-laid-out by the passes (pysparse.kernels.formats.dense_weight)
        "weight_layouts": meta.get("weight_layouts", {}),
    }


def _swap_in(tmp: Path, target: Path) -> None:
    """Puts the finished ``tmp`` at ``target``; an existing artifact goes only after."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


class LoadedModel(Generates, torch.nn.Module):
    """A reloaded artifact: call it like the compiled model; ``manifest`` holds its record.
    Decoders saved with their step graph also ``generate``."""

    def __init__(
        self,
        module: torch.nn.Module,
        manifest: dict[str, Any],
        step: torch.nn.Module | None = None,
        cache_spec: CacheSpec | None = None,
    ):
        super().__init__()
        self.module = module
        self.step = step
        self.cache_spec = cache_spec
        self.manifest = manifest
        self.report = manifest.get("passes", [])
        self.example_args: tuple = ()
        self.example_kwargs: dict = {}
        self.root: Path | None = None
        self.inputs: InputSpec | None = (
            None  # the manifest's input record (None: an artifact saved before it)
        )

    @property
    def tokenizer(self) -> Any:
        """The tokenizer stored with the artifact (loaded with transformers), or None."""
        if self.root is None or not self.manifest.get("tokenizer"):
            return None
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            # An artifact's tokenizer files are data: never the code a config could point to.
            self._tokenizer = AutoTokenizer.from_pretrained(
                str(self.root / TOKENIZER), trust_remote_code=False
            )
        return self._tokenizer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the program; under ``torch.no_grad()`` / ``inference_mode()`` as native code
        (pysparse.runtime.native; ``PYSPARSE_NATIVE=0`` turns that off)."""
        if self.inputs is not None:  # called like the original model (pysparse.capture.inputs)
            args, kwargs = self.inputs.bind(args, kwargs)
        runner = None
        if native.wanted() and self.example_args + tuple(self.example_kwargs.values()):
            runner = native.forward_of(self, self._make_native_forward)
        if runner is not None and runner.accepts(args, kwargs):
            out = runner(args, kwargs)
        else:
            out = self.module(*args, **kwargs)
        names = self.manifest.get("output_names")
        if names and isinstance(out, (tuple, list)) and len(names) == len(out):
            return Outputs(zip(names, out))
        return out

    def _make_native_forward(self) -> native.NativeForward:
        args, kwargs = self.example_args, self.example_kwargs
        if self.inputs is not None:
            args, kwargs = self.inputs.bind(args, kwargs)
        return native.NativeForward(self.module, {}, args, kwargs)


def _listed_file(root: Path, name: Any, rec: Any) -> tuple[Path, int, str]:
    """The path, size and sha256 the manifest lists for ``name``; names stay inside ``root``."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or name.startswith("/") or ".." in parts or "\\" in name:
        raise ArtifactError(
            f"{root}: the manifest lists {name!r}, which is not a file of the "
            "artifact; the manifest is corrupt, re-save the model"
        )
    if not (
        isinstance(rec, dict)
        and type(rec.get("bytes")) is int
        and isinstance(rec.get("sha256"), str)
    ):
        raise ArtifactError(
            f"{root}: the manifest's record of {name} is corrupt; re-save the model"
        )
    return root / name, rec["bytes"], rec["sha256"]


def load(directory: str | os.PathLike) -> LoadedModel:
    """Verifies and loads an artifact written by ``pysparse.save``. Nothing in it is unpickled or
    run as code (see the module docstring); a program that would be is refused with an
    ``ArtifactError`` naming the member."""
    require_extension()
    root = Path(directory)
    manifest = _read_manifest(root)
    blobs = _verify_files(root, manifest["files"])
    wanted = [PROGRAM] + ([STEP_PROGRAM] if manifest.get("generation") is not None else [])
    _inspect_programs(root, blobs, wanted)
    return _rebuild(root, manifest, blobs, wanted)


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, checked to be this format's, to list the programs and the weights, and to
    hold a well-formed generation record."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a pysparse artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{mpath} is corrupt (not valid JSON: {exc}); re-save the model"
        ) from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is corrupt (not a JSON object); re-save the model")
    if (
        manifest.get("format") != "pysparse-artifact"
        or manifest.get("format_version") != FORMAT_VERSION
    ):
        raise ArtifactError(
            f"{root}: artifact format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} is not supported by pysparse {__version__} "
            f"(expects version {FORMAT_VERSION}); re-save it with this version"
        )
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ArtifactError(f"{mpath} is corrupt (no table of files); re-save the model")
    manifest["files"] = files
    for required in (PROGRAM, WEIGHTS):
        if required not in files:
            raise ArtifactError(f"{root}: the manifest lists no {required}; re-save the model")
    generation = manifest.get("generation")
    if generation is not None and (
        not isinstance(generation, dict) or generation.get("program") != STEP_PROGRAM
    ):
        raise ArtifactError(f"{mpath} is corrupt (its generation record); re-save the model")
    if generation is not None and STEP_PROGRAM not in files:
        raise ArtifactError(f"{root}: the manifest lists no {STEP_PROGRAM}; re-save the model")
    return manifest


def _verify_files(root: Path, files: dict[str, Any]) -> dict[str, bytes]:
    """Checks every listed file's size and checksum; returns the programs' bytes, read once (they
    are checked, inspected and loaded from these very bytes: the file cannot change between)."""
    blobs: dict[str, bytes] = {}
    for name, rec in files.items():
        path, nbytes, sha256 = _listed_file(root, name, rec)
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is missing")
        size = path.stat().st_size
        if size != nbytes:
            raise ArtifactError(
                f"{root}: {name} is {size} bytes, the manifest says {nbytes} (truncated?)"
            )
        if name in (PROGRAM, STEP_PROGRAM):
            blobs[name] = path.read_bytes()
            digest = hashlib.sha256(blobs[name]).hexdigest()
        else:
            digest = sha256_file(path)
        if digest != sha256:
            raise ArtifactError(f"{root}: {name} does not match its checksum (altered or corrupt)")
    return blobs


def _inspect_programs(root: Path, blobs: dict[str, bytes], wanted: list[str]) -> None:
    """Refuses a program that would run code when torch loads it (pysparse.artifacts.pt2check)."""
    for name in wanted:
        try:
            check_program(blobs[name])
        except UnsafeProgramError as exc:
            raise ArtifactError(
                f"{root}: {name} {exc}. Refused: loading it could run code it carries. Re-save "
                "the model with pysparse.save, which writes none of this"
            ) from exc


def _rebuild(
    root: Path, manifest: dict[str, Any], blobs: dict[str, bytes], wanted: list[str]
) -> LoadedModel:
    """The verified programs loaded with the weights put back, as a LoadedModel."""
    mpath = root / MANIFEST
    try:
        tensors = _st_load(str(root / WEIGHTS))
    except Exception as exc:
        raise ArtifactError(f"{root}: {WEIGHTS} cannot be read ({exc}); re-save the model") from exc
    weights = manifest.get("weights")
    aliases = weights.get("aliases") if isinstance(weights, dict) else None
    modules = {}
    for name in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.load(io.BytesIO(blobs[name]))
        except Exception as exc:  # torch's deserializer raises many kinds
            raise ArtifactError(
                f"{root}: {name} cannot be loaded by torch ({type(exc).__name__}: {exc}); "
                "re-save the model"
            ) from exc
        _restore_weights(
            ep,
            tensors,
            aliases if isinstance(aliases, dict) else {},
            STEP if name == STEP_PROGRAM else "",
        )
        modules[name] = ep.module()
        _drop_guard_module(modules[name])
        if name == STEP_PROGRAM:
            drop_input_checks(modules[name])
    cache_spec = None
    generation = manifest.get("generation")
    if generation is not None:
        try:
            cache_spec = CacheSpec.from_dict(generation.get("cache") or {})
        except Exception as exc:
            raise ArtifactError(f"{mpath}: {exc}; re-save the model") from exc
    inputs = None
    if manifest.get("inputs") is not None:
        try:
            inputs = InputSpec.from_dict(manifest["inputs"])
        except ValueError as exc:
            raise ArtifactError(
                f"{mpath} is corrupt (its input record); re-save the model"
            ) from exc
    loaded = LoadedModel(modules[PROGRAM], manifest, modules.get(STEP_PROGRAM), cache_spec)
    loaded.inputs = inputs
    loaded.root = root
    if EXAMPLES in manifest["files"]:
        loaded.example_args, loaded.example_kwargs = _unpack_inputs(root / EXAMPLES)
    return loaded
