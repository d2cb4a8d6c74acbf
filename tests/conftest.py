"""Shared test fixtures. Models are tiny (32-96 px, weights=None) unless accuracy is the point."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `edgepipe ARGS` in a fresh process (as a user would), capturing output."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgepipe.pipeline", *args], capture_output=True,
                          text=True, timeout=timeout, env=e)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory) -> Path:
    """A fresh $EDGEPIPE_CACHE_DIR under this session's temp dir: exports and the trained digits
    model (tests/digits_model.py, trained once per session) never come from an earlier run's cache."""
    d = tmp_path_factory.mktemp("edgepipe-cache")
    old = os.environ.get("EDGEPIPE_CACHE_DIR")
    os.environ["EDGEPIPE_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("EDGEPIPE_CACHE_DIR", None)
    else:
        os.environ["EDGEPIPE_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def session_ledger(tmp_path_factory) -> Path:
    """A fresh results ledger ($EDGEPIPE_LEDGER) under this session's temp dir: every bench, eval and check
    the tests run is recorded (as a user's would be), never into the user's real ledger."""
    p = tmp_path_factory.mktemp("edgepipe-ledger") / "ledger.sqlite"
    old = os.environ.get("EDGEPIPE_LEDGER")
    os.environ["EDGEPIPE_LEDGER"] = str(p)
    yield p
    if old is None:
        os.environ.pop("EDGEPIPE_LEDGER", None)
    else:
        os.environ["EDGEPIPE_LEDGER"] = old


@pytest.fixture(scope="session")
def tiny_keras_files(tmp_path_factory):
    """A small CNN saved as .keras, legacy .h5 and a SavedModel folder."""
    import keras
    import numpy as np

    d = tmp_path_factory.mktemp("tiny_models")
    keras.utils.set_random_seed(1)
    inp = keras.Input((40, 40, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU(6.0)(x)
    y = keras.layers.Conv2D(8, 1, activation="relu")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5, activation="softmax")(x)
    m = keras.Model(inp, out)
    # give BN non-trivial statistics so outputs depend on the input
    bn = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(0, 0.1, 8).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 8).astype("float32"))
    m.save(d / "tiny.keras")
    m.save(d / "tiny.h5")
    m.export(str(d / "tiny_savedmodel"), verbose=False)
    return {"keras": d / "tiny.keras", "h5": d / "tiny.h5", "savedmodel": d / "tiny_savedmodel", "model": m}


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """A small export folder (TFLite fp32/int8, ONNX, Core ML, edge cases) shared by the
    bench, GPU, report and remote-device tests; see bench_artifacts.py."""
    from bench_artifacts import build_tiny_export

    return build_tiny_export(tmp_path_factory.getbasetemp() / "bench-tiny-export")


@pytest.fixture()
def reg(tmp_path, monkeypatch):
    """A private device registry (and so a private known_hosts) per test; the CLI finds it
    through $EDGEPIPE_CONFIG."""
    from edgepipe.devices import Registry

    p = tmp_path / "cfg" / "devices.json"
    monkeypatch.setenv("EDGEPIPE_CONFIG", str(p))
    monkeypatch.delenv("EDGEPIPE_AGENT_CRASH", raising=False)
    return Registry(p)


@pytest.fixture()
def remote_tmp(tmp_path) -> Path:
    """A remote device's --tmpdir: tests check it is empty afterwards (temp dirs always removed)."""
    d = tmp_path / "device-tmp"
    d.mkdir()
    return d


def rows_by(report, device=None) -> dict:
    """A bench report's rows keyed by (artifact, target), optionally for one device."""
    return {(r.artifact, r.target): r for r in report.rows if device is None or r.device == device}
