"""End-to-end generation benchmark: tokens per second with the KV cache, as a user sees them.

Rows (one process, interleaved call by call so the machine's drift hits all alike):
    HF dense         Hugging Face ``generate`` on the dense model (DynamicCache): the baseline
    pysparse dense   pysparse.compile(lower) of the same model: nothing sparse, the toolchain's
                     own overhead (graph interpreter, static-cache step, mask built per step)
    act-sparse       compile(relu[t], lower): FFNs on sparse_ffn, t set for --sparsity of the
                     FFN gate activations off (pooled over layers, on a prompt of other random
                     tokens than the timed one and the compile example, so no gate value of
                     those sits exactly on t)
    2:4              compile(magnitude, compress24, lower): every linear but the lm_head 2:4
    2:4 + act        compile(relu[t], magnitude, compress24, lower)
    act + pred       compile(relu[t], predictor, lower): activation predictors fitted on
                     --calib-batches prompts of other random tokens; the FFNs compute only the
                     neurons they predict (gate included)
    2:4 + act + pred compile(relu[t], magnitude, predictor, compress24, lower)
    int8             compile(quantize, lower): every linear and the lm_head weight-only int8
    2:4 + int8       compile(magnitude, quantize, compress24, lower)
    2:4 + act + int8 compile(relu[t], magnitude, quantize, compress24, lower): the attention
                     projections and the lm_head int8, the FFNs on the 2:4 act-sparse kernels
    int4             compile(quantize(bits=4), lower): the projections int4 g32, the lm_head int8
    2:4 + int4       compile(magnitude, quantize(bits=4), compress24, lower)
    2:4 + act + int4 compile(relu[t], magnitude, quantize(bits=4), compress24, lower): the
                     attention projections 2:4 int4, the lm_head int8, the FFNs int8 on their
                     2:4 act-sparse op (there is no int4 FFN kernel yet)
    ..., native      each pysparse row's model again with generate(native=True): the step
                     graph as AOTInductor code (pysparse.runtime.native), no Python between its
                     ops; the rows without the suffix run the graph op by op (native=False). The
                     native build (or its cache hit) is paid in the warm-up call and printed
    llama.cpp f32 / f16 / q8_0 / q4_0  (SmolLM2, when llama-cpp-python is installed;
                     bench/llamacpp.py) the field's reference CPU runtime on the same weights
                     dequantised to an F32 (float32 table) or F16 (bfloat16 table) GGUF, and
                     quantised to Q8_0 and Q4_0 (both tables)

Decode tokens/s: batch 1, a --prompt-len prompt, --new-tokens tokens; every row is timed the same
way, by a streamer that stamps each token: decode = (new tokens - 1) / (last stamp - first new
token's stamp); the first new token's stamp minus the call's start is the prefill time (time to
first token). Prefill tokens/s at each --prefill-lens length: generate(max_new_tokens=1).
Models: ``smollm2`` (SmolLM2-135M-Instruct, real weights; --sparsity sets speed only, its
quality is issue 14's) or ``1b`` (bench/decode.py's 1B LLaMA shape, random weights).
Magnitude masks are used for speed rows: the mask's choice does not change the bytes read.

    python bench/generate.py                                  # SmolLM2, fp32 and bf16
    python bench/generate.py --model 1b --layers 22 --new-tokens 32 --dtypes float32
    python bench/generate.py --rss      # + RSS per row: each row saved, then loaded and run in a
                                        # fresh process (what a server holds), loaded vs peak

The OpenMP team is pinned (pysparse.pin_threads) unless --no-pin.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from pysparse.passes import (
    Compress24,
    Lower,
    MagnitudePrune,
    Predictor,
    Quantize,
    ReluSubstitution,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/'s helpers, however started
import llamacpp
from decode import build as build_1b
from decode import gate_threshold
from runinfo import header
from timing import interleaved_times

import pysparse

NATIVE_SUFFIX = ", native"  # the same model, generate(native=True)
BASE_ROWS = [
    "pysparse dense",
    "act-sparse",
    "act + pred",
    "2:4",
    "2:4 + act",
    "2:4 + act + pred",
    "int8",
    "2:4 + int8",
    "2:4 + act + int8",
    "int4",
    "2:4 + int4",
    "2:4 + act + int4",
]
ROWS = ["HF dense", *(r + s for r in BASE_ROWS for s in ("", NATIVE_SUFFIX))]
LLAMA_ROWS = {
    "float32": ["llama.cpp f32", "llama.cpp q8_0", "llama.cpp q4_0"],
    "bfloat16": ["llama.cpp f16", "llama.cpp q8_0", "llama.cpp q4_0"],
}


def load_model(name: str, layers: int, dtype: torch.dtype):
    if name == "1b":
        return build_1b(layers, dtype)
    from pysparse.cli import models

    model, _, _ = models.load(name)
    return model.to(dtype).eval()


def passes_for(row: str, t: float) -> list:
    return {
        "pysparse dense": lambda: [Lower()],
        "act-sparse": lambda: [ReluSubstitution(t), Lower()],
        "2:4": lambda: [MagnitudePrune(), Compress24(), Lower()],
        "2:4 + act": lambda: [ReluSubstitution(t), MagnitudePrune(), Compress24(), Lower()],
        "act + pred": lambda: [ReluSubstitution(t), Predictor(), Lower()],
        "2:4 + act + pred": lambda: [
            ReluSubstitution(t),
            MagnitudePrune(),
            Predictor(),
            Compress24(),
            Lower(),
        ],
        "int8": lambda: [Quantize(), Lower()],
        "2:4 + int8": lambda: [MagnitudePrune(), Quantize(), Compress24(), Lower()],
        "2:4 + act + int8": lambda: [
            ReluSubstitution(t),
            MagnitudePrune(),
            Quantize(),
            Compress24(),
            Lower(),
        ],
        "int4": lambda: [Quantize(bits=4), Lower()],
        "2:4 + int4": lambda: [MagnitudePrune(), Quantize(bits=4), Compress24(), Lower()],
        "2:4 + act + int4": lambda: [
            ReluSubstitution(t),
            MagnitudePrune(),
            Quantize(bits=4),
            Compress24(),
            Lower(),
        ],
    }[row]()


class Stamps:
    """A streamer that records when each put arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _ids) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def weight_bytes(compiled) -> int:
    """Bytes of the tensors the step graph holds (each storage once: tied weights count once)."""
    seen: dict[int, int] = {}
    for t in (*compiled.step.parameters(), *compiled.step.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def runner(row: str, model, compiled):
    """generate(ids, n) -> (prefill s, decode tokens/s) for one row."""

    def run(ids: torch.Tensor, n: int) -> tuple[float, float]:
        st = Stamps()
        t0 = time.perf_counter()
        if row == "HF dense":
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=st,
                pad_token_id=0,
            )
        else:
            compiled.generate(
                ids,
                max_new_tokens=n,
                eos_token_id=[],
                streamer=st,
                native=row.endswith(NATIVE_SUFFIX),
            )
        new = st.times[1:]  # the first put is the prompt
        decode = (len(new) - 1) / (new[-1] - new[0]) if len(new) > 1 else 0.0
        return new[0] - t0, decode

    return run


