"""No speed figure without correct outputs (edgepipe.pipeline.fidelity.outputs): the check on
synthetic outputs, and the wrong answers of LiteRT's GPU accelerator on an int8 model reproduced
on the real runtime (lavapipe here), where today's bench row still says "ok"."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgepipe.devices.measure import host
from edgepipe.pipeline.fidelity.outputs import STATUS_WRONG, check_outputs
from fidelity_fixtures import exported, fid_models, source  # noqa: F401 (fixtures)


def _probs(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_check_outputs_on_synthetic_outputs():
    rng = np.random.default_rng(0)
    ref = _probs(rng.normal(0, 3, (64, 10)))
    same = check_outputs(ref, ref + rng.normal(0, 1e-5, ref.shape), "fp32")
    assert same.ok and same.top1_agreement == 1.0 and same.reason is None
    noisy = _probs(np.log(ref) + rng.normal(0, 0.2, ref.shape))  # int8-sized noise: fine for int8
    assert check_outputs(ref, noisy, "int8").ok
    assert not check_outputs(ref, noisy, "fp32").ok  # but not for an fp32 artifact on another target
    shuffled = ref[rng.permutation(64)]  # right-looking numbers, wrong answers
    bad = check_outputs({"probs": ref}, {"probs": shuffled}, "int8", against="cpu")
    assert bad.status == STATUS_WRONG and "top-1 agreement with cpu" in bad.reason
    assert check_outputs(ref, ref[:, :5], "int8").reason.startswith("output shape")
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert check_outputs(ref, nan, "fp16").reason == "non-finite outputs"
    assert bad.to_dict()["status"] == STATUS_WRONG


_GPU_SCRIPT = r"""
import json, sys
import numpy as np
from edgepipe.devices.runtimes.litert import LiteRTCPU
from edgepipe.devices.runtimes.litert_gpu import LiteRTGPU
x = np.load(sys.argv[1])["data"]
out = {"tf": "tensorflow" in sys.modules}
for path in sys.argv[2:]:
    with LiteRTGPU().load(path) as g, LiteRTCPU().load(path) as c:
        out[path] = {"gpu": [g.run([x[i:i + 1]])[0].ravel().tolist() for i in range(len(x))],
                     "cpu": [c.run([x[i:i + 1]])[0].ravel().tolist() for i in range(len(x))]}
print(json.dumps(out))
"""


@pytest.mark.gpu
def test_gpu_int8_wrong_outputs_are_caught(fid_models, tmp_path_factory, tmp_path):
    p = host.probe_target("gpu").get("tflite", {})
    if not p.get("available"):
        pytest.skip(f"LiteRT GPU unavailable here: {p.get('reason')}")
    name = "digits_xception"
    src = source(fid_models[name], "tf")
    arts = exported(fid_models[name], "tf", tmp_path_factory.getbasetemp() / f"fid-export-{name}-fp32",
                    formats=("tflite",), precisions=("fp32", "int8"))
    int8 = arts["tflite"]
    fp32 = int8.with_name(int8.name.replace("_int8", "_fp32"))
    np.savez(tmp_path / "x.npz", data=src.test.data[:96])
    # lavapipe and TensorFlow cannot share a process (devices/runtimes/litert_gpu.py): a child runs both
    r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, str(tmp_path / "x.npz"), str(fp32), str(int8)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tf"] is False
    ok = check_outputs(np.array(got[str(fp32)]["cpu"]), np.array(got[str(fp32)]["gpu"]), "fp32", against="cpu")
    assert ok.ok, ok.reason
    wrong = check_outputs(np.array(got[str(int8)]["cpu"]), np.array(got[str(int8)]["gpu"]), "int8", against="cpu")
    assert wrong.status == STATUS_WRONG and wrong.top1_agreement < 0.9, wrong
