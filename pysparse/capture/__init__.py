"""Capture: a model becomes an annotated ``torch.fx`` graph (trace: torch.export, FFN blocks
and prunable linears in ``gm.meta["pysparse"]``), and a captured graph is called the way the
original model is (inputs: ``InputSpec``, ``call``).

May import: kernels, util.
"""
