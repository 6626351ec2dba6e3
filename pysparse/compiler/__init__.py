"""The compiler: the pass interface (base: Pass, PassResult, PassContext, PassError), the
PassManager that orders, runs, checks and reports passes (manager), and the graph queries, taps
and activation edits that passes share (graph).

May import: capture, kernels, util. Never the passes themselves, the runtime or the CLI.
"""

from pysparse.compiler.base import Pass, PassContext, PassError, PassResult
from pysparse.compiler.manager import PassManager

__all__ = ["Pass", "PassContext", "PassError", "PassManager", "PassResult"]
