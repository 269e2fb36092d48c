"""The command-line layer: `side4video COMMAND ...`. Parsing and presentation live here; every
command calls one library function with plain arguments (or the config)."""

from side4video.cli.main import main

__all__ = ["main"]
