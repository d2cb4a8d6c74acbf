"""`python -m edgepipe.pipeline.cli` (and `python -m edgepipe.pipeline`) is the `edgepipe` command."""
from edgepipe.pipeline.cli.main import main

main()
