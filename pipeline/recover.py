"""Accuracy recovery for int8 artifacts that miss an accuracy budget (`edgepipe export --max-drop X`).

Export-time code: it imports TensorFlow. After the export, each int8 artifact is evaluated on a
labelled set (``--eval-data DIR|digits``; the source model's predictions are cached in the folder
as ``edgepipe eval`` would cache them). When its drop exceeds the budget, the recoveries the
converters offer are tried, in this order:

1. ONNX: onnxruntime's other calibration methods (``entropy``, ``percentile``;
   ``ExportOptions.calib_method``), same size as the first artifact.
2. TFLite: 16-bit activations with 8-bit weights (``int16x8``), about the same size.
3. TFLite, only when 1-2 found nothing: keep the most sensitive layers in float. TFLite's
   quantization debugger (``tf.lite.experimental.QuantizationDebugger``) runs the calibrated
   model layer by layer on the calibration data; layers are ranked by RMSE / scale of their
   quantization error, and the top 1, 2, 4, 8 are ``denylisted_nodes`` (float) until the
   budget is met. These models are larger and take float input/output.

Of the attempts that meet the budget the smallest file wins (ties: lower drop). It replaces the
artifact in the manifest (same id; precision, options, calibration and verification updated;
``extra["recovery"]`` records the budget, every attempt's drop and size, and the choice). When
nothing meets the budget the exported artifact stays, the attempts are recorded, and
``summarize()`` raises ``GateFailure`` (exit 1).

``after_export()`` also fills ``artifact.calibration`` for int8 artifacts whose format has no
activation calibration (Core ML int8 is weight-only), so every int8 artifact says how it was
calibrated.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest

ONNX_METHODS = ("minmax", "entropy", "percentile")
DENYLIST_STEPS = (1, 2, 4, 8)
DEBUG_SAMPLES = 32


# --------------------------------------------------------------------------- validation (no TF)
def validate_options(max_drop: Optional[float], eval_data: Optional[str], data: Optional[str],
                     calib: Optional[str], plan: list[tuple[str, str]]) -> Optional[str]:
    """The labelled set --max-drop will use, checked before any expensive work (None without --max-drop)."""
    from edgepipe.pipeline.datasets import check_spec

    if max_drop is None:
        if eval_data is not None:
            raise UserError("--eval-data is only used with --max-drop", "Add --max-drop POINTS, or drop --eval-data")
        return None
    if math.isnan(max_drop) or max_drop < 0:
        raise UserError(f"bad --max-drop {max_drop}", "Give a non-negative number of top-1 points")
    if not any(p == "int8" for _, p in plan):
        raise UserError("--max-drop applies to int8 artifacts, and none is being exported", "Add --int8")
    spec = eval_data
    if spec is None:
        if calib == "digits":
            spec = "digits"
        elif data and Path(data).is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in Path(data).iterdir()):
            spec = data  # calibration images arranged by class
        else:
            raise UserError("--max-drop needs labelled images to measure the drop",
                            "Give --eval-data DIR (one subfolder per class) or --eval-data digits")
    check_spec(spec)
    return spec


# --------------------------------------------------------------------------- entry points
def after_export(req, manifest: Manifest, *, max_drop: Optional[float] = None, eval_data: Optional[str] = None,
                 metric: str = "top1", min_samples: Optional[int] = None, progress: Callable = None) -> Optional[dict]:
    """The export's post-step: complete calibration records; with ``max_drop``, recover int8 artifacts."""
    fill_calibration_records(manifest)
    report = None
    if max_drop is not None:
        report = recover_int8(req, manifest, max_drop, eval_data or "digits", metric=metric,
                              min_samples=min_samples, progress=progress)
    manifest.save(req.folder)
    return report


def fill_calibration_records(manifest: Manifest) -> None:
    for a in manifest.artifacts:
        if a.precision in ("int8", "int16x8") and a.ok and not a.calibration:
            if a.format == "coreml":
                a.calibration = {"method": "none: weight-only int8 (activations stay fp16)", "samples": 0,
                                 "source": None}
            else:
                a.calibration = {"method": "unknown (not recorded by the exporter)",
                                 "samples": (manifest.calibration or {}).get("samples"),
                                 "source": (manifest.calibration or {}).get("source")}


