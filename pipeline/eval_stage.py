"""`edgepipe eval`: accuracy of the source model and of every artifact on a labelled set.

For each artifact and each target a runtime can run it on here, the labelled images are run
through the runtime seam and compared with the labels (top-1, top-5) and with the source model's
own predictions (agreement). The drop of an artifact is ``source metric - artifact metric`` in
percentage points on the same images (for agreement: ``100 - agreement``).

The jobs live in their own modules: ``source_predictions`` (the source model's outputs, computed
once in a child process that imports TensorFlow, then cached), ``eval_artifacts`` (planning and
the artifact loop) and ``eval_remote`` (``--device``). A standalone .tflite/.onnx file (no
manifest) gets absolute accuracy only (``standalone``).

eval.json (next to manifest.json; ``schema_version`` 1) is what ``edgepipe check`` reads; its
records are ``edgepipe.pipeline.base.evaluation.EvalResult`` / ``EvalRow``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.devices import Registry
from edgepipe.devices import parse_targets
from edgepipe.pipeline import standalone
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.evaluation import (EVAL_NAME, METRICS, EvalResult, EvalRow, classification_metrics,
                                               load_eval, topk_hits)
from edgepipe.pipeline.base.manifest import Manifest, load_manifest
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.util import pkg_version, write_json_atomic
from edgepipe.pipeline.datasets import DEFAULT_MIN_SAMPLES, LabelledSet, check_spec, load_labelled
from edgepipe.pipeline.eval_artifacts import EVAL_TARGETS, EvalContext, plan, run_plan
from edgepipe.pipeline.eval_remote import evaluate_remote
from edgepipe.pipeline.options import check_threads
from edgepipe.pipeline.source_predictions import keras_predictor, source_predictions

# names the export's recovery step (pipeline/recover.py) imports from here
__all__ = ["EvalPlan", "EvalRequest", "METRICS", "classification_metrics", "evaluate", "keras_predictor",
           "load_eval", "resolve_targets", "source_predictions", "validate"]

Progress = Callable[[str, dict], None]


def _noop(event: str, info: dict) -> None:
    pass


@dataclass
class EvalRequest:
    model_dir: str | os.PathLike  # OUT/<model>, its manifest.json, or a standalone .tflite/.onnx file
    data: str  # ImageFolder directory or "digits"
    targets: Optional[Sequence[str] | str] = None  # default: the fast targets available here
    limit: Optional[int] = None
    min_samples: int = DEFAULT_MIN_SAMPLES
    labels_map: Optional[str] = None
    source_model: Optional[str] = None  # the source model file, when it moved since the export
    threads: Optional[int] = None
    seed: int = 0
    artifacts: Optional[Sequence[str]] = None  # artifact ids; default all
    device: Optional[str] = None  # a registered remote device; None/"local": here
    config: Optional[str] = None  # the device registry (default: $EDGEPIPE_CONFIG or ~/.config/edgepipe)
    preprocess: Optional[str] = None  # standalone files only: how the model expects its pixels
    out: Optional[str | os.PathLike] = None  # where eval.json goes (default: beside the manifest)


@dataclass
class EvalPlan:
    """A validated request: what to read, where to write, which targets."""

    manifest: Manifest
    folder: Path  # artifact paths are relative to it
    out: Path  # eval.json goes here
    targets: list[str]
    explicit: bool
    standalone: bool
    device: Optional[str]


def resolve_targets(targets: Optional[Sequence[str] | str]) -> tuple[list[str], bool]:
    """(targets, explicit). Default: cpu, gpu and reference, the slow ones left out when planning;
    named targets (``all`` as the one target parser means it) all run."""
    if targets is None or targets == "" or targets == []:
        return list(EVAL_TARGETS), False
    return parse_targets(targets if isinstance(targets, str) else ",".join(targets)), True


def _manifest(req: EvalRequest) -> tuple[Manifest, Path, Path, bool]:
    if standalone.is_artifact_file(req.model_dir):
        m = standalone.file_manifest(req.model_dir, req.preprocess)
        standalone.require_preprocessing(m, req.model_dir)
        out = Path(req.out) if req.out else standalone.default_out(req.model_dir)
        return m, Path(req.model_dir).resolve().parent, out, True
    if req.preprocess is not None:
        raise UserError("--preprocess applies to a standalone .tflite/.onnx file",
                        "An export's preprocessing is in its manifest: leave --preprocess out")
    m, folder = load_manifest(req.model_dir)
    return m, folder, Path(req.out) if req.out else folder, False


def validate(req: EvalRequest) -> EvalPlan:
    """Cheap checks before any expensive work."""
    m, folder, out, alone = _manifest(req)
    check_spec(req.data)
    check_threads(req.threads)
    targets, explicit = resolve_targets(req.targets)
    for a in req.artifacts or []:
        m.artifact(a)  # raises UserError for unknown ids
    device = req.device if req.device and req.device != "local" else None
    if device:
        Registry(req.config).get(device)  # UserError naming the registry when unknown
        if explicit and targets != ["cpu"]:
            raise UserError(f"--device {device} evaluates on the device's cpu; --targets {','.join(targets)} "
                            f"cannot be combined with it", "Leave --targets out (or use --targets cpu)")
        targets, explicit = ["cpu"], True
    return EvalPlan(m, folder, out, targets, explicit, alone, device)


def _source(p: EvalPlan, ds: LabelledSet, req: EvalRequest, predictor: Optional[Callable],
            progress: Progress) -> tuple[Optional[dict], Optional[np.ndarray], Optional[np.ndarray]]:
    """The source model's metrics, top-1 predictions and top-5 hits (all None for a standalone file)."""
    if p.standalone:
        return None, None, None
    k = int(p.manifest.model.num_classes)
    progress("stage", {"name": "source model predictions"})
    out, info = source_predictions(p.manifest, p.folder, ds, predictor=predictor, source_model=req.source_model,
                                   progress=progress)
    if out.shape != (ds.n, k):
        raise UserError(f"cached source predictions have shape {out.shape}, expected {(ds.n, k)}",
                        f"Delete {info.get('path')} and re-run")
    met = classification_metrics(out, ds.labels)
    return ({"top1": met["top1"], "top5": met["top5"], "correct": met["correct"], "samples": ds.n,
             "predictions": info}, out.argmax(axis=1), topk_hits(out, ds.labels, 5))


