"""TFLite conversions in a separate process, overlapping ONNX and Core ML in the main one.

The converter holds the GIL for much of an int8 conversion (calibration runs through
Python), so a thread does not overlap it with tf2onnx/coremltools; a process does.

    python -m edgepipe.export.tflite_worker SPEC.json

SPEC: {"saved_model": DIR, "calibration": NPY or null, "precisions": [...],
       "options": {...ExportOptions fields}, "out": DIR}
For each precision it writes OUT/<precision>.tflite then OUT/<precision>.json
({"used": {...}} or {"error": "..."}); the .json appears last, so its presence means done.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from edgepipe.pipeline.base.errors import ConversionError


def main(spec_path: str) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec = json.loads(Path(spec_path).read_text())
    import numpy as np
    import tensorflow as tf

    from edgepipe.export.base import ExportOptions
    from edgepipe.export.tflite import configure

    out = Path(spec["out"])
    data = np.load(spec["calibration"]) if spec.get("calibration") else None
    batches = [data[i : i + 1] for i in range(data.shape[0])] if data is not None else []
    options = ExportOptions(**spec["options"])
    for p in spec["precisions"]:
        result: dict
        try:
            c = tf.lite.TFLiteConverter.from_saved_model(spec["saved_model"])
            used = {"converter": "TFLiteConverter.from_saved_model"}
            used.update(configure(c, p, batches, options))
            blob = c.convert()
            tmp = out / f".{p}.tflite.tmp"
            tmp.write_bytes(blob)
            os.replace(tmp, out / f"{p}.tflite")
            result = {"used": used}
        except Exception as e:  # recorded per precision; the others go on
            msg = str(e).strip().splitlines()
            result = {"error": f"{type(e).__name__}: {msg[0][:500] if msg else ''}"}
        tmp = out / f".{p}.json.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out / f"{p}.json")
    return 0


class Pending:
    """A conversion running in the worker process; ``result()`` waits for its precision."""

    def __init__(self, worker: "Worker", precision: str):
        self.worker, self.precision = worker, precision

    def result(self) -> tuple[bytes, dict]:
        return self.worker.wait(self.precision)


class Worker:
    def __init__(self, saved_model: Path, calibration, precisions: list[str], options, scratch: Path):
        import numpy as np

        self.dir = scratch / "tflite-worker"
        self.dir.mkdir(parents=True, exist_ok=True)
        calib = None
        if calibration is not None:
            calib = str(self.dir / "calibration.npy")
            np.save(calib, calibration.data)
        spec = {"saved_model": str(saved_model), "calibration": calib, "precisions": precisions,
                "options": dict(vars(options)), "out": str(self.dir)}
        (self.dir / "spec.json").write_text(json.dumps(spec, default=str))
        self.log = open(self.dir / "worker.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgepipe.export.tflite_worker", str(self.dir / "spec.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait(self, precision: str) -> tuple[bytes, dict]:
        done = self.dir / f"{precision}.json"
        while not done.exists():
            if self.proc.poll() is not None and not done.exists():
                tail = (self.dir / "worker.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise ConversionError(f"TFLite worker exited ({self.proc.returncode}) before {precision}: "
                                      + " | ".join(tail))
            time.sleep(0.05)
        res = json.loads(done.read_text())
        if "error" in res:
            raise ConversionError(res["error"])
        return (self.dir / f"{precision}.tflite").read_bytes(), res["used"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
