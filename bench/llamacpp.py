"""llama.cpp on the same weights, for bench/generate.py's reference rows (printed, not a target).

The embedded SmolLM2 ships as a Q4_1 GGUF; pysparse runs it dequantised to fp32/bf16. For a fair
row llama.cpp gets the same weights in float: ``write_float_gguf`` dequantises every tensor with
the ``gguf`` package and writes an F32 or F16 GGUF (1-D tensors, the norms, stay F32 as llama.cpp's
own converter keeps them), metadata copied with the file type changed.

llama.cpp comes from ``llama-cpp-python`` (PyPI, built from source; not a project dependency):

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=OFF" pip install llama-cpp-python

Timing matches the other rows: batch 1, greedy, a streamer-like stamp per token: decode tokens/s =
(new tokens - 1) / (last stamp - first new token's stamp); prefill = time to the first new token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

# LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q4_0 / MOSTLY_Q8_0
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def write_float_gguf(src: Path, dst: Path, kind: str) -> Path:
    """An F32 (kind "f32"), F16 ("f16"), Q8_0 ("q8_0") or Q4_0 ("q4_0") copy of the GGUF ``src``
    at ``dst`` (quantised by the ``gguf`` package's own quantiser from the dequantised weights;
    1-D tensors stay F32); kept if present. "q4_k_m": llama.cpp's own quantiser (through
    llama-cpp-python) from the F32 copy, its mixes and fallbacks as a user's ``llama-quantize``
    makes them (the ``gguf`` package has no K-quant quantiser)."""
    import gguf

    if dst.exists():
        return dst
    if kind == "q4_k_m":
        import ctypes

        import llama_cpp

        f32 = write_float_gguf(src, dst.with_name(dst.name.replace("Q4_K_M", "F32")), "f32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        tmp = dst.with_suffix(".partial")
        rc = llama_cpp.llama_model_quantize(
            str(f32).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if rc != 0:
            raise RuntimeError(f"llama.cpp's quantiser failed ({rc}) making {dst}")
        tmp.rename(dst)
        return dst
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = FILE_TYPES[kind] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        kind0 = field.types[0]
        sub = field.types[-1] if kind0 == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind0, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        quant = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
        if kind == "f16" and data.ndim > 1:
            writer.add_tensor(
                t.name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16
            )
        elif kind in quant and data.ndim > 1 and data.shape[-1] % 32 == 0:
            writer.add_tensor(
                t.name, gguf.quants.quantize(data, quant[kind]), raw_dtype=quant[kind]
            )
        else:
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def _llama(path: Path, threads: int, n_ctx: int, **kwargs: Any) -> Any:
    """A llama_cpp.Llama on ``threads`` threads (decode and batch), quiet."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        **kwargs,
    )


class LlamaCppRunner:
    """generate(ids, n) -> (prefill s, decode tokens/s) on llama.cpp, greedy, batch 1."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        self.llm = _llama(path, threads, n_ctx, n_batch=512)

    def __call__(self, ids, n: int) -> tuple[float, float]:
        self.llm.reset()
        stamps = []
        t0 = time.perf_counter()
        for i, _tok in enumerate(
            self.llm.generate([int(t) for t in ids[0]], temp=0.0, top_k=1, reset=True)
        ):
            stamps.append(time.perf_counter())
            if i + 1 >= n:
                break
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return stamps[0] - t0, decode


class LlamaCppLM:
    """A GGUF on llama.cpp called like a causal LM for ``pysparse.quality.evaluate.perplexity``:
    ``lm(ids [1, T])`` evaluates the window from an empty cache and returns its logits [1, T, V]
    (llama.cpp's own, with ``logits_all``), so its perplexity is scored on exactly the windows
    and targets of every pysparse row."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        self.llm = _llama(path, threads, n_ctx, n_batch=n_ctx, logits_all=True)

    def forward(self, ids):
        import torch

        tokens = [int(t) for t in ids[0]]
        self.llm.reset()
        self.llm.eval(tokens)
        scores = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float32)
        return (torch.from_numpy(scores.copy()).unsqueeze(0),)

    __call__ = forward
