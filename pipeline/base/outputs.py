"""No speed figure without correct outputs.

A bench row on an accelerator (GPU delegate, NNAPI, Edge TPU...) is only a speed figure if the
accelerator computes the same answers as the CPU does for the same artifact. ``check_outputs``
compares the row's outputs on the bench inputs with the CPU row's and returns ``ok`` or
``wrong-output`` with the figures and the reason; bench gives such a row its own status,
listed first in every report, and check fails it.

Per precision, what a correct accelerator keeps (the CPU run of the *same artifact* is the
reference, so the bounds are tighter than export verification's source-vs-artifact ones, except
for int8, where a GPU delegate legitimately computes in float what the CPU computes in int8).
Without a CPU row the source model's outputs on the same images are the reference, with the
export verification's bounds, never tighter than the CPU run's (SOURCE_THRESHOLDS). An untrained model (a built-in exported with
``--weights none``) is chaotic: its quantized artifacts are held to a structural bound only
(UNTRAINED_QUANTIZED), as in export verification.

    top1     top-1 agreement on confident samples (reference top-1 margin > 2x max abs error,
             all samples when none is confident)
    centered per-sample correlation of the outputs (log-probabilities for softmax outputs)

Measured (ai-edge-litert 2.3.0, GPU accelerator on lavapipe): the digits Xception-style model's
full-int8 TFLite artifact agrees with its own CPU run on 71% of 96 digits test images (top-1
accuracy 70% vs 99%), whatever the I/O type (int8, uint8, float32), and `edgepipe bench` reports
the row "ok" (its agreement dict says 37.5% on the 8 reference images); the fp32 artifact agrees
100%. The cause, reduced to one op: an int8 1x1 convolution with stride 2 (the shortcut of
Xception and ResNet blocks) comes out of the GPU with garbage values (max error 4.6 on outputs
of range 3.3) while the delegate logs "Shape mismatch in GpuModelBuilder::UpdateOutputTensors
(output of convolution1x1)"; stride 1 is fine (tests/test_fidelity_outputs.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

PROB_FLOOR = 1.0 / 256
OUTPUT_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"top1": 0.99, "centered": 0.999},
    "fp16": {"top1": 0.97, "centered": 0.99},
    "dynamic": {"top1": 0.95, "centered": 0.97},
    "int16x8": {"top1": 0.95, "centered": 0.97},
    "palettized": {"top1": 0.9, "centered": 0.95},
    "int8": {"top1": 0.9, "centered": 0.9},
}
# against the source model instead of the CPU run: export verification's bounds (pipeline/verify.py),
# never stricter than the CPU run's (an accelerator may compute fp32 models in fp16)
SOURCE_THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"top1": 0.99, "centered": 0.999},
    "fp16": {"top1": 0.9, "centered": 0.99},
    "dynamic": {"top1": 0.8, "centered": 0.97},
    "int16x8": {"top1": 0.8, "centered": 0.97},
    "palettized": {"top1": 0.7, "centered": 0.93},
    "int8": {"top1": 0.5, "centered": 0.8},
}
UNTRAINED_QUANTIZED = {"centered": 0.5}
QUANTIZED = ("dynamic", "int8", "int16x8", "palettized")
STATUS_WRONG = "wrong-output"


def thresholds_for(precision: str, against: str = "cpu", trained: bool = True) -> dict[str, float]:
    """The bounds a row of this precision keeps against the CPU run ("cpu") or the source model."""
    if not trained and precision in QUANTIZED:
        return dict(UNTRAINED_QUANTIZED)
    table = OUTPUT_THRESHOLDS if against == "cpu" else SOURCE_THRESHOLDS
    return dict(table.get(precision, table["int8"]))


@dataclass
class OutputCheck:
    status: str  # ok | wrong-output
    precision: str
    against: str
    samples: int
    top1_agreement: Optional[float]
    confident: int
    centered: float
    max_abs: float
    thresholds: dict = field(default_factory=dict)
    reason: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def _flat(x: Any) -> np.ndarray:
    if isinstance(x, dict):
        x = [x[k] for k in sorted(x)]
    if isinstance(x, (list, tuple)):
        return np.concatenate([np.asarray(a, np.float64).reshape(np.asarray(a).shape[0], -1) for a in x], axis=1)
    a = np.asarray(x, np.float64)
    return a.reshape(a.shape[0], -1)


def _is_prob(r: np.ndarray) -> bool:
    return r.shape[1] > 1 and bool((r >= -1e-6).all()) and bool(np.allclose(r.sum(axis=1), 1.0, atol=1e-2))


def _centered(a: np.ndarray, r: np.ndarray) -> float:
    if _is_prob(r):
        a, r = np.log(np.maximum(a, PROB_FLOOR)), np.log(np.maximum(r, PROB_FLOOR))
    ac, rc = a - a.mean(axis=1, keepdims=True), r - r.mean(axis=1, keepdims=True)
    vals = []
    for x, y in zip(ac, rc):
        nx, ny = np.linalg.norm(x), np.linalg.norm(y)
        vals.append(1.0 if nx == 0 and ny == 0 else (0.0 if nx == 0 or ny == 0 else float(x @ y / (nx * ny))))
    return float(np.mean(vals)) if vals else 1.0


def check_outputs(reference: Any, outputs: Any, precision: str, against: str = "cpu", *, trained: bool = True,
                  thresholds: Optional[dict] = None) -> OutputCheck:
    """A target's outputs against the reference run's (dicts by output name, arrays or lists)."""
    r, a = _flat(reference), _flat(outputs)
    th = dict(thresholds) if thresholds is not None else thresholds_for(precision, against, trained)
    if r.shape != a.shape:
        return OutputCheck(STATUS_WRONG, precision, against, int(a.shape[0]), None, 0, 0.0, float("inf"), th,
                           f"output shape {list(a.shape)} vs {against} {list(r.shape)}")
    if not np.isfinite(a).all():
        return OutputCheck(STATUS_WRONG, precision, against, int(a.shape[0]), None, 0, 0.0, float("inf"), th,
                           "non-finite outputs")
    max_abs = float(np.abs(a - r).max()) if a.size else 0.0
    top1, confident = None, 0
    if r.shape[1] > 1:
        srt = np.sort(r, axis=1)
        mask = (srt[:, -1] - srt[:, -2]) > 2 * max_abs
        confident = int(mask.sum())
        m = mask if confident else np.ones(len(r), bool)
        top1 = float(np.mean(a[m].argmax(1) == r[m].argmax(1)))
    cc = _centered(a, r)
    fails = []
    if top1 is not None and "top1" in th and top1 < th["top1"]:
        fails.append(f"top-1 agreement with {against} {100 * top1:.0f}% < {100 * th['top1']:.0f}%")
    if "centered" in th and cc < th["centered"]:
        fails.append(f"output correlation with {against} {cc:.3f} < {th['centered']}")
    status = STATUS_WRONG if fails else "ok"
    return OutputCheck(status, precision, against, int(a.shape[0]), top1, confident, cc, max_abs, th,
                       "; ".join(fails) or None)
