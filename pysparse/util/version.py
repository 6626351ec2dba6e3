"""pysparse's version, its one place: pyproject.toml reads it from here (scikit-build-core's
regex metadata provider), and the extension gets it from the build."""

__version__ = "0.1.0"
