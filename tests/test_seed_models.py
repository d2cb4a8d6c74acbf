"""The six seed Keras applications (plus MobileNetV2/V3) through every format and precision,
at small input sizes with weights=None, every artifact verified against the Keras model."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from edgepipe.export import formats

# smallest sizes the Keras applications accept
SIZES = {"vgg16": 32, "vgg19": 32, "resnet50": 32, "inception_v3": 75, "xception": 71, "mobilenet": 32,
         "mobilenet_v2": 32, "mobilenet_v3_small": 32}
ALL = "fp32,fp16,dynamic,int8,int16x8,palettized"


def _expected_pairs(fmts):
    fm = formats()
    return {f"{f}-{p}" for f in fmts for p in ALL.split(",") if p in fm[f].precisions}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vgg16", "vgg19", "resnet50", "inception_v3", "xception", "mobilenet"])
def test_seed_model_every_format_and_precision(model, tmp_path):
    fmts = ["tflite", "onnx", "coreml"]
    res = run_cli("export", model, "--weights", "none", "--input-size", str(SIZES[model]), "--classes", "10",
                  "--formats", ",".join(fmts), "--precisions", ALL, "--calib", "digits", "--calib-samples", "16",
                  "--verify-samples", "6", "--out", str(tmp_path), "--no-cache", "--json", timeout=1500)
    assert res.stdout, res.stderr[-3000:]
    m = json.loads(res.stdout)
    got = {a["id"]: a for a in m["artifacts"]}
    assert set(got) == _expected_pairs(fmts)
    problems = []
    for aid, a in got.items():
        v = a["verification"]
        if a["status"] != "ok":
            problems.append(f"{aid}: {a['status']} {a['error']}")
        elif a["format"] == "coreml" and v["status"] == "not_verified":
            problems.append(f"{aid}: {v['reason']}")
        elif v["status"] != "passed":
            problems.append(f"{aid}: verification {v['status']} {v['reason']}")
        if a["inputs"] and a["format"] != "coreml":
            assert a["inputs"][0]["shape"][0] == 1
    assert not problems, "\n".join(problems)
    assert res.returncode == 0
    # fp32 artifacts are numerically the source model; int8 ones are quantized
    assert got["tflite-fp32"]["verification"]["centered_cosine"] > 0.9999
    assert got["tflite-int8"]["inputs"][0]["dtype"] == "int8"
    assert got["tflite-int8"]["size_bytes"] < 0.4 * got["tflite-fp32"]["size_bytes"]
    assert got["onnx-int8"]["size_bytes"] < 0.4 * got["onnx-fp32"]["size_bytes"]
    pp = m["model"]["preprocessing"]["mode"]
    assert pp == {"vgg16": "caffe", "vgg19": "caffe", "resnet50": "caffe"}.get(model, "tf")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v3_small"])
def test_more_mobilenets_fp_formats(model, tmp_path):
    res = run_cli("export", model, "--weights", "none", "--input-size", str(SIZES[model]), "--classes", "10",
                  "--precisions", "fp32,fp16", "--out", str(tmp_path), "--no-cache", "--json", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout)
    for a in m["artifacts"]:
        assert a["status"] == "ok" and a["verification"]["status"] in ("passed", "not_verified"), a