def summarize(report: Optional[dict]) -> None:
    """Raise GateFailure when an int8 artifact still misses its budget."""
    if not report:
        return
    missed = [r for r in report["artifacts"] if not r["meets"]]
    if missed:
        parts = "; ".join(f"{r['artifact']}: best {report['metric']} drop {r['best_drop']:.2f} > {report['budget']:g} "
                          f"after {len(r['attempts'])} attempt(s)" for r in missed)
        raise GateFailure(f"{len(missed)} int8 artifact(s) miss the --max-drop budget ({parts})",
                          "See extra.recovery in manifest.json; calibrate on more representative --data, "
                          "or raise --max-drop")


# --------------------------------------------------------------------------- recovery
def _note(progress, msg: str) -> None:
    if progress is not None and hasattr(progress, "note"):
        progress.note(msg)


def _stage(progress, name: str) -> None:
    if progress is not None:
        progress("stage", {"name": name})


def recover_int8(req, manifest: Manifest, budget: float, eval_data: str, *, metric: str = "top1",
                 min_samples: Optional[int] = None, progress: Callable = None, loaded=None) -> dict:
    """Evaluate every int8 artifact; try recoveries for those over budget (see module docstring)."""
    from edgepipe.pipeline import models, trace as trace_mod
    from edgepipe.pipeline.calibration import calibrate
    from edgepipe.pipeline.datasets import DEFAULT_MIN_SAMPLES, load_labelled
    from edgepipe.pipeline.eval_stage import (METRICS, classification_metrics, keras_predictor, source_predictions)

    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'", f"Use one of: {', '.join(METRICS)}")
    folder = Path(req.folder)
    src = manifest.model
    arts = [a for a in manifest.artifacts if a.precision == "int8" and a.path]
    report = {"metric": metric, "budget": budget, "eval_data": eval_data, "artifacts": []}
    if not arts:
        return report
    _stage(progress, "accuracy check: loading eval data")
    ds = load_labelled(eval_data, src.input_shape, src.num_classes, model_labels=src.labels,
                       min_samples=min_samples or DEFAULT_MIN_SAMPLES)
    _stage(progress, "accuracy check: source model")
    lm = loaded or models.load(req.model)
    traced = trace_mod.trace(lm)
    src_out, _ = source_predictions(manifest, folder, ds, predictor=keras_predictor(lm))
    src_pred = src_out.argmax(1)
    smet = classification_metrics(src_out, ds.labels)
    source = {"top1": smet["top1"], "top5": smet["top5"]}
    data = ds.data(traced.preprocessing)
    ctx = {"calibration": None}
    report["dataset"] = {k: v for k, v in ds.describe().items() if k != "skipped_files"}
    report["source"] = source

    def calibration():
        if ctx["calibration"] is None:
            ctx["calibration"] = calibrate(req.reader, req.calib_samples, src.input_shape, traced.preprocessing)
        return ctx["calibration"]

    def measure(path: Path, fmt: str) -> dict:
        from edgepipe.pipeline.eval_artifacts import EvalContext, evaluate_file
        from edgepipe.pipeline.base.evaluation import EvalRow
        from edgepipe.pipeline.verify import checker_for
        from edgepipe.devices.runtimes.base import Runtime, _load_all

        _load_all()
        rt = Runtime.registry[checker_for(fmt)]()
        ctx = EvalContext(ds, data, int(src.num_classes), source, src_pred)
        row = evaluate_file(path, fmt, rt, EvalRow(artifact=path.name, format=fmt), ctx)
        if row.status != "ok":
            return {"drop": None, "error": row.reason, "runtime": rt.name}
        return {"drop": row.drop[metric], "top1": row.top1, "agreement": row.agreement, "runtime": rt.name}

    work = folder / ".recover"
    try:
        for a in arts:
            _stage(progress, f"accuracy check: {a.id}")
            rec = _recover_one(a, folder, work, traced, calibration, measure, budget, req, progress)
            report["artifacts"].append(rec)
            a.extra = {**(a.extra or {}), "recovery": {k: v for k, v in rec.items() if k != "artifact"}
                       | {"metric": metric, "budget": budget, "eval_data": report["dataset"]}}
            manifest.save(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if "scratch" in traced.shared:
            traced.shared["scratch"].cleanup()
    manifest.extra["recovery"] = {"metric": metric, "budget": budget, "dataset": report["dataset"],
                                  "source": source,
                                  "artifacts": {r["artifact"]: r["chosen"] for r in report["artifacts"]}}
    return report


def _recover_one(a: Artifact, folder: Path, work: Path, traced, calibration, measure, budget: float, req,
                 progress) -> dict:
    first = {"name": "as exported", "precision": a.precision,
             "method": (a.calibration or {}).get("method"), "size_bytes": a.size_bytes,
             **measure(folder / a.path, a.format)}
    first["meets"] = first["drop"] is not None and first["drop"] <= budget + 1e-9
    attempts = [first]
    rec = {"artifact": a.id, "attempts": attempts}
    if first["meets"]:
        _note(progress, f"{a.id}: drop {first['drop']:.2f} within the budget of {budget:g}")
        return _finish(rec, first, budget)
    what = "evaluation failed" if first["drop"] is None else f"drop {first['drop']:.2f} > {budget:g}"
    _note(progress, f"{a.id}: {what}; trying recoveries")
    if a.format not in ("tflite", "onnx"):
        rec["note"] = f"no recovery implemented for {a.format} int8"
        return _finish(rec, None, budget)
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[Path, object]] = {}

    def attempt(name: str, precision: str, export_fn, **info) -> dict:
        dest = work / f"{a.id}-{len(attempts)}{Path(a.path).suffix}"
        t0 = time.perf_counter()
        try:
            res = export_fn(dest)
        except Exception as e:
            row = {"name": name, "precision": precision, **info, "size_bytes": None, "drop": None, "meets": False,
                   "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"}
            attempts.append(row)
            return row
        secs = info.pop("convert_s", 0.0) + time.perf_counter() - t0
        row = {"name": name, "precision": precision, **info, "size_bytes": dest.stat().st_size,
               "convert_s": round(secs, 2), **measure(dest, a.format)}
        row["meets"] = row["drop"] is not None and row["drop"] <= budget + 1e-9
        attempts.append(row)
        files[name] = (dest, res)
        _note(progress, f"{a.id}: {name}: " + ("failed" if row["drop"] is None else f"drop {row['drop']:.2f}"))
        return row

    opts = req.options
    if opts is None:
        from edgepipe.export import ExportOptions

        opts = ExportOptions()
    if a.format == "onnx":
        from edgepipe.export.onnx import ONNXFormat

        used = (a.calibration or {}).get("method") or opts.calib_method or "minmax"
        for method in ONNX_METHODS:
            if method == used:
                continue
            o = dataclasses.replace(opts, calib_method=method)
            attempt(f"{method} calibration", "int8",
                    lambda d, o=o: ONNXFormat().export(traced, "int8", calibration(), d, o), method=method)
    else:
        from edgepipe.export.tflite import TFLiteFormat

        attempt("int16x8 activations", "int16x8",
                lambda d: TFLiteFormat().export(traced, "int16x8", calibration(), d, opts))
        if not any(r["meets"] for r in attempts[1:]):
            for k, nodes, model, secs in _denylisted_models(traced, calibration(), DENYLIST_STEPS):
                row = attempt(f"{k} sensitive layer(s) in float", "int8", lambda d, m=model: _write_mixed(d, m),
                              float_nodes=nodes, convert_s=secs)
                if row["meets"]:
                    break
    ok = [r for r in attempts[1:] if r["meets"]]
    if not ok:
        return _finish(rec, None, budget)
    best = min(ok, key=lambda r: (r["size_bytes"], r["drop"]))
    dest, res = files[best["name"]]
    _replace(a, folder, dest, res, best, traced)
    return _finish(rec, best, budget)


