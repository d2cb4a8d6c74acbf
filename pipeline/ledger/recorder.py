"""Recording without slowing the run down: open the ledger while the run measures.

    rec = Recorder(ledger_option, disabled=no_ledger)   # bad --ledger values fail here, before measuring
    report = run_bench(..., progress=lambda ev, *a: rec.wait())   # opened before the first row is timed
    write_reports(report, out)                           # the run's own report first
    done = rec.record_bench(report, source=out / "bench.json")   # LedgerError (exit 2) if the ledger fails

A daemon thread takes the "before" conditions (clocks, load, thermal, git) and opens the ledger
(importing SQLAlchemy, checking the schema) while the run prepares (manifest, integrity checks,
target probes), so what the run pays at the end is the insert itself; ``wait()`` before the first
timed row keeps that work out of every measurement. The thread never raises: its error is raised by the
``record_*`` call, after the report was written. ``disabled`` (``--no-ledger``, or
``EDGEPIPE_LEDGER=off``) makes every ``record_*`` a no-op returning None.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional, Union

import edgepipe.pipeline.ledger as ledger
from edgepipe.pipeline.ledger import conditions
from edgepipe.pipeline.ledger.location import Location, resolve


class Recorder:
    def __init__(self, spec: Union[str, os.PathLike, None] = None, disabled: bool = False):
        self.location: Optional[Location] = resolve(spec, disabled)
        self.before: Optional[dict] = None
        self.prepare_s: Optional[float] = None  # how long the thread took (it overlaps the run)
        self._ledger = None
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._closed = False
        if self.location is not None:
            self._thread = threading.Thread(target=self._prepare, name="edgepipe-ledger", daemon=True)
            self._thread.start()

    def _prepare(self) -> None:
        t0 = time.perf_counter()
        try:
            self.before = conditions.capture()
            opened = ledger.Ledger.open(self.location)
            with self._lock:
                if self._closed:  # the run ended (failed) while this thread was opening the ledger
                    opened.close()
                else:
                    self._ledger = opened
        except BaseException as e:  # noqa: BLE001 - raised by record_*, after the report is written
            self._error = e
        self.prepare_s = time.perf_counter() - t0

    @property
    def enabled(self) -> bool:
        return self.location is not None

    def wait(self) -> None:
        """Block until the ledger is open (or failed: raised later by record_*). Call it before the first
        timed measurement, e.g. on run_bench's first "start" progress event, so that opening the ledger
        never competes with a measurement for the CPU."""
        if self._thread is not None:
            self._thread.join()

    def _ready(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._ledger

    def ledger(self) -> Optional["ledger.Ledger"]:
        """The open ledger, for reading (e.g. the latency gate's baseline); None when recording is off.
        Raises the ledger's error (LedgerError, exit 2) if it could not be opened."""
        return self._ready() if self.enabled else None

    def _after(self) -> dict:
        after = conditions.capture(git=False)
        after["git"] = (self.before or {}).get("git")
        return after

    def _write(self, run: dict, table: str, rows: list, source) -> "ledger.Recorded":
        try:
            return ledger.write_runs(self._ready(), [(run, table, rows)])
        except ledger.LedgerError as e:
            kept = f" ({source} was written)" if source else ""
            raise ledger.LedgerError(f"{e.message.rstrip('.')}{kept}", e.hint) from e

    def record_bench(self, report: Any, source=None, node: Optional[str] = None) -> Optional["ledger.Recorded"]:
        """Record a bench report (None when recording is off). ``source``: the bench.json just written."""
        if not self.enabled:
            return None
        run, rows = ledger.bench_run(report, source, self.before, node, after=self._after())
        return self._write(run, "bench_rows", rows, source)

    def record_eval(self, result: Any, source=None) -> Optional["ledger.Recorded"]:
        if not self.enabled:
            return None
        run, rows = ledger.eval_run(result, source, self.before, after=self._after())
        return self._write(run, "eval_rows", rows, source)

    def record_check(self, result: Any, latency: Any = None, source=None) -> Optional["ledger.Recorded"]:
        if not self.enabled:
            return None
        run, rows = ledger.check_run(result, latency, source, self.before, after=self._after())
        return self._write(run, "check_rows", rows, source)

    def close(self, wait: bool = True) -> None:
        """Close the ledger. ``wait=False`` (the run failed before recording): do not wait for the thread
        still opening it (a locked ledger can take $EDGEPIPE_LEDGER_TIMEOUT); it closes what it opens."""
        with self._lock:
            self._closed = True
            if not wait and self._thread is not None and self._thread.is_alive():
                return
        if self._thread is not None:
            self._thread.join()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
