"""Accuracy recovery for int8 artifacts that miss an accuracy budget (`edgepipe export --max-drop X`).

It runs inside the export, on the export's own traced model, calibration data, verification set
and format instances (``ExportRun``): nothing is loaded, traced or calibrated again. Each int8
artifact is judged (recover_judges.py) on a labelled set (``--eval-data DIR|digits``: top-1 drop;
the source model's predictions are cached in the folder as ``edgepipe eval`` would cache them) or,
without labels, on calibration images held out of the calibration (top-1 agreement with the
source model: the drop is ``100 - agreement``). Every attempt records its drop with its 95%
interval. When the drop exceeds the budget, the attempts its format offers (``Format.recoveries``)
are tried, group by group, until one meets the budget:

1. ONNX: onnxruntime's other calibration methods (``entropy``, ``percentile``), same size.
2. TFLite: 16-bit activations with 8-bit weights (``int16x8``), about the same size; then, only
   when that missed, the most sensitive layers kept in float (TFLite's quantization debugger
   ranks layers by RMSE / scale of their quantization error; the top 1, 2, 4, 8 stay float).
   These models are larger and take float input/output.
3. Then, TFLite and ONNX: the per-layer report (pipeline/fidelity) of the artifact on its calibration
   images, and the float fallback of its worst layers (1, 2, 4, 8, 16) until the budget holds; the
   report is kept beside the artifact (``layers/<id>/layers.json`` and ``.html``), every attempt
   records the layers kept in float, the ops that run in float, its size, CPU latency and why
   (the report's reasons), and the chosen one's cost against the artifact (``cost``).

Of the format's attempts that meet the budget the smallest file wins (ties: lower drop); the float
fallback is tried only when none did, and its first candidate that meets the budget (the fewest
float layers) wins. It replaces the artifact in the manifest (same id; precision, options,
calibration updated) and is verified with the export's own thresholds against the ORIGINAL model
(an untrained model keeps its structural bound). ``extra["recovery"]`` records the budget, every
attempt and the choice. When nothing meets the budget the exported artifact stays, the attempts are
recorded, and the outcome raises ``GateFailure``.

``recover_folder`` runs the same recovery on a finished export folder (it loads the model).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from edgepipe.export import ExportResult, Format, Recovery
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.evaluation import METRICS
from edgepipe.pipeline.base.manifest import Artifact, Manifest, load_manifest
from edgepipe.pipeline.base.records import ArtifactRecovery, RecoveryAttempt, RecoveryReport, VerificationSet
from edgepipe.pipeline.base.util import atomic_path, path_size, sha256_file
from edgepipe.pipeline.export_plan import ExportRequest
from edgepipe.pipeline.export_run import ExportRun, Progress, noop, one_line
from edgepipe.pipeline.recover_fallback import fallback_attempts
from edgepipe.pipeline.recover_judges import HOLDOUT_NAME, HoldoutJudge, Judge, LabelledJudge

WORK_DIR = ".recover"


def _note(progress: Progress, msg: str) -> None:
    progress("note", {"message": msg})


def _judge(run: ExportRun, manifest: Manifest, budget: float, eval_data: Optional[str], metric: str,
           min_samples: Optional[int]) -> Judge:
    if eval_data is not None:
        return LabelledJudge.build(run, manifest, eval_data, metric, budget, min_samples)
    if run.holdout is None:
        raise UserError("a label-free --max-drop needs calibration images held out of the calibration",
                        "Give --data DIR with your images, or --eval-data (labelled images)")
    return HoldoutJudge.build(run, budget)


def recover_int8(run: ExportRun, manifest: Manifest, budget: float, eval_data: Optional[str], *,
                 metric: str = "top1", min_samples: Optional[int] = None) -> RecoveryReport:
    """Evaluate every int8 artifact; try recoveries for those over budget (see module docstring).
    ``eval_data`` None: the label-free budget (agreement on the export's held-out images)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'", f"Use one of: {', '.join(METRICS)}")
    arts = [a for a in manifest.artifacts if a.precision == "int8" and a.path]
    report = RecoveryReport(metric=metric if eval_data is not None else "agreement", budget=budget,
                            eval_data=eval_data if eval_data is not None else HOLDOUT_NAME)
    if not arts:
        return report
    judge = _judge(run, manifest, budget, eval_data, metric, min_samples)
    report.dataset = judge.describe()
    report.source = getattr(judge, "source", {}) or {}
    work = run.req.folder / WORK_DIR
    try:
        for a in arts:
            run.progress("stage", {"name": f"accuracy check: {a.id}"})
            rec = _recover_one(run, a, judge, budget, work)
            report.artifacts.append(rec)
            a.extra = {**(a.extra or {}), "recovery": report.artifact_record(rec)}
            manifest.save(run.req.folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest.extra["recovery"] = report.summary()
    return report


def _meets(drop: Optional[float], budget: float) -> bool:
    return drop is not None and drop <= budget + 1e-9


def _recover_one(run: ExportRun, a: Artifact, judge: Judge, budget: float, work: Path) -> ArtifactRecovery:
    assert a.path is not None
    figures, _ = judge.judge(run.req.folder / a.path, a.format)
    first = RecoveryAttempt("as exported", a.precision, size_bytes=a.size_bytes,
                            method=(a.calibration or {}).get("method"), **figures)
    first.meets = _meets(first.drop, budget)
    rec = ArtifactRecovery(a.id, [first])
    if first.meets:
        _note(run.progress, f"{a.id}: drop {first.drop:.2f} within the budget of {budget:g}")
        rec.chosen = first.name
        return rec
    what = "evaluation failed" if first.drop is None else f"drop {first.drop:.2f} > {budget:g}"
    _note(run.progress, f"{a.id}: {what}; trying recoveries")
    if run.calibration is None:
        rec.note = "no calibration data to re-quantize with"
        return rec
    f = run.format(a.format)
    made = _format_attempts(run, a, f, judge, budget, work, rec)
    ok = [t for t in rec.attempts[1:] if t.meets]
    if ok:
        best = min(ok, key=lambda t: (t.size_bytes or 0, t.drop or 0.0))
        dest, res, r = made[best.name]
        _adopt(run, a, best, dest, res, r.tag)
        rec.chosen = best.name
        return rec
    adopted = fallback_attempts(run, a, f, judge, budget, work, rec)
    if adopted is not None:
        best, dest, res = adopted
        _adopt(run, a, best, dest, res, "int8_mixed")
        rec.chosen = best.name
    elif len(rec.attempts) == 1:
        rec.note = f"no recovery implemented for {a.format} int8"
    return rec


def _format_attempts(run: ExportRun, a: Artifact, f: Format, judge: Judge, budget: float, work: Path,
                     rec: ArtifactRecovery) -> dict[str, tuple[Path, ExportResult, Recovery]]:
    """The format's own recoveries, group by group, until one meets the budget."""
    assert run.calibration is not None and a.path is not None
    groups = f.recoveries(run.traced, run.calibration, run.req.options_for(a.format))
    made: dict[str, tuple[Path, ExportResult, Recovery]] = {}
    while not any(t.meets for t in rec.attempts[1:]):
        group = next(groups, None)
        if group is None:
            break
        work.mkdir(parents=True, exist_ok=True)
        for r in group:
            dest = work / f"{a.id}-{len(rec.attempts)}{Path(a.path).suffix}"
            row, res = _attempt(run, f, r, dest, judge, budget)
            rec.attempts.append(row)
            if res is not None:
                made[r.name] = (dest, res, r)
            _note(run.progress, f"{a.id}: {r.name}: " + ("failed" if row.drop is None else f"drop {row.drop:.2f}"))
    return made


def _attempt(run: ExportRun, f: Format, r: Recovery, dest: Path, judge: Judge,
             budget: float) -> tuple[RecoveryAttempt, Optional[ExportResult]]:
    info = {k: v for k, v in r.info.items() if k in ("method", "float_nodes")}
    t0 = time.perf_counter()
    try:
        res = run.convert(f, r.run, dest, keep_files=False)
    except Exception as e:  # an attempt that fails is recorded; the others go on
        return RecoveryAttempt(r.name, r.precision, error=one_line(e, 300), **info), None
    figures, _ = judge.judge(dest, f.name)
    row = RecoveryAttempt(r.name, r.precision, size_bytes=path_size(dest),
                          convert_s=round(r.convert_s + time.perf_counter() - t0, 2), **info, **figures)
    row.meets = _meets(row.drop, budget)
    return row, res


def _adopt(run: ExportRun, a: Artifact, best: RecoveryAttempt, dest: Path, res: ExportResult, tag: str) -> None:
    """Put the chosen attempt in place of the artifact and verify it like the export did."""
    assert a.path is not None
    folder = run.req.folder
    fname = a.path if tag == a.precision else run.format(a.format).filename(run.traced.source.name, tag)
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
        a.options["float_nodes"] = [n.get("tensor") or n.get("node") for n in best.float_nodes]
    if best.float_layers:
        a.options["float_layers"] = list(best.float_layers)
    a.calibration = res.calibration or a.calibration
    a.status, a.error = "ok", None
    run.verify(a)


def recover_folder(req: ExportRequest, *, metric: str = "top1", min_samples: Optional[int] = None,
                   progress: Progress = noop) -> RecoveryReport:
    """The export's recovery on a finished export folder (``req`` as ``export_plan.prepare`` built it,
    with ``max_drop``): loads, traces and calibrates the model again; verifies against the folder's
    reference.npz. Saves the manifest."""
    if req.max_drop is None:
        raise UserError("recovery needs a budget", "Give max_drop (and eval_data, or calibration images)")
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