def _finish(rec: dict, chosen: Optional[dict], budget: float) -> dict:
    drops = [r["drop"] for r in rec["attempts"] if r.get("drop") is not None]
    rec["chosen"] = chosen["name"] if chosen else None
    rec["meets"] = chosen is not None
    rec["best_drop"] = min(drops) if drops else float("inf")
    return rec


def _write_mixed(dest: Path, model: bytes):
    from edgepipe.devices.runtimes.litert import tflite_io
    from edgepipe.export.base import ExportResult

    dest.write_bytes(model)
    ins, outs = tflite_io(dest)
    return ExportResult(dest, ins, outs, {"converter": "tf.lite.experimental.QuantizationDebugger",
                                          "io": "float32", "per_channel": True})


def _denylisted_models(traced, calibration, steps):
    """Yield (k, denylisted tensor names, model bytes): the k layers with the largest RMSE/scale in float."""
    import tensorflow as tf

    from edgepipe.export.tflite import _converter

    def debug_data():
        for x in calibration.batches(limit=DEBUG_SAMPLES):
            yield [x]

    def calib_data():
        for x in calibration.batches():
            yield [x]

    t0 = time.perf_counter()
    conv = _converter(traced)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = calib_data
    dbg = tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=debug_data)
    dbg.run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    buf.seek(0)
    scores: dict[str, float] = {}
    for row in csv.DictReader(buf):
        try:
            s = math.sqrt(float(row["mean_squared_error"])) / float(row["scale"])
        except (ValueError, ZeroDivisionError, KeyError):
            continue
        name = row["tensor_name"]
        if math.isfinite(s):
            scores[name] = max(s, scores.get(name, 0.0))
    ranked = sorted(scores, key=scores.get, reverse=True)
    for k in steps:
        if k > len(ranked):
            break
        nodes = ranked[:k]
        dbg.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        model = dbg.get_nondebug_quantized_model()
        yield (k, [{"tensor": n, "rmse_over_scale": round(scores[n], 4)} for n in nodes], model,
               time.perf_counter() - t0)
        t0 = time.perf_counter()


