"""Float64 PyTorch references of every kernel: the oracle for tests, fuzzing and benchmarks.

Written straight from the definitions, with no attempt at speed. Each returns float64 results
(or exact bit copies where the op only moves data) so a kernel's error can be measured against it.
"""

from __future__ import annotations

import torch

__all__ = [
    "is_24_sparse",
    "reference_compress24",
    "reference_decompress24",
    "reference_prune24",
    "reference_sparse24_linear",
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
