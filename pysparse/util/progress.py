"""Progress bars for long work (calibration sweeps, SparseGPT layers, training, saving).

One switch for the whole library: bars go to stderr when it is a terminal; ``PYSPARSE_PROGRESS=1``
forces them on (e.g. in a log file), ``PYSPARSE_PROGRESS=0`` turns them off; under torchrun only
rank 0 draws them. Built on tqdm.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 draws bars
        return False
    flag = os.environ.get("PYSPARSE_PROGRESS", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "it", **kw: Any) -> tqdm:
    """A tqdm bar (a no-op one when progress is off) to update by hand."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled(),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        **kw,
    )


def track(
    items: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterates ``items`` with a bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total=total, desc=desc, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)
