"""kdfast's version: the one place it is written (the build reads it, `kdfast.__version__` re-exports it)."""

__version__ = "0.1.0"
