"""Evaluation harness: how far a compiled model is from its dense original, and how sparse its
FFN activations are.

  * Encoders (sentence embeddings): on held-out sentences, the mean cosine between the compiled
    model's and the dense original's sentence embeddings (mean over real tokens of the final
    hidden states), and the Spearman correlation between their pairwise-similarity matrices (do
    the two models rank sentence pairs alike?).
  * Decoders: perplexity on a text with sliding windows of ``max_length`` tokens advanced by
    ``stride`` (default max_length / 2); each token is scored once, with at least
    ``max_length - stride`` tokens of context except at the start.
  * Activation sparsity, whenever the FFNs are ReLU/FATReLU: the fraction of zeros in the FFN
    intermediate x1 (the input of the down projection) per token, padding excluded, averaged over
    tokens per layer, then over layers (ProSparse, arXiv 2402.13516: zeros of x1 per token).

Default held-out text: ``pysparse.quality.corpus.sentences("heldout")`` (never used for calibration or
training by pysparse). ``evaluate(...)`` returns a dict (JSON-ready); ``format_table`` prints it.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from pysparse.compiler.graph import tapped
from pysparse.learning.objectives import hidden_states, mean_pool

aten = torch.ops.aten


# ---- activation sparsity ------------------------------------------------------------------------
def _linear_like(n: Any) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return False
    name = str(n.target)
    return n.target is aten.linear.default or name.startswith(("pysparse.sparse", "pysparse.dense"))


def _is_relu_like(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target in (aten.relu.default, aten.relu_.default):
        return True
    # FATReLU as written by ReluSubstitution: where(x >= t, x, 0)
    if n.target is aten.where.ScalarOther and isinstance(n.args[0], fx.Node):
        return n.args[0].target is aten.ge.Scalar
    return False


_PASS_THROUGH = {
    aten.view.default,
    aten.reshape.default,
    aten.clone.default,
    aten.dropout.default,
    aten._unsafe_view.default,
    aten.contiguous.default,
}


def activation_sites(gm: fx.GraphModule) -> list[fx.Node]:
    """The FFN intermediates x1 of ``gm``: a ReLU-like node, or the product of one with another
    tensor (gated FFNs), that feeds a linear (dense or pysparse) — in graph order, one per layer."""
    sites: list[fx.Node] = []
    for r in gm.graph.nodes:
        if not _is_relu_like(r):
            continue
        frontier = [r]
        found = None
        for _ in range(3):  # relu -> (mul) -> (view...) -> linear
            nxt = []
            for n in frontier:
                for u in n.users:
                    if _linear_like(u) and u.args[0] is n:
                        found = n
                    elif u.target is aten.mul.Tensor or u.target in _PASS_THROUGH:
                        nxt.append(u)
            if found is not None:
                break
            frontier = nxt
        if found is not None and found not in sites:
            sites.append(found)
    return sites


_FFN_OPS = (
    "pysparse::sparse_ffn",
    "pysparse::sparse_mlp",
    "pysparse::sparse_ffn24",
    "pysparse::sparse_mlp24",
    "pysparse::sparse_ffn24_int8",
)


def _ffn_op(n: fx.Node) -> str | None:
    """The name of the lowered FFN op ``n`` calls (see passes/lower.py), else None."""
    if n.op != "call_function" or not hasattr(n.target, "name"):
        return None
    name = n.target.name()
    return name if name in _FFN_OPS else None


def lowered_ffn_x1(op: str, args: Sequence[Any]) -> torch.Tensor:
    """x1 (the down projection's input) of a lowered FFN op, recomputed from its arguments."""
    linear24 = torch.ops.pysparse.sparse24_linear.default
    x = args[0]
    if op == "pysparse::sparse_ffn":
        g, u, t = x @ args[1].T, x @ args[2].T, args[4] if len(args) > 4 else 0.0
    elif op == "pysparse::sparse_ffn24":
        g, u = linear24(x, args[1], args[2]), linear24(x, args[3], args[4])
        t = args[7] if len(args) > 7 else 0.0
    elif op == "pysparse::sparse_ffn24_int8":
        int8 = torch.ops.pysparse.sparse24_int8_linear.default
        g, u = int8(x, args[1], args[2], args[3]), int8(x, args[4], args[5], args[6])
        t = args[10] if len(args) > 10 else 0.0
    elif op == "pysparse::sparse_mlp":
        g = x @ args[1].T + (args[2] if args[2] is not None else 0)
        u, t = None, args[5] if len(args) > 5 else 0.0
    else:
        g, u = linear24(x, args[1], args[2], args[3]), None
        t = args[7] if len(args) > 7 else 0.0
    a = torch.where(g >= t, g, 0)
    at = _PREDICTED_ARG[op]
    if len(args) > at and args[at] is not None:  # activation predictors' mask
        a = a * args[at]
    return a if u is None else a * u


# Where the FFN ops take ``predicted`` (see csrc/register_ops.cpp).
_PREDICTED_ARG = {
    "pysparse::sparse_ffn24_int8": 11,
    "pysparse::sparse_ffn": 5,
    "pysparse::sparse_mlp": 6,
    "pysparse::sparse_ffn24": 8,
    "pysparse::sparse_mlp24": 8,
}


def measure_activation_sparsity(
    gm: fx.GraphModule, batches: Sequence[tuple[tuple, dict]], call_kwargs: dict | None = None
) -> list[float] | None:
    """Per-layer zero fraction of x1 (see the module docstring); None when the FFNs are not
    ReLU-like. FFNs lowered to pysparse's FFN ops count too (x1 recomputed from the op's inputs).
    The graph is restored afterwards."""
    lowered = [n for n in gm.graph.nodes if _ffn_op(n)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = sorted(activation_sites(gm) + lowered, key=order.__getitem__)
    if not sites:
        return None
    if call_kwargs is None:  # a captured graph knows the keyword arguments its capture fixed
        call_kwargs = gm.meta.get("pysparse", {}).get("call_kwargs", {})
    zeros = [0.0] * len(sites)
    tokens = [0] * len(sites)
    current: dict[str, Any] = {}

    def observe(x: torch.Tensor, i: int) -> torch.Tensor:
        per_token = (x.detach() == 0).float().mean(-1).reshape(-1)
        mask = current.get("mask")
        if mask is not None and mask.numel() == per_token.numel():
            keep = mask.reshape(-1).bool()
            per_token = per_token[keep]
        zeros[i] += float(per_token.sum())
        tokens[i] += per_token.numel()
        return x

    def observe_lowered(op: str, args: tuple, i: int) -> None:
        observe(lowered_ffn_x1(op, args), i)

    taps = [
        (node, observe_lowered, (_ffn_op(node), tuple(node.args), i), "side")
        if node in lowered
        else (node, observe, (i,), "output")
        for i, node in enumerate(sites)
    ]
    with tapped(gm, taps), torch.no_grad():
        for args, kwargs in batches:
            current["mask"] = kwargs.get("attention_mask")
            gm(*args, **{**call_kwargs, **kwargs})
    return [z / max(t, 1) for z, t in zip(zeros, tokens)]


# ---- quality ------------------------------------------------------------------------------------
def _pooled(model: Any, batch: tuple[tuple, dict]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*batch[0], **batch[1])
    return mean_pool(hidden_states(out).float(), batch)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def encoder_quality(model: Any, reference: Any, batches: Sequence[tuple[tuple, dict]]) -> dict:
    e = torch.cat([_pooled(model, b) for b in batches])
    r = torch.cat([_pooled(reference, b) for b in batches])
    cos = torch.nn.functional.cosine_similarity(e, r, dim=-1)
    en = torch.nn.functional.normalize(e, dim=-1)
    rn = torch.nn.functional.normalize(r, dim=-1)
    iu = torch.triu_indices(len(e), len(e), offset=1)
    se, sr = (en @ en.T)[iu[0], iu[1]], (rn @ rn.T)[iu[0], iu[1]]
    return {
        "sentences": len(e),
        "mean_cosine_to_dense": round(float(cos.mean()), 4),
        "min_cosine_to_dense": round(float(cos.min()), 4),
        "spearman_pairwise_similarity": round(_spearman(se, sr), 4),
    }


def _lm_caller(model: Any) -> Any:
    """How to call ``model`` on one window of token ids, as it was captured: a compiled or loaded
    model takes exactly the inputs of its examples (``input_ids`` positional or by keyword, with an
    ``attention_mask`` or without), a plain module what its signature offers."""
    examples = getattr(model, "example_kwargs", None)
    if isinstance(examples, dict):
        by_keyword, mask = "input_ids" in examples, "attention_mask" in examples
    else:
        by_keyword = False
        try:
            mask = "attention_mask" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            mask = False

    def call(window: torch.Tensor) -> Any:
        kwargs = {"attention_mask": torch.ones_like(window)} if mask else {}
        if by_keyword:
            return model(input_ids=window, **kwargs)
        return model(window, **kwargs)

    return call


def perplexity(
    model: Any, ids: torch.Tensor, max_length: int = 256, stride: int | None = None
) -> float:
    """Sliding-window perplexity of a 1-D token sequence (see the module docstring)."""
    stride = stride or max_length // 2
    call = _lm_caller(model)
    nll, count, scored_to = 0.0, 0, 0
    n = ids.numel()
    for start in range(0, max(n - 1, 1), stride):
        end = min(start + max_length, n)
        window = ids[start:end].unsqueeze(0)
        with torch.no_grad():
            out = call(window)
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        targets = window[0, 1:]
        lp = torch.nn.functional.cross_entropy(logits[0, :-1], targets, reduction="none")
        first_new = max(scored_to - start - 1, 0)  # tokens already scored by an earlier window
        nll += float(lp[first_new:].sum())
        count += lp[first_new:].numel()
        scored_to = end
        if end == n:
            break
    return math.exp(nll / max(count, 1))


def encode_sentences(
    tokenizer: Any, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> list[tuple[tuple, dict]]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append(((enc["input_ids"],), {"attention_mask": enc["attention_mask"]}))
    return out


def pack_text(
    tokenizer: Any,
    texts: Sequence[str],
    block: int = 256,
    batch_size: int = 4,
    sep: str = "\n\n",
) -> list[tuple[tuple, dict]]:
    """``texts`` joined by ``sep``, tokenised once and cut into full blocks of ``block`` tokens,
    ``batch_size`` blocks per batch (the last batch may hold fewer; a tail shorter than a block is
    dropped). No padding: every token is real, and the context lengths are those that a sliding
    window perplexity scores - the way to feed decoders' learning passes."""
    if block < 2 or batch_size < 1:
        raise ValueError(
            f"pack_text: block must be >= 2 and batch_size >= 1, got {block}, {batch_size}"
        )
    ids = tokenizer(sep.join(texts), return_tensors="pt")["input_ids"][0]
    n = ids.numel() // block
    if n == 0:
        raise ValueError(
            f"pack_text: the text is {ids.numel()} tokens, shorter than one block of {block}; "
            "give more text or a smaller block"
        )
    blocks = ids[: n * block].view(n, block)
    return [
        (
            (blocks[i : i + batch_size].clone(),),
            {"attention_mask": torch.ones_like(blocks[i : i + batch_size])},
        )
        for i in range(0, n, batch_size)
    ]


def evaluate(
    model: Any,
    tokenizer: Any,
    reference: Any = None,
    texts: Sequence[str] | None = None,
    *,
    decoder: bool | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    stride: int | None = None,
) -> dict[str, Any]:
    """Evaluates ``model`` (compiled, loaded or plain) against ``reference`` (the dense original;
    optional for decoders) on ``texts`` (default: the held-out corpus)."""
    from pysparse.quality.corpus import sentences

    texts = list(texts) if texts is not None else sentences("heldout")
    if not texts:
        raise ValueError("evaluate: no text to evaluate on")
    batches = encode_sentences(tokenizer, texts, batch_size, max_length)
    if decoder is None:
        with torch.no_grad():
            out = model(*batches[0][0], **batches[0][1])
        decoder = hasattr(out, "logits")
    result: dict[str, Any] = {"kind": "decoder" if decoder else "encoder"}
    if decoder:
        ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
        result["tokens"] = ids.numel()
        result["window"], result["stride"] = max_length, stride or max_length // 2
        result["perplexity"] = round(perplexity(model, ids, max_length, stride), 4)
        if reference is not None:
            result["perplexity_dense"] = round(perplexity(reference, ids, max_length, stride), 4)
    else:
        if reference is None:
            raise ValueError(
                "evaluate: encoders are compared with their dense original; pass reference="
            )
        result.update(encoder_quality(model, reference, batches))
    gm = getattr(model, "gm", None) or getattr(model, "module", None)
    if isinstance(gm, fx.GraphModule):
        per_layer = measure_activation_sparsity(gm, batches)
        if per_layer is not None:
            result["activation_sparsity_per_layer"] = [round(s, 4) for s in per_layer]
            result["activation_sparsity"] = round(sum(per_layer) / len(per_layer), 4)
    return result


def speedup(
    model: Any, reference: Any, batch: tuple[tuple, dict], repeats: int = 7
) -> dict[str, Any]:
    """Forward latency of ``model`` and of ``reference`` (the dense original) on ``batch``, runs
    interleaved after one warm-up each (a noisy machine slows both alike), medians in ms."""
    args, kwargs = batch
    times: dict[str, list[float]] = {"model": [], "reference": []}
    with torch.inference_mode():
        for i in range(repeats + 1):
            for name, m in (("reference", reference), ("model", model)):
                t0 = time.perf_counter()
                m(*args, **kwargs)
                if i:  # the first run of each is the warm-up
                    times[name].append(time.perf_counter() - t0)
    dense, ours = (statistics.median(times[k]) * 1e3 for k in ("reference", "model"))
    ids = args[0] if args else kwargs.get("input_ids")
    return {
        "dense_ms": round(dense, 2),
        "compiled_ms": round(ours, 2),
        "speedup": round(dense / ours, 3),
        "batch_shape": list(ids.shape) if isinstance(ids, torch.Tensor) else None,
        "threads": torch.get_num_threads(),
    }


def summary(
    result: dict[str, Any], report: Sequence[dict[str, Any]], speeds: Sequence[dict] = ()
) -> str:
    """The lines a compile ends with: quality against the dense original on held-out text, weight
    and activation sparsity, and the measured speed-up."""
    if result["kind"] == "decoder":
        ppl = f"perplexity {result['perplexity']:.2f}"
        if "perplexity_dense" in result:
            ratio = result["perplexity"] / result["perplexity_dense"]
            ppl += f" (dense {result['perplexity_dense']:.2f}, {ratio:.2f}x)"
        quality = f"{ppl} on {result['tokens']} held-out tokens"
    else:
        quality = (
            f"mean cosine to the dense original {result['mean_cosine_to_dense']:.3f} "
            f"(lowest {result['min_cosine_to_dense']:.3f}), Spearman of pairwise similarities "
            f"{result['spearman_pairwise_similarity']:.3f}, on held-out sentences"
        )
    masked = [e for e in report if "layers_pruned" in e]
    weights = (
        f"2:4 on {masked[-1]['layers_pruned']} linears (half their weights zero)"
        if masked
        else "dense (no 2:4 pass)"
    )
    act = result.get("activation_sparsity")
    acts = f"{act:.1%} of FFN activations zero" if act is not None else "no activation sparsity"
    lines = [f"quality: {quality}", f"sparsity: weights {weights}; {acts}"]
    for speed in speeds:
        shape = "x".join(str(d) for d in speed["batch_shape"] or [])
        lines.append(
            f"speed: {speed['speedup']:.2f}x the dense model ({speed['compiled_ms']:.1f} ms vs "
            f"{speed['dense_ms']:.1f} ms a forward, batch x tokens {shape}, {speed['threads']} "
            "threads, median of interleaved runs on this machine)"
        )
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    rows = [f"| {k} | {v} |" for k, v in result.items() if k != "activation_sparsity_per_layer"]
    lines = ["| metric | value |", "|---|---|", *rows]
    per = result.get("activation_sparsity_per_layer")
    if per:
        lines.append("")
        lines.append("| layer | " + " | ".join(str(i) for i in range(len(per))) + " |")
        lines.append("|---|" + "---:|" * len(per))
        lines.append("| zeros in x1 | " + " | ".join(f"{s:.1%}" for s in per) + " |")
    return "\n".join(lines)
