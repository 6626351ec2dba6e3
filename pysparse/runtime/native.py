"""Compiled graphs run natively: AOTInductor turns a graph into C++ that calls pysparse's kernels
directly, so no Python runs between ops.

Why: a decode step of a 135M decoder is ~1500 small ops (norms, rotary embeddings, views, adds,
cache writes) around the sparse kernels; dispatched one by one from Python they cost more than the
kernels themselves. AOTInductor (``torch._inductor.aoti_compile_and_package``) compiles the whole
exported program, fusing the small ops into generated loops and reaching ``torch.ops.pysparse.*``
through its proxy executor (C entry points instead measured 0.35 us a call less: ~0.04 ms a
SmolLM2 token, not worth exporting the extension's symbols to global scope), with the KV cache
updated in place and batch, prompt and cache length dynamic. Inductor's other route,
``torch.compile`` of the graph, still enters Python for every call and guards its inputs each
step; this one is a shared library and a C++ runner.

The native code is built on the user's machine, the first time a graph is run natively there, and
kept in a cache outside any artifact: ``PYSPARSE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pysparse``
or ``~/.cache/pysparse``), one entry per key made of the graph's code and its tensors' layouts,
the torch and pysparse versions, this CPU's features and the thread count. A package holds code
only: the model's own tensors are handed to it when it is loaded (no second copy of the weights
in memory or on disk). An entry is a package file and a record of its SHA-256; one whose file does
not match its record (damaged, cut short, altered) is rebuilt, never loaded. Artifacts never carry
shared libraries, and ``pysparse.load`` refuses any that does.

``PYSPARSE_NATIVE=0`` turns the native route off (the graph runs op by op, as before).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from pysparse.kernels.extension import build_info
from pysparse.util.files import atomic_path, atomic_write, sha256_file
from pysparse.util.progress import bar
from pysparse.util.version import __version__

_log = logging.getLogger(__name__)

ENV_SWITCH = "PYSPARSE_NATIVE"
ENV_CACHE = "PYSPARSE_CACHE_DIR"
_RECORD_FORMAT = "pysparse-native-entry"
# The package holds code only: the weights stay the model's (handed over at load, not copied)
_CONFIGS = {"aot_inductor.package_constants_in_so": False}


class NativeError(RuntimeError):
    """The native route cannot run this graph here; the message says why (the graph path runs
    instead where a caller falls back)."""


def enabled() -> bool:
    """Whether the native route is on (``PYSPARSE_NATIVE``, default on)."""
    return os.environ.get(ENV_SWITCH, "1").strip() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Where native builds are kept: ``PYSPARSE_CACHE_DIR``, else the user cache directory."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pysparse" / "native"


def _machine() -> dict[str, Any]:
    """What the generated code depends on besides the graph: versions and CPU features."""
    cpu = dict(build_info().get("cpu", {}))
    return {
        "pysparse": __version__,
        "torch": torch.__version__,
        "cpu": cpu,
        "threads": torch.get_num_threads(),
    }


def _program_tensors(program: torch.export.ExportedProgram) -> dict[str, Any]:
    return {**program.state_dict, **program.constants}


def graph_digest(program: torch.export.ExportedProgram) -> str:
    """SHA-256 of what an exported program's native code depends on: its code and the names,
    dtypes, shapes and strides of the tensors it holds. Not their values: the package keeps no
    weights, the model's own tensors are handed to it at load (``_attach``), so one build serves
    every model of one architecture and sparsity layout."""
    h = hashlib.sha256()
    h.update(str(program.graph_module.code).encode())
    h.update(repr(program.call_spec).encode())
    tensors = _program_tensors(program)
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, torch.Tensor):
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.stride()}:{t.device}".encode())
        else:
            h.update(f"{name}:{type(t).__name__}".encode())
    return h.hexdigest()


class Runner:
    """A loaded native package and the tensors it computes with. The package reads them in place
    (user-managed constants), so they are held here for as long as it lives: the program's lifted
    constants belong to no module and would otherwise be freed under it.

    A call whose arguments are tensors and lists of tensors (the decode step: the token, its
    position, the mask, 2 x layers cache tensors) goes straight to the loader with the tensors in
    order: the package's own call parses its input and output specs from JSON and flattens the
    arguments with pytree on every call, ~0.2 ms of a ~4.5 ms SmolLM2 step. The first such call
    checks that order against pytree's; anything else takes the package's call."""

    def __init__(self, package: Any, tensors: dict[str, torch.Tensor]):
        self.package, self.tensors = package, tensors
        self._out_spec: Any = None
        self._direct: bool | None = None  # None: not checked yet

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = None if kwargs or self._direct is False else _tensor_leaves(args)
        if flat is None:
            return self.package(*args, **kwargs)
        if self._direct is None:
            self._direct = self._check_direct(args, flat)
            if not self._direct:
                return self.package(*args)
        return pytree.tree_unflatten(self.package.loader.boxed_run(flat), self._out_spec)

    def _check_direct(self, args: tuple, flat: list[torch.Tensor]) -> bool:
        loader = getattr(self.package, "loader", None)
        if loader is None or not hasattr(loader, "boxed_run"):
            return False
        in_spec, out_spec = (pytree.treespec_loads(s) for s in loader.get_call_spec())
        leaves = pytree.tree_flatten((args, {}))[0]
        same = len(leaves) == len(flat) and all(a is b for a, b in zip(leaves, flat))
        if not same or in_spec != pytree.tree_flatten((args, {}))[1]:
            return False
        self._out_spec = out_spec
        return True


def _tensor_leaves(args: tuple) -> list[torch.Tensor] | None:
    """The tensors of ``args`` in order when each is a tensor or a list/tuple of tensors, else
    None."""
    flat: list[torch.Tensor] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
            flat.extend(a)
        else:
            return None
    return flat


def _attach(package: Any, program: torch.export.ExportedProgram) -> Runner:
    """Hands the program's tensors (the model's own, not copies) to a loaded package."""
    tensors = _program_tensors(program)
    wanted = list(package.get_constant_fqns())
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise NativeError(
            f"the native code wants tensors the graph does not hold ({missing[:3]}...); "
            "AOTInductor folded constants of its own"
        )
    held = {n: tensors[n] for n in wanted}
    package.load_constants(held, check_full_update=True, user_managed=True)
    return Runner(package, held)


def entry_key(digest: str, part: str) -> str:
    record = {"graph": digest, "part": part, **_machine()}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load_entry(package: Path, record_path: Path) -> Any | None:
    """The runner of a cache entry whose package matches its record, else None (a missing,
    damaged or foreign entry is rebuilt, never loaded)."""
    if not package.is_file() or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        ok = (
            record.get("format") == _RECORD_FORMAT
            and record.get("bytes") == package.stat().st_size
            and record.get("sha256") == sha256_file(package)
        )
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        _log.warning("native cache entry %s is damaged or incomplete: rebuilding it", package.name)
        return None
    try:
        return torch._inductor.aoti_load_package(str(package))
    except Exception as exc:  # noqa: BLE001 - a package torch cannot load is rebuilt
        _log.warning("native cache entry %s does not load (%s): rebuilding it", package.name, exc)
        return None


def _compile_with_progress(program: torch.export.ExportedProgram, package: Path, desc: str) -> None:
    """``aoti_compile_and_package`` into ``package`` (atomically), with a bar that shows the
    seconds passing: the compile is one call that reports nothing while it runs."""
    done = threading.Event()
    with bar(total=None, desc=desc, bar_format="{desc}: {elapsed} (compiling)") as pbar:

        def tick() -> None:
            while not done.wait(1.0):
                pbar.update(1)

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            with atomic_path(package) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tmp.unlink()  # the packager writes a new file (and wants the .pt2 suffix)
                out = tmp.with_name(f"{tmp.name}.build.pt2")
                try:
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=str(out), inductor_configs=_CONFIGS
                    )
                    out.replace(tmp)
                finally:
                    out.unlink(missing_ok=True)
        finally:
            done.set()
            ticker.join()


def build(
    make_program: Callable[[], torch.export.ExportedProgram], part: str, desc: str
) -> tuple[Any, float, bool]:
    """The native runner of the program ``make_program()`` returns, from the cache or compiled
    into it: (runner, seconds spent, whether it was compiled now). Raises NativeError."""
    t0 = time.perf_counter()
    try:
        program = make_program()
        digest = graph_digest(program)
    except Exception as exc:
        raise NativeError(
            f"the {part} graph does not export ({type(exc).__name__}: {exc})"
        ) from exc
    root = cache_dir()
    key = entry_key(digest, part)
    package, record_path = root / f"{key}.pt2", root / f"{key}.json"
    runner = _load_entry(package, record_path)
    if runner is not None:
        return _attach(runner, program), time.perf_counter() - t0, False
    _log.info(
        "compiling the %s graph natively (AOTInductor; once per model on this machine, kept in %s)",
        part,
        root,
    )
    try:
        root.mkdir(parents=True, exist_ok=True)
        _compile_with_progress(program, package, desc)
        record = {
            "format": _RECORD_FORMAT,
            "part": part,
            "graph": digest,
            **_machine(),
            "bytes": package.stat().st_size,
            "sha256": sha256_file(package),
        }
        atomic_write(record_path, json.dumps(record, indent=2, default=str).encode())
        runner = _attach(torch._inductor.aoti_load_package(str(package)), program)
    except NativeError:
        raise
    except Exception as exc:  # a compiler missing or failing: the graph path runs
        raise NativeError(
            f"native compile of the {part} graph failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''})"
        ) from exc
    seconds = time.perf_counter() - t0
    _log.info("native %s graph ready in %.1fs", part, seconds)
    return runner, seconds, True


_held_off = threading.local()


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Forward calls in the block run the graph (for calls that only read the model's structure,
    such as saving it, where a native build would be wasted)."""
    before = getattr(_held_off, "on", False)
    _held_off.on = True
    try:
        yield
    finally:
        _held_off.on = before


