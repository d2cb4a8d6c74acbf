"""OUT/<model>/export.log: what TensorFlow and the converters print while an export runs.

They print freely: C++ logs on fd 2, progress bars and prints on fds 1 and 2, Python warnings
and ``logging`` records (onnxruntime's quantizer logs through the root logger, whose last-resort
handler writes to ``sys.stderr`` when the record is emitted). While an ``ExportLog`` is open all of
that goes to a temporary file, moved to ``export.log`` when it closes; the terminal keeps the
progress display (written to a handle the caller duplicated beforehand) and one-line errors.

A cache hit converts nothing: its export.log says so and carries the log of the export that made
the cached artifacts (kept in the cache beside them), instead of an empty file.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Optional

from edgepipe.pipeline.base.util import write_text_atomic

LOG_NAME = "export.log"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ExportLog:
    def __init__(self, path: Path, title: str, enabled: bool = True):
        self.path, self.title, self.enabled = Path(path), title, enabled
        self._cache: Optional[tuple[str, Path]] = None
        self._tmp: Optional[str] = None
        self._file: Optional[IO[str]] = None
        self._saved_fds: tuple[int, int] = (-1, -1)
        self._saved_streams: tuple[Any, Any] = (None, None)

    def __enter__(self) -> "ExportLog":
        if not self.enabled:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        fd, self._tmp = tempfile.mkstemp(prefix="edgepipe-export-", suffix=".log")
        self._file = os.fdopen(fd, "w", buffering=1)
        self._file.write(f"[edgepipe] {_now()}: {self.title}\n")
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        self._saved_streams = (sys.stdout, sys.stderr)
        sys.stdout = sys.stderr = self._file
        return self

    def served_from_cache(self, key: str, cached_log: Path) -> None:
        """Make the log say the export was a cache hit, followed by the original export's log."""
        self._cache = (key, cached_log)

    def __exit__(self, typ: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if not self.enabled or self._file is None or self._tmp is None:
            return
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass
        out, err = self._saved_fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        sys.stdout, sys.stderr = self._saved_streams
        self._file.close()
        self._finish(Path(self._tmp))

    def _finish(self, tmp: Path) -> None:
        try:
            if not self.path.parent.is_dir():
                tmp.unlink()
            elif self._cache is None:
                shutil.move(str(tmp), self.path)
            else:
                write_text_atomic(self.path, self._cache_text(tmp.read_text(errors="replace")))
                tmp.unlink()
        except OSError:
            pass

    def _cache_text(self, captured: str) -> str:
        key, cached = self._cache or ("", Path())
        try:
            original = cached.read_text(errors="replace")
        except OSError:
            original = "(the cache kept no log of that export)\n"
        return (f"{captured.rstrip()}\n[edgepipe] served from the export cache (key {key[:16]}): nothing was "
                f"converted here. The log of the export that produced these artifacts follows.\n"
                f"----- {cached} -----\n{original}")
