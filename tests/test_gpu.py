"""LiteRT's GPU accelerator: real drivers, or Mesa's lavapipe (software Vulkan) on machines without
a GPU (.ci/system-deps.sh installs Mesa 25 for it). Correctness only: lavapipe is never a speed figure.

Skipped only when the GPU probe (a fresh process running a one-op model on the GPU) gives a reason,
and the skip message says it. The in-process session is exercised in a child process: this pytest
process has imported TensorFlow to build the artifacts, and lavapipe cannot share a process with it
(see devices/runtimes/litert_gpu.py); a test below checks that the runtime says so instead of crashing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.devices import BenchSettings, run_bench
from edgepipe.devices.measure import host
from edgepipe.devices.runtimes.litert_gpu import LiteRTGPU

pytestmark = pytest.mark.gpu
AGENT = Path(__file__).resolve().parents[1] / "devices" / "onboard" / "agent.py"



@pytest.fixture(scope="module")
def gpu_probe() -> dict:
    p = host.probe_target("gpu").get("tflite", {})
    if not p.get("available"):
        pytest.skip(f"LiteRT GPU unavailable here: {p.get('reason')}")
    return p


_SESSION_SCRIPT = r"""
import json, sys
import numpy as np
from edgepipe.devices.runtimes.litert import LiteRTCPU
from edgepipe.devices.runtimes.litert_gpu import LiteRTGPU
folder = sys.argv[1]
x = np.load(folder + "/reference.npz")["data"][:4]
rt = LiteRTGPU()
out = {"available": rt.available(), "check_dyn": rt.check(folder + "/tiny_dynbatch.tflite", "tflite"),
       "check_fp32": rt.check(folder + "/tiny_fp32.tflite", "tflite"), "tf": "tensorflow" in sys.modules}
for name in ("tiny_fp32", "tiny_int8"):
    path = folder + "/" + name + ".tflite"
    with rt.load(path) as g, LiteRTCPU().load(path) as c:
        ys = [(g.run(x[i:i + 1])[0], c.run(x[i:i + 1])[0]) for i in range(len(x))]
        q = g.outputs[0].quantization
        out[name] = {"facts": {k: v for k, v in g.facts.items() if k != "placement"},
                     "max_abs": max(float(np.max(np.abs(a - b))) for a, b in ys),
                     "range": max(float(np.max(np.abs(b))) for a, b in ys),
                     "top1": [int(a.argmax() == b.argmax()) for a, b in ys],
                     "shape": list(ys[0][0].shape), "scale": q["scale"][0] if q else None}