def wanted(native: bool | None = None) -> bool:
    """Whether a forward call should take the native route: asked for, or by default when the
    switch is on and autograd is not recording (native code computes no gradients: training
    loops, and calls outside ``torch.no_grad()`` / ``torch.inference_mode()``, run the graph)."""
    if native is not None:
        return native
    return enabled() and not torch.is_grad_enabled() and not getattr(_held_off, "on", False)


class _PlainForward(torch.nn.Module):
    """A graph called in its captured layout (inputs already bound, the keyword arguments its
    capture fixed supplied), returning a flat tuple: what the native forward is compiled from
    (model output classes do not pass through a compiled package's output spec)."""

    def __init__(self, graph: torch.nn.Module, call_kwargs: dict[str, Any]):
        super().__init__()
        # (not "graph": the exported program's module has an attribute of that name)
        self.compiled = graph
        self.call_kwargs = dict(call_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _flat_output(self.compiled(*args, **{**self.call_kwargs, **kwargs}))


def _flat_output(out: Any) -> Any:
    if hasattr(out, "to_tuple"):
        return out.to_tuple()
    if isinstance(out, dict):
        return tuple(out.values())
    return out


class NativeForward:
    """A compiled forward graph run natively: built (or read from the cache) on the first call;
    later calls take bound inputs, in the layout the graph was captured with, and give the
    graph's own output type back."""

    def __init__(
        self,
        graph: torch.nn.Module,
        call_kwargs: dict[str, Any],
        example_args: tuple,
        example_kwargs: dict[str, Any],
    ):
        from pysparse.capture.trace import export_module

        plain = _PlainForward(graph, call_kwargs)
        with torch.no_grad():  # the output's structure, to give it back after the native call
            out = graph(*example_args, **{**call_kwargs, **example_kwargs})
        if hasattr(out, "to_tuple") and hasattr(out, "keys"):
            cls, names = type(out), list(out.keys())
            self.rebuild: Callable[[Any], Any] = lambda flat: cls(**dict(zip(names, flat)))
        else:
            self.rebuild = lambda flat: flat
        made: list[torch.export.ExportedProgram] = []

        def make() -> torch.export.ExportedProgram:
            made.append(export_module(plain, example_args, example_kwargs))
            return made[0]

        self.runner, self.seconds, self.compiled = build(make, "forward", "native forward graph")
        self.in_spec, self.layout = _input_layout(made[0])

    def accepts(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether a call's inputs fit what the code was compiled for: the same structure, and
        each tensor of the same dtype, device and rank with its static dims equal (native code
        checks none of it; the graph, which does, runs any other call)."""
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        if spec != self.in_spec or len(leaves) != len(self.layout):
            return False
        for x, want in zip(leaves, self.layout):
            if want is None:
                continue
            if not isinstance(x, torch.Tensor):
                return False
            dtype, device, dims = want
            if x.dtype != dtype or x.device.type != device or x.dim() != len(dims):
                return False
            if any(d is not None and d != n for d, n in zip(dims, x.shape)):
                return False
        return True

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        return self.rebuild(self.runner(*args, **kwargs))


def _input_layout(program: torch.export.ExportedProgram) -> tuple[Any, list]:
    """The program's input structure and, per input, (dtype, device, dims with None where the
    dim is dynamic) for a tensor, None for anything else."""
    user = [
        s.arg.name
        for s in program.graph_signature.input_specs
        if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
    ]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    layout = []
    for name in user:
        v = vals.get(name)
        if isinstance(v, torch.Tensor):
            dims = [d if isinstance(d, int) else None for d in v.shape]
            layout.append((v.dtype, v.device.type, dims))
        else:
            layout.append(None)
    return program.call_spec.in_spec, layout


def forward_of(owner: torch.nn.Module, make: Callable[[], NativeForward]) -> NativeForward | None:
    """``owner``'s native forward, made once by ``make`` and kept on it; None, with one warning,
    where it cannot run here (the graph runs op by op then)."""
    if "_native_forward" not in owner.__dict__:
        try:
            owner.__dict__["_native_forward"] = make()
        except NativeError as exc:
            _log.warning("%s; the forward graph runs op by op instead", exc)
            owner.__dict__["_native_forward"] = None
    return owner.__dict__["_native_forward"]
