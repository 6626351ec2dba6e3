"""Typed Python entry points to the ``torch.ops.pysparse`` kernels, with their fake (meta)
implementations for torch.compile / torch.export (the linear op's autograd is in C++).

The schemas themselves are defined once, in C++ (csrc/register_ops.cpp).

Packed 2:4 layout (every op here, CPU and CUDA):
    values  [N, K/2]        the two kept weights of each group of 4 along K, ascending index order
    meta    uint8 [N, ceil(K/8)]  per group one nibble ``idx0 | idx1 << 2`` (idx0 < idx1), two groups
                             per byte, the even group in the low nibble; when K/4 is odd the last
                             high nibble is 0. Groups with fewer than two nonzeros store explicit
                             zeros at the nonzero indices completed by the lowest free ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pysparse.kernels import extension

__all__ = [
    "STRICT_CUSPARSELT_ENV",
    "attention",
    "batch_invariant",
    "compress24",
    "cuda_route_counts",
    "cusparselt_cache_info",
    "decompress24",
    "dense_linear",
    "ffn_predict",
    "int4_linear",
    "int8_linear",
    "last_cuda_route",
    "meta_cols",
    "obs24_sweep_",
    "prox24",
    "prox24_",
    "prune24",
    "reset_cuda_route_counts",
    "sparse24_int4_linear",
    "sparse24_int8_linear",
    "sparse24_linear",
    "sparse_ffn",
    "sparse_ffn24",
    "sparse_ffn24_int8",
    "sparse_mlp",
    "sparse_mlp24",
]


def meta_cols(K: int) -> int:
    """Bytes of metadata per row for ``K`` input features: ceil(K / 8)."""
    return (K // 4 + 1) // 2


def compress24(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs a 2:4-sparse weight.

    Args:
        dense: ``[N, K]`` float32/bfloat16/float16/float64, ``K % 4 == 0``, at most two nonzeros in
            every group of 4 consecutive elements along K. Anything else is an error that names the
            first offending row and group (the weight is never pruned silently; use ``prune24``).

    Returns:
        ``(values [N, K/2] same dtype, meta uint8 [N, ceil(K/8)])`` in the layout of this module.
    """
    extension.require_extension()
    return torch.ops.pysparse.compress24.default(dense)


