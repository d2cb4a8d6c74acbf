"""Shared by the fidelity tests and benchmarks/bench_int8.py: export int8 variants of a trained
model through the real export stage, and judge them on the digits test split against the float
source model (top-1, drop with its interval, agreement, latency, size).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.calibration import calibrate, make_reader
from edgepipe.pipeline.datasets import digits_arrays
from edgepipe.pipeline.export_stage import prepare, run
from edgepipe.pipeline.fidelity.holdout import artifact_drop
from edgepipe.pipeline.fidelity.runs import latency_ms
from edgepipe.pipeline.models import resolve

CALIB_SAMPLES = 100


@dataclass
class Source:
    """A trained Keras model file, loaded and traced once, with its float outputs on the test split."""

    path: Path
    preprocess: str
    lm: object
    traced: object
    test: Calibration
    labels: np.ndarray
    outputs: np.ndarray

    @property
    def pp(self) -> Preprocessing:
        return self.traced.preprocessing

    def calibration(self, n: int = CALIB_SAMPLES) -> Calibration:
        """The images export calibrates on (digits train split, seed 0): a prefix of any larger read."""
        return calibrate(make_reader(None, "digits"), n, self.lm.source.input_shape, self.pp)


def load_source(path: Path, preprocess: str) -> Source:
    from edgepipe.pipeline import models, trace

    req = resolve(str(path), preprocess=preprocess)
    lm = models.load(req)
    traced = trace.trace(lm)
    _, h, w, c = lm.source.input_shape
    raw, labels = digits_arrays("test", h, w, c)
    raw = raw.astype(np.float32)
    test = Calibration(raw=raw, data=traced.preprocessing.apply(raw).astype(np.float32), source="digits-test")
    outputs = traced.reference(test.data)
    return Source(Path(path), preprocess, lm, traced, test, labels, outputs)


def export_int8(model_path: Path, preprocess: str, out: Path, formats=("tflite", "onnx"), *,
                calib_samples: int = CALIB_SAMPLES, calib_method: Optional[str] = None,
                precisions=("int8",), equalize: bool = True, bias_correction: bool = False) -> dict[str, Path]:
    """Export through the real export stage (no cache), with its defaults unless told otherwise;
    {format: artifact path} of the int8 ones."""
    req = prepare(str(model_path), preprocess=preprocess, formats=list(formats), precisions=list(precisions), out=out,
                  calib="digits", calib_samples=calib_samples, options={"calib_method": calib_method},
                  cache=False, parallel=False, equalize=equalize, bias_correction=bias_correction)
    m = run(req).manifest  # an artifact that fails verification is still written: it is what we measure
    failed = [f"{a.id}: {a.error}" for a in m.artifacts if not a.path]
    if failed:
        raise RuntimeError("; ".join(failed))
    return {a.format: req.folder / a.path for a in m.artifacts if a.precision == "int8"}


def judge(path: Path, fmt: str, src: Source, budget: Optional[float] = None, timing: bool = True) -> dict:
    """An int8 artifact on the digits test split against the float source model."""
    labelled = artifact_drop(path, fmt, src.test, src.outputs, labels=src.labels, budget=budget)
    agree = artifact_drop(path, fmt, src.test, src.outputs)
    row = {"top1": labelled.artifact_value, "source_top1": labelled.source_value, "drop": labelled.drop,
           "drop_low": labelled.low, "drop_high": labelled.high, "agreement": agree.artifact_value,
           "agreement_low": 100 - agree.high, "size_kb": os.path.getsize(path) / 1024, "verdict": labelled.verdict}
    if timing:
        row["latency_ms"] = latency_ms(path, fmt, src.test, runs=50)
    return row
