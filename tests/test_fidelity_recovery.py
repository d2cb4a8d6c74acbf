"""int8 you can fix: the default bar on real trained models, float fallback of the worst layers,
cross-layer equalization, bias correction, BN folding and label-free (held-out) budgets."""
from __future__ import annotations

import numpy as np
import pytest

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.fidelity.equalize import correct_bias, equalize
from edgepipe.pipeline.fidelity.fallback import adopt, float_fallback
from edgepipe.pipeline.fidelity.holdout import artifact_drop, split_holdout
from edgepipe.pipeline.fidelity.keras_graph import fold_batchnorm
from edgepipe.pipeline.fidelity.layers import build_report
from edgepipe.pipeline.fidelity.report import fallback_recovery, make_probe
from fidelity_fixtures import broken200, exported, fid_models, source  # noqa: F401 (fixtures)
from fidelity_harness import export_int8, judge

PREPROCESS = {"digits_cnn": "unit", "digits_xception": "tf"}


@pytest.mark.parametrize("name", ["digits_cnn", "digits_xception"])
def test_default_int8_agrees_with_float(fid_models, tmp_path_factory, name):
    """The bar: >= 98% agreement with the float model on held-out images, <= 0.5 top-1 points lost."""
    src = source(fid_models[name], PREPROCESS[name])
    arts = exported(fid_models[name], PREPROCESS[name], tmp_path_factory.getbasetemp() / f"fid-export-{name}")
    assert src.labels.shape[0] == 450 and 100 * np.mean(src.outputs.argmax(1) == src.labels) >= 95
    for fmt, path in arts.items():
        r = judge(path, fmt, src, timing=False)
        assert r["agreement"] >= 98.0 and r["drop"] <= 0.5, (fmt, r)


def _holdout(src, held: int = 200):
    both = src.calibration(100 + held)
    calib = Calibration(both.raw[:100], both.data[:100], both.source)  # what the export calibrated on
    hold = Calibration(both.raw[100:], both.data[100:], both.source)  # never calibrated on
    return calib, hold, src.traced.reference(hold.data)


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_float_fallback_of_the_worst_layer_recovers(broken200, tmp_path_factory, tmp_path, fmt):
    src = source(broken200, "tf")
    art = exported(broken200, "tf", tmp_path_factory.getbasetemp() / "fid-export-x200", equalize=False)[fmt]
    before = judge(art, fmt, src, timing=False)
    assert before["agreement"] < 90  # one channel 200x louder: int8 collapses, the float model does not
    calib, hold, hold_out = _holdout(src)
    if fmt == "tflite":  # the pieces ...
        probe = make_probe(fmt, art, tmp_path / "ref", traced=src.traced, calibration=calib)
        try:
            rep = build_report(probe, calib, isolated_images=8)
            rec = float_fallback(probe, rep, lambda p: artifact_drop(p, fmt, hold, hold_out, budget=1.0), 1.0,
                                 tmp_path / "fb", images=calib)
        finally:
            probe.close()
    else:  # ... and the one call export's recovery makes
        rec, rep = fallback_recovery(art, fmt, calib, lambda p: artifact_drop(p, fmt, hold, hold_out, budget=1.0),
                                     1.0, tmp_path, traced=src.traced, isolated_images=8)
    assert rep.worst[0].layer.startswith("entry_sep1")
    assert not rec.baseline.meets and rec.baseline.drop["verdict"] == "fail"
    assert rec.chosen is rec.attempts[0] and rec.chosen.float_layers[0].startswith("entry_sep1")
    # the tensor stays float: its producer and its consumers run in float
    assert len(rec.chosen.float_nodes) >= 2 and "channel 17" in rec.chosen.why
    assert rec.cost["size_ratio"] > 0.9 and rec.cost["latency_ms"] > 0 and rec.cost["baseline_latency_ms"] > 0
    d = rec.to_dict()
    assert d["meets"] and d["chosen"] == rec.chosen.name and "per_class" not in d["attempts"][0]["drop"]
    after = judge(rec.chosen.path, fmt, src, timing=False)  # on the labelled test split, never seen
    assert after["agreement"] >= 98.0 and after["drop"] <= 0.5, after
    dest = tmp_path / f"adopted{art.suffix}"
    assert adopt(rec, dest) == dest and dest.read_bytes() == open(rec.chosen.path, "rb").read()


def test_cross_layer_equalization_recovers_without_fallback(broken200, tmp_path):
    src = source(broken200, "tf")
    data = src.calibration().data
    eq, info = equalize(src.lm.model, data)
    assert any("entry_sep1 -> entry_sep2 (relu)" == p for p in info["pairs"]) and info["folded"]
    same = eq.predict(src.test.data, verbose=0)
    assert np.abs(same - src.outputs).max() < 1e-4  # the float function is unchanged
    path = tmp_path / "eq.keras"
    eq.save(path)
    art = export_int8(path, "tf", tmp_path / "out", ("tflite",), equalize=False)["tflite"]  # equalized here
    r = judge(art, "tflite", src, timing=False)
    assert r["agreement"] >= 98.0 and r["drop"] <= 0.5, r


def test_equalization_keeps_relu6_clipping_valid(fid_models):
    src = source(fid_models["digits_cnn"], "unit")  # MobileNet-style: every activation is ReLU6
    data = src.calibration().data
    eq, info = equalize(src.lm.model, data)
    assert sum("(relu6)" in p for p in info["pairs"]) >= 8
    assert np.abs(eq.predict(src.test.data, verbose=0) - src.outputs).max() < 1e-4
    _, none = equalize(src.lm.model, None)  # without images it cannot know which channels clip
    assert not any("(relu6)" in p for p in none["pairs"])


def test_batchnorm_folding_and_bias_correction(fid_models):
    src = source(fid_models["digits_xception"], "tf")
    folded, info = fold_batchnorm(src.lm.model)
    assert len(info["folded"]) == 7
    assert not any(type(l).__name__ == "BatchNormalization" for l in folded.layers)
    assert np.abs(folded.predict(src.test.data, verbose=0) - src.outputs).max() < 1e-4
    corrected, info = correct_bias(src.lm.model, src.calibration().data, levels=127)
    assert "probs" in info["corrected"] and max(info["max_shift"].values()) > 0
    pred = corrected.predict(src.test.data, verbose=0).argmax(1)
    assert np.mean(pred == src.outputs.argmax(1)) >= 0.99  # a small, deliberate change of the float model


def _calibration(n: int) -> Calibration:
    raw = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 4, 4, 3), np.float32)
    return Calibration(raw=raw, data=raw / 255.0, source="folder", location="/imgs")


def test_holdout_split():
    keep, held = split_holdout(_calibration(100), 0.25, seed=1)
    assert keep.n == 75 and held.n == 25
    ids = set(keep.raw[:, 0, 0, 0]) | set(held.raw[:, 0, 0, 0])
    assert len(ids) == 100 and not set(keep.raw[:, 0, 0, 0]) & set(held.raw[:, 0, 0, 0])
    again, _ = split_holdout(_calibration(100), 0.25, seed=1)
    assert np.array_equal(again.raw, keep.raw)
    with pytest.raises(UserError, match="too few"):
        split_holdout(_calibration(12), 0.25)
    with pytest.raises(UserError, match="fraction"):
        split_holdout(_calibration(100), 1.5)
