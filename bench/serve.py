"""``pysparse serve`` under load, against llama-cpp-python's OpenAI server in the same run.

    python bench/serve.py ARTIFACT_DIR [--clients 1,2,4,8,16] [--max-tokens 64]
        [--gguf-dir DIR] [--llama-kind f32|f16|q8_0|q4_0] [--no-llamacpp] [--no-invariant-row]
        [--soak SECONDS]

Each server runs as its own process (2 threads), started the way a user starts it:
``pysparse serve DIR --max-batch 16`` and ``python -m llama_cpp.server --model GGUF --n_threads 2``
(llama-cpp-python's server, when installed, on the embedded SmolLM2 converted to a float GGUF by
bench/llamacpp.py: llama.cpp does not skip zeros, so its speed is that of any weights of the
shape). Per concurrency N, N streaming clients start together, each with its own prompt of a fixed
set (lengths 5-60 tokens), greedy, ``max_tokens`` each; printed: aggregate decode tokens/s (all
generated tokens over the wall time of the round), its ratio to one client's, p50/p99 time to
first token and per-token latency (the gaps between a client's streamed tokens), then the ratio of
the two servers at each N. ``--no-invariant-row`` leaves out the pysparse row that runs with
``--no-batch-invariant`` (what batch invariance costs).

``--soak S``: S seconds of 1-8 concurrent clients with random prompts and lengths, a fifth of them
disconnecting after a few tokens; reports failed requests (any not 200, or a stream that ended
without [DONE], other than the disconnects) and the server's RSS after warm-up and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runinfo

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in simple words why the sky is blue, as you would to a child who keeps asking why.",
    "def quicksort(xs):",
    "List three uses of sparse matrices in machine learning and say briefly why each one helps.",
    "Once upon a time",
    "Translate to French: The weather is nice today and we are going to the park after lunch.",
    "What is 17 times 23?",
    (
        "Summarise the plot of a detective story in which the butler did not do it, but the "
        "gardener did, with the help of a parrot that remembered every word it had heard."
    ),
    "Hello! How are you?",
    "Give me a recipe for pancakes.",
    "The three laws of motion are",
    "Why do cats purr?",
    "A haiku about autumn leaves:",
    "Name the planets of the solar system in order from the sun, and one fact about each.",
    "In Python, a generator is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Proc:
    """A server process; ``model`` is the id its requests name."""

    def __init__(self, name: str, cmd: list[str], port: int, model: str, startup_s: float = 900):
        self.name, self.port, self.model = name, port, model
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        self.log = open(f"/tmp/bench-serve-{name}.log", "w")  # noqa: SIM115
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd="/")
        deadline = time.time() + startup_s
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"{name} exited; see /tmp/bench-serve-{name}.log")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not start in {startup_s:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.log.close()


EOS_BIAS: dict[str, float] = {}  # token id -> -100 for the model's end-of-sequence ids (main)


async def stream(
    client: httpx.AsyncClient,
    proc: Proc,
    prompt: str,
    max_tokens: int,
    disconnect_after: int | None = None,
) -> dict:
    """One streaming completion: token stamps, and how it ended. The end-of-sequence ids get a
    -100 logit bias on both servers, so every request generates max_tokens tokens (the dense
    model ends some of these prompts at once; the sparse one never does)."""
    body = {
        "model": proc.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": EOS_BIAS,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    done = False
    async with client.stream("POST", proc.url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "stamps": [], "t0": t0, "done": False, "tokens": 0}
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                break
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if disconnect_after is not None and len(stamps) >= disconnect_after:
                break
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"status": 200, "stamps": stamps, "t0": t0, "done": done, "tokens": tokens}


def round_of(proc: Proc, n: int, max_tokens: int) -> dict:
    """N clients on one event loop (one thread: the client's own CPU use stays small on a
    2-core machine that also runs the server), started together."""

    async def go() -> tuple[list[dict], float]:
        limits = httpx.Limits(max_connections=n + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            start = time.perf_counter()
            results = await asyncio.gather(
                *(stream(client, proc, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(n))
            )
            return list(results), time.perf_counter() - start

    results, wall = asyncio.run(go())
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    gaps = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    failed = sum(1 for r in results if r["status"] != 200 or not r["done"])
    short = sum(1 for r in results if r["tokens"] < max_tokens)
    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "ttft": ttft,
        "gaps": gaps,
        "failed": failed,
        "short": short,
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_server(proc: Proc, clients: list[int], max_tokens: int, repeats: int) -> dict[int, dict]:
    round_of(proc, 1, 8)  # warm-up
    out = {}
    for n in clients:
        rounds = [round_of(proc, n, max_tokens) for _ in range(repeats)]
        best = statistics.median_low([r["tok_s"] for r in rounds])
        r = next(r for r in rounds if r["tok_s"] == best)
        r["ttft"] = [x for rr in rounds for x in rr["ttft"]]
        r["gaps"] = [x for rr in rounds for x in rr["gaps"]]
        r["failed"] = sum(rr["failed"] for rr in rounds)
        r["short"] = sum(rr["short"] for rr in rounds)
        out[n] = r
        print(
            f"  {proc.name:<28} N={n:<3} {r['tok_s']:8.1f} tok/s  ({r['tokens']} tokens)  "
            f"TTFT p50 {pct(r['ttft'], 0.5) * 1e3:7.1f} ms p99 {pct(r['ttft'], 0.99) * 1e3:7.1f} ms  "
            f"token p50 {pct(r['gaps'], 0.5) * 1e3:6.1f} ms p99 {pct(r['gaps'], 0.99) * 1e3:6.1f} ms"
            + (f"  FAILED {r['failed']}" if r["failed"] else "")
            + (f"  ({r['short']} requests ended early)" if r["short"] else ""),
            flush=True,
        )
    return out


def soak(proc: Proc, seconds: float, max_tokens: int) -> None:
    """8 concurrent client loops for ``seconds``: random prompts and lengths, a fifth of the
    requests disconnecting after 1-6 tokens."""
    counts = {"ok": 0, "disconnected": 0, "failed": 0}
    rss0 = rss_mib(proc.p.pid)

    async def worker(client: httpx.AsyncClient, seed: int, stop: float) -> None:
        r = random.Random(seed)
        await asyncio.sleep(r.random() * 2)
        while time.time() < stop:
            cut = r.randint(1, 6) if r.random() < 0.2 else None
            try:
                res = await stream(client, proc, r.choice(PROMPTS), r.randint(4, max_tokens), cut)
            except httpx.HTTPError:
                res = {"status": 0, "done": False}
            if cut is not None and res["status"] == 200:
                counts["disconnected"] += 1
            elif res["status"] == 200 and res["done"]:
                counts["ok"] += 1
            else:
                counts["failed"] += 1
            await asyncio.sleep(r.random() * 0.5)

    async def go() -> None:
        stop = time.time() + seconds
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=16)) as client:
            await asyncio.gather(*(worker(client, i, stop) for i in range(8)))

    asyncio.run(go())
    time.sleep(1)
    rss1 = rss_mib(proc.p.pid)
    print(
        f"\nsoak {seconds:.0f} s, 8 clients (random prompts, 4-{max_tokens} tokens, a fifth "
        f"disconnecting): {counts['ok']} completed, {counts['disconnected']} disconnected on "
        f"purpose, {counts['failed']} failed; server RSS {rss0:.0f} MiB after warm-up -> "
        f"{rss1:.0f} MiB at the end ({(rss1 / rss0 - 1) * 100:+.1f}%)",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("artifact", help="a decoder artifact from `pysparse compile`")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per N (the median is kept)")
    ap.add_argument("--gguf-dir", default=None, help="where the float GGUFs for llama.cpp are kept")
    ap.add_argument("--llama-kind", default="f32", choices=["f32", "f16", "q8_0", "q4_0"])
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--no-invariant-row", action="store_true")
    ap.add_argument("--soak", type=float, default=0.0, help="seconds of soak after the table")
    ap.add_argument("--eos-ids", default="0,2", help="ids given a -100 logit bias (SmolLM2's)")
    args = ap.parse_args()
    EOS_BIAS.update({i: -100.0 for i in args.eos_ids.split(",") if i})
    clients = [int(c) for c in args.clients.split(",")]
    print(runinfo.header(), flush=True)
    print(
        f"artifact {args.artifact}; {args.max_tokens} tokens a request, greedy; median of {args.repeats} rounds"
    )
    rows: dict[str, dict[int, dict]] = {}

    def pysparse_server(name: str, *extra: str) -> Proc:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "pysparse.cli",
            "serve",
            args.artifact,
            "--port",
            str(port),
            "--max-batch",
            "16",
            "--model-name",
            "m",
            *extra,
        ]
        return Proc(name, cmd, port, "m")

    proc = pysparse_server("pysparse")
    try:
        rows["pysparse"] = run_server(proc, clients, args.max_tokens, args.repeats)
        if args.soak:
            soak(proc, args.soak, args.max_tokens)
    finally:
        proc.stop()
    if not args.no_invariant_row:
        proc = pysparse_server("pysparse --no-batch-invariant", "--no-batch-invariant")
        try:
            rows["pysparse --no-batch-invariant"] = run_server(
                proc, clients, args.max_tokens, args.repeats
            )
        finally:
            proc.stop()
    if not args.no_llamacpp:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as exc:
            print(
                f"(llama-cpp-python's server is not installed: {exc}; pip install 'llama-cpp-python[server]')"
            )
        else:
            import llamacpp

            from pysparse.cli import models

            src = models.resolve("smollm2")
            gguf_dir = Path(args.gguf_dir or "/tmp/pysparse-gguf")
            gguf_dir.mkdir(parents=True, exist_ok=True)
            kind = args.llama_kind
            path = llamacpp.write_float_gguf(
                Path(src.folder) / src.gguf_file,
                gguf_dir / f"SmolLM2-135M-Instruct.{kind.upper()}.gguf",
                kind,
            )
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(path),
                "--model_alias",
                "m",
                "--n_threads",
                "2",
                "--n_threads_batch",
                "2",
                "--n_ctx",
                "2048",
                "--port",
                str(port),
                # serve every request to its end (by default a new request interrupts the one
                # running: concurrent clients would get truncated outputs)
                "--interrupt_requests",
                "False",
            ]
            proc = Proc(f"llama.cpp server {kind.upper()}", cmd, port, "m")
            try:
                rows[proc.name] = run_server(proc, clients, args.max_tokens, args.repeats)
            finally:
                proc.stop()
    base = rows["pysparse"]
    print(
        "\naggregate decode tokens/s by concurrency (x: over pysparse's own N=1; ratio: pysparse / row)"
    )
    print(f"{'server':<30}" + "".join(f"{'N=' + str(n):>16}" for n in clients))
    for name, r in rows.items():
        one = r[clients[0]]["tok_s"]
        print(
            f"{name:<30}"
            + "".join(f"{r[n]['tok_s']:9.1f} ({r[n]['tok_s'] / one:4.2f}x)" for n in clients)
        )
    for name, r in rows.items():
        if name == "pysparse":
            continue
        print(
            f"{'pysparse / ' + name:<30}"
            + "".join(f"{base[n]['tok_s'] / r[n]['tok_s']:16.2f}" for n in clients)
        )


if __name__ == "__main__":
    main()