def n_ctx(args: argparse.Namespace) -> int:
    """llama.cpp's context: the longest generation or prefill the bench runs."""
    return max([args.prompt_len + args.new_tokens, *args.prefill_lens]) + 8


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith(field))) / 1024


def rss_child(args: argparse.Namespace) -> dict:
    """In a fresh process: load one row as a server would (the saved artifact, the HF model, the
    GGUF), then generate; RSS once loaded and the peak while generating (the kernel's high-water
    mark reset after loading, /proc/self/clear_refs)."""
    dtype = getattr(torch, args.dtypes[0])
    ids = torch.randint(100, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    row = args.rss_row
    if row == "HF dense":
        model = load_model(args.model, args.layers, dtype)
        run = runner(row, model, None)
    elif row.startswith("llama.cpp"):
        run = llamacpp.LlamaCppRunner(Path(args.rss_path), torch.get_num_threads(), n_ctx(args))
    else:
        run = runner(row, None, pysparse.load(args.rss_path))
    gc.collect()
    loaded = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run(ids, args.new_tokens)
    # after: the resident memory split into anonymous (allocated) and file-backed pages (the
    # weights file safetensors maps, paged in as the kernels first read it)
    return {
        "loaded": loaded,
        "peak": _rss_mib("VmHWM"),
        "anon": _rss_mib("RssAnon"),
        "file": _rss_mib("RssFile"),
    }


def bench_dtype(args: argparse.Namespace, dtype: torch.dtype) -> None:
    model = load_model(args.model, args.layers, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (1, args.prompt_len), generator=gen)
    calib = torch.randint(
        100, 1000, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)
    )
    t = gate_threshold(model, args.sparsity, calib, layers=None)
    # the predictors' (and any calibration pass's) batches: prompts of other random tokens
    cgen = torch.Generator().manual_seed(2)
    calibration = [
        ((torch.randint(100, 1000, (1, args.prompt_len), generator=cgen),), {})
        for _ in range(args.calib_batches)
    ]
    rows = list(args.rows)
    dname = str(dtype).removeprefix("torch.")
    ggufs: dict[str, Path] = {}
    if args.model == "smollm2" and dname in LLAMA_ROWS and not args.no_llamacpp:
        if llamacpp.available():
            from pysparse.cli import models

            src = models.resolve("smollm2")
            for row in LLAMA_ROWS[dname]:
                kind = row.split()[-1]
                dst = Path(args.gguf_dir) / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf"
                dst.parent.mkdir(parents=True, exist_ok=True)
                ggufs[row] = llamacpp.write_float_gguf(src.folder / src.gguf_file, dst, kind)
                rows.append(row)
        else:
            print("  (llama.cpp rows skipped: pip install llama-cpp-python, see bench/llamacpp.py)")
    compiled = {}
    for row in rows:
        if row == "HF dense" or row in ggufs:
            continue
        base = row.removesuffix(NATIVE_SUFFIX)
        if base in compiled:
            compiled[row] = compiled[base]
            continue
        t0 = time.perf_counter()
        compiled[base] = pysparse.compile(
            model, passes_for(base, t), (ids[:, :8],), calibration=calibration
        )
        compiled[row] = compiled[base]
        print(f"  compiled {base} in {time.perf_counter() - t0:.1f}s", flush=True)
    runs = {r: runner(r, model, compiled.get(r)) for r in args.rows}
    for r, path in ggufs.items():
        runs[r] = llamacpp.LlamaCppRunner(path, torch.get_num_threads(), n_ctx(args))
    print(f"\n{args.model} {dname}: FATReLU t={t:.4g}", flush=True)

    if "HF dense" in args.rows and "pysparse dense" in compiled:
        with torch.no_grad():
            hf = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                pad_token_id=0,
            )
        ours = compiled["pysparse dense"].generate(
            ids, max_new_tokens=32, eos_token_id=[], native=False
        )
        same = int((hf[0, -32:] == ours[0, -32:]).cumprod(0).sum())
        print(f"  pysparse dense vs HF greedy: first {same} of 32 new tokens identical")
    decode = {r: [] for r in rows}
    prefill0 = {r: [] for r in rows}
    for r in rows:  # warm-up
        t0 = time.perf_counter()
        runs[r](ids, 4)
        if r.endswith(NATIVE_SUFFIX):
            print(
                f"  {r}: native step graph built or read from the cache, first call {time.perf_counter() - t0:.0f}s"
            )
    for _ in range(args.repeats):
        for r in rows:
            p, d = runs[r](ids, args.new_tokens)
            decode[r].append(d)
            prefill0[r].append(p)
    base = decode.get("HF dense")
    llama = decode.get(next((r for r in LLAMA_ROWS.get(dname, []) if r in decode), ""))
    q8, q4 = decode.get("llama.cpp q8_0"), decode.get("llama.cpp q4_0")
    print(f"  decode, prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1:")
    print(
        f"  {'row':<24} {'tok/s':>8} {'vs HF':>7} {'vs llama':>8} {'vs q8_0':>7} {'vs q4_0':>7}"
        f"  {'TTFT ms':>8} {'weights MB':>10} {'GB/s':>6}"
    )

    def ratio(r: str, ref: list | None) -> float:
        return statistics.median(d / b for d, b in zip(decode[r], ref)) if ref else float("nan")

    for r in rows:
        tps = statistics.median(decode[r])
        mb = weight_bytes(compiled.get(r)) / 1e6 if r in compiled else float("nan")
        print(
            f"  {r:<24} {tps:>8.2f} {ratio(r, base):>6.2f}x {ratio(r, llama):>7.2f}x "
            f"{ratio(r, q8):>6.2f}x {ratio(r, q4):>6.2f}x "
            f"{statistics.median(prefill0[r]) * 1e3:>8.0f} {mb:>10.0f} {mb * tps / 1e3:>6.1f}"
        )
    print(
        "  (weights MB: every weight tensor of the step graph, the tied embedding/lm_head once; "
        "GB/s = that x tok/s: the bytes a dense or 2:4 token reads, an upper bound for "
        "act-sparse rows, which skip most FFN up/down rows)"
    )
    for n in args.prefill_lens:
        pids = torch.randint(100, 1000, (1, n), generator=gen)
        timed = interleaved_times(
            {r: (lambda r=r, p=pids: runs[r](p, 1)) for r in rows},
            min_repeats=args.repeats,
            min_seconds=0.0,
            warmup=1,
        )
        print(f"  prefill {n} tokens (generate 1 token):")
        for r in rows:
            print(f"  {r:<24} {n / timed[r].median_s:>8.1f} tok/s {timed[r].ratio:>6.2f}x")
    if args.rss:
        rss_table(args, rows, compiled, ggufs, dname)


