"""pysparse.passes: the graph rewrite passes (ReLU substitution, ProSparse, ProxSparse, baseline
2:4 masks, Compress24, Lower).

This folder sits at the top of the repository and ships inside the wheel as ``pysparse.passes``.
The passes themselves arrive with the pipeline; for now the package only has to import.
"""

__all__: list[str] = []
