"""``pysparse serve DIR``: an OpenAI-compatible server (completions, chat, streaming) on a compiled
decoder, with continuous batching (pysparse.serving)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pysparse.cli.common import add_native_argument, load_decoder

_log = logging.getLogger("pysparse.serve")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a compiled decoder over the OpenAI API (continuous batching)"
    )
    p.add_argument("dir", help="artifact directory from `pysparse compile` of a decoder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-batch", type=int, default=8, help="sequences decoded together (KV-cache slots)"
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting for a slot before 429"
    )
    p.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        help="tokens a request may hold, prompt + max_tokens (default: the model's context, "
        "at most 2048); the cache is --max-batch times this",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PYSPARSE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PYSPARSE_API_KEY, else none)",
    )
    p.add_argument(
        "--model-name", default=None, help="the model id clients send (default: DIR's name)"
    )
    add_native_argument(p)
    p.add_argument(
        "--no-batch-invariant",
        dest="invariant",
        action="store_false",
        help="let batched decode steps take the fastest route for their batch size (a request's "
        "tokens may then depend on what else is served)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from pysparse.serving.app import Server
        from pysparse.serving.engine import Engine
    except ImportError as exc:
        raise RuntimeError(
            f"pysparse serve needs the server packages ({exc.name} is missing): "
            "pip install 'pysparse[serve]'"
        ) from exc
    loaded, tok = load_decoder(args.dir)
    engine = Engine(
        loaded,
        max_batch=args.max_batch,
        max_cache_len=args.max_cache_len,
        max_queue=args.max_queue,
        native=None if args.native else False,
        invariant=args.invariant,
    )
    name = args.model_name or Path(args.dir).resolve().name
    server = Server(engine, tok, name, api_key=args.api_key, start_engine=False)
    print(
        f"pysparse serve: model '{name}' ({'native' if engine.native else 'graph'} step), "
        f"{args.max_batch} slots x {engine.max_cache_len} tokens "
        f"({engine.cache_bytes / 2**20:.0f} MiB KV cache), "
        f"batch-invariant {'on' if args.invariant else 'off'}; "
        f"http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    # The engine runs on this (the main) thread, uvicorn on another (Engine.run says why).
    # SIGTERM / Ctrl-C drain: uvicorn stops taking connections and lets the requests in flight
    # finish; its shutdown then stops the engine, whose loop returns here.
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning")
    web = uvicorn.Server(config)

    def serve_http() -> None:
        # However uvicorn ends (its lifespan shutdown, a signal while it was still starting, a
        # failure), the engine on the main thread must stop too, or engine.run() never returns.
        try:
            web.run()
        finally:
            engine.stop(drain=not web.force_exit)

    thread = threading.Thread(target=serve_http, name="pysparse-http", daemon=True)

    def on_signal(signum: int, frame: object) -> None:
        server.draining = True  # /health answers 503 "draining" from now on
        if web.should_exit:  # a second Ctrl-C: stop now
            web.force_exit = True
            engine.stop(drain=False)
        web.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread.start()
    while not web.started:
        if not thread.is_alive():
            raise RuntimeError(f"the HTTP server did not start on {args.host}:{args.port}")
        time.sleep(0.05)
    engine.run()
    thread.join()
    print("pysparse serve: drained, exiting", file=sys.stderr, flush=True)
    return 0
