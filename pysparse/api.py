"""``pysparse.compile``: model -> captured graph -> passes -> ``SparseModel``.

The one place where capture (pysparse.capture), the pass machinery (pysparse.compiler), the passes
(pysparse.passes) and the runtime (pysparse.runtime) meet.

May import: runtime, passes, quality, compiler, capture, kernels, util.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pysparse.capture.inputs import split_example
from pysparse.capture.trace import trace
from pysparse.compiler.base import Pass, PassContext, PassError
from pysparse.compiler.manager import PassManager
from pysparse.passes import PASS_REGISTRY
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import encode_sentences
from pysparse.runtime.generate import GenerationError, capture_step
from pysparse.runtime.model import SparseModel

_log = logging.getLogger(__name__)


def resolve_passes(passes: Sequence[Pass | str]) -> list[Pass]:
    out = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            factory: Callable[[], Pass] | None = PASS_REGISTRY.get(p)
            if factory is None:
                raise PassError(f"unknown pass '{p}'; known passes: {sorted(PASS_REGISTRY)}")
            out.append(factory())
        else:
            raise PassError(f"a pass must be a Pass or a name, got {type(p).__name__}")
    return out


def compile(
    model: torch.nn.Module,
    passes: Sequence[Pass | str] = ("relu", "magnitude", "compress24", "lower"),
    example_inputs: tuple | torch.Tensor | Mapping | None = None,
    example_kwargs: dict | None = None,
    *,
    calibration: list[tuple[tuple, dict]] | None = None,
    copy_model: bool = True,
    check_numerics: bool = True,
    generation: bool | None = None,
    max_cache_len: int | None = None,
    tokenizer: Any = None,
) -> SparseModel:
    """Captures ``model``, runs ``passes`` (objects or names) and returns a runnable SparseModel.

    Args:
        model: any nn.Module (Hugging Face models included).
        passes: pass objects or names ("relu", "magnitude", "wanda", "compress24", "lower").
        example_inputs / example_kwargs: inputs for capture and numeric spot checks: a tensor,
            a tuple, or a mapping of keyword inputs (``tokenizer(texts, return_tensors="pt")``).
            The compiled model is then called like the original (``pysparse.capture.inputs``).
        calibration: batches ``[(args, kwargs), ...]`` for data-driven passes (Wanda); default the
            example inputs.
        copy_model: capture a deep copy so the caller's weights are never modified.
        check_numerics: after passes that must not change outputs, compare against the graph
            before the pass and fail loudly if they differ.
        generation: also capture the generation step graph (KV cache, see pysparse.runtime.generate) and
            transform it with the same passes. None (default): for models that can generate
            (Hugging Face decoders), with a warning when the capture fails; True: fail instead;
            False: never.
        max_cache_len: the default KV-cache limit of ``generate`` (prompt + new tokens); default
            the model's ``max_position_embeddings``.
        tokenizer: the model's (Hugging Face) tokenizer: without ``calibration``, data passes
            calibrate and train on ``pysparse.quality.corpus``'s training text (256 lines, the CLI's
            default), and the example inputs default to its first batch; ``pysparse.save`` stores
            it with the artifact.
    """
    pass_objs = resolve_passes(passes)
    manager = PassManager(pass_objs)  # validates the order before any expensive work
    if tokenizer is not None and calibration is None:
        calibration = encode_sentences(tokenizer, sentences("train", 256), 8, 64)
    if example_inputs is None and example_kwargs is None and calibration:
        example_inputs, example_kwargs = calibration[0]
    if copy_model:
        model = copy.deepcopy(model)
    args, kwargs = split_example(example_inputs, example_kwargs)
    gm = trace(model, args, kwargs)
    step = None
    if generation or (generation is None and _is_decoder(model)):
        t0 = time.perf_counter()
        try:
            step = capture_step(model, max_cache_len)
            _log.info("captured the generation step graph in %.1fs", time.perf_counter() - t0)
        except GenerationError as exc:
            if generation:
                raise
            _log.warning("%s; the compiled model will not generate", exc)
    ctx = PassContext(
        example_args=args,
        example_kwargs=kwargs,
        calibration=list(calibration or []),
        check_numerics=check_numerics,
    )
    gm = manager.run(gm, ctx, mirrors=[step] if step is not None else [])
    sm = SparseModel(gm, manager.report, args, kwargs, step=step)
    if tokenizer is not None:
        sm.tokenizer = tokenizer
    return sm


def _is_decoder(model: torch.nn.Module) -> bool:
    """Hugging Face models that generate text (``*ForCausalLM`` and the like)."""
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a model's own check failing means "no"
        return False