def _replace(a: Artifact, folder: Path, dest: Path, res, best: dict, traced) -> None:
    """Put the chosen attempt in place of the artifact and re-verify it."""
    from edgepipe.export import get_format

    from edgepipe.pipeline.base.util import atomic_path, path_size, sha256_file
    from edgepipe.pipeline.verify import verify_artifact

    fmt = get_format(a.format)
    name = traced.source.name
    if best["precision"] != a.precision:
        fname = fmt.filename(name, best["precision"])
    elif best.get("float_nodes"):
        fname = fmt.filename(name, "int8_mixed")
    else:
        fname = a.path
    old = folder / a.path
    with atomic_path(folder / fname) as tmp:
        shutil.copyfile(dest, tmp)
    if fname != a.path and old.exists():
        old.unlink()
    a.path = fname
    a.precision = best["precision"]
    a.sha256 = sha256_file(folder / fname)
    a.size_bytes = path_size(folder / fname)
    a.inputs, a.outputs = res.inputs, res.outputs
    a.options = {**res.options, "input_kind": res.input_kind, "recovered_by": best["name"]}
    if best.get("float_nodes"):
        a.options["float_nodes"] = [n["tensor"] for n in best["float_nodes"]]
    a.calibration = res.calibration or a.calibration
    ref = folder / "reference.npz"
    if ref.is_file():
        with np.load(ref) as z:
            raw, data, outputs = z["raw"], z["data"], z["outputs"]
        a.verification = verify_artifact(folder / fname, a.format, a.precision, raw, data, outputs,
                                         a.verification.data or "calibration")
        a.status = "ok" if a.verification.status != "failed" else "verify_failed"
        a.error = None if a.status == "ok" else a.verification.reason