print(json.dumps(out))
"""


def test_gpu_session_fully_accelerated_and_agrees_with_cpu(gpu_probe, tiny_export):
    r = subprocess.run([sys.executable, "-c", _SESSION_SCRIPT, str(tiny_export)], capture_output=True, text=True,
                       timeout=600, env=host.agent_env())
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert d["tf"] is False and d["available"] is None and d["check_fp32"] is None
    assert "static" in d["check_dyn"] and "batch of 1" in d["check_dyn"]
    fp32 = d["tiny_fp32"]
    assert fp32["facts"]["fully_accelerated"] is True and fp32["facts"]["accelerator"] == "gpu"
    assert fp32["shape"] == [1, 10]
    # the GPU computes in fp16 by default: compare against the outputs' range
    assert fp32["max_abs"] <= 1e-2 * fp32["range"] + 1e-3, fp32
    assert all(fp32["top1"])
    int8 = d["tiny_int8"]
    assert int8["facts"]["fully_accelerated"] is True
    assert int8["max_abs"] <= 4 * int8["scale"] + 1e-6  # a few quantization steps at most


def test_gpu_refuses_to_share_a_process_with_tensorflow(gpu_probe, tiny_export):
    assert "tensorflow" in sys.modules  # the fixture built the artifacts with it
    if not all(a["type"] == "cpu" for a in gpu_probe.get("vulkan_adapters", [])):
        pytest.skip("a hardware Vulkan driver: no LLVM clash with TensorFlow")
    from edgepipe.pipeline.base.errors import UnsupportedArtifact

    rt = LiteRTGPU()
    why = rt.available()
    assert why and "TensorFlow" in why
    # check() answers for the artifact and the host (a fresh process could run it); load() refuses here
    assert "static" in rt.check(tiny_export / "tiny_dynbatch.tflite", "tflite")
    assert rt.check(tiny_export / "tiny_fp32.tflite", "tflite") is None
    with pytest.raises(UnsupportedArtifact, match="TensorFlow"):
        rt.load(tiny_export / "tiny_fp32.tflite")


def test_bench_gpu_rows(gpu_probe, tiny_export):
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["cpu", "gpu"], runs=5, min_seconds=0.0, warmup=1, threads=1,
                                               artifacts=["tflite-fp32", "tflite-dynbatch", "onnx-fp32"]))
    rows = {(r.artifact, r.target): r for r in rep.rows}
    r = rows[("tflite-fp32", "gpu")]
    assert r.status == "ok", r.reason
    assert r.runtime == "litert" and r.runtime_api == "compiled_model"
    assert r.placement["fully_accelerated"] is True and r.placement["accelerator"] == "gpu"
    assert 0 < r.stat("p50") <= r.stat("p90") <= r.stat("p99") and r.latency_ms["n"] >= 5
    # outputs read back from the GPU agree with the CPU row on the same real inputs
    assert r.agreement["top1_agreement"] == 1.0
    assert r.agreement["max_rel_to_range"] < 1e-2
    dyn = rows[("tflite-dynbatch", "gpu")]
    assert dyn.status == "skipped" and "static" in dyn.reason
    ort_gpu = rows[("onnx-fp32", "gpu")]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert ort_gpu.status == "unavailable" and "CUDAExecutionProvider" in ort_gpu.reason
    if all(a["type"] == "cpu" for a in gpu_probe.get("vulkan_adapters", [])):
        assert "correctness only" in rep.targets["gpu"]["tflite"]["note"]


def test_gpu_runtime_crash_fails_only_its_row(gpu_probe, tiny_export):
    # ai-edge-litert 2.3's WebGPU accelerator dies (SIGILL) compiling a model with CUMSUM: a real
    # runtime crash. If a later LiteRT runs it, the row must say how the ops were placed instead.
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["gpu"], runs=3, min_seconds=0.0, warmup=0,
                                                        threads=1, artifacts=["tflite-cumsum", "tflite-fp32"]))
    rows = {(r.artifact, r.target): r for r in rep.rows}
    cumsum = rows[("tflite-cumsum", "gpu")]
    if cumsum.status == "failed":
        assert cumsum.signal and cumsum.signal.startswith("SIG") and cumsum.signal in cumsum.reason
        assert "crashed" in cumsum.reason and "while loading/compiling the model" in cumsum.reason
    else:
        assert cumsum.status == "ok" and "fully_accelerated" in cumsum.placement
    assert rows[("tflite-fp32", "gpu")].status == "ok"


def test_agent_gpu_reports_dynamic_batch_reason(gpu_probe, tiny_export):
    r = subprocess.run([sys.executable, str(AGENT), "--artifact", str(tiny_export / "tiny_dynbatch.tflite"),
                        "--format", "tflite", "--target", "gpu", "--runs", "1"],
                       capture_output=True, text=True, timeout=300)
    d = json.loads(r.stdout)
    assert r.returncode == 1 and d["status"] == "error"
    assert "static" in d["error"] and "batch of 1" in d["error"]


def test_probe_names_the_vulkan_adapter(gpu_probe):
    adapters = gpu_probe["vulkan_adapters"]
    assert adapters and all(a["name"] and a["vulkan"].count(".") == 2 for a in adapters)
    assert gpu_probe["accelerator_libraries"]
