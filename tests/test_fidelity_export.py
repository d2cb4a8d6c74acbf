"""int8 fidelity wired into the commands, on real trained models, converters and runtimes:

* export: cross-layer equalization by default (recorded, in the cache key, artifacts verified against
  the original model), and a label-free budget (`--max-drop` with only `--data DIR`) whose recovery
  ends in the per-layer float fallback;
* inspect --layers: the deliberately broken layer named worst, from an export folder;
* bench/eval/check on the GPU: int8 outputs the GPU delegate gets wrong are `wrong-output`, eval shows
  the accuracy they really have there, and check fails them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from edgepipe.devices.measure import host
from edgepipe.pipeline import export_stage
from edgepipe.pipeline.base.manifest import load_manifest
from edgepipe.pipeline.base.records import LoadedModel
from edgepipe.pipeline.fidelity.ptq import strengthen
from edgepipe.pipeline.images import write_digits_folder
from fidelity_fixtures import broken50, broken200, fid_models, source  # noqa: F401 (fixtures)
from fidelity_harness import judge


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory) -> Path:
    """Unlabelled images: the digits train split, all in one folder (no class subfolders)."""
    root = tmp_path_factory.mktemp("flat")
    write_digits_folder(root / "by_class", "train")
    flat = root / "images"
    flat.mkdir()
    for p in (root / "by_class").rglob("*.png"):
        shutil.copyfile(p, flat / f"{p.parent.name}_{p.name}")
    return flat


def test_label_free_budget_recovers_by_the_per_layer_float_fallback(broken200, flat_images, tmp_path):
    """One channel 200x louder, equalization off: int8 collapses. With images only (no labels) the budget
    is agreement on held-out calibration images; TFLite recovers with int16x8, ONNX (whose calibration
    methods do not help) by keeping the worst layer of the per-layer report in float."""
    outcome = export_stage.export(str(broken200), preprocess="tf", formats="tflite,onnx", int8=True,
                                  data=str(flat_images), max_drop=1.0, equalize=False, out=tmp_path,
                                  capture_output=False)
    outcome.raise_for_status()
    rec = outcome.recovery
    assert rec.metric == "agreement" and rec.dataset["source"] == "holdout" and rec.dataset["samples"] == 200
    m, folder = load_manifest(outcome.folder)
    assert m.calibration["samples"] == 100 and m.calibration["held_out"] == 200
    onnx = m.artifact("onnx-int8")
    attempts = onnx.extra["recovery"]["attempts"]
    assert [t["name"] for t in attempts[:3]] == ["as exported", "entropy calibration", "percentile calibration"]
    assert attempts[0]["drop"] > 10 and attempts[0]["interval"]["verdict"] == "fail"
    chosen = next(t for t in attempts if t["meets"])
    assert chosen["name"].endswith("worst layer(s) in float") and chosen["float_layers"][0].startswith("entry_sep1")
    assert len(chosen["float_nodes"]) >= 2 and "channel 17" in chosen["why"] and chosen["latency_ms"] > 0
    assert chosen["interval"]["metric"] == "agreement" and chosen["interval"]["n"] == 200
    cost = onnx.extra["recovery"]["cost"]
    assert cost["size_ratio"] > 0.9 and cost["latency_ms"] > 0
    assert onnx.options["float_layers"] == chosen["float_layers"] and onnx.path.endswith("_int8_mixed.onnx")
    assert (folder / onnx.extra["layers"]).is_file() and (folder / "layers" / "onnx-int8" / "layers.html").is_file()
    assert onnx.verification.status == "passed" and onnx.ok
    assert m.artifact("tflite-int8").extra["recovery"]["chosen"] == "int16x8 activations"
    src = source(broken200, "tf")  # the labelled test split, never seen by calibration or recovery
    for a in m.artifacts:
        r = judge(folder / a.path, a.format, src, timing=False)
        assert r["agreement"] >= 98.0 and r["drop"] <= 0.5, (a.id, r)


def test_export_equalizes_by_default_and_verifies_against_the_original(broken200, tmp_path):
    """The same broken model with the defaults: cross-layer equalization balances the loud channel before
    conversion, so no recovery is needed; the reference outputs are the original model's."""
    outcome = export_stage.export(str(broken200), preprocess="tf", formats="tflite,onnx", int8=True, calib="digits",
                                  out=tmp_path, capture_output=False)
    outcome.raise_for_status()
    m, folder = load_manifest(outcome.folder)
    eq = m.model.options["ptq"]["equalize"]
    assert eq["applied"] and "entry_sep1 -> entry_sep2 (relu)" in eq["pairs"] and eq["output_change"] < 1e-3
    src = source(broken200, "tf")
    with np.load(folder / "reference.npz") as z:
        original = src.lm.model.predict(z["data"], verbose=0)
        assert np.abs(z["outputs"] - original).max() < 1e-5 and z["inputs"].shape[0] == 32
    for a in m.artifacts:
        assert a.verification.status == "passed", a.verification.reason
        r = judge(folder / a.path, a.format, src, timing=False)
        assert r["agreement"] >= 98.0 and r["drop"] <= 0.5, (a.id, r)
    on = export_stage.prepare(str(broken200), preprocess="tf", int8=True, calib="digits", out=tmp_path / "x")
    off = export_stage.prepare(str(broken200), preprocess="tf", int8=True, calib="digits", out=tmp_path / "x",
                               equalize=False)
    assert on.cache_parts()["ptq"] != off.cache_parts()["ptq"]  # what was applied is in the cache key


