"""Prints what CMakeLists.txt needs to know about the installed torch, one KEY=VALUE per line.

Run by CMake at configure time with the interpreter the wheel is built for (build with
--no-build-isolation so this is the environment that already has torch)."""

import os
import sys

try:
    import torch
except ImportError as exc:  # pragma: no cover - reported by CMake
    sys.exit(f"torch is not importable from {sys.executable}: {exc}")

root = os.path.dirname(torch.__file__)
print(f"TORCH_DIR={root}")
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA={torch.version.cuda or ''}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"SITE_PACKAGES={os.path.dirname(root)}")
