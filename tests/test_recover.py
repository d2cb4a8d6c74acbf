"""Accuracy recovery (`export --max-drop`) inside the export: it reuses the export's own traced model
and calibration, and verifies a recovered artifact with the export's thresholds."""
from __future__ import annotations

import numpy as np
import pytest

import digits_model
from edgepipe.pipeline import export_run, export_stage, recover
from edgepipe.pipeline.base.errors import GateFailure
from edgepipe.pipeline.base.manifest import load_manifest
from edgepipe.pipeline.base.util import sha256_file
from edgepipe.pipeline.verify import thresholds_for


def _dark_folder(path):
    """Calibration images of the wrong range: noise at 0-6 (real digits reach 255)."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 7, (32, 32), dtype=np.uint8), "L").save(path / f"{i}.png")
    return path


class _Count:
    """Counts calls of a real function (it still runs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


def test_recovery_reuses_the_exports_model_and_calibration(tmp_path, monkeypatch):
    load, trace, calibrate = (_Count(export_run.models.load), _Count(export_run.trace), _Count(export_run.calibrate))
    monkeypatch.setattr(export_run.models, "load", load)
    monkeypatch.setattr(export_run, "trace", trace)
    monkeypatch.setattr(export_run, "calibrate", calibrate)
    outcome = export_stage.export(str(digits_model.digits_model_path()), preprocess="unit", formats="onnx", int8=True,
                                  data=str(_dark_folder(tmp_path / "dark")), calib_samples=24, out=tmp_path / "out",
                                  max_drop=1.0, eval_data="digits", capture_output=False, equalize=False)
    # (equalize off: a failed artifact of an equalized export is first converted again from the model as
    # loaded, one more trace before recovery; that fallback is tested in test_fidelity_export.py)
    assert (load.calls, trace.calls, calibrate.calls) == (1, 1, 1)
    rec = outcome.recovery
    assert rec is not None and [a.artifact for a in rec.artifacts] == ["onnx-int8"]
    names = [t.name for t in rec.artifacts[0].attempts]
    assert names[:3] == ["as exported", "entropy calibration", "percentile calibration"]
    # then, when those miss, the per-layer report's float fallback (the report is kept beside the artifact)
    assert rec.artifacts[0].meets or all(n.endswith("worst layer(s) in float") for n in names[3:])
    assert rec.artifacts[0].attempts[0].drop > 1.0  # calibrated on the wrong range: a real drop
    m, folder = load_manifest(outcome.folder)
    assert m.extra["recovery"]["budget"] == 1.0 and m.artifact("onnx-int8").extra["recovery"]["attempts"][0]["drop"] > 1
    assert not (folder / recover.WORK_DIR).exists()
    if not rec.artifacts[0].meets:
        with pytest.raises(GateFailure, match="miss the --max-drop budget"):
            outcome.raise_for_status()


def test_recovered_artifact_of_an_untrained_model_keeps_the_structural_bound(tmp_path):
    """An untrained model's quantized artifacts are held to a structural bound at export; a recovered
    one must be verified with the same thresholds, not the trained model's."""
    out = tmp_path / "out"
    args = dict(weights="none", input_size=32, alpha=0.25, classes=10, formats="tflite", int8=True, calib="digits",
                calib_samples=16, out=out, cache=False, capture_output=False)
    first = export_stage.export("mobilenet", **args)
    a = first.manifest.artifact("tflite-int8")
    assert a.verification.thresholds.get("untrained") == 1.0
    # The artifact as exported cannot be evaluated (a broken file the manifest agrees with), so the
    # recovery tries int16x8, which any drop <= 100 points accepts.
    path = first.folder / a.path
    path.write_bytes(b"TFL3" + bytes(64))
    m, folder = load_manifest(first.folder)
    m.artifact("tflite-int8").sha256 = sha256_file(path)
    m.save(folder)
    req = export_stage.prepare("mobilenet", **args, max_drop=100.0, eval_data="digits")
    report = recover.recover_folder(req)
    (rec,) = report.artifacts
    assert rec.attempts[0].drop is None and rec.chosen == "int16x8 activations"
    m, _ = load_manifest(folder)
    a = m.artifact("tflite-int8")
    assert a.precision == "int16x8" and a.path == "mobilenet_int16x8.tflite"
    th = {k: v for k, v in a.verification.thresholds.items() if k != "space"}
    assert th == thresholds_for("int16x8", trained=False) != thresholds_for("int16x8")
    assert a.verification.status == "passed" and a.ok, a.verification.reason
