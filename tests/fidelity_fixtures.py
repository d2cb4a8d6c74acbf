"""Fixtures of the fidelity tests: real models trained once per test session.

Test modules import the fixtures (``from fidelity_fixtures import fid_models, ...``). The models
are trained into the session's temporary folder, so every session trains afresh (~35 s for both
on 2 cores) and no test depends on an earlier run's cache; a second module in the same session
finds the files there and loads them.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BROKEN_LAYER = "entry_sep1_bn"  # folded into entry_sep1's pointwise conv; its ReLU is entry_sep1_relu
BROKEN_CHANNEL = 17  # the loudest channel of that layer on the digits
_SOURCES: dict = {}


def _root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "fidelity-models"


@pytest.fixture(scope="session")
def fid_models(tmp_path_factory) -> dict[str, Path]:
    """{"digits_cnn": .keras, "digits_xception": .keras}, trained in this session."""
    from fidelity_models import train_into

    return train_into(_root(tmp_path_factory))


def broken(models: dict[str, Path], factor: float) -> Path:
    """digits_xception with one channel of BROKEN_LAYER scaled by ``factor`` (float function unchanged)."""
    import keras

    from fidelity_models import break_channel

    dest = models["digits_xception"].with_name(f"digits_xception_x{int(factor)}.keras")
    if not dest.is_file():
        m = keras.models.load_model(models["digits_xception"])
        break_channel(m, BROKEN_LAYER, BROKEN_CHANNEL, factor)
        m.save(dest)
    return dest


@pytest.fixture(scope="session")
def broken50(fid_models) -> Path:
    return broken(fid_models, 50.0)


@pytest.fixture(scope="session")
def broken200(fid_models) -> Path:
    return broken(fid_models, 200.0)


def source(path: Path, preprocess: str):
    """fidelity_harness.Source for a model file, loaded and traced once per session."""
    from fidelity_harness import load_source

    key = (str(path), preprocess)
    if key not in _SOURCES:
        _SOURCES[key] = load_source(path, preprocess)
    return _SOURCES[key]


def exported(path: Path, preprocess: str, out: Path, formats=("tflite", "onnx"), **kw) -> dict[str, Path]:
    """int8 artifacts of a model (exported once per session and output folder)."""
    from fidelity_harness import export_int8

    key = ("export", str(path), str(out), tuple(formats), tuple(sorted(kw.items())))
    if key not in _SOURCES:
        _SOURCES[key] = export_int8(path, preprocess, out, formats, **kw)
    return _SOURCES[key]
