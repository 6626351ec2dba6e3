"""``pysparse generate DIR "PROMPT" [--max-new-tokens N] [--chat]``: stream a compiled decoder's
continuation (KV cache on the sparse kernels), then prefill and decode tokens/s."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from pysparse.cli.common import add_native_argument, load_decoder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with a compiled decoder (KV cache)")
    p.add_argument("dir", help="artifact directory from `pysparse compile` of a decoder")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling"
    )
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    p.add_argument("--seed", type=int, default=None, help="sampling: random seed")
    p.add_argument(
        "--max-cache-len",
        type=int,
        default=None,
        help="KV-cache limit, prompt + new tokens (default: the model's context length)",
    )
    add_native_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from pysparse.runtime.native import enabled as native_enabled

    loaded, tok = load_decoder(args.dir)
    enc = _encode_prompt(args, tok)
    if args.native and native_enabled():  # before the prompt: a first build logs, then text
        loaded.native_step()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    if not args.chat:  # the continuation follows the prompt on the same line
        print(args.prompt, end="", flush=True)
    loaded.generate(
        enc["input_ids"],
        enc.get("attention_mask"),
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        streamer=streamer,
        max_cache_len=args.max_cache_len,
        generator=generator,
        native=None if args.native else False,  # None: the default (PYSPARSE_NATIVE, fallback)
    )
    st = loaded.last_generation
    print(
        f"\n[prefill {st.prompt_tokens} tokens: {st.prefill_tokens_per_s:.1f} tok/s "
        f"({st.prefill_s * 1e3:.0f} ms); decode {st.decode_steps} tokens: "
        f"{st.decode_tokens_per_s:.1f} tok/s; {'native' if st.native else 'graph'}]",
        file=sys.stderr,
    )
    return 0


def _encode_prompt(args: argparse.Namespace, tok: Any) -> Any:
    """The prompt tokenized, wrapped in the tokenizer's chat template under ``--chat``."""
    if not args.chat:
        return tok(args.prompt, return_tensors="pt")
    if not getattr(tok, "chat_template", None):
        raise RuntimeError(f"the tokenizer of {args.dir} has no chat template; drop --chat")
    text = tok.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    return tok(text, return_tensors="pt", add_special_tokens=False)
