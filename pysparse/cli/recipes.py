"""Recipes: a compile pipeline as a file — its passes, their settings, and the calibration text.

A recipe is YAML::

    passes:                  # in order; a name, or {name: {setting: value}}
      - relu
      - prosparse: {steps: 150}
      - lower
    calibration:             # every key optional (the CLI's defaults below)
      text: corpus           # corpus (pysparse.quality.corpus) or a text file, one sample per line
      lines: 256             # lines of the corpus's training part
      batch_size: 8
      max_length: 64
      pack: 0                # N > 0: full blocks of N tokens (corpus: its training topics whole)

``pysparse compile MODEL --recipe NAME|FILE|ARTIFACT_DIR`` runs one; every artifact the CLI writes
holds the recipe it was made with (``recipe.yaml``), so ``--recipe`` on that artifact's folder (or
that file) makes it again. Shipped recipes: ``SHIPPED``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CALIBRATION_DEFAULTS: dict[str, Any] = {
    "text": "corpus",
    "lines": 256,
    "batch_size": 8,
    "max_length": 64,
    "pack": 0,
}

# Measured on the embedded all-MiniLM-L6-v2 (2 cores): bench/RESULTS.md.
SHIPPED: dict[str, str] = {
    "fast": """\
# 2:4 in about a minute, no training: ReLU FFNs + Wanda masks, packed and lowered. Quality drops
# (all-MiniLM-L6-v2: ~0.4 mean cosine to the original on held-out text; SmolLM2: perplexity
# over 1000x dense, ReLU with no training): a smoke test of the toolchain, not a model to serve.
passes: [relu, wanda, compress24, lower]
""",
    "activation": """\
# Activation sparsity (ProSparse): ReLU FFNs, the staged-sine L1 fine-tune distilling the
# original, the FATReLU threshold sweep, then the activation-sparse FFN kernels.
# Calibration as in bench/prosparse.py (768 corpus lines, batches of 32): all-MiniLM-L6-v2 86.0%
# of FFN activations zero at 0.969 mean cosine to the original. Decoders train best on packed
# text: --pack 256 --batch-size 4 (SmolLM2: 81.3% at 1.62x dense perplexity after 49 min of training).
passes: [relu, prosparse, lower]
calibration: {lines: 768, batch_size: 32}
""",
    "learned24": """\
# 2:4 weight sparsity that keeps quality: SparseGPT's masks with its weight update, then a
# masked recovery fine-tune distilling the original (all-MiniLM-L6-v2: 0.919 mean cosine).
passes: [sparsegpt, recover, compress24, lower]
calibration: {lines: 512, batch_size: 32}
""",
    "both": """\
# Both sparsities: ProSparse's activation sparsity, then SparseGPT 2:4 masks with the weight
# update and a masked recovery fine-tune, packed and lowered onto the 2:4 activation-sparse FFNs
# (all-MiniLM-L6-v2: 0.899 mean cosine to the original, 86.2% of FFN activations zero, every
# linear 2:4; ~25 min on 2 cores).
passes: [relu, prosparse, sparsegpt, recover, compress24, lower]
calibration: {lines: 768, batch_size: 32}
""",
}
SHIPPED.update(
    {
        "int8": """\
# Weight-only int8 (one scale per output row, round to nearest) on every linear and the lm_head:
# no training, seconds. SmolLM2: held-out perplexity +0.5% over dense; decode 168 tok/s native fp32
# on AMD EPYC Zen 4 (2 threads), 1.13x llama.cpp Q8_0 in the same run (docs/quantization.md).
passes: [quantize, lower]
""",
        "learned24-int8": """\
# learned24 (SparseGPT 2:4 + recovery), then int8 weights: 2:4 int8 values + metadata read 5/8
# of a byte a weight. SmolLM2, 2:4 + int8 native fp32: 216 tok/s, 1.46x llama.cpp Q8_0.
passes: [sparsegpt, recover, quantize, compress24, lower]
calibration: {lines: 512, batch_size: 32}
""",
        "both-int8": """\
# Both sparsities and int8: ProSparse activation sparsity, SparseGPT 2:4 + recovery, int8
# weights, lowered onto the int8 act-sparse FFN kernels (sparse_ffn24_int8).
passes: [relu, prosparse, sparsegpt, recover, quantize, compress24, lower]
calibration: {lines: 768, batch_size: 32}
""",
        "int4": """\
