"""Stronger post-training quantization, applied to the Keras model before it is traced and converted.

    loaded, record = strengthen(loaded, calibration.data, equalize=True, bias_levels=None)

* **Cross-layer equalization** (equalize.py, BatchNormalization folded first): on by default for
  exports with int8 artifacts. The float function is unchanged, which is checked: the equalized
  model's outputs on calibration images must match the original's to ``TOLERANCE`` of their
  range, else the original model is used and the record says why. A model it cannot rewrite (not
  a Keras functional model, a layer it does not know) falls back the same way.
* **Bias correction** (equalize.correct_bias): off by default (round 1's benchmark measured no gain
  on the test models, benchmarks/bench_int8.py); it changes the float model slightly, on purpose,
  towards what int8 weights on the format's grid (``bias_levels``: 127, or 63 for ONNX's 7-bit
  weights) compute.

The record goes to the manifest (``model.options["ptq"]``) and the export's cache key; the export
verifies every artifact against the ORIGINAL model's outputs, never the rewritten one's.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base.records import LoadedModel
from edgepipe.pipeline.fidelity.equalize import correct_bias, equalize as cross_layer_equalize

EQUALIZE_IMAGES = 64  # calibration images that bound ReLU6 channels (the most the rewrite looks at)
CHECK_IMAGES = 8
TOLERANCE = 1e-3  # largest output change allowed, relative to the outputs' range


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def _outputs(model: Any, x: np.ndarray) -> np.ndarray:
    y = model(x, training=False)
    if isinstance(y, dict):
        y = [y[k] for k in sorted(y)]
    if isinstance(y, (list, tuple)):
        y = np.concatenate([np.asarray(v, np.float64).reshape(len(x), -1) for v in y], axis=1)
    return np.asarray(y, np.float64).reshape(len(x), -1)


def output_change(a: Any, b: Any, x: np.ndarray) -> float:
    """Largest |a(x) - b(x)| relative to the range of a(x)."""
    ya, yb = _outputs(a, x), _outputs(b, x)
    span = float(ya.max() - ya.min()) or 1.0
    return float(np.abs(ya - yb).max()) / span


def _equalize(model: Any, data: np.ndarray) -> tuple[Any, dict]:
    eq, info = cross_layer_equalize(model, data[:EQUALIZE_IMAGES])
    change = output_change(model, eq, data[:CHECK_IMAGES])
    if change > TOLERANCE:
        raise ValueError(f"the equalized model's outputs moved by {change:.2g} of their range (> {TOLERANCE:g})")
    return eq, {"applied": True, "pairs": info.get("pairs", []), "folded": info.get("folded", []),
                "sweeps": info.get("sweeps", []), "output_change": round(change, 8)}


def _bias(model: Any, data: np.ndarray, levels: int) -> tuple[Any, dict]:
    corrected, info = correct_bias(model, data, levels=levels)
    return corrected, {"applied": True, "levels": levels, "layers": info.get("corrected", []),
                       "max_shift": {k: round(v, 8) for k, v in (info.get("max_shift") or {}).items()}}


def strengthen(lm: LoadedModel, data: Optional[np.ndarray], *, equalize: bool = True,
               bias_levels: Optional[int] = None) -> tuple[LoadedModel, dict]:
    """(the model to trace and convert, what was applied): see the module docstring. ``data``: the
    preprocessed calibration images. Never raises for a model it cannot rewrite: the record says why."""
    record: dict = {}
    if not equalize and not bias_levels:
        return lm, record
    why_not = None if lm.is_keras else "not a Keras model (a SavedModel without Keras metadata)"
    if data is None or len(data) == 0:
        why_not = why_not or "no calibration images"
    model = lm.model
    steps = ([("equalize", lambda m: _equalize(m, data))] if equalize else []) + \
        ([("bias_correction", lambda m: _bias(m, data, int(bias_levels)))] if bias_levels else [])
    for name, step in steps:
        if why_not:
            record[name] = {"applied": False, "skipped": why_not}
            continue
        try:
            model, record[name] = step(model)
        except Exception as e:  # a model the rewrite cannot handle is converted as it is
            record[name] = {"applied": False, "skipped": _one_line(e)}
    if model is lm.model:
        return lm, record
    return LoadedModel(lm.source, model, lm.preprocessing, lm.is_keras, lm.saved_model_dir), record
