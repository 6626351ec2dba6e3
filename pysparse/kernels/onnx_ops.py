"""How pysparse's custom ops appear in ONNX: standard ONNX ops over the packed tensors.

The activation-sparse FFN ops become their dense formulas (MatMul, GreaterOrEqual/Where for
FATReLU, Mul), their 2:4 forms over weights rebuilt the same way (the down projection from the
neuron-group layout). ``sparse24_linear(x, values, meta, bias)`` becomes a small subgraph that rebuilds the dense
masked weight from the packed 2:4 tensors and multiplies:

    nibbles  = meta (uint8, two groups per byte, low nibble = even group) split into [N, K/4]
    cols     = 4*group + (nibble & 3), 4*group + (nibble >> 2)        -> [N, K/2] int64
    W        = ScatterElements(zeros[N, K], cols, values, axis=1)
    y        = x @ Wᵀ (+ bias)

Why this form: it is portable (opset 18 only, no custom domain, so every ONNX runtime runs it),
and the file keeps the packed weights (values at half size plus 1/16 byte of meta per weight),
not the dense ones. ``values`` and ``meta`` are initializers, so runtimes constant-fold the
decode once at session creation (onnxruntime does); torch's exporter may already fold it for
small weights. The multiply itself is then dense in the runtime: no standard ONNX op executes 2:4
sparsity. Float32 is what onnxruntime's CPU provider runs for every op used here. The int8
linears become ``DequantizeLinear`` (per output row) + MatMul over the int8 initializers; the int4
ones unpack their nibble initializers (BitwiseAnd / Div by 16, minus 8) and multiply by the
float16 scales expanded over their groups (portable opset-18 ops: the file keeps 4.5 bits a
weight, the runtime folds the float weight once).
"""

from __future__ import annotations

from typing import Any

import torch
from onnxscript import opset18 as op

_INT64 = 7  # onnx.TensorProto.INT64
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _onnx_dtype(value: Any) -> int:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        raise RuntimeError("ONNX export: the packed weight's dtype is unknown to the exporter")
    return int(dtype)


def _dense_from_packed(values: Any, meta: Any, dtype: int | None = None) -> Any:
    shape = op.Shape(values)  # [N, K/2]
    n = op.Slice(shape, [0], [1])
    half_k = op.Slice(shape, [1], [2])
    groups = op.Div(half_k, op.Constant(value_ints=[2]))  # K/4
    m = op.Cast(meta, to=_INT64)  # [N, ceil(K/8)]
    low = op.BitwiseAnd(m, op.Constant(value_int=15))
    high = op.Div(m, op.Constant(value_int=16))
    nib = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)
    nib = op.Reshape(nib, op.Concat(n, op.Constant(value_ints=[-1]), axis=0))
    nib = op.Slice(nib, [0], groups, [1])  # an odd group count leaves a padding nibble
    base = op.Mul(
        op.Range(op.Constant(value_int=0), op.Squeeze(groups, [0]), op.Constant(value_int=1)),
        op.Constant(value_int=4),
    )
    first = op.Add(op.BitwiseAnd(nib, op.Constant(value_int=3)), base)
    second = op.Add(op.Div(nib, op.Constant(value_int=4)), base)
    cols = op.Concat(op.Unsqueeze(first, [-1]), op.Unsqueeze(second, [-1]), axis=-1)
    cols = op.Reshape(cols, shape)
    k = op.Mul(half_k, op.Constant(value_ints=[2]))
    # Zeros of values' dtype from a plain Cast (onnxruntime cannot constant-fold CastLike, which
    # would leave the decode running on every inference).
    zeros = op.Cast(
        op.ConstantOfShape(op.Concat(n, k, axis=0)),
        to=_onnx_dtype(values) if dtype is None else dtype,
    )
    return op.ScatterElements(zeros, cols, values, axis=1)


def sparse24_linear(x: Any, values: Any, meta: Any, bias: Any = None) -> Any:
    w = _dense_from_packed(values, meta)
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def dense_linear(x: Any, weight: Any, bias: Any = None) -> Any:
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


# int8 weights (the quantize pass): DequantizeLinear per output row (axis 0) rebuilds the float
# weight from the int8 initializer and its scales, in x's type; the file keeps the int8 bytes.
def int8_linear(x: Any, qweight: Any, scale: Any, bias: Any = None) -> Any:
    w = op.CastLike(op.DequantizeLinear(qweight, scale, axis=0), x)
    return dense_linear(x, w, bias)


