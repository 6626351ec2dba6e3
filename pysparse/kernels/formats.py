"""Sparse24Weight: the container for a 2:4-compressed weight, and its round trip to dense.

A ``Sparse24Weight`` holds only plain tensors (``values``, ``meta``) plus a few ints, so it fits in
a state dict, moves with ``.to(device)``, and is what the Compress24/Lower passes store as module
buffers. ``layout`` records which packed form the tensors hold: ``"pysparse24"`` is the layout of
pysparse.ops (CPU and our CUDA kernels). cuSPARSELt's opaque compressed buffer is derived from it on
the GPU on first use and cached by the op, so it never has to be saved.

Weights whose in_features is not a multiple of 4 are padded with zero columns (a warning says so);
``linear`` pads x to match, and ``to_dense`` drops the padding again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pysparse.kernels import ops

_log = logging.getLogger(__name__)

LAYOUT_PYSPARSE24 = "pysparse24"


@dataclass
class Sparse24Weight:
    values: torch.Tensor  # [N, Kp/2]
    meta: torch.Tensor  # uint8 [N, ceil(Kp/8)]
    in_features: int  # K of the original weight (before padding)
    layout: str = LAYOUT_PYSPARSE24

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    @property
    def padded_in_features(self) -> int:
        return int(self.values.shape[1]) * 2

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def nbytes(self) -> int:
        """Bytes the kernels read per pass over the weight (values + meta)."""
        return self.values.numel() * self.values.element_size() + self.meta.numel()

    @classmethod
    def from_dense(cls, w: torch.Tensor, *, prune: bool = False) -> Sparse24Weight:
        """Compresses a dense 2:4-masked weight ``[out_features, in_features]``.

        With ``prune=True`` the weight is first magnitude-pruned to 2:4 (``ops.prune24``); otherwise a
        weight that is not 2:4 raises an error naming the first offending row and group.
        """
        if w.dim() != 2:
            raise ValueError(
                f"Sparse24Weight.from_dense: expected a 2-D weight, got shape {tuple(w.shape)}"
            )
        w = w.detach()
        K = int(w.shape[1])
        pad = (-K) % 4
        if pad:
            _log.warning(
                "Sparse24Weight: in_features=%d is not a multiple of 4; padding with %d zero column(s)",
                K,
                pad,
            )
            w = torch.nn.functional.pad(w, (0, pad))
        if prune:
            w = ops.prune24(w)
        values, meta = ops.compress24(w)
        return cls(values=values, meta=meta, in_features=K)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out_features, in_features]`` weight (zeros where pruned)."""
        dense = ops.decompress24(self.values, self.meta, self.padded_in_features)
        return (
            dense[:, : self.in_features] if self.padded_in_features != self.in_features else dense
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Sparse24Weight:
        """Moves (and optionally casts) the weight; casting packed values is exact for zeros, so the
        pattern is preserved."""
        values = self.values.to(device=device, dtype=dtype)
        meta = self.meta.to(device=device)
        return Sparse24Weight(
            values=values, meta=meta, in_features=self.in_features, layout=self.layout
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` on the 2:4 kernels; x is zero-padded if the weight was."""
        if self.padded_in_features != self.in_features:
            x = torch.nn.functional.pad(x, (0, self.padded_in_features - self.in_features))
        return ops.sparse24_linear(x, self.values, self.meta, bias)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only, so it can live inside a module state dict or a safetensors file."""
        return {
            "values": self.values,
            "meta": self.meta,
            "in_features": torch.tensor(self.in_features, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Sparse24Weight:
        missing = {"values", "meta", "in_features"} - set(state)
        if missing:
            raise KeyError(f"Sparse24Weight.from_state_dict: missing entries {sorted(missing)}")
        w = cls(values=state["values"], meta=state["meta"], in_features=int(state["in_features"]))
        expected = ops.meta_cols(w.padded_in_features)
        if w.meta.dtype != torch.uint8 or tuple(w.meta.shape) != (w.out_features, expected):
            raise ValueError(
                f"Sparse24Weight.from_state_dict: meta must be uint8 [{w.out_features}, {expected}], "
                f"got {w.meta.dtype} {tuple(w.meta.shape)}"
            )
        if not 0 <= w.padded_in_features - w.in_features < 4:
            raise ValueError(
                f"Sparse24Weight.from_state_dict: in_features={w.in_features} does not fit values "
                f"with {w.padded_in_features} packed columns"
            )
        return w

    def __repr__(self) -> str:
        return (
            f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
            f"layout={self.layout!r}, {self.nbytes() / 1e6:.2f} MB)"
        )


# ---- int8 weights (the quantize pass) -------------------------------------------------------
# Weight-only, symmetric, one fp32 scale per output row: W ~= q * scale[:, None], q int8 in
# [-127, 127] (-128 unused, so that negation is exact and the grid symmetric). Zeros stay zeros,
# so a 2:4 mask survives quantization and compress24 packs the int8 weight as it packs any other.
INT8_QMAX = 127


def int8_scale(w: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest's scale per output row: max |w| / 127 (1 for an all-zero row)."""
    amax = w.detach().abs().amax(dim=1).to(torch.float32)
    return torch.where(amax > 0, amax / INT8_QMAX, torch.ones_like(amax))


def quantize_int8(
    w: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K], scale float32 [N])`` with ``q = clamp(round(w / scale), -127, 127)``;
    ``scale`` defaults to ``int8_scale(w)`` (round to nearest)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"quantize_int8: expected a 2-D float weight [out_features, in_features], got "
            f"{tuple(w.shape)} {w.dtype}"
        )
    scale = int8_scale(w) if scale is None else scale.to(torch.float32)
    q = torch.round(w.detach().to(torch.float32) / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight ``q * scale[:, None]`` an int8 weight stands for."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def compress24_int8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compress24 of a 2:4 int8 weight: ``(values int8 [N, K/2], meta)`` (packed through float32,
    which holds every int8 exactly)."""
    values, meta = ops.compress24(q.to(torch.float32))
    return values.to(torch.int8), meta


def decompress24_int8(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The int8 ``[N, K]`` weight ``compress24_int8`` packed."""
    K = 2 * values.shape[1]
    return ops.decompress24(values.to(torch.float32).contiguous(), meta.contiguous(), K).to(
        torch.int8
    )


# ---- int4 weights (the quantize pass's bits=4) ----------------------------------------------
# Weight-only, symmetric, one float16 scale per group of 32 or 64 stored values of a row: W ~= q *
# scale, q in [-8, 7]. The scale of a group is its value of largest magnitude divided by -8, so
# that value lands exactly on -8 and the grid's 16 levels are all used (a ±7 grid leaves one
# unused); zeros stay zeros. Packed two to a byte per block of 32 values (csrc/core/qlinear.h):
# byte i of a block holds value i + 8 (low nibble) and value i + 16 + 8 (high nibble); a row of V
# values is ceil(V / 32) * 16 bytes. A 2:4 weight is quantised with groups of 2 * group columns
# (``group`` kept values each) and its kept values packed, so its scales count stored values.
INT4_GROUPS = (32, 64)


def _check_group(group: int, who: str) -> None:
    if group not in INT4_GROUPS:
        raise ValueError(f"{who}: group={group}; int4 scales are per 32 or 64 values")


def int4_scale(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """Round-to-nearest's float16 scales ``[N, ceil(K / group)]``: each group's signed value of
    largest magnitude over -8, rounded to float16 (1 for an all-zero group; a group whose scale
    underflows float16 gets the smallest subnormal)."""
    N, K = w.shape
    pad = (-K) % group
    wg = torch.nn.functional.pad(w.detach().to(torch.float32), (0, pad)).reshape(N, -1, group)
    idx = wg.abs().argmax(-1, keepdim=True)
    d = (torch.gather(wg, -1, idx) / -8.0).squeeze(-1).to(torch.float16)
    tiny = torch.tensor(2.0**-24, dtype=torch.float16)
    return torch.where(
        (wg.abs().amax(-1) == 0),
        torch.ones_like(d),
        torch.where(d == 0, torch.where(wg.gather(-1, idx).squeeze(-1) > 0, -tiny, tiny), d),
    )


def quantize_int4(
    w: torch.Tensor,
    group: int = 32,
    scale: torch.Tensor | None = None,
    sparse24: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 [N, K] in [-8, 7], scale float16 [N, ceil(K / cols)])`` with ``q = clamp(
    round(w / scale), -8, 7)`` per group of ``cols`` columns: ``group``, or with ``sparse24`` (a
    2:4 weight, whose kept values are what is stored) ``2 * group`` columns, i.e. ``group`` kept
    values. ``scale`` defaults to round-to-nearest's ``int4_scale``."""
    _check_group(group, "quantize_int4")
    if sparse24 and (w.dim() != 2 or w.shape[-1] % 4):
        raise ValueError(
            f"quantize_int4: a 2:4 weight needs in_features % 4 == 0, got {tuple(w.shape)}"
        )
    group = 2 * group if sparse24 else group
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"quantize_int4: expected a 2-D float weight [out_features, in_features], got "
            f"{tuple(w.shape)} {w.dtype}"
        )
    scale = int4_scale(w, group) if scale is None else scale.to(torch.float16)
    s = scale.to(torch.float32).repeat_interleave(group, dim=1)[:, : w.shape[1]]
    q = torch.round(w.detach().to(torch.float32) / s).clamp_(-8, 7)
    return q.to(torch.int8).contiguous(), scale.contiguous()


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, group: int, sparse24: bool = False
) -> torch.Tensor:
    """The float32 weight an int4 ``(q, scale)`` stands for (exact: 4-bit times float16); ``q``
    dense [N, K], with ``sparse24`` its groups ``2 * group`` columns (see quantize_int4)."""
    group = 2 * group if sparse24 else group
    s = scale.to(torch.float32).repeat_interleave(group, dim=1)[:, : q.shape[1]]
    return q.to(torch.float32) * s


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values ``[N, V]`` (int8 in [-8, 7]) packed as the kernels read them: uint8
    ``[N, ceil(V / 32) * 16]`` (see above)."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4: expected int8 [N, V], got {tuple(q.shape)} {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7] (quantize_int4 makes them so)")
    N, V = q.shape
    u = torch.nn.functional.pad(q.to(torch.int16) + 8, (0, (-V) % 32), value=8).reshape(N, -1, 32)
    return (u[..., :16] | (u[..., 16:] << 4)).to(torch.uint8).reshape(N, -1).contiguous()


def unpack_int4(packed: torch.Tensor, V: int) -> torch.Tensor:
    """The int8 values ``[N, V]`` ``pack_int4`` packed."""
    N = packed.shape[0]
    b = packed.to(torch.int16).reshape(N, -1, 16)
    u = torch.cat([b & 15, b >> 4], dim=-1).reshape(N, -1)[:, :V]
    return (u - 8).to(torch.int8).contiguous()


def compress24_int4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 int4 weight (``q`` int8 [N, K] in [-8, 7], two nonzeros at most per group of 4)
    compressed: ``(pack_int4 of its K/2 kept values, meta)``."""
    values, meta = compress24_int8(q)
    return pack_int4(values), meta


def decompress24_int4(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """The int8 ``[N, K]`` weight ``compress24_int4`` packed."""
    return decompress24_int8(unpack_int4(values, K // 2), meta)


def pack_down24(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroups a compressed FFN down projection for ``sparse_ffn24`` / ``sparse_mlp24``.

    The down weight ``W_down [d_model, d_ff]`` is 2:4 along d_ff (its in_features), as every mask
    pass makes it, and ``compress24`` packs it as ``values [d_model, d_ff/2]``, ``meta [d_model,
    d_ff/8]``. The FFN kernels read it by groups of 4 neurons instead (a group is skipped when all
    four are inactive), so each group becomes one contiguous block:

        values [d_ff/4, 2, d_model]   plane 0: the lower kept index's weight for every output,
                                      plane 1: the higher one's
        meta   uint8 [d_ff/4, ceil(d_model/2)]  per output one nibble ``idx0 | idx1 << 2``,
                                      the even output in the low nibble

    Pure data movement (exact); any device.
    """
    if values.dim() != 2 or meta.dim() != 2 or meta.dtype != torch.uint8:
        raise ValueError(
            f"pack_down24: expected compress24's (values [d_model, d_ff/2], uint8 meta), got "
            f"{tuple(values.shape)} {values.dtype} and {tuple(meta.shape)} {meta.dtype}"
        )
    D, half = values.shape
    F = 2 * half
    if F % 4 or meta.shape != (D, ops.meta_cols(F)):
        raise ValueError(
            f"pack_down24: meta {tuple(meta.shape)} does not describe a [{D}, {F}] weight with "
            f"d_ff a multiple of 4; pass the pair compress24 returned"
        )
    G = F // 4
    g = torch.arange(G, device=meta.device)
    nib = (meta[:, g // 2].to(torch.int64) >> (4 * (g % 2))) & 0xF  # [D, G]
    gvalues = values.reshape(D, G, 2).permute(1, 2, 0).contiguous()
    nib = nib.T
    if D % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    gmeta = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return gvalues, gmeta


def unpack_down24(values: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of ``pack_down24``: compress24's ``(values [d_model, d_ff/2], meta [d_model,
    ceil(d_ff/8)])`` from the FFN kernels' grouped layout."""
    if values.dim() != 3 or values.shape[1] != 2 or meta.dim() != 2 or meta.dtype != torch.uint8:
        raise ValueError(
            f"unpack_down24: expected pack_down24's (values [d_ff/4, 2, d_model], uint8 meta), "
            f"got {tuple(values.shape)} {values.dtype} and {tuple(meta.shape)} {meta.dtype}"
        )
    G, _, D = values.shape
    if meta.shape != (G, (D + 1) // 2):
        raise ValueError(
            f"unpack_down24: meta {tuple(meta.shape)} does not match values {tuple(values.shape)}"
        )
    flat = values.permute(2, 0, 1).reshape(D, 2 * G).contiguous()
    m = meta.to(torch.int64)
    nib = torch.stack((m & 0xF, m >> 4), dim=2).reshape(G, -1)[:, :D].T  # [D, G]
    if G % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return flat, packed


# How a compiled graph holds a weight that is no longer a dense parameter (the record
# ``gm.meta["pysparse"]["weight_layouts"][weight]``, kept in an artifact's manifest):
#   "rows"        compress24's (values, meta) of W [out, in]      (tensors: values, meta)
#   "by_row"      compress24's (values, meta) of W^T (a down projection masked along d_model)
#   "down24"      pack_down24's grouped (values, meta) of W         (the 2:4 FFN kernels)
#   "transposed"  W^T as one dense tensor                           (tensors: tensor)
#   "dense"       W as rows of a dense tensor it shares                (tensors: tensor)
#   "int8"        quantize_int8's (q, scale) of W                      (tensors: tensor, scale)
#   "int8_rows"   compress24's (values, meta) of the int8 W, and its scale
#                                                                      (tensors: values, meta, scale)
#   "int8_down24" pack_down24's grouped (values, meta) of the int8 W, and its scale (the same)
#   "int4"        pack_int4 of quantize_int4's q, its float16 scale       (tensor, scale; group,
#                                                                      in_features)
#   "int4_rows"   compress24_int4's (values, meta) of the int4 W, and its scale
#                                                      (values, meta, scale; group, in_features)
# A record with ``rows: [r0, r1]`` holds W in rows r0:r1 of its tensors (Lower's fused sibling
# linears: q, k and v in one [q; k; v] weight); "rows", "dense", "int8", "int8_rows", "int4" and
# "int4_rows" only. int8 and int4 weights come back dequantised (float32).
WEIGHT_LAYOUTS = (
    "rows",
    "by_row",
    "down24",
    "transposed",
    "dense",
    "int8",
    "int8_rows",
    "int8_down24",
    "int4",
    "int4_rows",
)
_ROW_LAYOUTS = ("rows", "dense", "int8", "int8_rows", "int4", "int4_rows")


def record_layout(
    gm: torch.nn.Module,
    weight: str,
    layout: str,
    rows: tuple[int, int] | None = None,
    group: int | None = None,
    in_features: int | None = None,
    **tensors: str,
) -> None:
    """Records that ``weight`` (its name in the traced model) now lives in ``tensors`` (buffer
    names of ``gm``) in ``layout`` (one of ``WEIGHT_LAYOUTS``), in rows ``rows`` of them when
    given, so that reports and exports can give it back dense (``dense_weight``)."""
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"record_layout: unknown layout {layout!r}; one of {WEIGHT_LAYOUTS}")
    if rows is not None and layout not in _ROW_LAYOUTS:
        raise ValueError(f"record_layout: a {layout!r} weight cannot be rows of a shared tensor")
    layouts = gm.meta.setdefault("pysparse", {}).setdefault("weight_layouts", {})
    if layout.startswith("int4") and (group is None or in_features is None):
        raise ValueError(f"record_layout: an {layout!r} weight needs its group and in_features")
    extra = {"group": group, "in_features": in_features} if layout.startswith("int4") else {}
    layouts[weight] = {
        "layout": layout,
        **tensors,
        **extra,
        **({"rows": list(rows)} if rows else {}),
    }


def dense_weight(
    tensors: dict[str, torch.Tensor], weight: str, layouts: dict[str, dict]
) -> torch.Tensor | None:
    """The dense ``[out, in]`` weight ``weight`` (masked weights with their zeros) from a compiled
    model's ``tensors`` (name -> tensor), whether it is still a plain parameter or was packed or
    re-laid-out (``layouts``: ``gm.meta["pysparse"]["weight_layouts"]`` or an artifact
    manifest's); None when the model holds it in neither form."""
    if weight in tensors:
        return tensors[weight]
    rec = layouts.get(weight)
    if rec is None:
        return None
    layout = rec.get("layout")
    r0, r1 = rec.get("rows") or (None, None)
    scale = tensors.get(rec.get("scale", ""))
    if layout.startswith(("int8", "int4")) and scale is None:
        return None
    if layout.startswith("int4"):
        group, K = int(rec["group"]), int(rec["in_features"])
        packed = tensors.get(rec.get("tensor" if layout == "int4" else "values", ""))
        if packed is None:
            return None
        packed, scale = packed[r0:r1], scale[r0:r1]
        if layout == "int4":
            return dequantize_int4(unpack_int4(packed, K), scale, group)
        meta = tensors.get(rec.get("meta", ""))
        if meta is None:
            return None
        values = dequantize_int4(unpack_int4(packed, K // 2), scale, group)
        return ops.decompress24(values.contiguous(), meta[r0:r1].contiguous(), K)
    if layout in ("transposed", "dense", "int8"):
        t = tensors.get(rec.get("tensor", ""))
        if t is None:
            return None
        if layout == "int8":
            return dequantize_int8(t[r0:r1], scale[r0:r1])
        return t.T if layout == "transposed" else t[r0:r1]
    values, meta = tensors.get(rec.get("values", "")), tensors.get(rec.get("meta", ""))
    if values is None or meta is None:
        return None
    values, meta = values[r0:r1], meta[r0:r1]
    if layout == "int8_down24":
        values, meta = unpack_down24(values, meta)
    if layout in ("int8_rows", "int8_down24"):
        return dequantize_int8(decompress24_int8(values, meta), scale[r0:r1])
    if layout == "down24":
        values, meta = unpack_down24(values, meta)
    elif layout not in ("rows", "by_row"):
        raise ValueError(f"dense_weight: {weight} has an unknown layout {layout!r}")
    w = ops.decompress24(values.contiguous(), meta.contiguous(), 2 * values.shape[1])
    return w.T if layout == "by_row" else w
