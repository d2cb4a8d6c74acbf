"""`python -m edgepipe.pipeline` is the `edgepipe` command.

It runs the CLI package's __main__ by name: the stages (this folder) never import the CLI above them.
"""
import runpy

runpy.run_module("edgepipe.pipeline.cli", run_name="__main__", alter_sys=True)
