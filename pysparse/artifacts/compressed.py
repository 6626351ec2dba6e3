"""``compressed-tensors`` export: a compiled model with int8 / int4 weights as the checkpoint
format vLLM and llm-compressor read (``pysparse export DIR --format compressed-tensors``).

The folder is the Hugging Face export (``pysparse.artifacts.hf``: config, tokenizer, dense
weights) with every linear the quantize pass quantized stored quantized instead:
  * int4 (``Quantize(bits=4)``): ``pack-quantized``: ``weight_packed`` int32 (8 values a word,
    value i of a row at bits 4 * (i % 8) of word i // 8, as value + 8), ``weight_scale``
    float32 ``[out, in / group_size]``, ``weight_shape``; strategy ``group``, symmetric. A 2:4
    weight's groups of ``group`` kept values are ``2 * group`` columns: its ``group_size``.
  * int8 (``Quantize()``): ``int-quantized``: ``weight`` int8 and ``weight_scale`` float32
    ``[out, 1]``; strategy ``channel``, symmetric.
The scales are pysparse's (float16 values held exactly in float32), so the dequantised weights
are bit for bit the ones pysparse computes with. ``quantization_config`` in ``config.json`` has
one config group per (bits, group size), targeting the modules by name; the lm_head stays dense
(``ignore``: on SmolLM2 it is tied to the embeddings, which compressed-tensors does not
quantize). 2:4 weights keep their zeros in place and are listed under ``pysparse_sparsity`` in
``config.json``: compressed-tensors >= 0.15 dropped its 2:4 bitmask compressor and loads no
``sparsity_config``, so there is no 2:4 container left for it to read.

Loads with ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` (the ``compressed-tensors``
package installed), which decompresses the weights; tested against pysparse's logits.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from pysparse.kernels.formats import (
    decompress24_int4,
    decompress24_int8,
    unpack_down24,
    unpack_int4,
)

FORMAT = "compressed-tensors"
_log = logging.getLogger(__name__)


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """int4 values ``[N, K]`` (int8 in [-8, 7]) packed 8 to an int32, value i of a row at bits
    4 * (i % 8) of word i // 8, stored as value + 8 (compressed-tensors' pack-quantized layout):
    ``[N, ceil(K / 8)]``."""
    N, K = q.shape
    u = torch.nn.functional.pad(q.to(torch.int64) + 8, (0, (-K) % 8)).reshape(N, -1, 8)
    words = (u << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def _quantized(tensors: dict, layouts: dict) -> dict[str, dict[str, Any]]:
    """Module name -> {bits, q (int8 [N, K]), scale (float32 [N, G] or [N, 1]), group_size,
    sparse24} for every quantized weight of the compiled model."""
    out = {}
    for name, rec in layouts.items():
        layout = rec.get("layout", "")
        if not layout.startswith(("int8", "int4")) or not name.endswith(".weight"):
            continue
        r0, r1 = rec.get("rows") or (None, None)
        scale = tensors[rec["scale"]][r0:r1].to(torch.float32)

        def part(key: str, rec=rec, r0=r0, r1=r1) -> torch.Tensor:
            return tensors[rec[key]][r0:r1]

        if layout == "int8":
            q, sparse24 = part("tensor"), False
        elif layout == "int8_rows":
            q, sparse24 = decompress24_int8(part("values"), part("meta")), True
        elif layout == "int8_down24":
            q, sparse24 = decompress24_int8(*unpack_down24(part("values"), part("meta"))), True
        elif layout == "int4":
            q, sparse24 = unpack_int4(part("tensor"), int(rec["in_features"])), False
        else:  # int4_rows
            K = int(rec["in_features"])
            q, sparse24 = decompress24_int4(part("values"), part("meta"), K), True
        bits = 8 if layout.startswith("int8") else 4
        # "int4" records the column group; "int4_rows" the group of kept values (2x columns)
        group = None if bits == 8 else int(rec["group"]) * (2 if layout == "int4_rows" else 1)
        out[name[: -len(".weight")]] = {
            "bits": bits,
            "q": q.contiguous(),
            "scale": scale.reshape(scale.shape[0], -1) if bits == 4 else scale.reshape(-1, 1),
            "group_size": group,
            "sparse24": sparse24,
        }
    return out


def _config_groups(quant: dict[str, dict]) -> dict[str, Any]:
    groups: dict[tuple, list[str]] = {}
    for module, d in sorted(quant.items()):
        groups.setdefault((d["bits"], d["group_size"]), []).append(module)
    out = {}
    for i, ((bits, group), modules) in enumerate(sorted(groups.items(), key=str)):
        out[f"group_{i}"] = {
            "targets": modules,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": True,
                "strategy": "group" if bits == 4 else "channel",
                "group_size": group,
                "dynamic": False,
                "observer": "minmax",
            },
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized" if bits == 4 else "int-quantized",
        }
    return out


def export_compressed_tensors(model: Any, directory: str | os.PathLike) -> Path:
    """Writes ``model`` (from ``pysparse.compile`` or ``pysparse.load``, with quantized weights)
    as a compressed-tensors checkpoint folder (see the module docstring); returns its path."""
    from safetensors.torch import load_file, save_file

    from pysparse.artifacts.hf import _dense_hf, _write_folder

    hf, tokenizer, tensors, layouts = _dense_hf(model)
    quant = {m: d for m, d in _quantized(tensors, layouts).items() if m != "lm_head"}
    # compressed-tensors' group strategy needs in_features a multiple of the group (pysparse's
    # kernels take a partial last group): such a linear is written dense (dequantised) instead
    dense = sorted(
        m for m, d in quant.items() if d["group_size"] and d["q"].shape[1] % d["group_size"]
    )
    if dense:
        _log.warning(
            "export: %d linear(s) have in_features not a multiple of their int4 group, which "
            "compressed-tensors cannot hold; written dense (dequantised): %s",
            len(dense),
            ", ".join(dense[:4]) + (" ..." if len(dense) > 4 else ""),
        )
    quant = {m: d for m, d in quant.items() if m not in dense}
    if not quant:
        raise ValueError(
            "export: the model has no quantized linears (run the quantize pass: --recipe int8 / "
            "int4, or Quantize() in the passes); for dense or 2:4 weights use --format hf"
        )
    for module in quant:
        if not isinstance(hf.get_submodule(module), torch.nn.Linear):  # (ValueError: the CLI's)
            raise ValueError(  # noqa: TRY004
                f"export: {module} is not a linear layer of {type(hf).__name__}"
            )

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files = sorted(tmp.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"export: expected one safetensors file, got {len(files)}")
        state = load_file(str(files[0]))
        for module, d in quant.items():
            del state[module + ".weight"]
            if d["bits"] == 4:
                state[module + ".weight_packed"] = pack_int32(d["q"])
                state[module + ".weight_shape"] = torch.tensor(list(d["q"].shape))
            else:
                state[module + ".weight"] = d["q"].to(torch.int8)
            state[module + ".weight_scale"] = d["scale"].contiguous()
        save_file(state, str(files[0]), metadata={"format": "pt"})
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        formats = {g["format"] for g in _config_groups(quant).values()}
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": _config_groups(quant),
            "ignore": ["lm_head", *dense],
            "kv_cache_scheme": None,
            "sparsity_config": {},
        }
        sparse = sorted(m for m, d in quant.items() if d["sparse24"])
        if sparse:
            cfg["pysparse_sparsity"] = {
                "structure": "2:4",
                "along": "in_features",
                "modules": sparse,
            }
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))

    return _write_folder(directory, write)