def sparse24_int8_linear(x: Any, values: Any, meta: Any, scale: Any, bias: Any = None) -> Any:
    return int8_linear(x, _dense_from_packed(values, meta), scale, bias)


def _int4_values(packed: Any, scale: Any, group: int, stored: Any) -> Any:
    """The float32 ``[N, stored]`` values of a packed int4 weight (formats.pack_int4: per block of
    16 bytes, low nibbles are values 0-15, high ones 16-31, each plus 8) times their scales."""
    n = op.Slice(op.Shape(packed), [0], [1])
    b = op.Reshape(
        op.Cast(packed, to=_INT64), op.Concat(n, op.Constant(value_ints=[-1, 16]), axis=0)
    )
    u = op.Concat(
        op.BitwiseAnd(b, op.Constant(value_int=15)), op.Div(b, op.Constant(value_int=16)), axis=-1
    )
    u = op.Slice(
        op.Reshape(u, op.Concat(n, op.Constant(value_ints=[-1]), axis=0)), [0], stored, [1]
    )
    q = op.Cast(op.Sub(u, op.Constant(value_int=8)), to=_FLOAT)
    groups = op.Slice(op.Shape(scale), [1], [2])
    s = op.Unsqueeze(op.Cast(scale, to=_FLOAT), [-1])
    s = op.Expand(s, op.Concat(n, groups, op.Constant(value_ints=[group]), axis=0))
    s = op.Slice(
        op.Reshape(s, op.Concat(n, op.Constant(value_ints=[-1]), axis=0)), [0], stored, [1]
    )
    return op.Mul(q, s)


def int4_linear(x: Any, qweight: Any, scale: Any, group: int, bias: Any = None) -> Any:
    k = op.Slice(op.Shape(x), [-1], [2**62])
    w = op.CastLike(_int4_values(qweight, scale, group, k), x)
    return dense_linear(x, w, bias)


def sparse24_int4_linear(
    x: Any, values: Any, meta: Any, scale: Any, group: int, bias: Any = None
) -> Any:
    half_k = op.Div(op.Slice(op.Shape(x), [-1], [2**62]), op.Constant(value_ints=[2]))
    kept = _int4_values(values, scale, group, half_k)
    w = op.CastLike(_dense_from_packed(kept, meta, dtype=_FLOAT), x)
    return dense_linear(x, w, bias)


def _dense_down_from_groups(values: Any, meta: Any) -> Any:
    """W_down^T [d_ff, d_model] from the neuron-group layout of the FFN ops (formats.pack_down24):
    values [G, 2, D], meta [G, ceil(D/2)] with one nibble per output."""
    shape = op.Shape(values)  # [G, 2, D]
    g = op.Slice(shape, [0], [1])
    d = op.Slice(shape, [2], [3])
    m = op.Cast(meta, to=_INT64)
    low = op.BitwiseAnd(m, op.Constant(value_int=15))
    high = op.Div(m, op.Constant(value_int=16))
    nib = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)
    nib = op.Reshape(nib, op.Concat(g, op.Constant(value_ints=[-1]), axis=0))
    nib = op.Slice(nib, [0], d, [1])  # an odd d_model leaves a padding nibble
    rows = op.Concat(
        op.Unsqueeze(op.BitwiseAnd(nib, op.Constant(value_int=3)), [1]),
        op.Unsqueeze(op.Div(nib, op.Constant(value_int=4)), [1]),
        axis=1,
    )  # [G, 2, D]: which of the group's 4 neurons each kept weight belongs to
    zeros = op.Cast(
        op.ConstantOfShape(op.Concat(g, op.Constant(value_ints=[4]), d, axis=0)),
        to=_onnx_dtype(values),
    )
    dense = op.ScatterElements(zeros, rows, values, axis=1)  # [G, 4, D]
    return op.Reshape(dense, op.Concat(op.Constant(value_ints=[-1]), d, axis=0))


def _fatrelu(g: Any, threshold: float) -> Any:
    keep = op.GreaterOrEqual(g, op.CastLike(op.Constant(value_float=threshold), g))
    return op.Where(keep, g, op.CastLike(op.Constant(value_float=0.0), g))


def _predicted(h: Any, predicted: Any) -> Any:
    """The activations restricted to the predicted (row, neuron) pairs (the ops' ``predicted``)."""
    if predicted is None:
        return h
    return op.Where(predicted, h, op.CastLike(op.Constant(value_float=0.0), h))


