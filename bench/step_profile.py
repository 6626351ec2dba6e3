"""Where a native decode step's time goes: SmolLM2 compiled as bench/generate.py's rows, the step
graph run natively (AOTInductor) at one token over a --context-token cache, then the torch
profiler over the same steps: time per pysparse op (the weight-reading kernels and the decode
attention) and the rest, the per-token overhead (Inductor's fused norms/rotary/adds, the cache
writes, the calls into the ops).

    python bench/step_profile.py                          # 2:4 + act, fp32 and bf16
    python bench/step_profile.py --rows dense "2:4 + act" --dtypes bfloat16

The profiler's own cost per op call (~1-3 us) lands in the op rows: "overhead" here is a lower
bound on what runs outside the kernels, "step ms (no profiler)" the figure to quote. The last
line times ``generate()`` on the same model: what the decode loop adds per token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import gate_threshold
from generate import load_model, passes_for
from runinfo import header

import pysparse
from pysparse.runtime.generate import _mask

ROWS = {"dense": "pysparse dense", "act": "act-sparse", "2:4": "2:4", "2:4 + act": "2:4 + act"}


def step_table(row: str, dtype: torch.dtype, args: argparse.Namespace) -> None:
    model = load_model("smollm2", 0, dtype)
    ids = torch.randint(100, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(100, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    t = gate_threshold(model, args.sparsity, calib, layers=None)
    cm = pysparse.compile(model, passes_for(ROWS[row], t), (ids[:, :8],))
    runner = cm.native_step(required=True)
    spec, need = cm.cache_spec, args.context + 1
    shape = (1, spec.kv_heads, need, spec.head_dim)
    keys = [torch.zeros(shape, dtype=spec.torch_dtype) for _ in range(spec.n_layers)]
    values = [torch.zeros_like(k) for k in keys]
    valid = torch.ones(1, need, dtype=torch.bool)
    pos = torch.arange(args.context)
    with torch.no_grad():
        runner(ids, pos[None], pos, _mask(valid[:, : args.context], pos), keys, values)
        step_in = (torch.tensor([[5]]), torch.tensor([[args.context]]))
        cp = torch.tensor([args.context])
        mask = _mask(valid, cp)

        def one() -> None:
            runner(*step_in, cp, mask, keys, values)

        for _ in range(5):
            one()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            one()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                one()
    step_ms = statistics.median(times) * 1e3
    loop = []
    for _ in range(3):  # the whole decode loop (sampling, stop checks, next inputs) around it
        cm.generate(ids, max_new_tokens=64, eos_token_id=[])
        loop.append(cm.last_generation.decode_tokens_per_s)
    ops = {
        e.key: e.self_cpu_time_total / args.steps / 1e3
        for e in prof.key_averages()
        if e.key.startswith("pysparse::")
    }
    calls = {e.key: e.count // args.steps for e in prof.key_averages() if e.key in ops}
    kernels = sum(ops.values())
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / args.steps / 1e3
    name = str(dtype).removeprefix("torch.")
    print(f"\n{row}, {name}: step {step_ms:.2f} ms (no profiler), {1e3 / step_ms:.1f} tok/s")
    print("  | op | calls/step | ms/step |")
    print("  |---|---|---|")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1]):
        print(f"  | {k} | {calls[k]} | {v:.2f} |")
    print(f"  | pysparse ops together | | {kernels:.2f} |")
    print(f"  | the rest (per-token overhead), under the profiler | | {total - kernels:.2f} |")
    print(f"  | the rest against the unprofiled step | | {step_ms - kernels:.2f} |")
    loop_ms = 1e3 / statistics.median(loop)
    print(
        f"  generate(): {statistics.median(loop):.1f} tok/s decode, {loop_ms:.2f} ms a token: "
        f"{loop_ms - step_ms:.2f} ms of it outside the step (the decode loop in Python)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", nargs="+", default=["2:4 + act"], choices=list(ROWS))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--context", type=int, default=128, help="tokens in the cache")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    pysparse.pin_threads()
    print(header())
    for dname in args.dtypes:
        for row in args.rows:
            step_table(row, getattr(torch, dname), args)


if __name__ == "__main__":
    main()
