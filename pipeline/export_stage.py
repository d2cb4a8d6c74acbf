"""The export stage: validate -> (cache) -> load -> trace -> calibrate -> per (format, precision):
convert, verify -> manifest.

`plan_export()` validates everything that can be validated without TensorFlow, in
milliseconds. `run_export()` does the work. One failing artifact never stops the others.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.pipeline.base.errors import StageFailure, UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel
from edgepipe.pipeline.models import ModelRequest
from edgepipe.pipeline.base.util import (atomic_path, converter_versions, path_size, sha256_file, write_json_atomic)

DEFAULT_CALIB_SAMPLES = 100
DEFAULT_VERIFY_SAMPLES = 8


@dataclass
class ExportRequest:
    model: ModelRequest
    plan: list[tuple[str, str]]  # (format, precision)
    out: Path
    reader: object = None  # calibration Reader or None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    verify: bool = True
    verify_samples: int = DEFAULT_VERIFY_SAMPLES
    options: object = None  # ExportOptions
    use_cache: bool = True
    skipped: list[dict] = field(default_factory=list)
    parallel: bool = True  # TFLite conversions in a worker process

    @property
    def folder(self) -> Path:
        return self.out / self.model.name


def build_plan(formats: Optional[list[str]], precisions: Optional[list[str]], int8: bool) -> tuple[list[tuple[str, str]], list[dict]]:
    """(format, precision) pairs to export, and the requested pairs a format cannot do."""
    from edgepipe.export import PRECISIONS, formats as all_formats

    fm = all_formats()
    fnames = formats or ["tflite", "onnx", "coreml"]
    for f in fnames:
        if f not in fm:
            raise UserError(f"unknown format '{f}'", f"Use one or more of: {', '.join(fm)}")
    for p in precisions or []:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision '{p}'", f"Use one or more of: {', '.join(PRECISIONS)}")
    plan, skipped = [], []
    for f in fnames:
        cls = fm[f]
        wanted = list(precisions or [])
        if int8:
            wanted.append("int8")
        if not wanted:
            wanted = [cls.default_precision]
        for p in dict.fromkeys(wanted):
            if p in cls.precisions:
                plan.append((f, p))
            else:
                skipped.append({"format": f, "precision": p,
                                "reason": f"{f} has no {p} variant (it offers {', '.join(cls.precisions)})"})
    if not plan:
        raise UserError("nothing to export: " + "; ".join(s["reason"] for s in skipped),
                        "Choose precisions the selected formats support")
    return plan, skipped


def check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".edgepipe-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}", "Choose a writable --out folder") from e


def validate(req: ExportRequest) -> None:
    from edgepipe.export import CALIBRATED

    needs_calib = [f"{f} {p}" for f, p in req.plan if p in CALIBRATED]
    if needs_calib and req.reader is None:
        raise UserError(f"{', '.join(needs_calib)} needs calibration data",
                        "Give --data DIR (images like the ones the model will see), or --calib random to calibrate on noise")
    if req.calib_samples < 1:
        raise UserError(f"bad --calib-samples {req.calib_samples}", "Give a positive number")
    check_output(req.out)


Progress = Callable[[str, dict], None]


def _noop(event: str, info: dict) -> None:
    pass


def _cache_parts(req: ExportRequest) -> dict:
    return {"model": req.model.identity(), "plan": req.plan, "verify": req.verify,
            "verify_samples": req.verify_samples, "calib_samples": req.calib_samples,
            "calibration": req.reader.identity() if req.reader is not None else None,
            "options": vars(req.options)}


def run_export(req: ExportRequest, progress: Progress = _noop) -> Manifest:
    from edgepipe.pipeline import cache

    validate(req)
    folder = req.folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    t_start = time.perf_counter()

    key = cache.cache_key(_cache_parts(req)) if req.use_cache else None
    if key and (hit := cache.lookup(key)):
        progress("cache", {"key": key})
        m = Manifest.from_dict(json.loads((hit / "manifest.json").read_text()))
        files = [a.path for a in m.artifacts if a.path] + _side_files(m)
        cache.restore(hit, folder, files)
        m.extra["cache"] = {"hit": True, "key": key, "seconds": round(time.perf_counter() - t_start, 3)}
        m.save(folder)
        return m

    from edgepipe.pipeline import models, trace as trace_mod
    from edgepipe.pipeline.calibration import calibrate

    progress("stage", {"name": "load", "detail": req.model.source})
    t0 = time.perf_counter()
    loaded = models.load(req.model)
    t_load = time.perf_counter() - t0
    progress("stage", {"name": "trace"})
    traced = trace_mod.trace(loaded)
    src: SourceModel = traced.source
    timings = {"load_s": round(t_load, 3), **traced.timings}

    calibration = None
    if req.reader is not None:
        progress("stage", {"name": "calibration data", "detail": req.reader.name})
        t0 = time.perf_counter()
        calibration = calibrate(req.reader, req.calib_samples, src.input_shape, traced.preprocessing)
        timings["calibration_data_s"] = round(time.perf_counter() - t0, 3)

    # The verification set: real calibration images when given, else seeded noise.
    t0 = time.perf_counter()
    if calibration is not None and calibration.source != "random":
        vraw = calibration.raw[: req.verify_samples]
        vsource = calibration.source
    else:
        rng = np.random.default_rng(req.model.seed + 1)
        vraw = rng.integers(0, 256, size=(req.verify_samples, *src.input_shape[1:])).astype(np.float32)
        vsource = "random"
    vdata = traced.preprocessing.apply(vraw).astype(np.float32)
    progress("stage", {"name": "reference outputs"})
    reference = traced.reference(vdata)
    ref_path = "reference.npz"
    with atomic_path(folder / ref_path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, raw=vraw.astype(np.float32), data=vdata, outputs=reference)
    timings["reference_s"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(folder / "preprocessing.json",
                      {"model": src.name, "input_shape": src.input_shape, "input_layout": "NHWC",
                       "preprocessing": traced.preprocessing.to_dict(), "labels": src.labels})

    manifest = Manifest(model=src, verify=req.verify, timings=timings, versions=converter_versions(),
                        cache_key=key, calibration=calibration.describe() if calibration else None,
                        reference={"path": ref_path, "samples": int(vraw.shape[0]), "data": vsource})
    if req.skipped:
        manifest.extra["skipped"] = req.skipped

    progress("artifacts", {"total": len(req.plan)})
    try:
        _export_all(req, traced, calibration, folder, manifest, vraw, vdata, reference, vsource, progress)
    finally:
        if "scratch" in traced.shared:
            traced.shared["scratch"].cleanup()
    manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    manifest.save(folder)
    failed = [a for a in manifest.artifacts if not a.ok]
    if key and not failed:
        cache.store(key, folder, [a.path for a in manifest.artifacts if a.path] + _side_files(manifest))
    return manifest


def _start_background(req, traced, calibration):
    """Run the TFLite conversions in a worker process while the other formats convert here.

    Returns the worker, or None when there is nothing to overlap (then everything runs in
    this process, in plan order)."""
    from edgepipe.export.tflite import TFLiteFormat
    from edgepipe.export.tflite_worker import Pending, Worker

    tfl = [p for f, p in req.plan if f in ("tflite", "edgetpu")]
    others = [f for f, _ in req.plan if f not in ("tflite", "edgetpu")]
    if not tfl or not others or not req.parallel or not traced.loaded.is_keras or (os.cpu_count() or 1) < 2:
        return None
    fmt = TFLiteFormat()
    precisions = list(dict.fromkeys("int8" if f == "edgetpu" else p for f, p in req.plan if f in ("tflite", "edgetpu")))
    worker = Worker(traced.saved_model_dir(traced.scratch()), calibration, precisions, req.options, traced.scratch())
    for p in precisions:
        traced.shared.setdefault(fmt.prefetch(traced, p, calibration, req.options), Pending(worker, p))
    return worker


def _export_all(req, traced, calibration, folder, manifest, vraw, vdata, reference, vsource, progress) -> None:
    worker = _start_background(req, traced, calibration)
    # formats converting in this process first; the worker's are then mostly ready
    order = sorted(req.plan, key=lambda fp: fp[0] in ("tflite", "edgetpu")) if worker else req.plan
    try:
        _export_each(order, req, traced, calibration, folder, manifest, vraw, vdata, reference, vsource, progress)
    finally:
        if worker is not None:
            worker.close()
    manifest.artifacts.sort(key=lambda a: req.plan.index((a.format, a.precision)))


def _export_each(order, req, traced, calibration, folder, manifest, vraw, vdata, reference, vsource, progress):
    from edgepipe.export import get_format

    for fmt, precision in order:
        art = _export_one(traced, fmt, precision, calibration, req, folder, get_format(fmt), progress)
        if art.ok and req.verify:
            progress("verify", {"id": art.id})
            from edgepipe.pipeline.verify import verify_artifact

            art.verification = verify_artifact(folder / art.path, fmt, precision, vraw, vdata, reference, vsource,
                                             trained=traced.source.trained)
            art.timings["verify_s"] = art.verification.seconds
            if art.verification.status == "failed":
                art.status = "verify_failed"
                art.error = art.verification.reason
        elif art.ok:
            art.verification.status = "skipped"
            art.verification.reason = "--no-verify"
        manifest.artifacts.append(art)
        progress("done", {"id": art.id, "status": art.status})
        manifest.save(folder)  # keep the manifest current: a crash later loses nothing


def _side_files(m: Manifest) -> list[str]:
    files = ["preprocessing.json"]
    if m.reference and m.reference.get("path"):
        files.append(m.reference["path"])
    for a in m.artifacts:
        for extra in (a.extra or {}).get("files", []):
            files.append(extra)
    return list(dict.fromkeys(files))


def _export_one(traced, fmt, precision, calibration, req, folder: Path, f, progress) -> Artifact:
    from edgepipe.export import CALIBRATED

    aid = f"{fmt}-{precision}"
    fname = f.filename(traced.source.name, precision)
    art = Artifact(id=aid, format=fmt, precision=precision, path=fname,
                   metadata_path="preprocessing.json", converter=_conv_versions(fmt))
    progress("convert", {"id": aid})
    t0 = time.perf_counter()
    try:
        with atomic_path(folder / fname) as tmp:
            res = f.export(traced, precision, calibration if precision in CALIBRATED else None, tmp, req.options)
    except Exception as e:
        art.status, art.path = "failed", None
        msg = str(e).strip().splitlines()
        art.error = f"{type(e).__name__}: {msg[0][:500] if msg else ''}"
        art.timings["convert_s"] = round(time.perf_counter() - t0, 3)
        return art
    art.timings["convert_s"] = round(time.perf_counter() - t0, 3)
    p = folder / fname
    art.sha256 = sha256_file(p)
    art.size_bytes = path_size(p)
    art.inputs, art.outputs = res.inputs, res.outputs
    art.options = {**res.options, "input_kind": res.input_kind}
    art.calibration = res.calibration
    art.extra = res.extra or {}
    art.status = "ok"
    return art


def _conv_versions(fmt: str) -> dict:
    v = converter_versions()
    keys = {"tflite": ["tensorflow", "keras"], "onnx": ["tensorflow", "tf2onnx", "onnx", "onnxruntime"],
            "coreml": ["tensorflow", "coremltools"]}.get(fmt, ["tensorflow"])
    return {k: v.get(k) for k in keys}


def summarize(m: Manifest) -> None:
    failed = [a for a in m.artifacts if not a.ok]
    if failed:
        lines = "; ".join(f"{a.id}: {a.error}" for a in failed)
        raise StageFailure(f"{len(failed)} of {len(m.artifacts)} artifacts failed ({lines})",
                           "The others were written; see manifest.json")