@pytest.mark.slow
def test_a_format_that_fails_from_the_equalized_model_is_converted_from_the_original(tmp_path):
    """tf2onnx turns ResNet50's folded residual biases (after equalization) into a Conv with four inputs,
    which onnxruntime refuses: the ONNX artifacts are converted again from the model as loaded and say so;
    TFLite keeps the equalized conversion."""
    outcome = export_stage.export("resnet50", weights="none", input_size=32, classes=10, formats="tflite,onnx",
                                  precisions="fp32,int8", calib="digits", calib_samples=16, out=tmp_path,
                                  capture_output=False, cache=False)
    outcome.raise_for_status()
    m, folder = load_manifest(outcome.folder)
    assert m.model.options["ptq"]["equalize"]["applied"]
    arts = {a.id: a for a in m.artifacts}
    assert all(a.ok and a.verification.status == "passed" for a in arts.values()), \
        {a.id: a.error for a in arts.values()}
    for aid in ("onnx-fp32", "onnx-int8"):
        assert "converted from the model as loaded" in arts[aid].extra["ptq"] and "INVALID_GRAPH" in arts[aid].extra["ptq"]
    assert "ptq" not in arts["tflite-fp32"].extra and "ptq" not in arts["tflite-int8"].extra
    assert not list(folder.glob(".*before-fallback")) and not list(folder.glob(".tmp-*"))


def test_a_model_equalization_cannot_rewrite_is_converted_as_it_is():
    import keras

    class Twice(keras.Model):  # subclassed: no functional graph to rewrite
        def call(self, x):
            return x * 2.0

    model = Twice()
    lm = LoadedModel(source=None, model=model, preprocessing=None)
    same, record = strengthen(lm, np.ones((4, 8, 8, 3), np.float32))
    assert same is lm and record["equalize"]["applied"] is False and record["equalize"]["skipped"]
    same, record = strengthen(LoadedModel(None, object(), None, is_keras=False), np.ones((1, 2)), bias_levels=127)
    assert same.model is not None and record["bias_correction"]["skipped"].startswith("not a Keras model")


