"""A runtime registered from outside edgepipe: a Runtime and its Session defined in this module only.

The "npzlin" format (a toy) is an .npz holding a linear classifier (w, b) over an int8-quantized input; the toy
runtime runs it with numpy on the cpu target. Nothing else is edited to add it: bench measures it with
the worker (a fresh process that loads this file to find the runtime) by the agent's method, exactly
as it measures built-in runtimes, and eval's and verification's code run its session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepipe.devices import BenchSettings, MeasureSpec, Runtime, Session, run_bench, runtimes_for
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel, TensorInfo
from edgepipe.pipeline.base.util import sha256_file

SCALE = 1.0 / 127


class ToyLinearSession(Session):
    runtime, api = "toy-numpy", "matmul"

    def __init__(self, path: Path, spec: MeasureSpec):
        with np.load(path) as z:
            self.w, self.b = z["w"], z["b"]
        self.version = np.__version__
        # the manifest's TensorInfo works as the session's tensor type (duck-typed)
        self.inputs = [TensorInfo("x", [1, 2, 2, 2], "int8", {"scale": [SCALE], "zero_point": [0]})]
        self.outputs = [TensorInfo("y", [1, 3], "float32")]
        self.facts = {"runtime": "toy", "threads": spec.threads}

    def run_native(self, feeds):
        x = feeds[0].astype(np.float32).reshape(feeds[0].shape[0], -1) * SCALE
        return [x @ self.w + self.b]


class ToyRuntime(Runtime):
    name = "toy-numpy"
    target = "cpu"
    formats = ("npzlin",)

    def load(self, path, spec=None):
        return ToyLinearSession(Path(path), spec or MeasureSpec())

    def versions(self):
        return {"numpy": np.__version__}


def _model(folder: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.savez(folder / "model.toy.npz", w=w, b=b)
    raw = rng.integers(0, 256, size=(20, 2, 2, 2)).astype(np.float32)
    return folder / "model.toy.npz", raw, (np.round(raw / 255 / SCALE) * SCALE).reshape(20, -1) @ w + b


@pytest.fixture()
def toy_export(tmp_path) -> Path:
    path, raw, _ = _model(tmp_path)
    np.savez(tmp_path / "reference.npz", data=raw / 255, raw=raw)
    m = Manifest(model=SourceModel(name="toy", kind="keras", input_shape=[1, 2, 2, 2], num_classes=3),
                 reference={"path": "reference.npz", "samples": len(raw), "data": "random"})
    m.artifacts.append(Artifact(id="toy-int8", format="npzlin", precision="int8", path=path.name, status="ok",
                                sha256=sha256_file(path), size_bytes=path.stat().st_size))
    m.save(tmp_path)
    return tmp_path


def test_the_registry_finds_it():
    assert [type(rt) for rt in runtimes_for("npzlin")] == [ToyRuntime]
    assert Runtime.registry[("toy-numpy", "cpu")] is ToyRuntime


def test_bench_measures_it_with_the_agents_method(toy_export):
    rep = run_bench(toy_export, settings=BenchSettings(targets=["cpu", "gpu"], runs=6, min_seconds=0, warmup=1,
                                                       threads=1))
    rows = {(r.artifact, r.target): r for r in rep.rows}
    r = rows[("toy-int8", "cpu")]
    assert r.status == "ok", (r.reason, r.stderr_tail)
    assert r.runner == "worker" and r.runtime == "toy-numpy" and r.runtime_api == "matmul"
    assert r.runtime_version == np.__version__ and r.threads == 1
    assert r.latency_ms["n"] >= 6 and 0 < r.stat("p50") <= r.stat("p90") and len(r.warmup_ms) == 1
    assert r.input_source == "file" and r.inputs == [{"name": "x", "shape": [1, 2, 2, 2], "dtype": "int8",
                                                      "scale": [SCALE], "zero_point": [0]}]
    assert r.memory["peak_rss_kb"] > 0
    gpu = rows[("toy-int8", "gpu")]
    assert gpu.status == "skipped" and gpu.reason == "no runtime runs npzlin artifacts on gpu"


def test_eval_and_verification_run_its_session(toy_export):
    from edgepipe.pipeline.base.evaluation import EvalRow
    from edgepipe.pipeline.datasets import LabelledSet
    from edgepipe.pipeline.eval_artifacts import EvalContext, evaluate_file
    from edgepipe.pipeline.verify import run_artifact

    path, raw, want = _model(toy_export)
    data = (raw / 255).astype(np.float32)
    got = run_artifact(path, "npzlin", raw, data, runtime=ToyRuntime())  # the verification loop
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    labels = want.argmax(axis=1)
    ds = LabelledSet(raw=raw, labels=labels, source="digits")
    ctx = EvalContext(ds, data, 3, {"top1": 100.0, "top5": 100.0}, labels, threads=1)
    row = evaluate_file(path, "npzlin", ToyRuntime(), EvalRow(artifact="toy-int8", format="npzlin"), ctx)
    assert row.status == "ok" and row.runtime == "toy-numpy", row
    assert row.top1 == 100.0 and row.drop["top1"] == 0.0 and row.facts["threads"] == 1
