"""Kernels: the typed entry points to ``torch.ops.pysparse`` (ops), the extension that registers
them (extension), the packed 2:4 weight formats (formats), the float64 references every kernel is
tested against (reference) and the ops' ONNX forms (onnx_ops).

May import: util.
"""
