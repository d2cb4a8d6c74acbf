"""edgepipe eval --device: accuracy on a remote device, against the real sshd of test_remote_ssh.py.

The "device" is this machine over ssh (127.0.0.1, throwaway keys), running devices/onboard/predict.py's
predict mode with the same LiteRT/onnxruntime as the local eval, so the device rows must equal
the local rows for the same artifact. The tiny export has no source model file, so its fp32 ONNX
artifact (converted from the source network) run by onnxruntime stands in for the source model.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe.devices import Registry, TransportError, make_device, predict_on_device
from edgepipe.pipeline.base.evaluation import load_eval
from edgepipe.pipeline.eval_stage import EvalRequest, evaluate
from test_remote_ssh import free_port, needs_openssh, sshd  # noqa: F401  (the module-scoped sshd fixture)

pytestmark = needs_openssh
ARTS = ["tflite-fp32", "tflite-int8", "onnx-fp32", "coreml-fp32"]
METRIC_KEYS = ("top1", "top5", "agreement", "correct", "lost", "gained", "drop", "samples")


@pytest.fixture()
def export(tiny_export, tmp_path) -> Path:
    """A private copy of the shared tiny export (eval writes eval.json and a prediction cache into it)."""
    d = tmp_path / "tiny"
    shutil.copytree(tiny_export, d)
    return d


@pytest.fixture()
def cfg(tmp_path, monkeypatch, sshd, export) -> Path:  # noqa: F811
    p = tmp_path / "cfg" / "devices.json"
    monkeypatch.setenv("EDGEPIPE_CONFIG", str(p))
    monkeypatch.delenv("EDGEPIPE_AGENT_CRASH", raising=False)
    (tmp_path / "device-tmp").mkdir()
    reg = Registry(p)
    for name, url in (("box", sshd.url), ("gone", f"ssh://{sshd.user}@127.0.0.1:{free_port()}")):
        reg.add(make_device(name, url, key=str(sshd.key), python=sys.executable, accept_new_host_key=True,
                            tmpdir=str(tmp_path / "device-tmp"), connect_timeout=5))
    reg.save()
    return p


def onnx_source(folder: Path):
    import onnxruntime as ort

    s = ort.InferenceSession(str(folder / "tiny_fp32.onnx"), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: np.concatenate([s.run(None, {name: x[i:i + 1].astype(np.float32)})[0] for i in range(len(x))])


def run_eval(folder: Path, cfg: Path, device=None) -> dict:
    req = EvalRequest(folder, "digits", targets=None if device else "cpu", limit=120,
                      device=device, config=str(cfg))
    return evaluate(req, predictor=onnx_source(folder)).to_dict()


def test_device_eval_equals_local_eval(export, cfg, tmp_path):
    local = run_eval(export, cfg)
    remote = run_eval(export, cfg, device="box")
    assert load_eval(export)[0].to_dict() == json.loads(json.dumps(remote))  # eval.json is the device run
    assert remote["device"] == "box" and local["device"] == "local"
    loc = {r["artifact"]: r for r in local["results"] if r["target"] == "cpu"}
    rem = {r["artifact"]: r for r in remote["results"]}
    assert all(r["device"] == "local" for r in local["results"])
    assert all(r["device"] == "box" for r in remote["results"])
    assert set(ARTS) <= set(rem)
    for aid in ("tflite-fp32", "tflite-int8", "onnx-fp32"):
        assert loc[aid]["status"] == "ok" and rem[aid]["status"] == "ok", (loc[aid], rem[aid])
        assert rem[aid]["target"] == "cpu" and rem[aid]["samples"] == 120
        for k in METRIC_KEYS:
            assert rem[aid][k] == loc[aid][k], (aid, k, rem[aid][k], loc[aid][k])
    assert rem["onnx-fp32"]["agreement"] == 100.0  # the stand-in source is this very ONNX model
    assert rem["coreml-fp32"]["status"] == "skipped" and "locally only" in rem["coreml-fp32"]["reason"]
    assert not list((tmp_path / "device-tmp").iterdir())  # every remote temp dir removed

    # edgepipe check shows where each row ran
    from edgepipe.pipeline.gate import Budget, GateConfig, run_check

    # the tiny export's random-weight model guesses (its baseline is at chance): gate on it anyway
    res = run_check(export, GateConfig([Budget("agreement", 100.0, {})], allow_chance_source=True))
    assert res.warnings and "gating anyway" in res.warnings[0]
    targets = {r.target for r in res.rows if r.check in ("agreement", "eval")}
    assert "cpu@box" in targets and all(t.endswith("@box") for t in targets if t), targets

    # the public helper: one artifact, outputs back as an array, identical to a local LiteRT run
    inp = tmp_path / "x.npz"
    x = np.random.default_rng(1).uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)
    np.savez(inp, inputs=x)
    y = predict_on_device("box", export / "tiny_fp32.tflite", "tflite", inp, config=str(cfg))
    from edgepipe.devices.runtimes.base import RunOptions, runtimes_for

    with runtimes_for("tflite", "cpu")[0].load(export / "tiny_fp32.tflite", RunOptions()) as s:
        ref = np.concatenate([s.run([x[i:i + 1]])[0] for i in range(5)])
    assert y.shape == (5, 10) and np.allclose(y, ref, atol=1e-5)
    assert not list((tmp_path / "device-tmp").iterdir())


def test_unreachable_device_fails_each_row_cleanly(export, cfg):
    ev = run_eval(export, cfg, device="gone")
    rows = {r["artifact"]: r for r in ev["results"]}
    for aid in ("tflite-fp32", "tflite-int8", "onnx-fp32"):
        assert rows[aid]["status"] == "error" and rows[aid]["device"] == "gone"
        assert rows[aid]["reason"].startswith("gone: ") and "127.0.0.1" in rows[aid]["reason"], rows[aid]
    with pytest.raises(TransportError):
        predict_on_device("gone", export / "tiny_fp32.tflite", "tflite", export / "reference.npz", config=str(cfg))


def test_eval_device_bad_input_exit_2(export, cfg, capsys):
    from edgepipe.pipeline.cli.main import main

    assert main(["eval", str(export), "--data", "digits", "--device", "nosuch", "--config", str(cfg)]) == 2
    assert "no device named 'nosuch'" in capsys.readouterr().err
    assert main(["eval", str(export), "--data", "digits", "--device", "box", "--targets", "gpu",
                 "--config", str(cfg)]) == 2
    assert "--targets" in capsys.readouterr().err
