"""Conversions in a separate process, overlapping the other formats' conversions in the main one.

TFLite's converter holds the GIL for much of an int8 conversion (calibration runs through
Python), so a thread does not overlap it with tf2onnx/coremltools; a process does. A format with
``worker = True`` offers ``WorkerJob``s (``Format.worker_jobs``) and converts them in the child
with ``Format.convert_saved_model`` from the traced model's static SavedModel.

    python -m edgepipe.export.worker SPEC.json

SPEC: {"saved_model": DIR, "calibration": NPY or null, "out": DIR,
       "jobs": [{"format": NAME, "precision": P, "options": {...}}, ...]}
For job i it writes OUT/<i>.bin then OUT/<i>.json ({"used": {...}, "seconds": S} or
{"error": "..."}); the .json appears last, so its presence means done.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Optional

import numpy as np

from edgepipe.export import format_class
from edgepipe.export.base import WorkerJob
from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import ConversionError
from edgepipe.pipeline.base.records import Calibration


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:500] if msg else ''}"


def _run_job(job: dict, saved_model: Path, calibration: Optional[Calibration], out: Path, i: int) -> dict:
    cls = format_class(job["format"])
    try:
        t0 = time.perf_counter()
        options = cls.Options.from_values(job["options"])
        blob, used = cls.convert_saved_model(saved_model, job["precision"], calibration, options)
        seconds = time.perf_counter() - t0
        tmp = out / f".{i}.bin.tmp"
        tmp.write_bytes(blob)
        os.replace(tmp, out / f"{i}.bin")
        return {"used": used, "seconds": seconds}
    except Exception as e:  # recorded per job; the others go on
        return {"error": _one_line(e)}


def main(spec_path: str) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    lazy.tensorflow()  # jobs convert from a SavedModel: import it before their time is measured
    calibration = None
    if spec.get("calibration"):
        data = np.load(spec["calibration"])
        calibration = Calibration(raw=data, data=data, source="worker")
    for i, job in enumerate(spec["jobs"]):
        result = _run_job(job, Path(spec["saved_model"]), calibration, out, i)
        tmp = out / f".{i}.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out / f"{i}.json")
    return 0


class Pending:
    """A conversion running in the worker process; ``result()`` waits for it."""

    def __init__(self, worker: "Worker", index: int):
        self.worker, self.index = worker, index

    def result(self) -> tuple[bytes, dict, float]:
        return self.worker.wait(self.index)


class Worker:
    """The child process converting ``jobs`` one after the other."""

    def __init__(self, saved_model: Path, calibration: Optional[Calibration], jobs: list[WorkerJob], scratch: Path):
        self.dir = scratch / "worker"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jobs = list(jobs)
        calib = None
        if calibration is not None:
            calib = str(self.dir / "calibration.npy")
            np.save(calib, calibration.data)
        spec = {"saved_model": str(saved_model), "calibration": calib, "out": str(self.dir),
                "jobs": [{"format": j.format, "precision": j.precision, "options": j.options.to_dict()}
                         for j in self.jobs]}
        (self.dir / "spec.json").write_text(json.dumps(spec, default=str))
        self.log: IO[bytes] = open(self.dir / "worker.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgepipe.export.worker", str(self.dir / "spec.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def pending(self, job: WorkerJob) -> Pending:
        return Pending(self, self.jobs.index(job))

    def wait(self, i: int) -> tuple[bytes, dict, float]:
        done = self.dir / f"{i}.json"
        job = self.jobs[i]
        while not done.exists():
            if self.proc.poll() is not None and not done.exists():
                tail = (self.dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise ConversionError(f"{job.format} worker exited ({self.proc.returncode}) before "
                                      f"{job.precision}: " + " | ".join(tail))
            time.sleep(0.05)
        res = json.loads(done.read_text())
        if "error" in res:
            raise ConversionError(res["error"])
        return (self.dir / f"{i}.bin").read_bytes(), res["used"], float(res["seconds"])

    def close(self) -> None:
        """Stop the child if it still runs; its output joins this process's (export.log)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        text = (self.dir / "worker.log").read_text(errors="replace")
        if text.strip():
            sys.stderr.write(f"[edgepipe] output of the conversion worker process:\n{text.rstrip()}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
