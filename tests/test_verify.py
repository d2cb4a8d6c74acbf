"""The comparison helper and verification: good artifacts pass, broken ones are caught."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from edgepipe.pipeline.base.records import VerificationSet
from edgepipe.pipeline.verify import THRESHOLDS, compare, run_artifact, thresholds_for, verify_artifact


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_compare_identical_and_fp16_rounding_pass():
    rng = np.random.default_rng(0)
    ref = _softmax(rng.normal(0, 2, (8, 10)))
    assert compare(ref, ref, "fp32").passed
    assert compare(ref.astype(np.float16).astype(np.float32), ref, "fp16").passed


def test_compare_catches_broken_outputs():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (8, 10))
    ref = _softmax(logits)
    assert not compare(np.full_like(ref, 0.1), ref, "int8").passed  # dead model: constant output
    assert not compare(_softmax(rng.normal(0, 2, (8, 10))), ref, "int8").passed  # unrelated outputs
    assert not compare(ref * np.nan, ref, "fp16").passed
    c = compare(ref[:, :5], ref, "fp32")
    assert not c.passed and "shape" in c.failures[0]
    # small logit noise is fine for int8, not for fp32
    noisy = _softmax(logits + rng.normal(0, 0.05, logits.shape))
    assert compare(noisy, ref, "int8").passed
    assert not compare(noisy, ref, "fp32").passed


def test_compare_uses_log_space_for_probabilities():
    rng = np.random.default_rng(2)
    ref = _softmax(rng.normal(0, 3, (6, 20)))
    c = compare(ref, ref, "fp32")
    assert c.thresholds["space"] == "log-probability"
    c = compare(rng.normal(size=(6, 20)), rng.normal(size=(6, 20)), "fp32")
    assert c.thresholds["space"] == "output"


def test_untrained_models_get_a_structural_bound_for_quantized_only():
    assert thresholds_for("int8", trained=False)["centered_cosine"] == 0.5
    assert thresholds_for("fp32", trained=False) == THRESHOLDS["fp32"]
    assert thresholds_for("int8", trained=True)["centered_cosine"] == THRESHOLDS["int8"]["centered_cosine"]


@pytest.fixture(scope="module")
def exported(tiny_keras_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify")
    res = run_cli("export", str(tiny_keras_files["keras"]), "--formats", "onnx,tflite", "--precisions", "fp32,int8",
                  "--preprocess", "tf", "--calib", "random", "--out", str(out), "--no-cache", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout)
    return m, out / m["model"]["name"]


def test_tampered_weights_are_caught(exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    m, folder = exported
    ref = np.load(folder / "reference.npz")
    model = onnx.load(str(folder / "tiny_fp32.onnx"))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(big).copy()
    w *= -1.0  # a sign slip in one weight tensor
    big.CopyFrom(numpy_helper.from_array(w, big.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(model, str(bad))
    vset = VerificationSet.load(folder / "reference.npz", "random")
    assert np.array_equal(vset.reference, ref["outputs"]) and vset.n == len(ref["data"])
    good = verify_artifact(folder / "tiny_fp32.onnx", "onnx", "fp32", vset)
    broken = verify_artifact(bad, "onnx", "fp32", vset)
    assert good.status == "passed"
    assert broken.status == "failed" and broken.centered_cosine < good.centered_cosine


def test_wrong_input_scale_is_caught(exported):
    """Feeding the int8 model raw pixels instead of [-1, 1] values (the classic preprocessing slip)."""
    m, folder = exported
    ref = np.load(folder / "reference.npz")
    out = run_artifact(folder / "tiny_int8.tflite", "tflite", ref["raw"], ref["raw"])
    assert not compare(out, ref["outputs"], "int8").passed
    ok = run_artifact(folder / "tiny_int8.tflite", "tflite", ref["raw"], ref["data"])
    assert compare(ok, ref["outputs"], "int8").passed
