"""Training memory and speed on the real SmolLM2-135M: one learning step of the captured graph
(forward, backward, AdamW) with and without activation checkpointing
(``pysparse.learning.train.checkpoint_layers``: the graph cut per transformer layer, each layer recomputed
in the backward pass), in fp32 and under bf16 autocast.

Each configuration runs in its own process, so that the peak resident memory printed is that
configuration's own (model, gradients, AdamW moments and the activations kept for backward; no
teacher cache: the loss is the causal-LM loss). "saved" is what the forward kept for backward,
counted through saved-tensor hooks. Seconds per step: the median of --steps after one warm-up.

    python bench/train_memory.py                   # batch 4 x 256 tokens
    python bench/train_memory.py --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def one(batch: int, seq: int, ckpt: bool, autocast: bool, steps: int) -> dict:
    import torch

    import pysparse
    from pysparse.capture.inputs import call
    from pysparse.cli.models import load
    from pysparse.learning.objectives import lm_loss
    from pysparse.learning.train import checkpoint_layers
    from pysparse.quality.corpus import documents
    from pysparse.quality.evaluate import pack_text

    model, tok, _ = load("smollm2")
    data = pack_text(tok, documents("train"), seq, batch)
    sm = pysparse.compile(model, [], *data[0], generation=False)
    del model
    gm = sm.gm
    net = checkpoint_layers(gm) if ckpt else gm
    params = [p for p in gm.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, saved = [], []
    nbytes = [0]

    def pack(t):
        nbytes[0] += t.numel() * t.element_size()
        return t

    for i in range(steps + 1):
        b = data[i % len(data)]
        nbytes[0] = 0
        t0 = time.perf_counter()
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            loss = lm_loss(call(net, *b), b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            saved.append(nbytes[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "s_per_step": statistics.median(times),
        "saved_gib": saved[-1] / 2**30,
        "peak_gib": peak,
        "tokens_per_s": batch * seq / statistics.median(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        ckpt, ac = json.loads(args.child)
        print(json.dumps(one(args.batch, args.seq, ckpt, ac, args.steps)))
        return
    import torch

    print(
        f"# SmolLM2-135M training step, batch {args.batch} x {args.seq} packed tokens, AdamW, "
        f"causal-LM loss | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| activations | precision | s/step | tokens/s | saved for backward GiB | peak RSS GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for ckpt in (False, True):
        for ac in (False, True):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--steps",
                    str(args.steps),
                    "--child",
                    json.dumps([ckpt, ac]),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {'checkpointed per layer' if ckpt else 'all kept'} | "
                f"{'bf16 autocast' if ac else 'fp32'} | {r['s_per_step']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {r['saved_gib']:.2f} | {r['peak_gib']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
