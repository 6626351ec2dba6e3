"""``pysparse info``: how the extension was built and what this machine offers, as JSON."""

from __future__ import annotations

import argparse
import json

import pysparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="build and machine information as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(pysparse.build_info(), indent=2))
    return 0
