"""An artifact exported with ``pysparse export DIR --format hf`` (default folder DIR/hf), loaded the
way a user without pysparse would — ``transformers`` alone, the FFN activation set from the
config's FATReLU field as the loader note says — against ``pysparse.load(DIR)`` on held-out text:
max and mean absolute difference of the outputs, their scale, and (decoders) both models'
perplexity over the same windows.

    python bench/hf_check.py pysparse-out            # after: pysparse export pysparse-out --format hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import pysparse
from pysparse.artifacts.hf import THRESHOLD_FIELD
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import perplexity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("artifact")
    p.add_argument("--hf", default=None, help="the exported folder (default ARTIFACT/hf)")
    args = p.parse_args()
    hf_dir = Path(args.hf or Path(args.artifact) / "hf")
    import transformers

    config = json.loads((hf_dir / "config.json").read_text())
    cls = getattr(transformers, config["architectures"][0])
    hf = cls.from_pretrained(hf_dir).eval()
    t = config.get(THRESHOLD_FIELD)
    if t:  # the loader note: FATReLU as torch.nn.Threshold(t, 0) in every FFN
        for m in hf.modules():
            if hasattr(m, "act_fn"):
                m.act_fn = torch.nn.Threshold(t, 0.0)
            if hasattr(m, "intermediate_act_fn"):
                m.intermediate_act_fn = torch.nn.Threshold(t, 0.0)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = pysparse.load(args.artifact)
    text = "\n\n".join(sentences("heldout")[:40])
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        a = hf(ids)
        b = ours(ids)
    a = a.logits if hasattr(a, "logits") else a[0]
    b = b.logits if hasattr(b, "logits") else b[0]
    d = (a.float() - b.float()).abs()
    print(
        f"# {hf_dir} ({cls.__name__}, FATReLU threshold {t}) vs pysparse.load({args.artifact}), "
        f"{ids.shape[1]} held-out tokens"
    )
    print(
        f"max |diff| {d.max():.3e}, mean |diff| {d.mean():.3e}, output scale "
        f"{b.float().abs().max():.2f}"
    )
    if hasattr(hf, "generate"):
        held = tok("\n\n".join(sentences("heldout")), return_tensors="pt")["input_ids"][0]
        print(
            f"perplexity (held-out, window 256): transformers {perplexity(hf, held):.3f}, "
            f"pysparse {perplexity(ours, held):.3f}"
        )


if __name__ == "__main__":
    main()
