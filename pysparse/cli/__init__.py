"""The ``pysparse`` command line: one module per command, the pipeline as a file (recipes) and the
models it loads by name (models).

May import: every layer (the CLI is a user of the public API, ``pysparse``, and of the modules
beneath it; nothing imports the CLI).
"""

from pysparse.cli.main import main

__all__ = ["main"]