# Weight-only int4 (a float16 scale per 32 values, GPTQ on the calibration text) on every
# projection, the lm_head int8: 4.5 bits a weight, llama.cpp Q4_0's budget. SmolLM2: held-out
# perplexity 15.97 (dense 14.86, llama.cpp Q4_0 18.39); a couple of minutes (docs/quantization.md).
passes: [{quantize: {bits: 4}}, lower]
calibration: {lines: 256, batch_size: 32}
""",
        "learned24-int4": """\
# learned24 (SparseGPT 2:4 + recovery), then int4 by GPTQ under the 2:4 mask (the zeros kept in
# the same sweep): the 2:4 int4 values + metadata read 13/32 of a byte a weight.
passes: [sparsegpt, recover, {quantize: {bits: 4}}, compress24, lower]
calibration: {lines: 512, batch_size: 32}
""",
    }
)
DEFAULT = "activation"


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the file and the problem."""


@dataclass
class Recipe:
    passes: list[tuple[str, dict[str, Any]]]
    calibration: dict[str, Any] = field(default_factory=lambda: dict(CALIBRATION_DEFAULTS))
    origin: str = "<given>"

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<given>") -> Recipe:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {origin} is not valid YAML: {exc}") from exc
        if not isinstance(doc, dict) or "passes" not in doc:
            raise RecipeError(f"recipe {origin}: expected a mapping with a 'passes' list")
        unknown = set(doc) - {"passes", "calibration"}
        if unknown:
            raise RecipeError(
                f"recipe {origin}: unknown keys {sorted(unknown)}; a recipe has 'passes' and "
                "'calibration'"
            )
        if not isinstance(doc["passes"], list) or not doc["passes"]:
            raise RecipeError(f"recipe {origin}: 'passes' must be a non-empty list")
        passes = []
        for item in doc["passes"]:
            if isinstance(item, str):
                passes.append((item, {}))
            elif (
                isinstance(item, dict)
                and len(item) == 1
                and isinstance(next(iter(item)), str)
                and isinstance(next(iter(item.values())) or {}, dict)
            ):
                name, settings = next(iter(item.items()))
                passes.append((name, dict(settings or {})))
            else:
                raise RecipeError(
                    f"recipe {origin}: pass entry {item!r} must be a name or "
                    "{name: {setting: value}}"
                )
        calib = doc.get("calibration") or {}
        if not isinstance(calib, dict):
            raise RecipeError(f"recipe {origin}: 'calibration' must be a mapping")
        bad = set(calib) - set(CALIBRATION_DEFAULTS)
        if bad:
            raise RecipeError(
                f"recipe {origin}: unknown calibration keys {sorted(bad)}; known: "
                f"{sorted(CALIBRATION_DEFAULTS)}"
            )
        for k, v in calib.items():
            want = str if k == "text" else int
            if type(v) is not want or (want is int and v < 0):
                raise RecipeError(
                    f"recipe {origin}: calibration.{k} must be a "
                    f"{'string' if want is str else 'non-negative integer'}, got {v!r}"
                )
        return cls(passes, {**CALIBRATION_DEFAULTS, **calib}, origin)

    def to_yaml(self) -> str:
        doc = {
            "passes": [{n: s} if s else n for n, s in self.passes],
            "calibration": self.calibration,
        }
        return "# pysparse recipe\n" + yaml.safe_dump(doc, sort_keys=False)

    def build(self) -> list:
        """The pass objects (a name pysparse does not know is left for ``compile`` to name)."""
        from pysparse.passes import PASS_REGISTRY

        out = []
        for name, settings in self.passes:
            factory = PASS_REGISTRY.get(name)
            if factory is None:
                out.append(name)
                continue
            try:
                out.append(factory(**settings))
            except TypeError as exc:
                raise RecipeError(
                    f"recipe {self.origin}: settings of pass {name!r}: {exc}"
                ) from exc
        return out


def load_recipe(spec: str) -> Recipe:
    """A shipped recipe by name, a YAML file, or an artifact folder (the recipe it was made with)."""
    if spec in SHIPPED:
        return Recipe.from_yaml(SHIPPED[spec], f"'{spec}' (shipped)")
    path = Path(spec)
    if path.is_dir():
        path = path / "recipe.yaml"
        if not path.is_file():
            raise RecipeError(f"{spec} holds no recipe.yaml (an artifact saved by the CLI has one)")
    if not path.is_file():
        raise RecipeError(
            f"recipe {spec!r}: no such file, and not a shipped recipe ({', '.join(SHIPPED)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from exc
    return Recipe.from_yaml(text, str(path))