def sparse_ffn(
    x: Any, w_gate: Any, w_up: Any, w_down_t: Any, threshold: float = 0.0, predicted: Any = None
) -> Any:
    g = _predicted(_fatrelu(op.MatMul(x, op.Transpose(w_gate, perm=[1, 0])), threshold), predicted)
    return op.MatMul(op.Mul(g, op.MatMul(x, op.Transpose(w_up, perm=[1, 0]))), w_down_t)


def sparse_mlp(
    x: Any, w1: Any, b1: Any, w2_t: Any, b2: Any, threshold: float = 0.0, predicted: Any = None
) -> Any:
    h = op.MatMul(x, op.Transpose(w1, perm=[1, 0]))
    h = _predicted(_fatrelu(h if b1 is None else op.Add(h, b1), threshold), predicted)
    y = op.MatMul(h, w2_t)
    return y if b2 is None else op.Add(y, b2)


def ffn_predict(x: Any, a: Any, b: Any, c: Any = None, max_rows: int = -1) -> Any:
    """The activation predictors' mask, ``(x a^T) b^T + c > 0``; every neuron when ``x`` has more
    than ``max_rows`` rows (>= 0). The runtime computes the logits either way."""
    logits = op.MatMul(op.MatMul(x, op.Transpose(a, perm=[1, 0])), op.Transpose(b, perm=[1, 0]))
    if c is not None:
        logits = op.Add(logits, c)
    mask = op.Greater(logits, op.CastLike(op.Constant(value_float=0.0), logits))
    if max_rows < 0:
        return mask
    rows = op.ReduceProd(op.Shape(x, end=-1), keepdims=1)  # [1]; 1 for a 1-D x
    return op.Or(mask, op.Greater(rows, op.Constant(value_ints=[max_rows])))


def _dense_down(dv: Any, dm: Any) -> Any:
    """W_down^T from either 2:4 down layout of the FFN ops (by neuron group, or by row)."""
    shape = getattr(dv, "shape", None)
    if shape is not None and len(shape) == 2:
        return _dense_from_packed(dv, dm)
    return _dense_down_from_groups(dv, dm)


def sparse_ffn24(
    x: Any,
    gv: Any,
    gm: Any,
    uv: Any,
    um: Any,
    dv: Any,
    dm: Any,
    threshold: float = 0.0,
    predicted: Any = None,
) -> Any:
    gate, up = _dense_from_packed(gv, gm), _dense_from_packed(uv, um)
    return sparse_ffn(x, gate, up, _dense_down(dv, dm), threshold, predicted)


def sparse_ffn24_int8(
    x: Any,
    gv: Any,
    gm: Any,
    gs: Any,
    uv: Any,
    um: Any,
    us: Any,
    dv: Any,
    dm: Any,
    ds: Any,
    threshold: float = 0.0,
    predicted: Any = None,
) -> Any:
    """The float FFN over the int8 weights dequantised (per neuron for gate/up; per output, the
    columns of W_down^T, for down)."""
    gate = op.CastLike(op.DequantizeLinear(_dense_from_packed(gv, gm), gs, axis=0), x)
    up = op.CastLike(op.DequantizeLinear(_dense_from_packed(uv, um), us, axis=0), x)
    down_t = op.CastLike(op.DequantizeLinear(_dense_down_from_groups(dv, dm), ds, axis=1), x)
    return sparse_ffn(x, gate, up, down_t, threshold, predicted)


def sparse_mlp24(
    x: Any,
    w1v: Any,
    w1m: Any,
    b1: Any,
    w2v: Any,
    w2m: Any,
    b2: Any,
    threshold: float = 0.0,
    predicted: Any = None,
) -> Any:
    w1, w2_t = _dense_from_packed(w1v, w1m), _dense_down(w2v, w2m)
    return sparse_mlp(x, w1, b1, w2_t, b2, threshold, predicted)


def translation_table() -> dict[Any, Any]:
    """The ``custom_translation_table`` handed to ``torch.onnx.export`` for every pysparse op."""
    p = torch.ops.pysparse
    return {
        p.sparse24_linear.default: sparse24_linear,
        p.dense_linear.default: dense_linear,
        p.int8_linear.default: int8_linear,
        p.sparse24_int8_linear.default: sparse24_int8_linear,
        p.int4_linear.default: int4_linear,
        p.sparse24_int4_linear.default: sparse24_int4_linear,
        p.sparse_ffn.default: sparse_ffn,
        p.ffn_predict.default: ffn_predict,
        p.sparse_mlp.default: sparse_mlp,
        p.sparse_ffn24.default: sparse_ffn24,
        p.sparse_ffn24_int8.default: sparse_ffn24_int8,
        p.sparse_mlp24.default: sparse_mlp24,
    }
