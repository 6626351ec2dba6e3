"""An artifact directory's file names, its format version, and the error for a bad one.

Shared by saving and loading (pysparse.artifacts.store) and by the reports rewritten in place
(pysparse.artifacts.report); docs/artifacts.md describes the format.
"""

from __future__ import annotations

FORMAT_VERSION = 3  # 3: no pickle anywhere (example inputs in safetensors, program without)
PROGRAM = "program.pt2"
WEIGHTS = "weights.safetensors"
MANIFEST = "manifest.json"
EXAMPLES = "example_inputs.safetensors"
TOKENIZER = "tokenizer"
STEP = "step"
STEP_PROGRAM = "step.pt2"  # decoders: the generation step graph (pysparse.runtime.generate)


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt, altered or from an incompatible version."""
