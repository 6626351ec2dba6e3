"""Hugging Face interop: a compiled model as a standard ``transformers`` folder.

``export_hf(model, directory)`` (CLI: ``pysparse export DIR --format hf``) writes what
``transformers`` loads and runs without pysparse:
  * ``model.safetensors`` every weight of the source model's class, dense: the 2:4 layers as
    masked dense weights (their zeros in place), read back from the packed tensors
    (``pysparse.kernels.formats.dense_weight``); the kernels' own tensors are not written,
  * ``config.json`` the source model's config with ``hidden_act`` set to ``"relu"`` when a ReLU
    or FATReLU pass replaced the FFN activation, and ``pysparse_fatrelu_threshold``: the FATReLU
    threshold ``t`` (0.0 for plain ReLU; absent when the activation is the original),
  * the tokenizer's files, when the model has one.
Loader note: transformers knows no FATReLU, so with ``t > 0`` it runs plain ReLU and its outputs
differ from pysparse's (slightly: only activations in (0, t) differ, and they are small). To run
the same function, set the activation after loading:

    t = model.config.pysparse_fatrelu_threshold
    for m in model.modules():
        if hasattr(m, "act_fn"):                # LLaMA-family MLPs
            m.act_fn = torch.nn.Threshold(t, 0.0)
        if hasattr(m, "intermediate_act_fn"):   # BERT-family
            m.intermediate_act_fn = torch.nn.Threshold(t, 0.0)

(``Threshold`` zeroes x <= t, FATReLU x < t: they differ only where x equals t exactly.)

The model class is the source model's (recorded at compile time); only classes of the
``transformers`` package are built. The folder is written to a temporary name and renamed into
place.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pysparse.kernels.formats import dense_weight

_log = logging.getLogger(__name__)

THRESHOLD_FIELD = "pysparse_fatrelu_threshold"


def fatrelu_threshold(report: list[dict[str, Any]]) -> float | None:
    """The FFN activation the passes left: None (the original), 0.0 (ReLU) or the FATReLU
    threshold, from the pass reports (``relu``'s setting, then ProSparse's chosen threshold)."""
    t: float | None = None
    for e in report:
        if e.get("pass") == "relu":
            t = float((e.get("settings") or {}).get("threshold") or 0.0)
        elif e.get("pass") == "prosparse" and isinstance(e.get("threshold"), (int, float)):
            t = float(e["threshold"])
    return t


def _source(model: Any) -> tuple[dict[str, torch.Tensor], dict, dict, list, Any]:
    """(tensors by graph name, weight layouts, model record, pass report, tokenizer) of a compiled
    model or a loaded artifact."""
    gm = getattr(model, "gm", None)
    if gm is not None:  # pysparse.compile's result
        meta = gm.meta.get("pysparse", {})
        tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
        return (
            tensors,
            meta.get("weight_layouts", {}),
            meta.get("model", {}),
            list(model.report),
            getattr(model, "tokenizer", None),
        )
    root = getattr(model, "root", None)
    manifest = getattr(model, "manifest", None)
    if root is None or manifest is None:
        raise TypeError(
            f"export_hf: expected a model from pysparse.compile or pysparse.load, got "
            f"{type(model).__name__}"
        )
    from safetensors.torch import load_file

    from pysparse.artifacts.layout import WEIGHTS

    stored = load_file(str(Path(root) / WEIGHTS))
    aliases = (manifest.get("weights") or {}).get("aliases") or {}
    tensors = {}
    for key in [*stored, *aliases]:
        kind, _, name = key.partition(":")
        if kind not in ("state", "const") or not name.startswith("compiled."):
            continue  # the step graph's entries, or another wrapper
        tensors[name[len("compiled.") :]] = stored[aliases.get(key, key)]
    return (
        tensors,
        manifest.get("weight_layouts") or {},
        manifest.get("model") or {},
        list(manifest.get("passes") or []),
        model.tokenizer,
    )


def _model_class(record: dict[str, Any]) -> type:
    path = record.get("class") or ""
    module, _, name = path.rpartition(".")
    if not module.startswith("transformers.") or not record.get("config"):
        raise ValueError(
            f"export_hf: the source model ({path or 'unknown class'}) is not a Hugging Face "
            "transformers model with a config; export it as pt2, torchscript or onnx instead"
        )
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"export_hf: transformers here has no {path} ({exc}); install the transformers "
            "version the model was compiled with"
        ) from exc


def _dense_hf(model: Any) -> tuple[torch.nn.Module, Any, dict, dict]:
    """(the source class's model holding the compiled model's weights dense, its tokenizer, the
    compiled tensors by graph name, their layouts)."""
    tensors, layouts, record, report, tokenizer = _source(model)
    cls = _model_class(record)
    config = cls.config_class.from_dict(
        {k: v for k, v in record["config"].items() if k != "_name_or_path"}
    )
    config.architectures = [cls.__name__]
    if any(name.startswith("pysparse__pred") for name in tensors):
        _log.warning(
            "export_hf: the model's activation predictors (passes.predictor) have no place in a "
            "Hugging Face folder: it runs the exact FFN (every neuron computed), which gives "
            "slightly different outputs than the compiled model"
        )
    t = fatrelu_threshold(report)
    if t is not None:
        config.hidden_act = "relu"
        setattr(config, THRESHOLD_FIELD, t)
    with torch.device("cpu"):
        hf = cls(config)
    wanted = hf.state_dict()
    state, missing = {}, []
    for name, ref in wanted.items():
        w = dense_weight(tensors, name, layouts)
        if w is None:
            missing.append(name)
        elif tuple(w.shape) != tuple(ref.shape):
            raise ValueError(
                f"export_hf: {name} is {tuple(w.shape)} in the compiled model but "
                f"{tuple(ref.shape)} in {cls.__name__}; the artifact does not match its config"
            )
        else:
            state[name] = w.detach()
    tied = {n for n in missing if n.endswith("lm_head.weight") and config.tie_word_embeddings}
    missing = [n for n in missing if n not in tied]
    if missing:
        raise ValueError(
            f"export_hf: the compiled model holds no {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; re-compile it with a current pysparse"
        )
    floats = [w.dtype for w in state.values() if w.is_floating_point()]
    if floats:  # keep the compiled model's precision (fp32 or bf16)
        hf = hf.to(max(set(floats), key=floats.count))
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf, tokenizer, tensors, layouts


def _write_folder(directory: str | os.PathLike, write: Any) -> Path:
    """Calls ``write(tmp)`` on a fresh temporary folder beside ``directory``, then renames it into
    place (a folder that is not a model folder is never replaced; nothing half-written stays)."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not (target / "config.json").exists():
        raise ValueError(f"export: {target} exists and is not a model folder; choose another")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def export_hf(model: Any, directory: str | os.PathLike) -> Path:
    """Writes ``model`` (from ``pysparse.compile`` or ``pysparse.load``) as a Hugging Face folder
    (see the module docstring); returns its path."""
    hf, tokenizer, _, _ = _dense_hf(model)

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _write_folder(directory, write)
