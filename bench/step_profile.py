"""Where a native decode step's time goes: SmolLM2 compiled as bench/generate.py's rows, the step
graph run natively (AOTInductor) at one token over a --context-token cache, then the torch
profiler over the same steps: time per pysparse op (the weight-reading kernels and the decode
attention) and the rest, the per-token overhead (Inductor's fused norms/rotary/adds, the cache
writes, the calls into the ops).

    python bench/step_profile.py                          # 2:4 + act, fp32 and bf16
    python bench/step_profile.py --rows dense "2:4 + act" --dtypes bfloat16
    python bench/step_profile.py --ab-env PYSPARSE_DISABLE_BF16_DOT --dtypes bfloat16
    python bench/step_profile.py --ab-fuse                # sibling linears fused vs apart
    python bench/step_profile.py --rows "2:4 + act + int8" --ab-env PYSPARSE_DISABLE_VNNI

The A/B modes time two variants of the same step in one process, in alternating rounds (this
machine drifts by 10-20% over a minute; alternation cancels most of it), and print each round's
median step and the median over rounds: ``--ab-env VAR`` the same native step with the kernel
switch VAR set to 1 and to 0 (the kernels read their switches per call), ``--ab-fuse`` two step
graphs compiled with ``Lower(fuse=True)`` and ``Lower(fuse=False)``.

The profiler's own cost per op call (~1-3 us) lands in the op rows: "overhead" here is a lower
bound on what runs outside the kernels, "step ms (no profiler)" the figure to quote. The last
line times ``generate()`` on the same model: what the decode loop adds per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import gate_threshold
from generate import load_model, passes_for
from pysparse.passes import Lower
from runinfo import header
from timing import restored_env

import pysparse
from pysparse.runtime.generate import _mask

ROWS = {
    "dense": "pysparse dense",
    "act": "act-sparse",
    "2:4": "2:4",
    "2:4 + act": "2:4 + act",
    "int8": "int8",
    "2:4 + int8": "2:4 + int8",
    "2:4 + act + int8": "2:4 + act + int8",
}


def compiled(row: str, dtype: torch.dtype, args: argparse.Namespace, fuse: bool = True):
    """SmolLM2 compiled as bench/generate.py's row (the last pass Lower(fuse=fuse)), its prompt."""
    model = load_model("smollm2", 0, dtype)
    ids = torch.randint(100, 1000, (1, args.context), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(100, 1000, (1, 128), generator=torch.Generator().manual_seed(1))
    t = gate_threshold(model, args.sparsity, calib, layers=None)
    passes = passes_for(ROWS[row], t)
    passes[-1] = Lower(fuse=fuse)
    return pysparse.compile(model, passes, (ids[:, :8],)), ids


def one_step(cm, ids: torch.Tensor, context: int):
    """A callable that runs one native decode step of cm over a context-token cache (prefilled)."""
    runner = cm.native_step(required=True)
    spec, need = cm.cache_spec, context + 1
    shape = (1, spec.kv_heads, need, spec.head_dim)
    keys = [torch.zeros(shape, dtype=spec.torch_dtype) for _ in range(spec.n_layers)]
    values = [torch.zeros_like(k) for k in keys]
    valid = torch.ones(1, need, dtype=torch.bool)
    pos = torch.arange(context)
    with torch.no_grad():
        runner(ids, pos[None], pos, _mask(valid[:, :context], pos), keys, values)
    step_in = (torch.tensor([[5]]), torch.tensor([[context]]))
    cp = torch.tensor([context])
    mask = _mask(valid, cp)

    def one() -> None:
        with torch.no_grad():
            runner(*step_in, cp, mask, keys, values)

    return one


def ab_table(row: str, dtype: torch.dtype, args: argparse.Namespace) -> None:
    """Two variants of one step, alternating rounds of args.steps steps each (see the top)."""
    if args.ab_fuse:
        steps = {}
        for fuse in (True, False):
            cm, ids = compiled(row, dtype, args, fuse=fuse)
            steps[f"fuse={fuse}"] = (one_step(cm, ids, args.context), None)
    else:
        cm, ids = compiled(row, dtype, args)
        one = one_step(cm, ids, args.context)
        steps = {f"{args.ab_env}=1": (one, "1"), f"{args.ab_env}=0": (one, "0")}
    rounds: dict[str, list[float]] = {k: [] for k in steps}
    with restored_env(args.ab_env):
        for _ in range(3):
            for fn, env in steps.values():
                if env is not None:
                    os.environ[args.ab_env] = env
                fn()
        for _ in range(args.rounds):
            for name, (fn, env) in steps.items():
                if env is not None:
                    os.environ[args.ab_env] = env
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                rounds[name].append(statistics.median(times) * 1e3)
    dname = str(dtype).removeprefix("torch.")
    print(f"\n{row}, {dname}: step ms per round (median of {args.steps} steps each)")
    for name, ms in rounds.items():
        print(
            f"  {name:>36}: median {statistics.median(ms):.2f}  [{' '.join(f'{m:.2f}' for m in ms)}]"
        )
    a, b = (statistics.median(ms) for ms in rounds.values())
    print(f"  first / second: {a / b:.3f}")


def step_table(row: str, dtype: torch.dtype, args: argparse.Namespace) -> None:
    cm, ids = compiled(row, dtype, args)
    one = one_step(cm, ids, args.context)
    with torch.no_grad():
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
    ab = ap.add_mutually_exclusive_group()
    ab.add_argument("--ab-env", metavar="VAR", help="A/B the step with the switch VAR at 1 and 0")
    ab.add_argument("--ab-fuse", action="store_true", help="A/B Lower(fuse=True) against False")
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds of an A/B")
    args = ap.parse_args()
    pysparse.pin_threads()
    print(header())
    for dname in args.dtypes:
        for row in args.rows:
            if args.ab_env or args.ab_fuse:
                ab_table(row, getattr(torch, dname), args)
            else:
                step_table(row, getattr(torch, dname), args)


if __name__ == "__main__":
    main()
