"""The ``pysparse`` command line.

    pysparse info            how the extension was built and what this machine offers
    pysparse compile [MODEL] [--passes relu,wanda,compress24,lower] [--out DIR]
                             compile MODEL — minilm (default, all-MiniLM-L6-v2) or smollm2
                             (SmolLM2-135M-Instruct, a LLaMA decoder), both embedded; or a Hugging
                             Face checkpoint folder or .gguf file — with calibration text (--calib FILE, default: the
                             training part of pysparse.quality.corpus) and save the artifact;
                             --set PASS.KEY=VALUE sets a pass's argument
    pysparse export DIR --format pt2|torchscript|onnx|hf [--out FILE] [--part forward|step]
    pysparse generate DIR "PROMPT" [--max-new-tokens N] [--chat]
                             stream a compiled decoder's continuation (KV cache on the sparse
                             kernels), then prefill and decode tokens/s
    pysparse serve DIR [--port 8000] [--max-batch 8] [--api-key KEY]
                             an OpenAI-compatible server (completions, chat, streaming, /metrics)
                             with continuous batching on the sparse kernels
    pysparse report DIR      measure quality and speed-up here again and rewrite DIR/report.html
                             (every artifact has report.html, report.md, report.json)
    pysparse eval DIR        held-out quality vs the dense original (encoders: embedding cosine
                             and Spearman of pairwise similarities; decoders: perplexity) and
                             FFN activation sparsity
    pysparse demo            compress a 2:4 weight and run the sparse kernels against torch dense,
                             then compile the embedded all-MiniLM-L6-v2 (wanda, compress24, lower)

Long work (calibration, SparseGPT layers, training) shows progress bars on a terminal
(PYSPARSE_PROGRESS=1 forces them, 0 hides them).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pysparse.cli import compile as compile_command
from pysparse.cli import demo, export, generate, info, report, serve
from pysparse.cli import eval as eval_command

# the subcommands in the order --help lists them; each adds its parser and runs its args
COMMANDS = (info, demo, compile_command, export, eval_command, report, generate, serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``pysparse`` parser: ``-v`` and one subparser per command (its ``func`` runs it)."""
    parser = argparse.ArgumentParser(
        prog="pysparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except RuntimeError as exc:
        print(f"pysparse: error: {exc}", file=sys.stderr)
        return 2