def test_inspect_layers_names_the_broken_layer_worst(broken50, tmp_path):
    out = tmp_path / "out"
    res = run_cli("export", str(broken50), "--preprocess", "tf", "--formats", "tflite,onnx", "--precisions",
                  "int8", "--calib", "digits", "--no-equalize", "--out", str(out), "--no-cache")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / broken50.stem
    res = run_cli("inspect", "--layers", str(folder))
    assert res.returncode == 0, res.stderr[-3000:]
    for aid in ("tflite-int8", "onnx-int8"):
        rep = json.loads((folder / "layers" / aid / "layers.json").read_text())
        worst = next(r for r in rep["rows"] if r["tensor"] == rep["worst"][0])
        assert worst["layer"].startswith("entry_sep1") and "channel 17" in worst["reason"], (aid, worst)
        assert rep["isolated"]["layers"] >= 10 and (folder / "layers" / aid / "layers.html").is_file()
    assert "worst layers:" in res.stdout and "1. entry_sep1" in res.stdout
    res = run_cli("inspect", "--layers", str(folder / f"{broken50.stem}_int8.onnx"), "--json", "--isolated-cap", "0")
    assert res.returncode == 0, res.stderr[-3000:]
    d = json.loads(res.stdout)
    assert d["id"] == "onnx-int8" and d["format"] == "onnx" and d["isolated"]["layers"] == 0
    assert d["worst"] and d["written"]["html"].endswith("layers.html")
    # without the source model and without an fp32 ONNX artifact there is nothing to compare with
    moved = tmp_path / "moved.keras"
    shutil.move(str(broken50), moved)
    try:
        res = run_cli("inspect", "--layers", str(folder), "--artifact", "onnx-int8")
    finally:
        shutil.move(str(moved), broken50)
    assert res.returncode == 2 and "needs a float reference" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("inspect", "--layers", str(folder), "--artifact", "tflite-fp32")
    assert res.returncode == 2 and "no artifact 'tflite-fp32'" in res.stderr
    res = run_cli("inspect", str(folder / f"{broken50.stem}_int8.onnx"), "--artifact", "onnx-int8")
    assert res.returncode == 2 and "--artifact applies to --layers" in res.stderr


@pytest.mark.gpu
def test_gpu_int8_wrong_outputs_no_speed_figure_real_accuracy_and_a_failed_gate(fid_models, tmp_path):
    p = host.probe_target("gpu").get("tflite", {})
    if not p.get("available"):
        pytest.skip(f"LiteRT GPU unavailable here: {p.get('reason')}")
    model = fid_models["digits_xception"]  # an int8 1x1 stride-2 conv, like ResNet50's shortcuts
    out = tmp_path / "out"
    res = run_cli("export", str(model), "--preprocess", "tf", "--formats", "tflite", "--precisions", "fp32,int8",
                  "--calib", "digits", "--out", str(out), "--no-cache")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / model.stem
    bench = run_cli("bench", str(folder), "--targets", "cpu,gpu", "--runs", "10", "--min-seconds", "0.2")
    rows = {(r["artifact"], r["target"]): r for r in json.loads((folder / "bench.json").read_text())["rows"]}
    fp32, int8 = rows[("tflite-fp32", "gpu")], rows[("tflite-int8", "gpu")]
    assert fp32["status"] == "ok" and fp32["agreement"]["check"]["samples"] == 32
    res = run_cli("eval", str(folder), "--data", "digits", "--targets", "cpu,gpu")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = {(r["artifact"], r["target"]): r for r in json.loads((folder / "eval.json").read_text())["results"]}
    gpu_top1, cpu_top1 = ev[("tflite-int8", "gpu")]["top1"], ev[("tflite-int8", "cpu")]["top1"]
    check = run_cli("check", str(folder), "--max-drop", "2", "--json")
    by = {(r["artifact"], r["target"], r["check"]): r for r in json.loads(check.stdout)["rows"]}
    wrong = int8["status"] == "wrong-output"
    # the bench's verdict and the accuracy eval measures on the same target say the same thing
    assert wrong == (gpu_top1 < cpu_top1 - 5), (int8["agreement"], gpu_top1, cpu_top1)
    if wrong:  # ai-edge-litert 2.3.0 on lavapipe: reproduced
        assert bench.returncode == 1 and "computed wrong outputs" in bench.stderr
        assert int8["latency_ms"]["p50"] > 0 and "no speed figure" in (folder / "bench.md").read_text()
        assert check.returncode == 1 and by[("tflite-int8", "gpu", "outputs")]["status"] == "fail"
        assert by[("tflite-int8", "gpu", "top1")]["status"] == "fail"
    assert by[("tflite-fp32", "gpu", "outputs")]["status"] == "pass"
