"""``pysparse export DIR --format pt2|torchscript|onnx|hf|compressed-tensors [--out FILE]
[--part forward|step]``:
write a saved artifact in a format other tools load."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pysparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a saved artifact")
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    p.add_argument(
        "--format",
        choices=["pt2", "torchscript", "onnx", "hf", "compressed-tensors"],
        default="pt2",
        help="hf: a Hugging Face folder transformers loads without pysparse (dense weights, 2:4 "
        "layers masked; see pysparse.artifacts.hf); compressed-tensors: the same with the int8 / "
        "int4 weights quantized as vLLM and llm-compressor read them (pysparse.artifacts.compressed)",
    )
    p.add_argument(
        "--out", default=None, help="output file (default: DIR/model.pt2|.ts|.onnx, DIR/hf)"
    )
    p.add_argument(
        "--part",
        choices=["forward", "step"],
        default="forward",
        help="step: a decoder's generation step with its KV cache (pt2 only; DIR/model-step.pt2)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pysparse.artifacts.store import load

    loaded = load(args.dir)
    out = _output_path(args)
    t0 = time.perf_counter()
    try:
        pysparse.export(loaded, out, format=args.format, part=args.part)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc
    size = (
        sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        if out.is_dir()
        else out.stat().st_size / 1e6
    )
    print(
        f"exported {args.dir} -> {out} ({args.format}, {size:.1f} MB, {time.perf_counter() - t0:.1f}s)"
    )
    return 0


def _output_path(args: argparse.Namespace) -> Path:
    """``--out``, else DIR/hf or DIR/model[-step].pt2|.ts|.onnx by format and part."""
    if args.format in ("hf", "compressed-tensors"):
        return Path(args.out) if args.out else Path(args.dir) / args.format
    suffix = {"pt2": ".pt2", "torchscript": ".ts", "onnx": ".onnx"}[args.format]
    stem = "model" if args.part == "forward" else "model-step"
    return Path(args.out) if args.out else Path(args.dir) / f"{stem}{suffix}"