def evaluate(req: EvalRequest, progress: Progress = _noop, predictor: Optional[Callable] = None) -> EvalResult:
    """Run the evaluation, write eval.json and return it."""
    p = validate(req)
    src = p.manifest.model
    t_start = time.perf_counter()
    progress("stage", {"name": "loading eval data", "detail": req.data})
    ds = load_labelled(req.data, src.input_shape, src.num_classes, labels_map=req.labels_map,
                       model_labels=src.labels, limit=req.limit, min_samples=req.min_samples, seed=req.seed)
    source, src_pred, src_top5 = _source(p, ds, req, predictor, progress)
    ctx = EvalContext(ds, ds.data(Preprocessing.from_dict(src.preprocessing)), int(src.num_classes), source,
                      src_pred, req.threads, progress, source_top5=src_top5)
    arts = [a for a in p.manifest.artifacts if not req.artifacts or a.id in req.artifacts]
    if p.device is None:
        rows = run_plan(plan(arts, p.folder, p.targets, p.explicit), ctx)
    else:
        rows = evaluate_remote(p.device, req.config, arts, p.folder, ctx)
    res = _result(p, ds, source, rows, time.perf_counter() - t_start)
    p.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(p.out / EVAL_NAME, res.to_dict())
    return res


def _result(p: EvalPlan, ds: LabelledSet, source: Optional[dict], rows: list[EvalRow], secs: float) -> EvalResult:
    for r in rows:
        if r.device in (None, "local"):
            r.device = p.device or "local"
    res = EvalResult(model=p.manifest.model.name, dataset=ds.describe(), source=source, results=rows,
                     targets=p.targets, device=p.device or "local",
                     manifest=None if p.standalone else "manifest.json",
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     edgepipe_version=pkg_version("edgepipe"), seconds=round(secs, 3),
                     tensorflow_imported="tensorflow" in sys.modules)
    if p.standalone:
        res.extra["file"] = str(p.manifest.artifacts[0].path)
    why = res.at_chance()
    if why and not p.manifest.model.trained:
        res.notes.append(f"{why}: expected, the source model is untrained (exported with --weights none)")
    elif why:
        res.notes.append(f"{why}: the labels probably do not match the model's classes (check --labels-map) or the "
                         "preprocessing is wrong; `edgepipe check` refuses a baseline like this")
    return res
