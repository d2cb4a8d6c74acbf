"""The `edgepipe` command: thin typer glue over the library (``edgepipe.pipeline.api``).

Commands live in small modules that each define ``register(app)``; adding a command is one
module plus one entry in CLI_MODULES. Errors become exit codes here and only here:

    usage errors (unknown command or option, missing argument, bad value)   2, typer's usage line
    UserError (bad input the library found)                                  2, one line
    GateFailure / StageFailure (ran, and something failed)                   1, one line
    anything else (a bug)                                                    1, one line
    Ctrl-C / SIGTERM                                                         130

No traceback unless --debug (or $EDGEPIPE_DEBUG). typer vendors click (typer._click) and does
not install it, so nothing here imports click. Nothing heavy is imported at start-up:
`edgepipe --help` stays under a second.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Optional

import typer

from edgepipe.pipeline.base.errors import EdgepipeError
from edgepipe.pipeline.base.util import pkg_version
from edgepipe.pipeline.cli.common import console, debug_enabled, emit_json, set_debug
from edgepipe.pipeline.logs import exit_output_to_last_log

CLI_MODULES = ["edgepipe.pipeline.cli.export", "edgepipe.pipeline.cli.inspect", "edgepipe.pipeline.cli.bench",
               "edgepipe.pipeline.cli.eval", "edgepipe.pipeline.cli.devices", "edgepipe.pipeline.cli.ledger",
               "edgepipe.pipeline.cli.sweep"]

app = typer.Typer(
    name="edgepipe",
    help="Quantize, convert, verify and benchmark vision models for phones and edge boards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# re-exported for command modules that import them from here (cli/common.py is their home)
__all__ = ["CLI_MODULES", "app", "console", "debug_enabled", "emit_json", "main"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edgepipe {pkg_version('edgepipe')}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors; runtimes' logs on the terminal."),
    version: Optional[bool] = typer.Option(None, "--version", help="Print the version and exit.",
                                           callback=_print_version, is_eager=True),
) -> None:
    if debug:
        set_debug()


for _m in CLI_MODULES:
    importlib.import_module(_m).register(app)


def _usage_error(e: typer.TyperException) -> int:
    """typer's own usage errors (its vendored click exceptions): usage line + message, exit 2."""
    show = getattr(e, "show", None)
    if callable(show):
        show()
    else:  # pragma: no cover - every TyperException typer raises has show()
        sys.stderr.write(f"Error: {e}\n")
    return int(getattr(e, "exit_code", 2) or 2)


def _run(args: list[str]) -> int:
    try:
        # Without standalone mode typer *returns* the exit code of typer.Exit / Ctrl-C (130).
        rv = app(args=args, prog_name="edgepipe", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == 130:
            sys.stderr.write("edgepipe: interrupted\n")
        return code
    except EdgepipeError as e:
        if debug_enabled():
            traceback.print_exc()
        sys.stderr.write(f"edgepipe: error: {e.one_line()}\n")
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:
        return _usage_error(e)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("edgepipe: interrupted\n")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback with --debug
        if debug_enabled():
            traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        sys.stderr.write(f"edgepipe: internal error: {type(e).__name__}: {first} "
                         "(re-run with --debug for the traceback)\n")
        return 1


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    set_debug("--debug" in args or bool(os.environ.get("EDGEPIPE_DEBUG")))
    code = _run(args)
    if argv is None:
        exit_output_to_last_log()  # runtimes that log from destructors at exit: into the log, not the terminal
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    main()
