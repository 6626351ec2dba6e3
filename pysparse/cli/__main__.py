"""``python -m pysparse.cli ...``: the CLI."""

from pysparse.cli.main import main

raise SystemExit(main())
