"""The extension is built, loaded and describes itself honestly; the wheel layout is right."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from testutil import KERNEL_FLAGS, cpu_has

import pysparse


def test_extension_loaded_and_ops_registered():
    assert pysparse.extension_error() is None
    for name in ("compress24", "decompress24", "prune24", "sparse24_linear"):
        assert hasattr(torch.ops.pysparse, name)


def test_passes_subpackage_ships_with_the_wheel():
    import pysparse.passes

    assert Path(pysparse.passes.__file__).parent.parent == Path(pysparse.__file__).parent


def test_build_info_reports_cpu_and_cuda():
    info = pysparse.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cpu"]["linear_impl"] in ("avx512", "avx2", "scalar")
    if not torch.cuda.is_available():
        assert info["cusparselt"]["available"] is False


@pytest.mark.skipif(
    any(os.environ.get(f"PYSPARSE_DISABLE_{k}") for k in ("AVX2", "AVX512", "AMX")),
    reason="a PYSPARSE_DISABLE_* switch is set in this environment",
)
def test_the_kernels_dispatched_are_the_best_this_cpu_runs():
    """The kernel chosen at run time is the one the CPU's own flags (/proc/cpuinfo, not
    pysparse's detection) call for: a build or a detection bug that falls back to a slower path
    fails here instead of silently costing speed."""
    cpu = pysparse.build_info()["cpu"]
    if cpu_has(*KERNEL_FLAGS["avx512"]):
        want = "avx512"
    elif cpu_has(*KERNEL_FLAGS["avx2"]):
        want = "avx2"
    else:
        want = "scalar"
    assert cpu["linear_impl"] == want
    assert cpu["ffn_impl"] == ("scalar" if want == "scalar" else "avx2")
    assert cpu["bf16_amx"] == cpu_has(*KERNEL_FLAGS["amx"]), (
        "AMX-BF16 tiles: /proc/cpuinfo and pysparse disagree (a stubbed AMX build, or the OS "
        "refused the tile state)"
    )


@pytest.mark.skipif(
    not (torch.version.cuda and shutil.which("nvcc")),
    reason="CUDA kernels are only built when torch is a CUDA build and nvcc is installed",
)
def test_cuda_kernels_built_and_cusparselt_linked():
    info = pysparse.build_info()
    assert info["cuda"], "torch has CUDA and nvcc exists, so the CUDA kernels must have been built"
    so = Path(pysparse._C.__file__)
    ldd = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout
    assert "libcusparseLt.so" in ldd, ldd
    assert "not found" not in ldd, ldd


def test_cusparselt_without_gpu_reports_instead_of_aborting():
    if not pysparse.build_info()["cuda"]:
        pytest.skip("built without CUDA")
    info = pysparse._C.cusparselt_info(0)
    if not torch.cuda.is_available():
        assert info["available"] is False and info["status"]


def test_missing_extension_gives_rebuild_hint(tmp_path):
    # A fresh interpreter in which pysparse._C cannot be imported: pure Python still imports, and
    # using an op says how to rebuild.
    code = (
        "import sys; sys.modules['pysparse._C'] = None\n"
        "import torch, pysparse\n"
        "assert pysparse.extension_error() is not None\n"
        "try:\n"
        "    pysparse.ops.prune24(torch.zeros(4, 4))\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    # from outside the repository: the installed package, not the source folder (which has no _C)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation" in out.stdout
