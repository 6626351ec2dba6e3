"""``pysparse report DIR``: measure an artifact's quality and speed-up on this machine again and
rewrite DIR/report.html (every artifact has report.html, report.md, report.json)."""

from __future__ import annotations

import argparse

from pysparse.cli.common import add_reference_argument, quality_summary, reference_of


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="measure an artifact's quality and speed here and rewrite its report"
    )
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    add_reference_argument(p)
    p.add_argument(
        "--no-eval", action="store_true", help="re-render report.html/.md from report.json only"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measures the artifact's held-out quality and speed-up on this machine again and rewrites
    its report (report.html / report.md / report.json)."""
    from pysparse.artifacts import report
    from pysparse.artifacts.store import load

    data = report.read(args.dir)
    if not args.no_eval:
        loaded = load(args.dir)
        tok, reference = reference_of(loaded, args.dir, args.reference, "pass --reference MODEL")
        if reference is None:
            raise RuntimeError(
                f"{args.dir} does not record its dense original; pass --reference MODEL (or "
                "--no-eval to re-render the report as it is)"
            )
        result, speeds = quality_summary(loaded, reference, tok)
        report.add_evaluation(data, result, speeds)
    print(f"report: {report.rewrite(args.dir, data)}")
    return 0
