"""``pysparse eval DIR``: held-out quality vs the dense original (encoders: embedding cosine and
Spearman of pairwise similarities; decoders: perplexity) and FFN activation sparsity."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pysparse.cli.common import add_reference_argument, calibration_text, reference_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a saved artifact against its dense original")
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    add_reference_argument(p)
    p.add_argument("--no-reference", action="store_true", help="decoders: perplexity only")
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text, one sample per line (default: the held-out part of pysparse.quality.corpus)",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pysparse.artifacts.store import load
    from pysparse.quality.evaluate import evaluate, format_table

    loaded = load(args.dir)
    tok, reference = reference_of(
        loaded, args.dir, args.reference, "pass --reference MODEL_DIR", not args.no_reference
    )
    texts = calibration_text(args.text) if args.text else None
    t0 = time.perf_counter()
    result = evaluate(loaded, tok, reference, texts, max_length=args.max_length)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
