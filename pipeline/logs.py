"""Runtimes' native logs go to a file beside the results, not to the terminal.

LiteRT, XNNPACK and the WebGPU accelerator write to the process's file descriptors 1 and 2 from
C++ (about 60 lines for a GPU eval), which Python cannot filter. ``native_logs(path)`` points
fd 1 and fd 2 (and ``sys.stderr``) at ``path`` while a bench or an eval runs; ``None`` (with
``--debug``) leaves fd 2 on the terminal and only moves fd 1 there, so ``--json`` on stdout stays
parseable either way. Progress output must be written to a handle opened before the block
(``terminal()``). An empty log is removed afterwards.

Some runtimes also log from destructors when the process exits (LiteRT's GPU accelerator says
"DestroyAccelerator"); ``exit_output_to_last_log()``, called by the CLI once everything is
printed, sends those lines to the same log.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import IO, Iterator, Optional


_last = {"log": None}


def terminal() -> IO[str]:
    """A text handle on the current fd 2, that keeps pointing at the terminal inside native_logs()."""
    return os.fdopen(os.dup(2), "w", buffering=1)


@contextlib.contextmanager
def native_logs(log_path: Optional[str | os.PathLike]) -> Iterator[Optional[Path]]:
    """fd 1 and fd 2 -> ``log_path`` (rewritten) for the duration; None: fd 1 -> fd 2 only."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log = None
    path = Path(log_path) if log_path is not None else None
    saved_stderr = sys.stderr
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            log = open(path, "w", buffering=1)
            _last["log"] = path
            os.dup2(log.fileno(), 2)
            sys.stderr = log
        os.dup2(2, 1)
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        sys.stderr = saved_stderr
        if log is not None:
            log.close()
            with contextlib.suppress(OSError):
                if path.stat().st_size == 0:
                    path.unlink()


def exit_output_to_last_log() -> None:
    """Point fd 1 and fd 2 at the last native log (appending), for what runtimes print at exit.
    Call it only when the process has nothing more to say."""
    path = _last["log"]
    if path is None or not Path(path).is_file():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
