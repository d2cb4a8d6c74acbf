"""The `edgepipe` command: one module per command, each mapping flags to a library call."""
from edgepipe.pipeline.cli.main import app, main

__all__ = ["app", "main"]
