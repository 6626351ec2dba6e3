"""Runtime: the compiled model (model: ``SparseModel``) and generation with a KV cache over the
step graph (generate).

May import: compiler, capture, kernels, util. Never the passes, artifacts or the CLI.
"""
