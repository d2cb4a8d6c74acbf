"""The `edgepipe` command: thin typer glue over the library.

Commands live in small modules that each define ``register(app)``; adding a command
is one module plus one entry in CLI_MODULES. Domain errors become exit codes here
and only here: UserError -> 2, GateFailure/StageFailure -> 1. No traceback unless --debug.
Nothing heavy is imported at start-up: `edgepipe --help` must stay under a second.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

import typer

from edgepipe.pipeline.base.errors import EdgepipeError

CLI_MODULES = ["edgepipe.pipeline.cli.export", "edgepipe.pipeline.cli.inspect", "edgepipe.pipeline.cli.bench",
               "edgepipe.pipeline.cli.eval", "edgepipe.pipeline.cli.devices",
               "edgepipe.pipeline.cli.sweep"]

app = typer.Typer(
    name="edgepipe",
    help="Quantize, convert, verify and benchmark vision models for phones and edge boards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": bool(os.environ.get("EDGEPIPE_DEBUG"))}


def debug_enabled() -> bool:
    return _state["debug"]


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
):
    if debug:
        _state["debug"] = True
    if version:
        from edgepipe.pipeline.base.util import pkg_version

        typer.echo(pkg_version("edgepipe"))
        raise typer.Exit(0)


def emit_json(obj: Any) -> None:
    """Print JSON on stdout (for --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


for _m in CLI_MODULES:
    importlib.import_module(_m).register(app)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        _state["debug"] = True
    try:
        # Without standalone mode typer *returns* the exit code of typer.Exit / Ctrl-C (130).
        rv = app(args=args, prog_name="edgepipe", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:
            sys.stderr.write("edgepipe: interrupted\n")
    except EdgepipeError as e:
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"edgepipe: error: {e.one_line()}\n")
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except SystemExit as e:  # click raises this for --help and usage errors
        code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        sys.stderr.write("edgepipe: interrupted\n")
        code = 130
    except Exception as e:  # click usage errors and real bugs
        import click

        if isinstance(e, click.exceptions.UsageError):
            e.show()
            code = 2
        elif isinstance(e, click.exceptions.Abort):
            code = 130
        else:
            if _state["debug"]:
                raise
            sys.stderr.write(f"edgepipe: internal error: {type(e).__name__}: {e} (re-run with --debug for the traceback)\n")
            code = 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
