"""Accuracy recovery for int8 artifacts that miss an accuracy budget (`edgepipe export --max-drop X`).

It runs inside the export, on the export's own traced model, calibration data, verification set
and format instances (``ExportRun``): nothing is loaded, traced or calibrated again. Each int8
artifact is evaluated on a labelled set (``--eval-data DIR|digits``; the source model's
predictions are cached in the folder as ``edgepipe eval`` would cache them). When its drop
exceeds the budget, the attempts its format offers (``Format.recoveries``) are tried, group by
group, until one meets the budget:

1. ONNX: onnxruntime's other calibration methods (``entropy``, ``percentile``), same size.
2. TFLite: 16-bit activations with 8-bit weights (``int16x8``), about the same size; then, only
   when that missed, the most sensitive layers kept in float (TFLite's quantization debugger
   ranks layers by RMSE / scale of their quantization error; the top 1, 2, 4, 8 stay float).
   These models are larger and take float input/output.

Of the attempts that meet the budget the smallest file wins (ties: lower drop). It replaces the
artifact in the manifest (same id; precision, options, calibration updated) and is verified with
the export's own thresholds (an untrained model keeps its structural bound). ``extra["recovery"]``
records the budget, every attempt's drop and size, and the choice. When nothing meets the budget
the exported artifact stays, the attempts are recorded, and the outcome raises ``GateFailure``.

``recover_folder`` runs the same recovery on a finished export folder (it loads the model).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.export import ExportResult, Format, Recovery
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, load_manifest
from edgepipe.pipeline.base.records import ArtifactRecovery, RecoveryAttempt, RecoveryReport, VerificationSet
from edgepipe.pipeline.base.util import atomic_path, path_size, sha256_file
from edgepipe.pipeline.datasets import DEFAULT_MIN_SAMPLES, LabelledSet, load_labelled
from edgepipe.pipeline.base.evaluation import METRICS, EvalRow, classification_metrics
from edgepipe.pipeline.eval_artifacts import EvalContext, evaluate_file
from edgepipe.pipeline.source_predictions import keras_predictor, source_predictions
from edgepipe.pipeline.export_plan import ExportRequest
from edgepipe.pipeline.export_run import ExportRun, Progress, noop, one_line
from edgepipe.pipeline.verify import verifier

WORK_DIR = ".recover"


def _note(progress: Progress, msg: str) -> None:
    progress("note", {"message": msg})


@dataclass
class _Evaluator:
    """Top-1/top-5/agreement of artifact files on the labelled set, against the source model."""

    ds: LabelledSet
    data: np.ndarray
    source: dict
    source_pred: np.ndarray
    num_classes: int
    metric: str

    @classmethod
    def build(cls, run: ExportRun, manifest: Manifest, eval_data: str, metric: str,
              min_samples: Optional[int]) -> "_Evaluator":
        src = manifest.model
        run.progress("stage", {"name": "accuracy check: loading eval data"})
        ds = load_labelled(eval_data, src.input_shape, src.num_classes, model_labels=src.labels,
                           min_samples=min_samples or DEFAULT_MIN_SAMPLES)
        run.progress("stage", {"name": "accuracy check: source model"})
        lm = run.traced.loaded
        predictor = keras_predictor(lm) if lm.is_keras else run.traced.reference
        src_out, _ = source_predictions(manifest, run.req.folder, ds, predictor=predictor)
        smet = classification_metrics(src_out, ds.labels)
        return cls(ds, ds.data(run.traced.preprocessing), {"top1": smet["top1"], "top5": smet["top5"]},
                   src_out.argmax(1), int(src.num_classes or src_out.shape[1]), metric)

    def measure(self, path: Path, fmt: str) -> dict:
        try:
            runs_as, rt = verifier(fmt)
        except LookupError as e:
            return {"drop": None, "error": str(e)}
        ctx = EvalContext(self.ds, self.data, self.num_classes, self.source, self.source_pred)
        row = evaluate_file(path, runs_as, rt, EvalRow(artifact=path.name, format=fmt), ctx)
        if row.status != "ok" or row.drop is None:
            return {"drop": None, "error": row.reason, "runtime": rt.name}
        return {"drop": row.drop[self.metric], "top1": row.top1, "agreement": row.agreement, "runtime": rt.name}


def recover_int8(run: ExportRun, manifest: Manifest, budget: float, eval_data: str, *, metric: str = "top1",
                 min_samples: Optional[int] = None) -> RecoveryReport:
    """Evaluate every int8 artifact; try recoveries for those over budget (see module docstring)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'", f"Use one of: {', '.join(METRICS)}")
    report = RecoveryReport(metric=metric, budget=budget, eval_data=eval_data)
    arts = [a for a in manifest.artifacts if a.precision == "int8" and a.path]
    if not arts:
        return report
    ev = _Evaluator.build(run, manifest, eval_data, metric, min_samples)
    report.dataset = {k: v for k, v in ev.ds.describe().items() if k != "skipped_files"}
    report.source = ev.source
    work = run.req.folder / WORK_DIR
    try:
        for a in arts:
            run.progress("stage", {"name": f"accuracy check: {a.id}"})
            rec = _recover_one(run, a, ev, budget, work)
            report.artifacts.append(rec)
            a.extra = {**(a.extra or {}), "recovery": report.artifact_record(rec)}
            manifest.save(run.req.folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest.extra["recovery"] = report.summary()
    return report


def _meets(drop: Optional[float], budget: float) -> bool:
    return drop is not None and drop <= budget + 1e-9


def _recover_one(run: ExportRun, a: Artifact, ev: _Evaluator, budget: float, work: Path) -> ArtifactRecovery:
    assert a.path is not None
    first = RecoveryAttempt("as exported", a.precision, size_bytes=a.size_bytes,
                            method=(a.calibration or {}).get("method"), **ev.measure(run.req.folder / a.path, a.format))
    first.meets = _meets(first.drop, budget)
    rec = ArtifactRecovery(a.id, [first])
    if first.meets:
        _note(run.progress, f"{a.id}: drop {first.drop:.2f} within the budget of {budget:g}")
        rec.chosen = first.name
        return rec
    what = "evaluation failed" if first.drop is None else f"drop {first.drop:.2f} > {budget:g}"
    _note(run.progress, f"{a.id}: {what}; trying recoveries")
    f = run.format(a.format)
    if run.calibration is None:
        rec.note = "no calibration data to re-quantize with"
        return rec
    groups = f.recoveries(run.traced, run.calibration, run.req.options_for(a.format))
    made: dict[str, tuple[Path, ExportResult, Recovery]] = {}
    tried = False
    while not any(t.meets for t in rec.attempts[1:]):
        group = next(groups, None)
        if group is None:
            break
        tried = True
        work.mkdir(parents=True, exist_ok=True)
        for r in group:
            dest = work / f"{a.id}-{len(rec.attempts)}{Path(a.path).suffix}"
            row, res = _attempt(run, f, r, dest, ev, budget)
            rec.attempts.append(row)
            if res is not None:
                made[r.name] = (dest, res, r)
            _note(run.progress, f"{a.id}: {r.name}: " + ("failed" if row.drop is None else f"drop {row.drop:.2f}"))
    if not tried:
        rec.note = f"no recovery implemented for {a.format} int8"
    ok = [t for t in rec.attempts[1:] if t.meets]
    if ok:
        best = min(ok, key=lambda t: (t.size_bytes or 0, t.drop or 0.0))
        _adopt(run, a, best, *made[best.name])
        rec.chosen = best.name
    return rec


def _attempt(run: ExportRun, f: Format, r: Recovery, dest: Path, ev: _Evaluator,
             budget: float) -> tuple[RecoveryAttempt, Optional[ExportResult]]:
    info = {k: v for k, v in r.info.items() if k in ("method", "float_nodes")}
    t0 = time.perf_counter()
    try:
        res = run.convert(f, r.run, dest, keep_files=False)
    except Exception as e:  # an attempt that fails is recorded; the others go on
        return RecoveryAttempt(r.name, r.precision, error=one_line(e, 300), **info), None
    row = RecoveryAttempt(r.name, r.precision, size_bytes=path_size(dest),
                          convert_s=round(r.convert_s + time.perf_counter() - t0, 2), **info,
                          **ev.measure(dest, f.name))
    row.meets = _meets(row.drop, budget)
    return row, res


def _adopt(run: ExportRun, a: Artifact, best: RecoveryAttempt, dest: Path, res: ExportResult, r: Recovery) -> None:
    """Put the chosen attempt in place of the artifact and verify it like the export did."""
    assert a.path is not None
    folder = run.req.folder
    fname = a.path if r.tag == a.precision else run.format(a.format).filename(run.traced.source.name, r.tag)
    old = folder / a.path
    with atomic_path(folder / fname) as tmp:
        shutil.copyfile(dest, tmp)
    if fname != a.path and old.exists():
        old.unlink()
    a.path, a.precision = fname, best.precision
    a.sha256, a.size_bytes = sha256_file(folder / fname), path_size(folder / fname)
    a.inputs, a.outputs = res.inputs, res.outputs
    a.options = {**res.options, "input_kind": res.input_kind, "recovered_by": best.name}
    if best.float_nodes:
        a.options["float_nodes"] = [n["tensor"] for n in best.float_nodes]
    a.calibration = res.calibration or a.calibration
    a.status, a.error = "ok", None
    run.verify(a)


def recover_folder(req: ExportRequest, *, metric: str = "top1", min_samples: Optional[int] = None,
                   progress: Progress = noop) -> RecoveryReport:
    """The export's recovery on a finished export folder (``req`` as ``export_plan.prepare`` built it,
    with ``max_drop``): loads, traces and calibrates the model again; verifies against the folder's
    reference.npz. Saves the manifest."""
    if req.max_drop is None or req.eval_data is None:
        raise UserError("recovery needs a budget and labelled images", "Give max_drop and eval_data")
    manifest, folder = load_manifest(req.folder)
    ref = manifest.reference or {}
    if not ref.get("path") or not (folder / ref["path"]).is_file():
        raise UserError(f"{folder} has no reference.npz to verify recovered artifacts against",
                        "Re-run `edgepipe export` (it writes reference.npz)")
    vset = VerificationSet.load(folder / ref["path"], ref.get("data") or "calibration")
    run = ExportRun.start(req, progress, vset=vset)
    try:
        report = recover_int8(run, manifest, req.max_drop, req.eval_data, metric=metric, min_samples=min_samples)
    finally:
        run.close()
    manifest.save(folder)
    return report

