"""``python -m pysparse ...`` (and ``torchrun --nproc-per-node N -m pysparse compile ...``): the CLI."""

import sys

from pysparse.cli import main

sys.exit(main())