def rss_table(
    args: argparse.Namespace, rows: list, compiled: dict, ggufs: dict, dname: str
) -> None:
    """Each row saved (pysparse rows: pysparse.save), then loaded and run in a child process."""
    import tempfile

    print(
        f"  RSS, each row loaded in a fresh process ({args.prompt_len}+{args.new_tokens} tokens):"
    )
    print(f"  {'row':<24} {'loaded MiB':>10} {'peak MiB':>9} {'after: anon':>11} {'file':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for r in rows:
            if r.endswith(NATIVE_SUFFIX):  # the same weights as the row it compiles
                continue
            path = ggufs.get(r, "")
            if r in compiled:
                path = Path(tmp) / r.replace(" ", "_").replace(":", "").replace("+", "p")
                pysparse.save(compiled[r], path)
            cmd = [sys.executable, __file__, "--rss-row", r, "--rss-path", str(path)]
            cmd += ["--model", args.model, "--layers", str(args.layers), "--dtypes", dname]
            cmd += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"  {r:<24} {got['loaded']:>10.0f} {got['peak']:>9.0f} {got['anon']:>11.0f} "
                f"{got['file']:>6.0f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "1b"], default="smollm2")
    ap.add_argument("--layers", type=int, default=22, help="1b: number of layers")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-lens", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-batches", type=int, default=16, help="predictor calibration prompts")
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--rss", action="store_true", help="RSS per row, loaded in a fresh process")
    ap.add_argument("--rss-row", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-llamacpp", action="store_true", help="leave out the llama.cpp rows")
    ap.add_argument(
        "--gguf-dir",
        default=str(Path.home() / ".cache" / "pysparse" / "gguf"),
        help="where the F32/F16 GGUFs for llama.cpp are written (once)",
    )
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    if not args.no_pin:
        pysparse.pin_threads()
    if args.rss_row:
        print(json.dumps(rss_child(args)))
        return
    print(header())
    for name in args.dtypes:
        bench_dtype(args, getattr(torch, name))


if __name__ == "__main__":
    main()
