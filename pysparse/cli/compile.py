"""``pysparse compile [MODEL]``: run a recipe's passes on a model with calibration text, save the
artifact, and end with its held-out quality, sparsity and measured speed-up (``--no-eval`` skips);
under torchrun every rank compiles its share and rank 0 alone prints and saves."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import torch

import pysparse
from pysparse.artifacts.report import pass_facts
from pysparse.cli.common import calibration_text, load_hf, quality_summary
from pysparse.learning.distributed import rank_and_world


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compile", help="compile a model and save the artifact")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pysparse.require_extension()
    rank = _join_torchrun()
    if rank == 0:
        return _compile(args)
    # Other ranks of a torchrun compile: the same passes on their share of the data (calibration
    # statistics summed, training sharded with FSDP2); rank 0 alone prints, saves and evaluates.
    logging.getLogger().setLevel(logging.ERROR)  # rank 0 logs the warnings every rank would
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return _compile(args, save=False)


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


def _compile(args: argparse.Namespace, save: bool = True) -> int:
    model, tok, src = load_hf(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    recipe = _recipe(args)
    batches = _calibration_batches(recipe, tok, model, src)
    _warn_relu_on_decoder(recipe, model)
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
    _save_and_evaluate(args, sm, model, tok, src, recipe, t0)
    return 0


def _calibration_batches(recipe: Any, tok: Any, model: Any, src: Any) -> list:
    """The recipe's calibration text tokenized into batches; prints what the compile runs on."""
    from pysparse.quality.corpus import documents, sentences
    from pysparse.quality.evaluate import encode_sentences, pack_text

    cal = recipe.calibration
    if cal["text"] != "corpus":
        texts = calibration_text(cal["text"])
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
    return batches


def _warn_relu_on_decoder(recipe: Any, model: Any) -> None:
    """A ReLU swap with no ProSparse training ruins a decoder: says so on stderr, with the
    recipes that work."""
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


def _save_and_evaluate(
    args: argparse.Namespace, sm: Any, model: Any, tok: Any, src: Any, recipe: Any, t0: float
) -> None:
    """Saves the artifact to ``--out`` (with the recipe as run) and, unless ``--no-eval``, adds the
    held-out quality and speed-up to its report."""
    # Recorded so that `pysparse eval` finds the dense original to compare with.
    sm.gm.meta["pysparse"].setdefault("model", {})["source"] = src.spec
    # the recipe as run (command-line calibration flags folded in): --recipe OUT makes it again
    out = pysparse.save(sm, args.out, tokenizer=tok, files={"recipe.yaml": recipe.to_yaml()})
    print(f"compiled in {time.perf_counter() - t0:.1f}s; artifact: {out}")
    if not args.no_eval:
        from pysparse.artifacts import report

        # the artifact as saved, as `pysparse eval` / `report` / `generate` load it: what is
        # measured is what a user runs, and its native build is then in the cache for them
        result, speeds = quality_summary(pysparse.load(out), model, tok)
        data = report.add_evaluation(report.read(out), result, speeds)
        print(f"report: {report.rewrite(out, data)}")


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
