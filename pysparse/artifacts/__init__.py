"""Artifacts: a compiled model on disk and out to other runtimes. save / load with checksums and
a program check before torch reads anything (store, pt2check, layout), exports to pt2,
TorchScript, ONNX (export) and Hugging Face folders (hf), and the report every artifact carries
(report).

May import: api, runtime, passes, quality, learning, compiler, capture, kernels, util. Never the CLI.
"""
