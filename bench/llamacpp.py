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

import numpy as np

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def write_float_gguf(src: Path, dst: Path, kind: str) -> Path:
    """An F32 (kind "f32"), F16 ("f16") or Q8_0 ("q8_0", quantised by the ``gguf`` package's own
    quantiser from the dequantised weights) copy of the GGUF ``src`` at ``dst``; kept if present."""
    import gguf

    if dst.exists():
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
        q8 = gguf.GGMLQuantizationType.Q8_0
        if kind == "f16" and data.ndim > 1:
            writer.add_tensor(
                t.name, data.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16
            )
        elif kind == "q8_0" and data.ndim > 1 and data.shape[-1] % 32 == 0:
            writer.add_tensor(t.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


class LlamaCppRunner:
    """generate(ids, n) -> (prefill s, decode tokens/s) on llama.cpp, greedy, batch 1."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )

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
