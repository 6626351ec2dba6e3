"""Helpers more than one command of the ``pysparse`` CLI uses: loading a model, an artifact's
tokenizer and dense original (and the ``--reference`` flag that names it), reading a text file of
samples, and the closing quality / speed-up summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def load_hf(model: str | None):
    """(model, tokenizer, ModelSource) for a name (minilm, smollm2), a .gguf file or a Hugging
    Face checkpoint folder (pysparse.cli.models)."""
    from pysparse.cli import models

    return models.load(model)


def calibration_text(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; a RuntimeError saying what is wrong."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise RuntimeError(f"calibration file {path} is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot read calibration file {path}: {exc.strerror}") from exc
    lines = [ln for ln in lines if ln]
    if not lines:
        raise RuntimeError(f"calibration file {path} has no text lines")
    return lines


def quality_summary(sm: Any, model: Any, tok: Any) -> tuple[dict, list[dict]]:
    """Ends a compile with what the user needs to trust the artifact: held-out quality against
    the dense original, sparsity, and the speed-up measured here (``pysparse.quality.evaluate``);
    returns the evaluation and the speed rows."""
    from pysparse.quality.corpus import sentences
    from pysparse.quality.evaluate import encode_sentences, evaluate, speedup, summary

    t0 = time.perf_counter()
    print("evaluating on held-out text against the dense original (--no-eval skips) ...")
    result = evaluate(sm, tok, model)
    held = sentences("heldout")
    # one sentence (latency serving: sparse FFN kernels skip the most) and a batch of 8 (the union
    # of neurons firing for any row is what a batched kernel can skip)
    speeds = [speedup(sm, model, encode_sentences(tok, held[:n], n, 64)[0]) for n in (1, 8)]
    print(summary(result, sm.report, speeds))
    print(f"(evaluated in {time.perf_counter() - t0:.1f}s; details: pysparse eval DIR)")
    return result, speeds


def artifact_tokenizer(loaded, directory: str, source: str | None, fix: str):
    """The tokenizer saved with an artifact, else its source model's; an error saying ``fix``."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    if not source:
        raise RuntimeError(f"{directory} has no tokenizer; {fix}")
    from pysparse.cli import models

    return models.load_tokenizer(source)


def load_decoder(directory: str) -> tuple[Any, Any]:
    """(the loaded artifact, its tokenizer) for the commands that generate from a compiled
    decoder (generate, serve); a RuntimeError saying what to do when it holds no step graph."""
    from pysparse.artifacts.store import load

    loaded = load(directory)
    if not loaded.can_generate:
        raise RuntimeError(
            f"{directory} holds no generation step graph (it is not a decoder, or its capture "
            "failed at compile time; see that log); recompile a *ForCausalLM model"
        )
    source = loaded.manifest.get("model", {}).get("source")
    return loaded, artifact_tokenizer(loaded, directory, source, "recompile it with its tokenizer")


def add_native_argument(p: Any) -> None:
    """``--no-native`` (``args.native``), for the commands that run a step graph."""
    p.add_argument(
        "--no-native",
        dest="native",
        action="store_false",
        help="run the step graph op by op instead of as native code (by default it is compiled "
        "natively the first time on this machine, then taken from the cache)",
    )


def reference_of(
    loaded: Any, directory: str, reference: str | None, fix: str, with_model: bool = True
) -> tuple[Any, Any]:
    """(tokenizer, dense original or None) for evaluating an artifact: ``reference`` (a MODEL as
    for compile) or the source recorded at compile time; ``fix`` ends the no-tokenizer error."""
    source = reference or loaded.manifest.get("model", {}).get("source")
    tok = artifact_tokenizer(loaded, directory, source, fix)
    if not source or not with_model:
        return tok, None
    try:
        model, _, _ = load_hf(source)
    except RuntimeError as exc:
        raise RuntimeError(
            f"the dense original cannot be loaded any more ({exc}); pass --reference MODEL "
            "(pysparse eval: or --no-reference)"
        ) from exc
    return tok, model


def add_reference_argument(p: Any) -> None:
    """``--reference MODEL``: the dense original to compare an artifact with (eval, report)."""
    p.add_argument(
        "--reference",
        default=None,
        help="dense original, a MODEL as for compile (default: the compiled one)",
    )
