"""Compress24: pack every 2:4-masked prunable linear into the packed 2:4 layout (pysparse.ops.
compress24) and attach the packed tensors to the graph module as buffers. The graph itself is
unchanged (Lower swaps the linears); a prunable weight that is not 2:4 is an error naming it.
A down projection masked along out_features (a mask pass's ``down_along="d_model"``) is packed
transposed, the by-row layout of the activation-sparse FFN kernels (``packed_by_row``).
A weight the quantize pass made int8 is packed as int8 (values int8, the same metadata; its scale
stays beside it): the ``int8_rows`` layout, which Lower puts on ``sparse24_int8_linear``; an int4
one (quantised over its kept values) packs its kept values' nibbles (``int4_rows``,
``sparse24_int4_linear``)."""

from __future__ import annotations

import torch
from torch import fx

from pysparse.compiler.base import MASK_PASSES, Pass, PassContext, PassError, PassResult
from pysparse.kernels import ops
from pysparse.kernels.formats import compress24_int4, compress24_int8, record_layout, unpack_int4
from pysparse.kernels.reference import is_24_sparse

from .baselines import prunable_linears


def packed_names(weight_target: str) -> tuple[str, str]:
    base = "pysparse__" + weight_target.replace(".", "__")
    return base + "__values", base + "__meta"


class Compress24(Pass):
    name = "compress24"
    after = ("recover", "quantize")
    needs_one_of = MASK_PASSES
    preserves_numerics = True

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        packed, dense_bytes, packed_bytes = 0, 0, 0
        for node, info in prunable_linears(gm):
            w = gm.get_parameter(info["weight"]).detach()
            if w.dtype not in (torch.float32, torch.bfloat16):
                info["packed"] = None
                continue
            by_row = info.get("mask_axis") == "out"  # masked along out_features: pack W^T
            packed_w = w.T.contiguous() if by_row else w.contiguous()
            if not is_24_sparse(packed_w):
                raise PassError(
                    f"compress24: weight {info['weight']} (role {info['role']}, layer "
                    f"{info['layer']}) is not 2:4 sparse; run a mask pass over it first"
                )
            quant = info.get("quant")
            if quant and quant["bits"] == 4 and not quant.get("sparse24"):
                quant = None  # grouped by columns, not kept values: the float weight is packed
            if quant and not by_row:
                q = gm.get_buffer(quant["qweight"])
                if quant["bits"] == 4:
                    values, meta = compress24_int4(unpack_int4(q, w.shape[1]))
                else:
                    values, meta = compress24_int8(q)
            else:
                quant = None  # (the by-row layout is the FFN kernels' only: they read fp32/bf16)
                values, meta = ops.compress24(packed_w)
            info["packed_by_row"] = by_row
            info["packed_quant"] = quant  # the quantize record the packed values carry, or None
            vname, mname = packed_names(info["weight"])
            gm.register_buffer(vname, values)
            gm.register_buffer(mname, meta)
            info["packed"] = [vname, mname]
            if quant and quant["bits"] == 4:
                record_layout(
                    gm,
                    info["weight"],
                    "int4_rows",
                    values=vname,
                    meta=mname,
                    scale=quant["scale"],
                    group=quant["group"],
                    in_features=w.shape[1],
                )
            elif quant:
                record_layout(
                    gm, info["weight"], "int8_rows", values=vname, meta=mname, scale=quant["scale"]
                )
            else:
                record_layout(
                    gm, info["weight"], "by_row" if by_row else "rows", values=vname, meta=mname
                )
            packed += 1
            dense_bytes += w.numel() * w.element_size()
            packed_bytes += values.numel() * values.element_size() + meta.numel()
        return PassResult(
            gm,
            packed > 0,
            {
                "linears_packed": packed,
                "dense_mb": round(dense_bytes / 1e6, 2),
                "packed_mb": round(packed_bytes / 1e6, 2),
            },
        )
