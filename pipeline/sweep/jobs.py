"""The sweep's units of work, run where the engine puts them: in this process (--serial) or in a Ray
worker on any node. Each job works in a private temporary folder on its machine and returns plain
data (the files it made, as bytes); only the machine running `edgepipe sweep` writes the output
folder. So nothing half-written reaches the output when a job, a worker or a node dies, and no
shared filesystem is needed between hosts.

    export  one model: every (format, precision) pair, each verified   -> manifest + files
    eval    the model's artifacts on the labelled set (cpu by default)  -> eval.json + cached predictions
    bench   the model's artifacts on one device ("local" or registered) -> a bench report

A job never raises for a failure of the work itself: it returns ``status: failed`` with the reason
(one line). Ctrl-C (a cancelled job) unwinds: temp folder removed, child processes killed.
"""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from edgepipe.pipeline.base.errors import EdgepipeError
from edgepipe.pipeline.base.util import converter_chatter_to_log, quiet_tensorflow, stdout_to_stderr
from edgepipe.pipeline.sweep import cells
from edgepipe.pipeline.sweep.state import write_files

#: a folder: jobs on a machine whose environment sets it write ``<kind>-<model>-<pid>.started`` there
#: and wait until ``release`` appears in it (tests use it to stop a node while a job runs on it)
PAUSE_ENV = "EDGEPIPE_SWEEP_PAUSE"
PAUSE_MAX_S = 600.0
LOGS = {"export": "export.log", "eval": "eval.log", "bench": "bench.log"}
TEMP_PREFIX = "edgepipe-sweep-"


def where(node: str) -> dict:
    """Where a job ran: the engine's node id ("local" when serial), the host name and its pid."""
    return {"node": node, "host": platform.node(), "pid": os.getpid()}


def run_job(spec: dict, payload: Optional[dict] = None, node: str = "local") -> dict:
    """Run one job (``spec["kind"]``: export | eval | bench). ``payload`` is the export job's result
    (its files) for eval and bench. Returns the result record; never raises except on Ctrl-C."""
    started = time.time()
    quiet_tensorflow()
    out: dict = {}
    _remove_stale_temp()
    with _reap_children(), tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as td:
        _pause(spec)
        log = Path(td) / "job.log"
        try:
            with converter_chatter_to_log(log), stdout_to_stderr():
                out = KINDS[spec["kind"]](spec, payload, Path(td) / "work")
            status, reason = "ok", None
        except EdgepipeError as e:
            status, reason = "failed", e.one_line()
        except Exception as e:  # noqa: BLE001 - one failing job never stops the others
            first = (str(e).strip().splitlines() or [""])[0][:400]
            status, reason = "failed", f"{type(e).__name__}: {first}"
        if log.is_file():
            out.setdefault("files", {})[LOGS[spec["kind"]]] = log.read_bytes()
    return {"kind": spec["kind"], "key": spec["key"], "model": spec["model"]["name"], "device": spec.get("device"),
            "status": status, "reason": reason, "started": started, "ended": time.time(), "where": where(node),
            **out}


def _export(spec: dict, payload: Optional[dict], work: Path) -> dict:
    manifest = cells.export(spec["model"], [tuple(p) for p in spec["pairs"]], spec["calibration"], spec["export"],
                            work)
    folder = next(p for p in work.iterdir() if p.is_dir())
    return {"manifest": manifest, "files": pack(folder)}


def _eval(spec: dict, payload: Optional[dict], work: Path) -> dict:
    folder = unpack(payload["files"], work)
    before = set(payload["files"])
    result = cells.evaluate(folder, spec["eval"])
    made = {k: v for k, v in pack(folder).items() if k not in before and k != "eval.json"}
    return {"eval": result, "files": made}


def _bench(spec: dict, payload: Optional[dict], work: Path) -> dict:
    folder = unpack(payload["files"], work)
    return {"report": cells.bench(folder, spec["device"], spec["bench"])}


KINDS: dict[str, Callable[[dict, Optional[dict], Path], dict]] = {"export": _export, "eval": _eval, "bench": _bench}


# ------------------------------------------------------------------------------------------ files
def pack(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes), temp names left out."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith((".tmp-", ".old-")) for part in rel.parts):
            files[rel.as_posix()] = p.read_bytes()
    return files


def unpack(files: dict[str, bytes], dest: Path) -> Path:
    write_files(dest, files)
    return dest


# ------------------------------------------------------------------------------------------ process hygiene
def _pause(spec: dict) -> None:
    d = os.environ.get(PAUSE_ENV)
    if not d or Path(d, "release").exists():
        return
    Path(d, f"{spec['kind']}-{spec['model']['name']}-{os.getpid()}.started").write_text(spec["key"])
    deadline = time.monotonic() + PAUSE_MAX_S
    while not Path(d, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def _remove_stale_temp() -> None:
    """Temp folders of jobs whose process is gone (a worker or node killed mid-job) on this machine."""
    for d in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = d.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and Path("/proc/self").exists():
            shutil.rmtree(d, ignore_errors=True)


def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(d.name))
    return kids


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


@contextlib.contextmanager
def _reap_children() -> Iterator[None]:
    """Kill what a job started and left running (a converter worker, an agent) when it ends or is
    cancelled: Ray would only kill the worker itself, and the children would live on."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    before = set(_descendants(os.getpid()))
    try:
        yield
    finally:
        for pid in reversed(_descendants(os.getpid())):
            if pid not in before:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
