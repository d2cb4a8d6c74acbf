"""Label-free budgets: most users have images, not labels.

The budget becomes top-1 *agreement* with the float source model on images the int8 ranges were
not calibrated on: a held-out part of the calibration folder when no labelled set is given.

    calib, held = split_holdout(calibration, fraction=0.25)
    res = artifact_drop(path, "tflite", held, source_outputs(held), budget=1.0)   # DropResult

``res.drop`` is then ``100 - agreement`` (points) with a Wilson interval, ``res.worst_class`` the
source-predicted class the artifact disagrees on most (a collapsed class shows here even when
the average is fine), and ``res.verdict`` pass | fail | inconclusive against the budget.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.fidelity.runs import predict
from edgepipe.pipeline.fidelity.stats import DropResult, paired_drop

DEFAULT_FRACTION = 0.25
MIN_CALIBRATION = 8  # images left to calibrate on
MIN_HOLDOUT = 8


def _part(c: Calibration, idx: np.ndarray, tag: str) -> Calibration:
    return Calibration(raw=c.raw[idx], data=c.data[idx], source=c.source, location=c.location,
                       skipped=c.skipped if tag == "calibration" else 0)


def split_holdout(calibration: Calibration, fraction: float = DEFAULT_FRACTION,
                  seed: int = 0) -> tuple[Calibration, Calibration]:
    """(images to calibrate on, held-out images to judge agreement on): a seeded split."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"bad held-out fraction {fraction}", "Give a fraction between 0 and 1, e.g. 0.25")
    n = calibration.n
    k = int(round(n * fraction))
    if k < MIN_HOLDOUT or n - k < MIN_CALIBRATION:
        raise UserError(f"{n} calibration images are too few to hold out {fraction:.0%} for a label-free budget",
                        f"Give at least {MIN_HOLDOUT + MIN_CALIBRATION} images (more is better: the interval "
                        "narrows with the held-out count), or a labelled set")
    order = np.random.default_rng(seed).permutation(n)
    held, keep = np.sort(order[:k]), np.sort(order[k:])
    return _part(calibration, keep, "calibration"), _part(calibration, held, "holdout")


def split_for_budget(calibration: Calibration, calib_samples: int, seed: int = 0) -> tuple[Calibration, Calibration]:
    """(images to calibrate on, held-out images) from one read of ``calib_samples`` + more images: the images
    beyond ``calib_samples`` (a seeded choice) are held out; a read too short for that is split by
    DEFAULT_FRACTION (UserError when even that leaves too few)."""
    extra = calibration.n - calib_samples
    if extra < MIN_HOLDOUT:
        return split_holdout(calibration, DEFAULT_FRACTION, seed)
    order = np.random.default_rng(seed).permutation(calibration.n)
    held, keep = np.sort(order[:extra]), np.sort(order[extra:])
    return _part(calibration, keep, "calibration"), _part(calibration, held, "holdout")


def artifact_drop(path: Path, fmt: str, images: Calibration, source_outputs: np.ndarray, *,
                  labels: Optional[np.ndarray] = None, budget: Optional[float] = None,
                  class_budget: Optional[float] = None, confidence: float = 0.95) -> DropResult:
    """The artifact's drop against the source on ``images``: agreement without labels, top-1 with."""
    got = predict(Path(path), fmt, images)
    src = np.asarray(source_outputs, np.float32).reshape(images.n, -1)
    if got.shape != src.shape:
        raise UserError(f"{Path(path).name} gives {got.shape[1]} outputs per image, the source {src.shape[1]}",
                        "Compare an artifact with the model it was exported from")
    return paired_drop(src, got, labels, confidence=confidence, budget=budget, class_budget=class_budget)
