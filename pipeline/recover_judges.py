"""How the export's accuracy recovery judges a candidate int8 artifact against its budget.

* ``LabelledJudge``: top-1 (or top-5, agreement) on a labelled set (``--eval-data DIR|digits``), the
  figures `edgepipe eval` computes, the source model's predictions cached in the export folder;
* ``HoldoutJudge``: no labels (most users have images, not labels): top-1 agreement with the source
  model on calibration images held out of the calibration (``ExportRun.holdout``); the drop is
  ``100 - agreement`` points.

``judge(path, fmt)`` -> (the attempt's figures for the manifest, the DropResult with its interval,
or None when the candidate could not be evaluated). Both compare with the ORIGINAL source model,
never with the equalized one the artifacts were converted from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from edgepipe.pipeline.base.evaluation import EvalRow, classification_metrics, topk_hits
from edgepipe.pipeline.base.manifest import Manifest
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.datasets import DEFAULT_MIN_SAMPLES, LabelledSet, load_labelled
from edgepipe.pipeline.eval_artifacts import EvalContext, evaluate_file
from edgepipe.pipeline.export_run import ExportRun, one_line
from edgepipe.pipeline.fidelity.holdout import artifact_drop
from edgepipe.pipeline.fidelity.runs import cpu_runtime
from edgepipe.pipeline.fidelity.stats import DropResult, drop_from_counts
from edgepipe.pipeline.source_predictions import keras_predictor, source_predictions
from edgepipe.pipeline.verify import verifier

HOLDOUT_NAME = "held-out calibration images"


def interval_record(res: DropResult) -> dict:
    """What an attempt records of a DropResult: everything but the per-class list."""
    return {k: v for k, v in res.to_dict().items() if k != "per_class"}


@dataclass
class LabelledJudge:
    """Top-1/top-5/agreement of artifact files on the labelled set, against the source model."""

    ds: LabelledSet
    data: np.ndarray
    source: dict
    source_pred: np.ndarray
    source_top5: np.ndarray
    num_classes: int
    metric: str
    budget: float

    @classmethod
    def build(cls, run: ExportRun, manifest: Manifest, eval_data: str, metric: str, budget: float,
              min_samples: Optional[int]) -> "LabelledJudge":
        src = manifest.model
        run.progress("stage", {"name": "accuracy check: loading eval data"})
        ds = load_labelled(eval_data, src.input_shape, src.num_classes, model_labels=src.labels,
                           min_samples=min_samples or DEFAULT_MIN_SAMPLES)
        run.progress("stage", {"name": "accuracy check: source model"})
        lm = run.original or run.traced.loaded
        predictor = keras_predictor(lm) if lm.is_keras else run.traced.reference
        src_out, _ = source_predictions(manifest, run.req.folder, ds, predictor=predictor)
        smet = classification_metrics(src_out, ds.labels)
        return cls(ds, ds.data(run.traced.preprocessing), {"top1": smet["top1"], "top5": smet["top5"]},
                   src_out.argmax(1), topk_hits(src_out, ds.labels, 5), int(src.num_classes or src_out.shape[1]),
                   metric, budget)

    def describe(self) -> dict:
        return {k: v for k, v in self.ds.describe().items() if k != "skipped_files"}

    def judge(self, path: Path, fmt: str) -> tuple[dict, Optional[DropResult]]:
        try:
            runs_as, rt = verifier(fmt)
        except LookupError as e:
            return {"drop": None, "error": str(e)}, None
        ctx = EvalContext(self.ds, self.data, self.num_classes, self.source, self.source_pred,
                          source_top5=self.source_top5)
        row = evaluate_file(path, runs_as, rt, EvalRow(artifact=path.name, format=fmt), ctx)
        if row.status != "ok" or row.drop is None:
            return {"drop": None, "error": row.reason, "runtime": rt.name}, None
        figures = {"drop": row.drop[self.metric], "top1": row.top1, "agreement": row.agreement, "runtime": rt.name}
        counts = row.flips(self.metric)
        if counts is None:
            return figures, None
        n, lost, gained, per_class = counts
        res = drop_from_counts(n, lost, gained, metric="agreement" if self.metric == "agreement" else "top1",
                               per_class=[tuple(c) for c in per_class], budget=self.budget)
        res.drop = row.drop[self.metric]
        return {**figures, "interval": interval_record(res)}, res


@dataclass
class HoldoutJudge:
    """Top-1 agreement with the source model on held-out calibration images (no labels needed)."""

    images: Calibration
    source_outputs: np.ndarray
    budget: float
    metric: str = "agreement"

    @classmethod
    def build(cls, run: ExportRun, budget: float) -> "HoldoutJudge":
        assert run.holdout is not None and run.reference is not None
        run.progress("stage", {"name": f"accuracy check: source model on {run.holdout.n} {HOLDOUT_NAME}"})
        return cls(run.holdout, np.asarray(run.reference(run.holdout.data), np.float32), budget)

    def describe(self) -> dict:
        return {"source": "holdout", "location": self.images.location, "samples": self.images.n,
                "held_out_from": self.images.source}

    def judge(self, path: Path, fmt: str) -> tuple[dict, Optional[DropResult]]:
        try:
            rt = cpu_runtime(fmt)
            res = artifact_drop(path, fmt, self.images, self.source_outputs, budget=self.budget)
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is recorded, the others go on
            return {"drop": None, "error": one_line(e, 300)}, None
        return {"drop": res.drop, "agreement": res.artifact_value, "runtime": rt.name,
                "interval": interval_record(res)}, res


Judge = Union[LabelledJudge, HoldoutJudge]
