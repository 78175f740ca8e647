"""Command-line tools, each run as ``python -m kindjax.tools.<name>``."""
