"""Quality: how far a compiled model is from its dense original and how sparse its activations
are (evaluate), on the text that ships with Python (corpus).

May import: learning, compiler, capture, kernels, util.
"""
