"""The compiled extension ``pysparse._C``, loaded defensively, and what it says of this machine.

Importing this module loads ``pysparse._C`` (which registers ``torch.ops.pysparse.*``). If it is
missing or was built against another torch, the pure-Python parts still import and using an op
raises an error that says how to rebuild (``require_extension``).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch  # the extension has no rpath of its own to torch's libraries: load them first

_log = logging.getLogger(__name__)

_C = None
_C_ERROR: str | None = None

REBUILD_HINT = (
    "Rebuild pysparse against the installed torch from the repository root with: "
    "pip install --no-build-isolation ."
)

try:
    _C = importlib.import_module("pysparse._C")
except ImportError as exc:  # missing, or an ABI/undefined-symbol mismatch with this torch
    _C_ERROR = f"pysparse._C could not be loaded ({exc}). {REBUILD_HINT}"
else:
    _built = _C.build_info()["torch_version"]
    if _built != torch.__version__:
        _C_ERROR = (
            f"pysparse._C was built against torch {_built} but torch {torch.__version__} is "
            f"installed. {REBUILD_HINT}"
        )
        _C = None


def extension_error() -> str | None:
    """Why the compiled extension is unusable, or None when it loaded."""
    return _C_ERROR


def require_extension() -> None:
    """Raises RuntimeError with a rebuild hint when the compiled kernels are not available."""
    if _C_ERROR is not None:
        raise RuntimeError(_C_ERROR)


def _cpu_model() -> str:
    """The CPU's name (``model name`` in /proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def build_info() -> dict:
    """How the extension was built and what this machine offers (CPU features, CUDA, cuSPARSELt)."""
    require_extension()
    info = dict(_C.build_info())
    info["cpu"] = {"model": _cpu_model(), **dict(_C.cpu_info())}
    if info["cuda"] and torch.cuda.is_available():
        info["cusparselt"] = dict(_C.cusparselt_info(torch.cuda.current_device()))
    else:
        info["cusparselt"] = {"available": False, "status": "CUDA unavailable"}
    return info


def pin_threads(nthreads: int | None = None) -> list[int]:
    """Pins the OpenMP team that runs the kernels — the calling thread and torch's pool threads,
    ``nthreads`` in all (default ``torch.get_num_threads()``) — one per CPU of the calling thread's
    affinity mask, and returns the CPU of each. Call it once, from the thread that runs the model,
    in a process dedicated to inference (threads started later by the pinned thread inherit its
    one-CPU mask).

    Why: the 2:4 kernels are compute-bound per thread at decode sizes, so when the scheduler puts
    two team threads on one CPU (``pysparse.ops.kernel_stats()`` reports it as ``one_cpu_calls``)
    they run at half speed, while torch's dense GEMV, close to single-thread memory-bound, hardly
    notices. Pinned threads cannot share a CPU. Measured (bench/decode.py, 6 layers, AMD EPYC, 2
    threads): quiet machine 43.4 ms/token unpinned vs 44.4 pinned; with one busy process on the
    machine 502 ms unpinned (half the regions on one CPU) vs 226 ms pinned (none)."""
    require_extension()
    n = torch.get_num_threads() if nthreads is None else int(nthreads)
    cpus = list(_C.pin_threads(n))
    if not cpus:
        raise RuntimeError(
            f"pin_threads: cannot pin {n} threads to distinct CPUs (this thread may run on "
            f"{len(os.sched_getaffinity(0))}); pass nthreads <= that, or torch.set_num_threads()"
        )
    return cpus