def decompress24(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """Exact inverse of ``compress24``.

    Args:
        values: ``[N, K/2]``.
        meta: uint8 ``[N, ceil(K/8)]``.
        K: in_features of the dense weight (``2 * values.shape[1]``).

    Returns:
        The dense ``[N, K]`` weight (zeros where nothing was kept).
    """
    extension.require_extension()
    return torch.ops.pysparse.decompress24.default(values, meta, K)


def prune24(w: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Magnitude (or score) 2:4 pruning.

    Args:
        w: ``[N, K]`` weight, ``K % 4 == 0``.
        score: optional ``[N, K]`` importance (compared in float32); default ``|w|``. In each group
            of 4 along K the two largest scores are kept; ties go to the lower index and NaN scores
            rank lowest, so exactly two entries per group survive.

    Returns:
        ``w`` with the other two entries of each group set to zero (same dtype and shape).
    """
    extension.require_extension()
    return torch.ops.pysparse.prune24.default(w, score)


def sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ W.T + bias`` with ``W`` in the packed 2:4 layout.

    Args:
        x: ``[..., K]``, same dtype as ``values`` (float32 or bfloat16).
        values, meta: the packed weight from ``compress24`` (``W`` is ``[N, K]``).
        bias: optional ``[N]`` of the same dtype.

    Returns:
        ``[..., N]`` in x's dtype. bfloat16 weights are read as bfloat16 and accumulated in float32;
        the result is rounded once.
    """
    extension.require_extension()
    return torch.ops.pysparse.sparse24_linear.default(x, values, meta, bias)


def dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ weight.T + bias`` for a dense ``weight`` ``[N, K]``: what ``Lower`` puts in place
    of every linear a model leaves dense (the lm_head first of all).

    On the CPU, fp32 up to 16 rows of x and bf16 up to 2 (``PYSPARSE_DENSE_GEMV_MAX_ROWS``) run on the
    core's dense GEMV, which streams the weight on every thread (torch's BLAS GEMV runs on one
    thread on some CPUs); other shapes, dtypes and devices run torch's ``linear``. Accumulation is
    fp32; bf16 results are rounded once.
    """
    extension.require_extension()
    return torch.ops.pysparse.dense_linear.default(x, weight, bias)


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = (x @ qweight.T) * scale + bias``: a weight-only int8 linear (``formats.quantize_int8``).

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16.
        qweight: int8 ``[N, K]``.
        scale: float32 ``[N]``, one per output row (the weight is ``qweight * scale[:, None]``).
        bias: optional ``[N]`` in x's dtype.

    Returns:
        ``[..., N]`` in x's dtype. On the CPU up to 16 rows of x (``PYSPARSE_INT8_GEMV_MAX_ROWS``)
        run the core's kernels: fp32 accumulation on the int8 values widened in registers, each
        row of x the same bits alone or batched; more rows (and other devices) dequantise the
        weight once and run torch's ``linear``.
    """
    extension.require_extension()
    return torch.ops.pysparse.int8_linear.default(x, qweight, scale, bias)


def sparse24_int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``int8_linear`` over a 2:4 int8 weight: ``values`` int8 ``[N, K/2]`` and ``meta`` as
    ``compress24`` makes them from the int8 weight (this module's packed layout), ``scale`` float32
    ``[N]``. More rows of x than the kernels take run the 2:4 linear on the dequantised values."""
    extension.require_extension()
    return torch.ops.pysparse.sparse24_int8_linear.default(x, values, meta, scale, bias)


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W.T + bias`` over a weight-only int4 weight (``formats.quantize_int4`` /
    ``formats.pack_int4``): ``W[n, k] = q[n, k] * scale[n, k // group]``.

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16.
        qweight: uint8 ``[N, ceil(K / 32) * 16]``: values in [-8, 7] plus 8, two a byte per block
            of 32 (``formats.pack_int4``).
        scale: float16 ``[N, ceil(K / group)]``.
        group: values per scale, 32 or 64.
        bias: optional ``[N]`` in x's dtype.

    Returns:
        ``[..., N]`` in x's dtype. On the CPU up to 16 rows of x run the core's kernels (AVX512-VNNI:
        x quantised per block of 32 as for int8; AVX2: nibbles dequantised in registers); more
        rows dequantise the weight a cache-sized chunk at a time into torch's GEMM.
    """
    extension.require_extension()
    return torch.ops.pysparse.int4_linear.default(x, qweight, scale, group, bias)


def sparse24_int4_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``int4_linear`` over a 2:4 int4 weight: the ``K/2`` kept values packed as ``pack_int4``
    packs them (``values`` uint8 ``[N, ceil(K / 64) * 16]``), ``meta`` as ``compress24`` makes it,
    ``scale`` float16 ``[N, ceil(K / 2 / group)]`` (a group is ``group`` kept values, i.e.
    ``2 * group`` columns)."""
    extension.require_extension()
    return torch.ops.pysparse.sparse24_int4_linear.default(x, values, meta, scale, group, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` without dropout: what ``Lower`` puts
    in the generation step graph.

    On the CPU, fp32 and bf16 with up to 4 query rows (``PYSPARSE_ATTENTION_MAX_QUERIES``) and a
    boolean mask (or none) run the core's decode kernel: one task per (batch, head, query row)
    over the cache, grouped KV heads read in place (no repeat), fp32 softmax; everything else runs
    torch's attention.
    """
    extension.require_extension()
    return torch.ops.pysparse.attention.default(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def prox24(w: torch.Tensor, lam: float, max_iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """ProxSparse's proximal operator of ``lam * Reg`` on every group of 4 along the last dim.

    ``Reg(w) = |w1w2w3| + |w2w3w4| + |w3w4w1| + |w4w1w2|`` (zero iff at most 2 of 4 are
    nonzero). Per group: the best of keeping the top 2, the top 3 and all 4 magnitudes, the
    latter two by coordinate descent run until no coordinate moves more than
    ``tol * (1 + max|group|)`` (or ``max_iters`` sweeps); signs are kept. See
    csrc/core/prox24_group.h for the exact iteration.

    Args:
        w: any float32/float64/bfloat16/float16 tensor whose last dim is a multiple of 4 (CPU or
            CUDA); bf16/fp16 are computed in float32.
        lam: the threshold (``lam1`` or ``lr * lam1``, see ``passes.proxsparse``), ``>= 0``.

    Returns:
        A new contiguous tensor; ``prox24_`` works in place.
    """
    extension.require_extension()
    return torch.ops.pysparse.prox24.default(w, lam, max_iters, tol)


def prox24_(w: torch.Tensor, lam: float, max_iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """In-place ``prox24`` (returns ``w``)."""
    extension.require_extension()
    torch.ops.pysparse.prox24_.default(w, lam, max_iters, tol)
    return w


def obs24_sweep_(
    wt: torch.Tensor, prune: torch.Tensor, hinv: torch.Tensor, block: int = 32, choose: int = 0
) -> torch.Tensor:
    """SparseGPT's 2:4 column sweep of one layer (the OBS update), in place, CPU float64.

    Args:
        wt: ``[K, N]`` contiguous float64, the weight transposed (row r = input feature r);
            updated in place (pruned entries are left with rounding residue: zero them).
        prune: ``[K, N]`` contiguous bool; written with the chosen mask (True = pruned), or read
            as a fixed mask with ``choose=2``.
        hinv: ``[K, K]`` float64 (any strides), the upper Cholesky factor of (H + damping)^-1.
        block: columns per lazy batch (a multiple of 4).
        choose: 0 chooses 2 of every 4 input features by w^2 / [H^-1]_rr^2; 1 chooses 2 of every
            4 output features by |w| (``down_along="d_model"``); 2 keeps ``prune``.

    See ``pysparse.kernels.reference.reference_obs24_sweep`` for the exact steps. Returns ``wt``.
    """
    extension.require_extension()
    torch.ops.pysparse.obs24_sweep_.default(wt, prune, hinv, block, choose)
    return wt


def sparse_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float = 0.0,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Activation-sparse gated FFN ``(fatrelu_t(x @ w_gate.T) * (x @ w_up.T)) @ w_down_t``.

    ``fatrelu_t(v) = v if v >= t else 0`` (``t = 0`` is ReLU). Exact, no predictor: the gate is
    computed for every neuron, the up row and the down row only for neurons active for some row of
    ``x``. One row of ``x`` always runs on pysparse's kernels; up to 16 rows do while few enough
    neurons fire (measured crossovers, csrc/aten/sparse_ffn_cpu.cpp), with the gate on torch's GEMM
    from 9 rows (from 2 for bf16 on AMX CPUs and for small FFNs); otherwise, and always past 16
    rows, torch's dense GEMM. On pysparse's kernels results are the same bits for any thread count
    and for a row whatever else is in the batch.

    Args:
        x: ``[..., d_model]``, the weights' dtype (float32 or bfloat16).
        w_gate, w_up: ``[d_ff, d_model]`` (``nn.Linear`` weights).
        w_down_t: the down projection's weight transposed, ``[d_ff, d_model]`` contiguous.
        threshold: ``t >= 0``.
        predicted: activation predictors' output, bool ``[..., d_ff]`` (x's leading shape): the
            result is the exact FFN restricted to the (row, neuron) pairs marked True — a firing
            neuron left out is lost, a predicted one that does not fire gives 0 as in the exact
            FFN — and a neuron's gate, up and down rows are read only when it is predicted for
            some row. None: exact.

    Returns:
        ``[..., d_model]`` in x's dtype; bfloat16 weights are read as bfloat16, the math is float32
        and the result is rounded once.
    """
    extension.require_extension()
    return torch.ops.pysparse.sparse_ffn.default(x, w_gate, w_up, w_down_t, threshold, predicted)


def ffn_predict(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None = None,
    max_rows: int | None = None,
) -> torch.Tensor:
    """Activation predictors' mask: ``(x @ a.T) @ b.T + c > 0``, bool ``[..., d_ff]`` — what the
    predictor pass computes for the FFN ops' ``predicted``.

    Args:
        x: ``[..., d_model]``, the weights' dtype (float32 or bfloat16).
        a: ``[rank, d_model]``; b: ``[d_ff, rank]``; c: ``[d_ff]`` or None.
        max_rows: when ``x`` has more rows than this (``x.numel() / d_model``), every neuron is
            predicted (an all-true mask; the predictor is not run), so the FFN runs exact. None:
            no cap.

    On the CPU up to 16 rows of ``x`` run on the FFN kernels' streaming dense gate (``x @ a.T`` is
    kept in float32, not rounded to the weights' dtype), past that on torch's matmuls; CUDA on
    torch's. A logit within rounding of 0 may fall either way between those routes.
    """
    extension.require_extension()
    return torch.ops.pysparse.ffn_predict.default(x, a, b, c, -1 if max_rows is None else max_rows)


def sparse_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float = 0.0,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain (BERT) form: ``fatrelu_t(x @ w1.T + b1) @ w2_t + b2``; ``w1`` and ``w2_t`` are
    ``[d_ff, d_model]`` (``w2_t`` is the second linear's weight transposed). As ``sparse_ffn``."""
    extension.require_extension()
    return torch.ops.pysparse.sparse_mlp.default(x, w1, b1, w2_t, b2, threshold, predicted)


def sparse_ffn24(
    x: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor],
    threshold: float = 0.0,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sparse_ffn`` over 2:4 weights: both sparsities at once.

    Args:
        x: ``[..., d_model]``.
        gate, up: ``(values, meta)`` from ``compress24`` of the ``[d_ff, d_model]`` weights.
        down: ``(values [d_ff/4, 2, d_model], meta uint8 [d_ff/4, ceil(d_model/2)])`` from
            ``pysparse.kernels.formats.pack_down24`` — the down weight pruned 2:4 along d_ff (what every
            mask pass makes) regrouped so that each group of 4 neurons is one contiguous block, read
            only when one of its neurons is active. Or, for a down weight pruned 2:4 along d_model
            instead, ``compress24(W_down.T)`` (values ``[d_ff, d_model/2]``): then each active
            neuron's half-size row is read and nothing else (fewer bytes at high sparsity; but no
            mask pass makes that pattern yet, and cuSPARSELt cannot run it).
        threshold: ``t >= 0``.
        predicted: as ``sparse_ffn``'s.
    """
    extension.require_extension()
    return torch.ops.pysparse.sparse_ffn24.default(x, *gate, *up, *down, threshold, predicted)


def sparse_ffn24_int8(
    x: torch.Tensor,
    gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    threshold: float = 0.0,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sparse_ffn24`` over int8 weights (the quantize pass): each of ``gate``, ``up``, ``down`` is
    ``(values int8, meta, scale float32)`` in sparse_ffn24's layouts (``formats.compress24_int8``
    for gate and up, ``formats.pack_down24`` of the compressed int8 down weight), the scales per
    neuron (``[d_ff]``) for gate and up and per output (``[d_model]``) for down. ``x`` float32 or
    bfloat16; the result in x's dtype. The gate runs on the int8 linears' kernels (see
    ``int8_linear``), the up and down rows of the active neurons widened in registers."""
    extension.require_extension()
    return torch.ops.pysparse.sparse_ffn24_int8.default(x, *gate, *up, *down, threshold, predicted)


def sparse_mlp24(
    x: torch.Tensor,
    w1: tuple[torch.Tensor, torch.Tensor],
    b1: torch.Tensor | None,
    w2: tuple[torch.Tensor, torch.Tensor],
    b2: torch.Tensor | None,
    threshold: float = 0.0,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sparse_mlp`` over 2:4 weights (``w1`` as ``compress24`` packs it, ``w2`` as
    ``pack_down24`` does; see ``sparse_ffn24``)."""
    extension.require_extension()
    return torch.ops.pysparse.sparse_mlp24.default(x, *w1, b1, *w2, b2, threshold, predicted)


def kernel_stats(reset: bool = False) -> dict[str, dict[str, int]]:
    """What the CPU kernels really ran since the last reset, per route (``gemv_avx512``,
    ``gemm_avx2``, ``linear_amx``, ``linear_dense_chunks``, ``ffn_gate``, ``ffn_tail``, ...): number of
    parallel regions (``calls``), threads asked for and threads that executed part of each region
    (summed over calls), calls whose threads all ran on one CPU (``one_cpu_calls``), and the
    smallest CPU affinity mask a team thread had (``min_allowed_cpus``). ``linear_dense_chunks``
    runs on torch's GEMM, whose threads are not traced (``threads_used`` 0). Counters are
    process-wide; ``reset=True`` returns them and starts again from zero.

    A kernel at its designed width has ``threads_used == threads_requested`` and
    ``one_cpu_calls == 0``; bench/decode.py prints these beside its timings."""
    extension.require_extension()
    return {k: dict(v) for k, v in extension._C.kernel_stats(reset).items()}


# ---- what ran on CUDA ----------------------------------------------------------------------------
#: Set this environment variable to 1 to make an unexpected cuSPARSELt fallback an error: a bf16
#: ``sparse24_linear`` call on CUDA with more than 16 rows and N, K multiples of 16 must then run
#: on cuSPARSELt, and raises (naming the failing step) instead of quietly running decompress +
#: cuBLAS. Read on every call. Tests and bench/gpu_linear24.py set it.
STRICT_CUSPARSELT_ENV = "PYSPARSE_STRICT_CUSPARSELT"


@contextlib.contextmanager
def batch_invariant(enabled: bool = True) -> Iterator[None]:
    """Batch-invariant mode inside the block (process-wide; restored on exit): every CPU op
    computes each row of its input with the same arithmetic whatever the other rows are and
    however many (the route one row alone takes, over row chunks of at most the rows it takes:
    no switch to torch's GEMM or the AMX tiles by batch size, no FFN route chosen by how many
    neurons fire across rows). What continuous batching needs for a request's greedy tokens not
    to depend on what else is decoded with it; one row alone runs the same routes either way.
    ``PYSPARSE_BATCH_INVARIANT=1`` starts a process in it."""
    extension.require_extension()
    before = extension._C.batch_invariant()
    extension._C.set_batch_invariant(bool(enabled))
    try:
        yield
    finally:
        extension._C.set_batch_invariant(before)


def last_cuda_route(op: str = "sparse24_linear") -> str:
    """The route the calling thread's last CUDA call of ``op`` took, ``"none"`` before any.

    ``sparse24_linear``: ``"gemv"`` (our 2:4 kernel, up to 16 rows), ``"cusparselt"``, ``"cublas"``
    (decompress + cuBLAS where cuSPARSELt does not apply: fp32, or N or K not a multiple of 16) or
    ``"cublas_fallback"`` (cuSPARSELt applied but failed; see ``STRICT_CUSPARSELT_ENV``).
    ``sparse_ffn`` (all four FFN ops): ``"ffn_kernel"`` (up to 8 rows) or ``"ffn_dense"``.
    """
    extension.require_extension()
    return extension._C.last_cuda_route(op)


def cuda_route_counts() -> dict[str, int]:
    """Process-wide count of CUDA op calls per route (names as in ``last_cuda_route``)."""
    extension.require_extension()
    return dict(extension._C.cuda_route_counts())


def reset_cuda_route_counts() -> None:
    """Sets every ``cuda_route_counts`` counter back to 0."""
    extension.require_extension()
    extension._C.reset_cuda_route_counts()


def cusparselt_cache_info() -> dict[str, int]:
    """cuSPARSELt state: ``plans_cached`` (now), ``plans_built`` and ``searches_run`` (since the
    start; one algorithm search per plan), ``weights`` and ``bytes`` of the compressed weight
    buffers alive now (each lives exactly as long as its ``values`` tensor)."""
    extension.require_extension()
    return dict(extension._C.cusparselt_cache_info())


def _register_linear_fakes() -> None:
    @torch.library.register_fake("pysparse::sparse24_linear")
    def _sparse24_linear_fake(x, values, meta, bias=None):
        torch._check(values.dim() == 2, lambda: "sparse24_linear: values must be 2-D")
        K = values.shape[1] * 2
        torch._check(
            x.shape[-1] == K, lambda: "sparse24_linear: x.shape[-1] must equal in_features"
        )
        torch._check(x.dtype == values.dtype, lambda: "sparse24_linear: x and weight dtypes differ")
        torch._check(meta.dtype == torch.uint8, lambda: "sparse24_linear: meta must be uint8")
        torch._check(
            x.device == values.device,
            lambda: f"sparse24_linear: x is on {x.device} but the weight is on {values.device}",
        )
        return x.new_empty((*x.shape[:-1], values.shape[0]))

    def check_int8(op, x, w, n, k, scale, bias):
        torch._check(w.dtype == torch.int8, lambda: f"{op}: the weight must be int8")
        torch._check(x.shape[-1] == k, lambda: f"{op}: x.shape[-1] must equal in_features")
        torch._check(scale.shape == (n,), lambda: f"{op}: scale must be [out_features]")
        torch._check(scale.dtype == torch.float32, lambda: f"{op}: scale must be float32")
        torch._check(
            x.device == w.device,
            lambda: f"{op}: x is on {x.device} but the weight is on {w.device}",
        )
        return x.new_empty((*x.shape[:-1], n))

    @torch.library.register_fake("pysparse::int8_linear")
    def _int8_linear_fake(x, qweight, scale, bias=None):
        torch._check(qweight.dim() == 2, lambda: "int8_linear: qweight must be 2-D")
        return check_int8("int8_linear", x, qweight, *qweight.shape, scale, bias)

    @torch.library.register_fake("pysparse::sparse24_int8_linear")
    def _sparse24_int8_linear_fake(x, values, meta, scale, bias=None):
        torch._check(values.dim() == 2, lambda: "sparse24_int8_linear: values must be 2-D")
        torch._check(meta.dtype == torch.uint8, lambda: "sparse24_int8_linear: meta must be uint8")
        n, k = values.shape[0], values.shape[1] * 2
        return check_int8("sparse24_int8_linear", x, values, n, k, scale, bias)

    def check_int4(op, x, w, scale, group, stored, bias):
        torch._check(group in (32, 64), lambda: f"{op}: group must be 32 or 64")
        torch._check(w.dtype == torch.uint8, lambda: f"{op}: the int4 weight must be uint8")
        torch._check(
            w.shape[1] == (stored + 31) // 32 * 16,
            lambda: f"{op}: the int4 weight's bytes a row do not match x.shape[-1]",
        )
        torch._check(
            scale.shape == (w.shape[0], (stored + group - 1) // group),
            lambda: f"{op}: scale must be [out_features, groups]",
        )
        torch._check(scale.dtype == torch.float16, lambda: f"{op}: scale must be float16")
        torch._check(
            x.device == w.device,
            lambda: f"{op}: x is on {x.device} but the weight is on {w.device}",
        )
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("pysparse::int4_linear")
    def _int4_linear_fake(x, qweight, scale, group, bias=None):
        torch._check(qweight.dim() == 2, lambda: "int4_linear: qweight must be 2-D")
        return check_int4("int4_linear", x, qweight, scale, group, x.shape[-1], bias)

    @torch.library.register_fake("pysparse::sparse24_int4_linear")
    def _sparse24_int4_linear_fake(x, values, meta, scale, group, bias=None):
        torch._check(values.dim() == 2, lambda: "sparse24_int4_linear: values must be 2-D")
        torch._check(meta.dtype == torch.uint8, lambda: "sparse24_int4_linear: meta must be uint8")
        torch._check(x.shape[-1] % 4 == 0, lambda: "sparse24_int4_linear: K % 4 != 0")
        return check_int4("sparse24_int4_linear", x, values, scale, group, x.shape[-1] // 2, bias)

    @torch.library.register_fake("pysparse::attention")
    def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "attention: 4-D")
        torch._check(q.shape[-1] == k.shape[-1], lambda: "attention: q and k head_dim differ")
        torch._check(q.dtype == k.dtype == v.dtype, lambda: "attention: q, k, v dtypes differ")
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))

    @torch.library.register_fake("pysparse::dense_linear")
    def _dense_linear_fake(x, weight, bias=None):
        torch._check(weight.dim() == 2, lambda: "dense_linear: weight must be 2-D")
        torch._check(
            x.shape[-1] == weight.shape[1], lambda: "dense_linear: x.shape[-1] must be in_features"
        )
        torch._check(x.dtype == weight.dtype, lambda: "dense_linear: x and weight dtypes differ")
        torch._check(
            x.device == weight.device,
            lambda: f"dense_linear: x is on {x.device} but the weight is on {weight.device}",
        )
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_fakes() -> None:
    @torch.library.register_fake("pysparse::prox24")
    def _prox24_fake(w, lam, max_iters=100, tol=1e-6):
        torch._check(w.dim() >= 1, lambda: "prox24: w must have at least one dim")
        torch._check(w.shape[-1] % 4 == 0, lambda: "prox24: the last dim must be a multiple of 4")
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pysparse::prox24_")
    def _prox24_inplace_fake(w, lam, max_iters=100, tol=1e-6):
        torch._check(w.shape[-1] % 4 == 0, lambda: "prox24_: the last dim must be a multiple of 4")

    @torch.library.register_fake("pysparse::obs24_sweep_")
    def _obs24_sweep_fake(wt, prune, hinv, block=32, choose=0):
        torch._check(wt.dim() == 2, lambda: "obs24_sweep_: wt must be 2-D")

    @torch.library.register_fake("pysparse::compress24")
    def _compress24_fake(dense):
        torch._check(dense.dim() == 2, lambda: "compress24: dense must be 2-D")
        N, K = dense.shape
        torch._check(
            K % 4 == 0, lambda: f"compress24: in_features must be a multiple of 4, got {K}"
        )
        values = dense.new_empty((N, K // 2))
        meta = dense.new_empty((N, meta_cols(K)), dtype=torch.uint8)
        return values, meta

    @torch.library.register_fake("pysparse::decompress24")
    def _decompress24_fake(values, meta, K):
        torch._check(values.dim() == 2 and meta.dim() == 2, lambda: "decompress24: 2-D inputs")
        torch._check(values.shape[1] * 2 == K, lambda: "decompress24: values must be [N, K/2]")
        torch._check(meta.dtype == torch.uint8, lambda: "decompress24: meta must be uint8")
        return values.new_empty((values.shape[0], K))

    @torch.library.register_fake("pysparse::prune24")
    def _prune24_fake(w, score=None):
        torch._check(w.dim() == 2, lambda: "prune24: w must be 2-D")
        torch._check(w.shape[1] % 4 == 0, lambda: "prune24: in_features must be a multiple of 4")
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    def _ffn_out(op, x, dtype, device, d_model, d_ff=None, predicted=None):
        torch._check(x.dim() >= 1, lambda: f"{op}: x must have a d_model dim")
        if predicted is not None:
            torch._check(predicted.dtype == torch.bool, lambda: f"{op}: predicted must be bool")
            torch._check(
                tuple(predicted.shape) == (*x.shape[:-1], d_ff),
                lambda: f"{op}: predicted must be x's leading shape + [d_ff]",
            )
        torch._check(x.shape[-1] == d_model, lambda: f"{op}: x.shape[-1] must equal d_model")
        torch._check(x.dtype == dtype, lambda: f"{op}: x and weight dtypes differ")
        torch._check(x.device == device, lambda: f"{op}: x and the weights are on other devices")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pysparse::sparse_ffn")
    def _sparse_ffn_fake(x, w_gate, w_up, w_down_t, threshold=0.0, predicted=None):
        torch._check(w_gate.dim() == 2, lambda: "sparse_ffn: w_gate must be 2-D")
        torch._check(w_up.shape == w_gate.shape, lambda: "sparse_ffn: w_up must match w_gate")
        torch._check(w_down_t.shape == w_gate.shape, lambda: "sparse_ffn: w_down_t must be [F, D]")
        F, D = w_gate.shape
        return _ffn_out("sparse_ffn", x, w_gate.dtype, w_gate.device, D, F, predicted)

    @torch.library.register_fake("pysparse::ffn_predict")
    def _ffn_predict_fake(x, a, b, c=None, max_rows=-1):
        torch._check(a.dim() == 2 and b.dim() == 2, lambda: "ffn_predict: a and b must be 2-D")
        torch._check(b.shape[1] == a.shape[0], lambda: "ffn_predict: b must be [d_ff, rank]")
        torch._check(x.shape[-1] == a.shape[1], lambda: "ffn_predict: x.shape[-1] must be d_model")
        torch._check(x.dtype == a.dtype, lambda: "ffn_predict: x and weight dtypes differ")
        return x.new_empty((*x.shape[:-1], b.shape[0]), dtype=torch.bool)

    @torch.library.register_fake("pysparse::sparse_mlp")
    def _sparse_mlp_fake(x, w1, b1, w2_t, b2, threshold=0.0, predicted=None):
        torch._check(w1.dim() == 2, lambda: "sparse_mlp: w1 must be 2-D")
        torch._check(w2_t.shape == w1.shape, lambda: "sparse_mlp: w2_t must be [F, D]")
        return _ffn_out("sparse_mlp", x, w1.dtype, w1.device, w1.shape[1], w1.shape[0], predicted)

    def _down24_check(op, dv, dm, F, D):
        torch._check(
            (dv.dim() == 3 and dv.shape[0] * 4 == F and dv.shape[2] == D)
            or (dv.dim() == 2 and dv.shape[0] == F and dv.shape[1] * 2 == D),
            lambda: f"{op}: down_values must be [d_ff/4, 2, d_model] or [d_ff, d_model/2]",
        )
        torch._check(dm.dtype == torch.uint8, lambda: f"{op}: down_meta must be uint8")

    @torch.library.register_fake("pysparse::sparse_ffn24")
    def _sparse_ffn24_fake(x, gv, gm, uv, um, dv, dm, threshold=0.0, predicted=None):
        torch._check(gv.dim() == 2, lambda: "sparse_ffn24: gate_values must be 2-D")
        F, D = gv.shape[0], gv.shape[1] * 2
        torch._check(uv.shape == gv.shape, lambda: "sparse_ffn24: up_values must match gate")
        _down24_check("sparse_ffn24", dv, dm, F, D)
        return _ffn_out("sparse_ffn24", x, gv.dtype, gv.device, D, F, predicted)

    @torch.library.register_fake("pysparse::sparse_ffn24_int8")
    def _sparse_ffn24_int8_fake(
        x, gv, gm, gs, uv, um, us, dv, dm, ds, threshold=0.0, predicted=None
    ):
        op = "sparse_ffn24_int8"
        torch._check(gv.dim() == 2, lambda: f"{op}: gate_values must be 2-D")
        F, D = gv.shape[0], gv.shape[1] * 2
        torch._check(uv.shape == gv.shape, lambda: f"{op}: up_values must match gate")
        torch._check(dv.dim() == 3, lambda: f"{op}: down_values must be [d_ff/4, 2, d_model]")
        _down24_check(op, dv, dm, F, D)
        torch._check(gv.dtype == torch.int8, lambda: f"{op}: the weights must be int8")
        torch._check(gs.shape == (F,) and us.shape == (F,), lambda: f"{op}: scales must be [d_ff]")
        torch._check(ds.shape == (D,), lambda: f"{op}: down_scale must be [d_model]")
        return _ffn_out(op, x, x.dtype, gv.device, D, F, predicted)

    @torch.library.register_fake("pysparse::sparse_mlp24")
    def _sparse_mlp24_fake(x, w1v, w1m, b1, w2v, w2m, b2, threshold=0.0, predicted=None):
        torch._check(w1v.dim() == 2, lambda: "sparse_mlp24: w1_values must be 2-D")
        F, D = w1v.shape[0], w1v.shape[1] * 2
        _down24_check("sparse_mlp24", w2v, w2m, F, D)
        return _ffn_out("sparse_mlp24", x, w1v.dtype, w1v.device, D, F, predicted)

    # The autograd formulas of sparse24_linear and dense_linear are registered in C++ (csrc/aten/sparse24_autograd.cpp):
    # a Python registration would put a Python call on every eager invocation.


if extension.extension_error() is None:
    _register_linear_fakes()
    _register_fakes()
