"""Text that ships with Python, for calibration, learning passes and held-out evaluation, so that
nothing is downloaded: the English prose of the Python reference documentation that CPython
installs as ``pydoc_data.topics`` (about 80 topics, 450 kB). Code samples and grammar blocks
(indented lines) are dropped, the prose is split into sentences, and topics are split between a
training part and a held-out part by a fixed rule (every fourth topic in sorted order is held out, and a sentence
that also occurs in a held-out topic is dropped from training),
so the two never share a sentence or even a topic.

    sentences("train")    ~1,000 sentences for calibration and training
    sentences("heldout")  ~200 sentences from other topics, for evaluation only
    documents("train")    the training topics whole (prose, code samples and grammar as the
                          documentation has them, ~95k SmolLM2 tokens), for learning passes that
                          train on packed blocks of text (``pysparse.quality.evaluate.pack_text``)
"""

from __future__ import annotations

import re
from functools import cache

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


@cache
def _split() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    parts: dict[str, list[str]] = {"train": [], "heldout": []}
    for i, key in enumerate(sorted(topics)):
        prose: list[str] = []
        paragraph: list[str] = []
        for line in topics[key].splitlines() + [""]:
            if line.strip() and not line.startswith((" ", "\t", "*", "=", "-")):
                paragraph.append(line.strip())
            elif paragraph:
                prose.append(" ".join(paragraph))
                paragraph = []
        part = "heldout" if i % 4 == 3 else "train"
        for text in prose:
            for s in _SENTENCE_END.split(text):
                s = s.strip()
                letters = sum(c.isalpha() or c == " " for c in s)
                if 40 <= len(s) <= 300 and letters >= 0.85 * len(s):
                    parts[part].append(s)
    held = tuple(dict.fromkeys(parts["heldout"]))  # de-duplicated, in order
    seen = set(held)
    train = tuple(s for s in dict.fromkeys(parts["train"]) if s not in seen)
    return {"train": train, "heldout": held}


def sentences(split: str = "train", limit: int | None = None) -> list[str]:
    """Sentences of ``split`` ("train" or "heldout"), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"corpus split must be 'train' or 'heldout', got {split!r}")
    out = list(_split()[split])
    return out if limit is None else out[:limit]


@cache
def _documents() -> dict[str, tuple[str, ...]]:
    from pydoc_data.topics import topics

    held = set(_split()["heldout"])
    docs: dict[str, list[str]] = {"train": [], "heldout": []}
    for i, key in enumerate(sorted(topics)):
        part = "heldout" if i % 4 == 3 else "train"
        paragraphs = topics[key].split("\n\n")
        if part == "train":  # a paragraph that holds a held-out sentence stays out of training
            paragraphs = [p for p in paragraphs if not any(s in " ".join(p.split()) for s in held)]
        text = "\n\n".join(p.strip("\n") for p in paragraphs if p.strip())
        if text:
            docs[part].append(text)
    return {k: tuple(v) for k, v in docs.items()}


def documents(split: str = "train") -> list[str]:
    """The topics of ``split`` whole, one string per topic, in a fixed order (the same topic split
    as ``sentences``; a training paragraph holding a held-out sentence is dropped)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"corpus split must be 'train' or 'heldout', got {split!r}")
    return list(_documents()[split])
