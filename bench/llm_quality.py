"""Decoder quality: 2:4 weight sparsity and ProSparse activation sparsity on the real
SmolLM2-135M-Instruct (30 LLaMA layers, 210 prunable linears), scored by perplexity.

Every row compiles the same model with the same calibration / training text (the first --train
sentences of pysparse.quality.corpus's training part, batches of --batch-size x <= --max-length tokens)
and is scored on the held-out part (other topics, never seen by any method) with the sliding
window of ``pysparse eval`` (256 tokens, stride 128). Rows (``--only`` picks by prefix):

  dense                       the model as shipped (dequantised to fp32)
  magnitude                   2:4, top-2 |w|
  wanda                       2:4, |w| * ||x||, calibrated block by block (the reference's way)
  wanda (dense statistics)    the same with every ||x|| taken on the dense model
  sparsegpt (mask only)       SparseGPT's mask, original weights under it
  sparsegpt (+ update)        SparseGPT with its OBS weight update
  proxsparse (mask only)      the learned mask, original weights under it (as published)
  proxsparse + reconstruct    the learned mask + SparseGPT's OBS update under it
  proxsparse (defaults)       ProxSparse(): SparseGPT's mask as the start, learning,
                              reconstruction, 100 recovery steps
  sparsegpt + N recovery      SparseGPT with its update, then N masked distillation steps
                              (passes.Recover, teacher: the dense model; --recover N)
  proxsparse + reconstruct + N recovery    the same after the learned mask's reconstruction
  relu (no training)          SiLU -> ReLU in every FFN
  prosparse (staged + sweep)  ReLU, the sine-staged L1 schedule, FATReLU threshold sweep
  prosparse (fixed lambda)    ReLU, a constant lambda for the same steps
  both                        ProSparse (staged + sweep), then the best 2:4 method, lowered
  int8                        Quantize(): every linear and the lm_head weight-only int8 (round to
                              nearest, one scale per output row)
  int4 g32 / g64              Quantize(bits=4[, group=64], method="rtn"): int4 with a float16
                              scale per 32 / 64 values (round to nearest), the lm_head int8
  int4 g32 everywhere         ... with the lm_head (tied embeddings) int4 too
  int4 g32 / g64 gptq         Quantize(bits=4): GPTQ on the calibration set (bits=4's default)
  ... + head int4 / int8 gptq the lm_head (tied: the embeddings too) by GPTQ as well
  sparsegpt (+ update) + int8 / + int4 g32 [gptq]
                              SparseGPT with its update, then int8 / int4 (RTN or GPTQ under the
                              mask: one sweep that keeps the zeros and quantises the rest)
  llama.cpp f32 / q8_0 / q4_0 the same weights as GGUFs (bench/llamacpp.py; the gguf package's
                              quantiser) scored through llama.cpp's own logits on the same windows
                              (when llama-cpp-python is installed)
  llama.cpp q4_k_m            llama.cpp's own quantiser's Q4_K_M (SmolLM2's 576-wide rows are not
                              K-quant blocks of 256: most tensors fall back to Q5_0 / Q8_0)

Printed: perplexity, its ratio to dense, FFN activation sparsity (zeros of the FFN intermediate
on the held-out text) and the wall time of the passes; per-layer sparsity for ProSparse rows; a
JSON with every pass report (--json). The learning rows' settings: the passes' defaults unless
--steps / --lam etc. are given.

    python bench/llm_quality.py --only dense,magnitude,wanda,sparsegpt
    python bench/llm_quality.py --only proxsparse --steps 100 --recover 50
    python bench/llm_quality.py --only relu,prosparse --prosparse-steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from pysparse.passes import (
    Lower,
    MagnitudePrune,
    ProSparse,
    ProxSparse,
    Quantize,
    Recover,
    ReluSubstitution,
    SparseGPTPrune,
    WandaPrune,
)
from pysparse.passes.compress24 import Compress24
from pysparse.passes.prosparse import DECODER_DEFAULTS, Constant
from runinfo import given

import pysparse
from pysparse.cli.models import load
from pysparse.quality.corpus import documents, sentences
from pysparse.quality.evaluate import (
    encode_sentences,
    measure_activation_sparsity,
    pack_text,
    perplexity,
)


class GraphLM:
    """A captured graph called like the compiled model (what ``perplexity`` calls), for
    measuring the model inside a pass while it trains."""

    def __init__(self, gm):
        self.gm = gm
        self.example_kwargs = {"attention_mask": None}

    def __call__(self, ids, **kwargs):
        from pysparse.capture.inputs import call

        return call(self.gm, (ids,), kwargs)


def plot_frontier(results: list, out_dir: Path) -> None:
    """ProSparse: held-out perplexity and FFN sparsity against training seconds (the monitor's
    points, plain ReLU during training), one PNG per run, and the points printed."""
    for r in results:
        points = None
        for rep in r["report"]:
            if rep.get("pass") == "prosparse" and rep.get("monitor"):
                points = rep["monitor"]
        if not points:
            continue
        print(f"frontier, {r['method']} (training seconds, held-out perplexity, FFN sparsity):")
        for pt in points:
            print(
                f"  step {pt['step']}: {pt['train_seconds']:.0f} s  ppl {pt['perplexity']:.2f}"
                f"  sparsity {pt['sparsity']:.1%}"
            )
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        t = [pt["train_seconds"] / 60 for pt in points]
        ax.plot(t, [pt["perplexity"] for pt in points], "o-", color="tab:red")
        ax.set_xlabel("training minutes (this machine)")
        ax.set_ylabel("held-out perplexity", color="tab:red")
        ax.set_yscale("log")
        ax2 = ax.twinx()
        ax2.plot(t, [100 * pt["sparsity"] for pt in points], "s--", color="tab:blue")
        ax2.set_ylabel("FFN activation sparsity, %", color="tab:blue")
        ax.set_title(f"SmolLM2 {r['method']}")
        fig.tight_layout()
        path = out_dir / (r["method"].split(" ")[0] + "_frontier.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(f"  plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train", type=int, default=256, help="calibration/training sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-batch-size", type=int, default=8, help="learning passes' batches")
    p.add_argument(
        "--pack",
        type=int,
        default=0,
        help="learning passes: blocks of N tokens packed from --learn-text (0: sentence batches)",
    )
    p.add_argument(
        "--learn-text",
        default="sentences",
        choices=("sentences", "documents"),
        help="with --pack: the --train sentences, or the corpus's training topics whole",
    )
    p.add_argument("--steps", type=int, default=None, help="ProxSparse steps (default: pass's)")
    p.add_argument("--lam1", type=float, default=None)
    p.add_argument("--lam2", type=float, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--objective", default=None, help="logit_kl | causal_lm (learning passes)")
    p.add_argument(
        "--recover", type=int, default=0, help="rows: sparsegpt / proxsparse + N recovery steps"
    )
    p.add_argument("--recover-lr", type=float, default=5e-5)
    p.add_argument(
        "--init-mask",
        default=None,
        choices=("wanda", "sparsegpt"),
        help="ProxSparse rows learn from W0 under this method's mask (default: from W0)",
    )
    p.add_argument("--prosparse-steps", type=int, default=None)
    p.add_argument("--lam", type=float, default=None, help="ProSparse final lambda")
    p.add_argument("--prosparse-lr", type=float, default=None)
    p.add_argument("--both-mask", default="sparsegpt", help="2:4 method of the 'both' row")
    p.add_argument("--autocast", default=None, help="bf16: learning passes under autocast")
    p.add_argument("--only", default=None, help="comma-separated prefixes of the rows to run")
    p.add_argument("--window", type=int, default=256)
    p.add_argument(
        "--monitor-every", type=int, default=25, help="ProSparse frontier: steps between points"
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--gguf-dir",
        default=str(Path.home() / ".cache" / "pysparse" / "gguf"),
        help="where the llama.cpp rows' GGUFs are written (once)",
    )
    p.add_argument("--out", default="bench-out/llm_quality", help="plots and reports")
    args = p.parse_args()
    os.environ.setdefault("PYSPARSE_PROGRESS", "0")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    model, tok, source = load("smollm2")
    model = model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    calib = encode_sentences(tok, sentences("train", args.train), args.batch_size, args.max_length)
    if args.pack:
        texts = (
            documents("train") if args.learn_text == "documents" else sentences("train", args.train)
        )
        train = pack_text(tok, texts, args.pack, args.train_batch_size)
        learn_desc = f"{len(train)} batches of {args.train_batch_size} x {args.pack} packed tokens of {args.learn_text}"
    else:
        train = encode_sentences(
            tok, sentences("train", args.train), args.train_batch_size, args.max_length
        )
        learn_desc = f"batches of {args.train_batch_size} sentences"
    held_text = sentences("heldout")
    held_ids = tok("\n\n".join(held_text), return_tensors="pt")["input_ids"][0]
    held_batches = encode_sentences(tok, held_text, 32, 128)
    example = calib[0]

    def frontier_point(step: int, gm) -> dict:
        """Held-out perplexity and FFN sparsity of the model being trained (plain ReLU)."""
        sp = measure_activation_sparsity(gm, held_batches)
        ppl = perplexity(GraphLM(gm), held_ids, args.window)
        return {"perplexity": round(ppl, 3), "sparsity": round(sum(sp) / len(sp), 4)}

    common = given(objective=args.objective, autocast=args.autocast)
    prox = given(steps=args.steps, lam1=args.lam1, lam2=args.lam2, lr=args.lr, **common)
    pro = given(steps=args.prosparse_steps, lam=args.lam, lr=args.prosparse_lr, **common)
    both_masks = {
        "sparsegpt": lambda: SparseGPTPrune(),
        "wanda": lambda: WandaPrune(),
        "proxsparse": lambda: ProxSparse(data=train, **prox),
    }

    def mask_of(method: str):
        """The compiled model of a mask row run earlier, else compiled now."""
        if method not in kept:
            make = {"wanda": WandaPrune, "sparsegpt": lambda: SparseGPTPrune(update_weights=False)}
            kept[method] = pysparse.compile(
                model, [make[method]()], *example, calibration=calib, generation=False
            )
        return kept[method]

    start = f", {args.init_mask} start" if args.init_mask else ""

    def proxsparse(**kw):
        if args.init_mask:
            kw["init_mask"] = mask_of(args.init_mask)
        return ProxSparse.mask_only(data=train, **{**prox, **kw})

    def recover():
        return Recover(data=train, steps=args.recover, lr=args.recover_lr, teacher=model, **common)

    def llama_lm(kind: str):
        """The model as a llama.cpp GGUF of ``kind``, scored through llama.cpp's logits."""
        import llamacpp

        from pysparse.cli import models

        if not llamacpp.available():
            return None
        src = models.resolve("smollm2")
        dst = Path(args.gguf_dir) / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
        dst.parent.mkdir(parents=True, exist_ok=True)
        path = llamacpp.write_float_gguf(src.folder / src.gguf_file, dst, kind)
        return llamacpp.LlamaCppLM(path, torch.get_num_threads(), args.window + 8)

    rows_def = {
        "dense": list,
        "magnitude": lambda: [MagnitudePrune()],
        "wanda": lambda: [WandaPrune()],
        "wanda (dense statistics)": lambda: [WandaPrune(sequential=False)],
        "sparsegpt (mask only)": lambda: [SparseGPTPrune(update_weights=False)],
        "sparsegpt (+ update)": lambda: [SparseGPTPrune()],
        f"proxsparse (mask only{start})": lambda: [proxsparse()],
        # the learned masks of the row above when it ran (one training for both rows)
        f"proxsparse + reconstruct{start}": lambda: [
            SparseGPTPrune(mask_from=kept["proxsparse"])
            if "proxsparse" in kept
            else proxsparse(reconstruct=True)
        ],
        # the pass's defaults: SparseGPT start, learning, reconstruction, 100 recovery steps
        "proxsparse (defaults)": lambda: [ProxSparse(data=train, **prox)],
        "relu (no training)": lambda: [ReluSubstitution()],
        "prosparse (staged + sweep)": lambda: [
            ReluSubstitution(),
            ProSparse(
                data=train,
                threshold="sweep",
                monitor=frontier_point,
                monitor_every=args.monitor_every,
                **pro,
            ),
        ],
        "prosparse (fixed lambda)": lambda: [
            ReluSubstitution(),
            ProSparse(data=train, schedule=Constant(args.lam or DECODER_DEFAULTS["lam"]), **pro),
        ],
        "both": lambda: [
            ReluSubstitution(),
            ProSparse(data=train, threshold="sweep", **pro),
            both_masks[args.both_mask](),
            Compress24(),
            Lower(),
        ],
    }
    rows_def["int8"] = lambda: [Quantize()]
    rows_def["int4 g32"] = lambda: [Quantize(bits=4, method="rtn")]
    rows_def["int4 g64"] = lambda: [Quantize(bits=4, group=64, method="rtn")]
    rows_def["int4 g32 everywhere (head too)"] = lambda: [
        Quantize(bits=4, head_bits=4, method="rtn")
    ]
    rows_def["int4 g32 gptq"] = lambda: [Quantize(bits=4, method="gptq")]
    rows_def["int4 g64 gptq"] = lambda: [Quantize(bits=4, group=64, method="gptq")]
    rows_def["int4 g32 gptq + head int4 gptq"] = lambda: [
        Quantize(bits=4, head_bits=4, gptq_head=True)
    ]
    rows_def["int4 g32 gptq + head int8 gptq"] = lambda: [Quantize(bits=4, gptq_head=True)]
    rows_def["sparsegpt (+ update) + int8"] = lambda: [SparseGPTPrune(), Quantize()]
    rows_def["sparsegpt (+ update) + int4 g32"] = lambda: [
        SparseGPTPrune(),
        Quantize(bits=4, method="rtn"),
    ]
    rows_def["sparsegpt (+ update) + int4 g32 gptq"] = lambda: [
        SparseGPTPrune(),
        Quantize(bits=4, method="gptq"),
    ]
    for kind in ("f32", "q8_0", "q4_0", "q4_k_m"):
        rows_def[f"llama.cpp {kind}"] = lambda kind=kind: llama_lm(kind)
    if args.recover:
        rows_def[f"proxsparse + reconstruct + {args.recover} recovery{start}"] = lambda: [
            SparseGPTPrune(mask_from=kept["proxsparse"])
            if "proxsparse" in kept
            else proxsparse(reconstruct=True),
            recover(),
        ]
        rows_def[f"sparsegpt (+ update) + {args.recover} recovery"] = lambda: [
            SparseGPTPrune(),
            recover(),
        ]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        rows_def = {k: v for k, v in rows_def.items() if any(k.startswith(w) for w in wanted)}

    print(
        f"# {source.describe()} (fp32) | 2:4 on every prunable linear | calibration: "
        f"{args.train} sentences of pysparse.quality.corpus train ({len(calib)} batches of "
        f"{args.batch_size} x <= {args.max_length} tokens; learning passes: {learn_desc}) | held-out: {held_ids.numel()} tokens, window {args.window}, "
        f"stride {args.window // 2} | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| method | perplexity | x dense | FFN act. sparsity | wall s |")
    print("|---|---:|---:|---:|---:|")
    results, dense_ppl = [], None
    kept: dict = {}  # compiled models later rows reuse: wanda, sparsegpt, proxsparse masks
    for name, make in rows_def.items():
        passes = make()
        t0 = time.perf_counter()
        if name.startswith("llama.cpp"):
            if passes is None:
                print(f"| {name} | (llama-cpp-python not installed) | | | |")
                continue
            target, report = passes, []
        elif passes:
            sm = pysparse.compile(model, passes, *example, calibration=calib, generation=False)
            target, report = sm, sm.report
        else:
            target, report = model, []
        secs = time.perf_counter() - t0
        ppl = perplexity(target, held_ids, args.window)
        if name == "dense":
            dense_ppl = ppl
        sparsity = None
        per_layer = None
        gm = getattr(target, "gm", None)
        if gm is not None:
            per_layer = measure_activation_sparsity(gm, held_batches)
            if per_layer:
                sparsity = sum(per_layer) / len(per_layer)
        ratio = f"{ppl / dense_ppl:.2f}" if dense_ppl else "-"
        sp = f"{sparsity:.1%}" if sparsity is not None else "-"
        print(f"| {name} | {ppl:.2f} | {ratio} | {sp} | {secs:.1f} |", flush=True)
        results.append(
            {
                "method": name,
                "perplexity": round(ppl, 4),
                "activation_sparsity": sparsity,
                "activation_sparsity_per_layer": per_layer,
                "seconds": round(secs, 1),
                "report": report,
            }
        )
        for method, row in (
            ("wanda", "wanda"),
            ("sparsegpt", "sparsegpt (mask only)"),
            ("proxsparse", f"proxsparse (mask only{start})"),
        ):
            if name == row:
                kept[method] = target
        del target
    plot_frontier(results, out_dir)
    for r in results:
        if r["activation_sparsity_per_layer"] and r["method"].startswith(("prosparse", "both")):
            per = " ".join(f"{s:.0%}" for s in r["activation_sparsity_per_layer"])
            print(f"per-layer sparsity, {r['method']}: {per}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
