"""What every command module shares: the console, tables that never cut text, JSON out, progress.

When stdout (or stderr) is not a terminal (CI logs, pipes, files), the console is wide (200
columns, or $COLUMNS) and table cells wrap instead of ending in "...", so tensor names,
reasons and fixes arrive whole.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PIPE_WIDTH = 200
LEDGER_HELP = ("The results ledger: a SQLite file or a postgresql://USER@HOST/DB URL (default: $EDGEPIPE_LEDGER, else "
               "$XDG_DATA_HOME/edgepipe/ledger.sqlite).")
NO_LEDGER_HELP = "Do not record this run in the ledger (also: EDGEPIPE_LEDGER=off)."

_state = {"debug": bool(os.environ.get("EDGEPIPE_DEBUG"))}


def debug_enabled() -> bool:
    """--debug (or $EDGEPIPE_DEBUG): tracebacks on errors, runtimes' logs on the terminal."""
    return _state["debug"]


def set_debug(on: bool = True) -> None:
    _state["debug"] = on


def console(stderr: bool = True, file: Optional[IO[str]] = None) -> Console:
    """A rich console on stdout/stderr (or ``file``): terminal width on a TTY, wide otherwise."""
    con = Console(stderr=stderr, file=file, highlight=False)
    if not con.is_terminal and not os.environ.get("COLUMNS"):
        con = Console(stderr=stderr, file=file, highlight=False, width=PIPE_WIDTH)
    return con


def table(*columns: str, **kw: Any) -> Table:
    """A table whose cells wrap (fold) rather than being cut with an ellipsis."""
    t = Table(**kw)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def sentence(text: str) -> str:
    """'recorded bench run 3 ...' -> 'Recorded bench run 3 ...' (the rest, paths included, untouched)."""
    return text[:1].upper() + text[1:]


def emit_json(obj: Any) -> None:
    """Print JSON on stdout (for --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


class RowProgress:
    """Progress of a run over rows (and, for eval, images).

    On a terminal: a transient bar with a count and the time left. Elsewhere: one line per
    finished row, so CI logs show how far it got. ``quiet`` shows nothing.
    """

    def __init__(self, con: Console, quiet: bool = False, unit: str = "images"):
        self.con = con
        self.quiet = quiet
        self.live = con.is_terminal and not quiet
        self.unit = unit
        self.rows_done = 0
        self.rows_total = 0
        self.t0 = time.perf_counter()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn(unit), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                            console=con, transient=True, disable=not self.live)
        self.task = self.bar.add_task("starting", total=None)

    def __enter__(self) -> "RowProgress":
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def describe(self, text: str) -> None:
        self.bar.update(self.task, description=text)

    def total(self, units: int, rows: int) -> None:
        self.rows_total = rows
        self.bar.update(self.task, total=units or None, completed=0)

    def advance(self, units: int) -> None:
        self.bar.advance(self.task, units)

    def row_done(self, text: str) -> None:
        self.rows_done += 1
        if not self.live and not self.quiet:
            self.con.print(f"[{self.rows_done}/{self.rows_total}] {text}", soft_wrap=True)
