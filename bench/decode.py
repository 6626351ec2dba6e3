"""End-to-end decode benchmark: a 1B-class LLaMA-shaped model built in code (random weights,
TinyLlama's shapes: d_model 2048, d_ff 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000), one
token at a time, batch 1, fp32 (or --dtype bfloat16), 2 threads.

Rows (same run, interleaved token by token so the machine's drift hits all alike):
    dense            the model as built (SiLU FFNs), eager Hugging Face forward
    compiled dense   pysparse.compile(lower) on the SiLU model: the traced graph with nothing sparse,
                     the control for what capture alone changes (the compiled rows below run
                     without the KV cache the eager row has, which at one token and no context is
                     the same work)
    act-sparse       pysparse.compile(relu[t], lower): FFNs on sparse_ffn
    act-sparse + 2:4 pysparse.compile(relu[t], magnitude, compress24, lower): FFNs on sparse_ffn24,
                     attention projections on sparse24_linear
    ... down by row  the same with the down projections masked along d_model
                     (MagnitudePrune(down_along="d_model")): the by-row 2:4 FFN layout

The FATReLU threshold t is chosen so that the FFN activations are about --sparsity sparse; each
compiled row's own FFN activation sparsity is measured on the timed tokens and printed in its row
(the 2:4 rows run pruned gates, so theirs differs from the act-sparse row's). Each step is a forward of one token with no KV cache: the
weights streamed per token (what decode at short context costs) are those of real decoding; the
attention over a cache, which this leaves out, is small next to them at short contexts. Random
weights say nothing about quality; this measures speed only.

    python bench/decode.py                       # 22 layers, 90% sparsity, 12 tokens
    python bench/decode.py --layers 4 --tokens 8 # quicker
    python bench/decode.py --rows act-sparse "act-sparse + 2:4"   # fewer models in memory

The OpenMP team is pinned one thread per CPU first (pysparse.pin_threads; --no-pin leaves it to
the scheduler). Beside each row it prints what pysparse's kernels really did (bench/runinfo.py):
threads used / asked per parallel region and the share of regions whose threads ran on one CPU,
the timing thread's involuntary context switches per token (another process on the core), and the
alignment of the packed buffers — so a slow row says whether it was the kernel or the machine.

Every row holds its own copy of the model (at 22 layers fp32 the four rows take ~14 GB); --rows
builds and times only the rows named, next to the dense one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from pysparse.passes import MagnitudePrune, ReluSubstitution

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s helpers, however started
from runinfo import KernelTally, header, packed_alignment

import pysparse
from pysparse.quality.evaluate import measure_activation_sparsity


def build(layers: int, dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def gate_threshold(model, sparsity: float, ids: torch.Tensor, layers: int | None = 1) -> float:
    """The ``sparsity`` quantile of the gate pre-activations of the first ``layers`` FFNs (None:
    all) on ``ids``, pooled. One layer suits random weights (the layers are statistically alike:
    RMSNorm'd inputs, same init); real weights differ by layer, so pool them all."""
    outs: list[torch.Tensor] = []
    mlps = [layer.mlp for layer in model.model.layers][:layers]
    hooks = [
        m.gate_proj.register_forward_hook(lambda m, i, o: outs.append(o.detach().float()))
        for m in mlps
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    pooled = torch.cat([o.flatten() for o in outs])
    if pooled.numel() > 1 << 24:  # torch.quantile's input limit
        pooled = pooled[torch.randperm(pooled.numel())[: 1 << 24]]
    return max(float(torch.quantile(pooled, sparsity)), 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--tokens", type=int, default=12, help="timed tokens per row")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--rows",
        nargs="*",
        default=None,
        help="compiled rows to build and time (default: all); the dense row is always timed",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="leave the threads unpinned (default: pysparse.pin_threads(), see its docstring)",
    )
    args = ap.parse_args()
    if not args.no_pin:
        pysparse.pin_threads()
    dtype = getattr(torch, args.dtype)
    model = build(args.layers, dtype)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 32000, (1, 16), generator=gen)
    t = gate_threshold(model, args.sparsity, prompt)
    example = {"input_ids": prompt[:, :1]}
    t0 = time.perf_counter()
    rows = {"dense": lambda ids: model(input_ids=ids).logits}
    variants = {
        "compiled dense": ["lower"],
        "act-sparse": [ReluSubstitution(t), "lower"],
        "act-sparse + 2:4": [ReluSubstitution(t), "magnitude", "compress24", "lower"],
        "act-sparse + 2:4, down by row": [
            ReluSubstitution(t),
            MagnitudePrune(down_along="d_model"),
            "compress24",
            "lower",
        ],
    }
    if args.rows:
        unknown = sorted(set(args.rows) - set(variants))
        if unknown:
            ap.error(f"--rows: unknown {unknown}; choose from {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.rows}
    compiled = {}
    for name, passes in variants.items():
        sm = pysparse.compile(model, passes, example_kwargs=example, copy_model=True)
        compiled[name] = sm
        rows[name] = lambda ids, sm=sm: sm(input_ids=ids)[0]
    setup_s = time.perf_counter() - t0
    tokens = torch.randint(0, 32000, (args.tokens + 2, 1, 1), generator=gen)
    times: dict[str, list[float]] = {k: [] for k in rows}
    tally = KernelTally()
    with torch.no_grad():
        for i, tok in enumerate(tokens):
            for name, fn in rows.items():
                tally.start()
                s = time.perf_counter()
                fn(tok)
                dt = time.perf_counter() - s
                if i >= 2:  # two warm-up tokens
                    times[name].append(dt)
                    tally.stop(name)
        batches = [((), {"input_ids": tok}) for tok in tokens[:4]]
        sparsity = {
            name: measure_activation_sparsity(sm.gm, batches) for name, sm in compiled.items()
        }
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(
        f"# decode, 1B-class LLaMA shape ({args.layers} layers, {weights_gb:.2f} GB {args.dtype}) | "
        f"FATReLU t={t:.3f} (target {args.sparsity:.0%}) | {args.tokens} tokens, median | "
        f"compile {setup_s:.0f} s{' | threads unpinned' if args.no_pin else ' | threads pinned'}"
    )
    print(f"# {header()}")
    print(
        "| row | FFN act. sparsity (layers min..max) | ms / token | tokens / s | vs dense | "
        "pysparse kernels per region: threads used/asked, share on one CPU | preempted / token | "
        "packed buffers aligned |"
    )
    print("|---|---|---:|---:|---:|---|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        # per-token ratios, paired with the dense row of the same token
        ratio = statistics.median(d / s for d, s in zip(times["dense"], ts))
        sp = sparsity.get(name)
        sp_cell = f"{sum(sp) / len(sp):.1%} ({min(sp):.1%}..{max(sp):.1%})" if sp else "—"
        align = packed_alignment(compiled[name].gm) if name in compiled else "—"
        print(
            f"| {name} | {sp_cell} | {med * 1e3:.1f} | {1 / med:.2f} | {ratio:.2f}x | "
            f"{tally.cell(name)} | {align} |"
        )


if __name__ == "__main__":
    main()
