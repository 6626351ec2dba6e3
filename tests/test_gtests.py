"""Builds the googletests of the torch-free core (tests/cpp) with CMake and runs them; fails when
any gtest fails (naming them) or when none ran. Needs Debian's googletest (libgtest-dev)."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Kept between runs (gitignored) so rebuilding is incremental.
BUILD = ROOT / "build" / "gtests"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def _build(build_dir: Path, extra: list[str]) -> Path:
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed to build the gtests (pip install cmake)"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = _run(
        [
            cmake,
            "-S",
            str(ROOT / "tests" / "cpp"),
            "-B",
            str(build_dir),
            *gen,
            "-DCMAKE_BUILD_TYPE=Release",
            *extra,
        ]
    )
    assert cfg.returncode == 0, f"configuring the gtests failed:\n{cfg.stdout}\n{cfg.stderr}"
    bld = _run([cmake, "--build", str(build_dir), "--parallel", "2"])
    assert bld.returncode == 0, f"building the gtests failed:\n{bld.stdout}\n{bld.stderr}"
    return build_dir / "core_tests"


def _run_gtests(binary: Path, tmp_path: Path, env: dict | None = None) -> None:
    report = tmp_path / "gtest.xml"
    proc = _run([str(binary), f"--gtest_output=xml:{report}"], env=env)
    assert report.exists(), (
        f"gtest wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    root = ET.parse(report).getroot()
    ran = [tc for tc in root.iter("testcase") if tc.get("status", "run") == "run"]
    failed = [
        f"{tc.get('classname')}.{tc.get('name')}" for tc in ran if tc.find("failure") is not None
    ]
    assert ran, "no gtest ran"
    assert not failed, f"failed gtests: {failed}\n{proc.stdout[-4000:]}"
    assert proc.returncode == 0, (
        f"gtest binary exited {proc.returncode}:\n{proc.stdout[-4000:]}{proc.stderr}"
    )


def test_core_gtests(tmp_path):
    _run_gtests(_build(BUILD, []), tmp_path)


def test_core_gtests_under_asan_ubsan(tmp_path):
    """The same gtests with AddressSanitizer + UndefinedBehaviorSanitizer (PYSPARSE_SANITIZE)."""
    binary = _build(
        ROOT / "build" / "gtests-asan", ["-DPYSPARSE_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"]
    )
    env = dict(os.environ)
    # OpenMP's runtime keeps thread pools alive at exit; leak checking would flag those.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    _run_gtests(binary, tmp_path, env)
