"""The export as a library call: the same pipeline the CLI runs (targets add formats, the Edge TPU
gate, typed errors after the caller has the results)."""
from __future__ import annotations

import sys

import pytest

from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.base.records import ExportOutcome
from edgepipe.pipeline.export_stage import export


def test_library_export_adds_the_edgetpu_artifact_and_gates_it(tiny_keras_files, tmp_path):
    streams = (sys.stdout, sys.stderr)
    outcome = export(str(tiny_keras_files["keras"]), formats=["tflite"], int8=True, calib="random", calib_samples=8,
                     targets="cpu,edgetpu", require_full_edgetpu=True, preprocess="unit", out=tmp_path,
                     cache=False, options={"edgetpu_compiler": str(tmp_path / "no-such-compiler")})
    assert (sys.stdout, sys.stderr) == streams  # the export log is closed again
    assert isinstance(outcome, ExportOutcome) and not outcome.cache_hit
    assert [a.id for a in outcome.manifest.artifacts] == ["tflite-int8", "edgetpu-int8"]
    a = outcome.manifest.artifact("edgetpu-int8")
    assert a.ok and a.verification.status == "passed" and a.verification.checker == "litert"
    assert a.inputs[0].dtype == "int8" and a.inputs[0].shape == [1, 40, 40, 3]  # described by LiteRT
    info = a.extra["edgetpu"]
    assert info["compiled"] is False and info["kind"] == "prediction" and "not found" in info["why_not_compiled"]
    assert a.options["edgetpu_compiled"] is False
    assert (outcome.folder / "export.log").read_text().startswith("[edgepipe] ")
    fully = not info["counts"]["cpu"]
    assert (not outcome.gate_failures) == fully
    if fully:
        outcome.raise_for_status()
    else:
        with pytest.raises(GateFailure, match="ops run on the CPU"):
            outcome.raise_for_status()


def test_library_export_rejects_bad_input_before_any_work(tmp_path):
    with pytest.raises(UserError, match="unknown --onnx-int8 'u4'"):
        export("mobilenet", weights="none", options={"onnx_int8": "u4"}, out=tmp_path)
    with pytest.raises(UserError, match="needs an Edge TPU artifact"):
        export("mobilenet", weights="none", formats="tflite", require_full_edgetpu=True, out=tmp_path)
    with pytest.raises(UserError, match="--max-drop applies to int8 artifacts"):
        export("mobilenet", weights="none", max_drop=1.0, eval_data="digits", out=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written
