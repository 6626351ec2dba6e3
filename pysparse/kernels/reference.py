"""Float64 PyTorch references of every kernel: the oracle for tests, fuzzing and benchmarks.

Written straight from the definitions, with no attempt at speed. Each returns float64 results
(or exact bit copies where the op only moves data) so a kernel's error can be measured against it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "is_24_sparse",
    "prox24_objective",
    "reference_attention",
    "reference_compress24",
    "reference_decompress24",
    "reference_dense_linear",
    "reference_int4_linear",
    "reference_int8_linear",
    "reference_int8_linear_a8",
    "reference_obs24_sweep",
    "reference_prox24",
    "reference_prune24",
    "reference_sparse24_int4_linear",
    "reference_sparse24_int8_linear",
    "reference_sparse24_linear",
    "reference_sparse_ffn",
    "reference_sparse_ffn24_int8",
    "reference_sparse_mlp",
    "reference_unpack_down24",
]


def is_24_sparse(w: torch.Tensor) -> bool:
    """True when every group of 4 along the last dim has at most two nonzeros."""
    groups = w.reshape(*w.shape[:-1], -1, 4)
    return bool(((groups != 0).sum(-1) <= 2).all())


def reference_prune24(w: torch.Tensor, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keeps the 2 largest scores (default |w|) per group of 4 along K; ties -> lower index, NaN
    scores rank lowest. Returns w (its own dtype) with the rest zeroed."""
    N, K = w.shape
    s = (w.abs() if score is None else score).to(torch.float32).to(torch.float64)
    s = torch.nan_to_num(s, nan=float("-inf")).reshape(N, K // 4, 4)
    keep = torch.zeros_like(s, dtype=torch.bool)
    for i in range(4):
        rank = torch.zeros(s.shape[:-1], dtype=torch.int64)
        for j in range(4):
            if j == i:
                continue
            beats = (s[..., j] > s[..., i]) | ((s[..., j] == s[..., i]) & (j < i))
            rank += beats.to(torch.int64)
        keep[..., i] = rank < 2
    return torch.where(keep.reshape(N, K), w, torch.zeros_like(w))


def reference_compress24(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed (values, meta) of a 2:4 tensor, computed group by group in Python."""
    N, K = dense.shape
    G = K // 4
    values = torch.zeros(N, K // 2, dtype=dense.dtype)
    meta = torch.zeros(N, (G + 1) // 2, dtype=torch.uint8)
    nz = (dense != 0).reshape(N, G, 4)
    for n in range(N):
        for g in range(G):
            idx = [i for i in range(4) if nz[n, g, i]]
            if len(idx) > 2:
                raise ValueError(f"row {n} group {g} has {len(idx)} nonzeros")
            for i in range(4):
                if len(idx) == 2:
                    break
                if i not in idx:
                    idx.append(i)
            i0, i1 = sorted(idx)
            values[n, 2 * g] = dense[n, 4 * g + i0]
            values[n, 2 * g + 1] = dense[n, 4 * g + i1]
            meta[n, g // 2] |= (i0 | (i1 << 2)) << (4 * (g % 2))
    return values, meta


def reference_decompress24(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """Dense [N, K] from (values, meta), vectorised over rows."""
    N = values.shape[0]
    G = K // 4
    g = torch.arange(G)
    nib = (meta[:, g // 2].to(torch.int64) >> (4 * (g % 2))) & 0xF
    i0, i1 = nib & 3, nib >> 2
    dense = torch.zeros(N, G, 4, dtype=values.dtype)
    v = values.reshape(N, G, 2)
    dense.scatter_(2, i0.unsqueeze(-1), v[..., :1])
    dense.scatter_(2, i1.unsqueeze(-1), v[..., 1:])
    return dense.reshape(N, K)


def reference_sparse24_linear(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 ``x @ W.T + bias`` with W decompressed; inputs are taken exactly (bf16 -> f64 is
    exact), so the only differences to a kernel are its accumulation and output rounding."""
    K = values.shape[1] * 2
    w = reference_decompress24(values.cpu(), meta.cpu(), K).to(torch.float64)
    y = x.cpu().to(torch.float64) @ w.T
    if bias is not None:
        y = y + bias.cpu().to(torch.float64)
    return y


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """float64 softmax(scale q k^T, masked) v with grouped KV heads (attention's reference)."""
    q, k, v = (t.cpu().to(torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask.cpu(), float("-inf"))
    return s.softmax(-1) @ v


def reference_dense_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 ``x @ weight.T + bias`` (dense_linear's reference; inputs taken exactly)."""
    y = x.cpu().to(torch.float64) @ weight.cpu().to(torch.float64).T
    return y if bias is None else y + bias.cpu().to(torch.float64)


def reference_int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 ``x @ (qweight * scale[:, None]).T + bias`` (int8_linear's reference)."""
    w = qweight.cpu().to(torch.float64) * scale.cpu().to(torch.float64)[:, None]
    return reference_dense_linear(x, w, bias)


def quantize_activations_a8(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 linears' VNNI route's x (csrc/core/qlinear_vnni.cpp): per row and block of
    ``block`` columns (the last one partial), ``xq = rint(x * (127 / amax))`` in fp32 arithmetic,
    round half to even, and the block's scale ``amax / 127``. Returns (xq [M, K] float64 integers,
    per-column scales [M, K] float64)."""
    x = x.cpu().to(torch.float32).reshape(-1, x.shape[-1])
    M, K = x.shape
    pad = (-K) % block
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(M, (K + pad) // block, block)
    amax = xp.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xp * inv).clamp(-127, 127)
    scale = (amax / torch.tensor(127.0)).expand_as(xp)
    unpad = lambda t: t.reshape(M, K + pad)[:, :K].to(torch.float64)
    return unpad(xq), unpad(scale)


def _a8_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 ``x @ w.T + bias`` with x quantised as the VNNI routes quantise it
    (quantize_activations_a8): each block's dot product over xq exact, times the block's scale."""
    xq, xs = quantize_activations_a8(x)
    M, K = xq.shape
    block = 32
    y = torch.zeros(M, w.shape[0], dtype=torch.float64)
    for b in range((K + block - 1) // block):
        cols = slice(b * block, min(K, (b + 1) * block))
        y += (xq[:, cols] @ w[:, cols].T) * xs[:, b * block : b * block + 1]
    return y if bias is None else y + bias.cpu().to(torch.float64)


def reference_int8_linear_a8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """float64 int8_linear as the VNNI route computes it: x quantised (quantize_activations_a8),
    each block's integer dot product exact, times the block's scale, summed, times the row's
    scale, plus the bias."""
    w = qweight.cpu().to(torch.float64) * scale.cpu().to(torch.float64)[:, None]
    return _a8_linear(x, w, bias)


def _int4_dense(qweight: torch.Tensor, scale: torch.Tensor, group: int, V: int) -> torch.Tensor:
    """The float64 ``[N, V]`` values of a packed int4 weight (csrc/core/qlinear.h's layout),
    unpacked here independently of pysparse.kernels.formats."""
    b = qweight.cpu().to(torch.int64)
    i = torch.arange(V)
    byte = b[:, (i // 32) * 16 + (i % 32) % 16]
    q = ((byte >> torch.where(i % 32 < 16, 0, 4)) & 15).to(torch.float64) - 8
    s = scale.cpu().to(torch.float64).repeat_interleave(group, dim=1)[:, :V]
    return q * s


def reference_int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    a8: bool = False,
) -> torch.Tensor:
    """float64 int4_linear: the dequantised weight; ``a8``: with x quantised as the VNNI route
    quantises it (``reference_int8_linear_a8``'s arithmetic)."""
    w = _int4_dense(qweight, scale, group, x.shape[-1])
    return _a8_linear(x, w, bias) if a8 else reference_dense_linear(x, w, bias)


def reference_sparse24_int4_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    a8: bool = False,
) -> torch.Tensor:
    """float64 sparse24_int4_linear: the kept values dequantised and decompressed."""
    K = x.shape[-1]
    w = reference_decompress24(_int4_dense(values, scale, group, K // 2), meta.cpu(), K)
    return _a8_linear(x, w, bias) if a8 else reference_dense_linear(x, w, bias)


def reference_sparse24_int8_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 ``int8_linear`` over the decompressed 2:4 int8 weight (sparse24_int8_linear's)."""
    q = reference_decompress24(values.cpu(), meta.cpu(), values.shape[1] * 2)
    return reference_int8_linear(x, q, scale, bias)


def prox24_objective(w: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """Per group of 4 along the last dim: ``1/2 ||w - z||^2 + lam * Reg(w)`` in float64, with
    ``Reg(w) = |w1w2w3| + |w2w3w4| + |w3w4w1| + |w4w1w2|``."""
    w = w.double().reshape(*w.shape[:-1], -1, 4)
    z = z.double().reshape(*z.shape[:-1], -1, 4)
    a = w.abs()
    reg = sum(a[..., i] * a[..., (i + 1) % 4] * a[..., (i + 2) % 4] for i in range(4))
    return 0.5 * ((w - z) ** 2).sum(-1) + lam * reg


def reference_prox24(
    w: torch.Tensor, lam: float, max_iters: int = 100, tol: float = 1e-6
) -> torch.Tensor:
    """The prox of ``lam * Reg`` per group of 4, in float64, one group at a time, straight from
    ProxSparse (arXiv 2502.00258): sort |z| descending (stable), candidates top-2 / top-3 / all-4 (the latter two by
    coordinate descent ``w_i = max(a_i - lam * (sum of products of the other kept pairs), 0)`` from
    ``w = a``, stopping when no coordinate moved more than ``tol * (1 + a_1)``), least objective
    wins (ties: fewer nonzeros), signs and positions restored. Slow; for tests."""
    z = w.detach().double().reshape(-1, 4)
    out = torch.empty_like(z)
    for gi in range(z.shape[0]):
        g = z[gi].tolist()
        order = sorted(range(4), key=lambda i: -abs(g[i]))  # stable: ties keep index order
        a = [abs(g[i]) for i in order]
        stop = tol * (1 + a[0])

        def descend(n: int, a=a, stop=stop) -> list[float]:
            x = a[:n]
            for _ in range(max_iters):
                moved = 0.0
                for i in range(n):
                    others = [x[j] for j in range(n) if j != i]
                    pairs = sum(
                        others[p] * others[q] for p in range(n - 1) for q in range(p + 1, n - 1)
                    )
                    new = max(a[i] - lam * pairs, 0.0)
                    moved = max(moved, abs(new - x[i]))
                    x[i] = new
                if moved <= stop:
                    break
            return x + [0.0] * (4 - n)

        def objective(x: list[float], a=a) -> float:
            reg = sum(x[i] * x[(i + 1) % 4] * x[(i + 2) % 4] for i in range(4))
            return 0.5 * sum((x[i] - a[i]) ** 2 for i in range(4)) + lam * reg

        if lam <= 0:
            best = a
        else:
            best = [a[0], a[1], 0.0, 0.0]
            if a[2] > 0:
                for cand in (descend(3), descend(4) if a[3] > 0 else None):
                    if cand is not None and objective(cand) < objective(best):
                        best = cand
        for r, i in enumerate(order):
            out[gi, i] = -best[r] if g[i] < 0 else best[r]
    return out.reshape(w.shape)


def reference_fatrelu(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """``v if v >= t else 0`` elementwise (t = 0: ReLU)."""
    return torch.where(v >= threshold, v, torch.zeros((), dtype=v.dtype))


def reference_unpack_down24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense ``W_down^T [d_ff, d_model]`` from the neuron-group 2:4 layout of the FFN ops
    (values ``[d_ff/4, 2, d_model]``, meta ``[d_ff/4, ceil(d_model/2)]``: per output column one
    nibble ``idx0 | idx1 << 2``, the even column in the low nibble).

    Vectorised (a scatter per plane, on the tensors' device): the element-by-element version took
    minutes at LLaMA-7B's 4096x11008. Plane 0 is written before plane 1, so a nibble naming one
    index twice keeps plane 1's value, as writing the two planes in order would."""
    G, _, D = values.shape
    n = torch.arange(D, device=meta.device)
    nib = (meta[:, n // 2].to(torch.int64) >> (4 * (n % 2))) & 0xF  # [G, D]
    dense = torch.zeros(G, 4, D, dtype=values.dtype, device=values.device)
    dense.scatter_(1, (nib & 3).unsqueeze(1).to(values.device), values[:, 0:1, :])
    dense.scatter_(1, (nib >> 2).unsqueeze(1).to(values.device), values[:, 1:2, :])
    return dense.reshape(G * 4, D)


def _dense(w) -> torch.Tensor:
    """float64 dense [d_ff, d_model] from a dense tensor or a packed ``(values, meta)`` pair."""
    if isinstance(w, tuple):
        values, meta = (t.cpu() for t in w)
        if values.dim() == 3:
            return reference_unpack_down24(values, meta).double()
        return reference_decompress24(values, meta, values.shape[1] * 2).double()
    return w.cpu().double()


def _restrict(h: torch.Tensor, predicted: torch.Tensor | None) -> torch.Tensor:
    """The activations restricted to the predicted (row, neuron) pairs (None: all)."""
    return h if predicted is None else h * predicted.cpu().to(h.dtype)


def reference_ffn_predict(x, a, b, c=None, max_rows: int | None = None) -> torch.Tensor:
    """float64 logits of the activation predictors, ``(x a^T) b^T + c`` (the mask is ``> 0``);
    +inf everywhere when ``x`` has more than ``max_rows`` rows (the op then predicts every
    neuron)."""
    rows = x.numel() // x.shape[-1]
    if max_rows is not None and max_rows >= 0 and rows > max_rows:
        return torch.full((*x.shape[:-1], b.shape[0]), math.inf, dtype=torch.float64)
    logits = (x.cpu().double() @ a.cpu().double().T) @ b.cpu().double().T
    return logits if c is None else logits + c.cpu().double()


def reference_sparse_ffn(
    x, w_gate, w_up, w_down_t, threshold: float = 0.0, predicted=None
) -> torch.Tensor:
    """float64 gated FFN ``(fatrelu_t(x W_gate^T) * (x W_up^T)) W_down_t``; each weight dense or a
    packed pair (compress24's for gate/up, pack_down24's for down); ``predicted`` (bool
    ``[..., d_ff]``) keeps only those (row, neuron) pairs of the activation."""
    x = x.cpu().double()
    g = _restrict(reference_fatrelu(x @ _dense(w_gate).T, threshold), predicted)
    return (g * (x @ _dense(w_up).T)) @ _dense(w_down_t)


def reference_sparse_ffn24_int8(
    x, gate, up, down, threshold: float = 0.0, predicted=None, gate_a8: bool = False
) -> torch.Tensor:
    """float64 sparse_ffn24_int8: each of gate/up/down ``(values int8, meta, scale)`` dequantised
    (scales per neuron for gate/up, per output for down) and the float FFN of
    ``reference_sparse_ffn``. ``gate_a8``: the gate as the int8 linears' VNNI route computes it
    (x quantised per block, ``reference_int8_linear_a8``), which the op's gate takes on CPUs with
    that route."""
    (gv, gm, gs), (uv, um, us), (dv, dm, ds) = gate, up, down
    K = gv.shape[1] * 2
    g_q = reference_decompress24(gv.cpu(), gm.cpu(), K)
    w_up = reference_decompress24(uv.cpu(), um.cpu(), K).double() * us.cpu().double()[:, None]
    w_down_t = reference_unpack_down24(dv.cpu(), dm.cpu()).double() * ds.cpu().double()[None, :]
    x2 = x.cpu().double().reshape(-1, K)
    if gate_a8:
        g = reference_int8_linear_a8(x.reshape(-1, K), g_q, gs)
    else:
        g = x2 @ (g_q.double() * gs.cpu().double()[:, None]).T
    a = _restrict(
        reference_fatrelu(g, threshold),
        None if predicted is None else predicted.reshape(-1, g.shape[-1]),
    )
    y = (a * (x2 @ w_up.T)) @ w_down_t
    return y.reshape(*x.shape[:-1], -1)


def reference_sparse_mlp(
    x, w1, b1, w2_t, b2, threshold: float = 0.0, predicted=None
) -> torch.Tensor:
    """float64 plain FFN ``fatrelu_t(x W1^T + b1) W2_t + b2`` (``predicted`` as
    ``reference_sparse_ffn``'s)."""
    x = x.cpu().double()
    h = x @ _dense(w1).T
    if b1 is not None:
        h = h + b1.cpu().double()
    y = _restrict(reference_fatrelu(h, threshold), predicted) @ _dense(w2_t)
    if b2 is not None:
        y = y + b2.cpu().double()
    return y


def reference_obs24_sweep(
    wt: torch.Tensor, prune: torch.Tensor, hinv: torch.Tensor, block: int = 32, choose: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 SparseGPT 2:4 sweep (what ``ops.obs24_sweep_`` computes in place), returned as new
    ``(wt, prune)``. For every input feature r (a row of ``wt``), in blocks of ``block`` rows:
    choose 0 at the first row of each group of 4 marks the 2 smallest w^2 / [H^-1]_rr^2 per output
    feature as pruned (ties: the lower index), choose 1 the 2 smallest |w| of every 4 output
    features of row r, choose 2 keeps ``prune``; then err = (w_r masked to the pruned) / [H^-1]_rr
    and w_j -= [H^-1]_rj * err for the rows j >= r of the block; after a block, the later rows
    take W[i2:] -= Hinv[i1:i2, i2:]^T Err."""
    W = wt.to(torch.float64).clone()
    P = prune.clone()
    K, N = W.shape
    earlier = torch.tensor([[k < j for k in range(4)] for j in range(4)]).unsqueeze(-1)

    def two_smallest(s: torch.Tensor) -> torch.Tensor:  # [4, M]
        a, b = s.unsqueeze(1), s.unsqueeze(0)
        return ((b < a) | ((b == a) & earlier)).sum(1) < 2

    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        err = torch.zeros(i2 - i1, N, dtype=torch.float64)
        for r in range(i1, i2):
            if choose == 0 and (r - i1) % 4 == 0:
                d2 = torch.diagonal(hinv)[r : r + 4].unsqueeze(1) ** 2
                P[r : r + 4] = two_smallest(W[r : r + 4] ** 2 / d2)
            elif choose == 1:
                P[r] = two_smallest(W[r].abs().view(N // 4, 4).T).T.reshape(N)
            e = torch.where(P[r], W[r] / hinv[r, r], torch.zeros_like(W[r]))
            err[r - i1] = e
            W[r:i2] -= hinv[r, r:i2].unsqueeze(1) * e.unsqueeze(0)
        W[i2:] -= hinv[i1:i2, i2:].T @ err
    return W, P
