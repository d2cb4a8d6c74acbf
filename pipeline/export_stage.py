"""The export, as a library call: validate -> (cache) -> load -> trace -> calibrate -> per (format,
precision): convert, describe, verify -> manifest -> (accuracy recovery) -> gates.

    from edgepipe.pipeline.export_stage import export

    outcome = export("mobilenet", weights="none", int8=True, calib="digits", out="edgepipe-out")
    for a in outcome.manifest.artifacts:
        print(a.id, a.status, a.verification.status)
    outcome.raise_for_status()   # StageFailure / GateFailure, after you printed the results

Everything that can be checked without TensorFlow is checked first (``export_plan.prepare``), in
milliseconds. The CLI (``edgepipe export``) maps its flags to this call and prints the outcome.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from edgepipe.devices.graph.edgetpu import require_full_edgetpu as edgetpu_gate
from edgepipe.pipeline import cache as export_cache
from edgepipe.pipeline.base.errors import GateFailure
from edgepipe.pipeline.base.manifest import Manifest
from edgepipe.pipeline.base.records import ExportOutcome, RecoveryReport
from edgepipe.pipeline.export_log import LOG_NAME, ExportLog
from edgepipe.pipeline.export_plan import (DEFAULT_CALIB_SAMPLES, DEFAULT_VERIFY_SAMPLES, EDGETPU, ExportRequest,
                                           Names, build_plan, check_output, prepare, validate)
from edgepipe.pipeline.export_run import PREPROCESSING_NAME, ExportRun, Progress, noop
from edgepipe.pipeline.models import ModelRequest
from edgepipe.pipeline.recover import recover_int8

__all__ = ["ExportOutcome", "ExportRequest", "Progress", "build_plan", "check_output", "export", "prepare", "run",
           "validate"]


def export(model: Union[str, ModelRequest], *, formats: Names = None, precisions: Names = None, int8: bool = False,
           out: Union[str, os.PathLike] = "edgepipe-out", data: Optional[str] = None, calib: Optional[str] = None,
           calib_samples: int = DEFAULT_CALIB_SAMPLES, options: Optional[Mapping[str, Any]] = None,
           weights: str = "imagenet", input_size: Optional[Union[str, int]] = None, alpha: Optional[float] = None,
           classes: Optional[int] = None, preprocess: Optional[str] = None, mean: Optional[list[float]] = None,
           std: Optional[list[float]] = None, scale: Optional[float] = None, labels: Optional[str] = None,
           trust_model: bool = False, seed: int = 0, verify: bool = True,
           verify_samples: int = DEFAULT_VERIFY_SAMPLES, cache: bool = True, parallel: bool = True,
           targets: Names = None, max_drop: Optional[float] = None, eval_data: Optional[str] = None,
           require_full_edgetpu: bool = False, capture_output: bool = True, equalize: bool = True,
           bias_correction: bool = False, progress: Optional[Progress] = None) -> ExportOutcome:
    """Convert a model to verified artifacts in ``OUT/<model>/``.

    ``model``: a built-in name (with ``weights``, ``input_size``, ``alpha``, ``classes``) or a
    .keras/.h5 file or SavedModel folder (with ``preprocess``, ``mean``, ``std``, ``scale``);
    ``labels`` is a file of class names. ``formats``/``precisions`` (lists or comma strings; default:
    the default formats at their default precision), ``int8`` adds every format's int8 variant, and
    with ``targets`` including a format's target (``edgetpu``) that format. Calibration from
    ``data`` (a folder) or ``calib`` ("digits" | "random"). ``options`` holds format options by key
    (``int8_io``, ``onnx_int8``, ``calib_method``, ``onnx_opset``, ``palette_bits``,
    ``edgetpu_compiler``, ``edgetpu_timeout``). ``max_drop`` (top-1 points on ``eval_data``; without
    labelled images, points of disagreement with the source model on calibration images held out of
    the calibration) runs the int8 accuracy recovery; ``require_full_edgetpu`` gates Edge TPU
    artifacts on full mapping. ``equalize`` (cross-layer equalization, default on) and
    ``bias_correction`` (default off) rewrite the Keras weights before conversion when int8
    artifacts are planned (pipeline/fidelity/ptq.py); artifacts are verified against the original.
    ``capture_output`` sends converter output to ``OUT/<model>/export.log``. ``progress(event,
    info)`` is told about stages ("stage", "cache", "artifacts", "convert", "verify", "done", "note").

    Bad input raises UserError before any conversion. Failed artifacts and missed gates do not raise
    here: the outcome records them, and ``outcome.raise_for_status()`` raises once you reported it.
    """
    req = prepare(model, formats=formats, precisions=precisions, int8=int8, out=out, data=data, calib=calib,
                  calib_samples=calib_samples, options=options, verify=verify, verify_samples=verify_samples,
                  cache=cache, parallel=parallel, targets=targets, max_drop=max_drop, eval_data=eval_data,
                  require_full_edgetpu=require_full_edgetpu, seed=seed, capture_output=capture_output,
                  weights=weights, input_size=input_size, alpha=alpha, classes=classes, preprocess=preprocess,
                  mean=mean, std=std, scale=scale, labels_file=labels, trust=trust_model, equalize=equalize,
                  bias_correction=bias_correction)
    return run(req, progress or noop)


def run(req: ExportRequest, progress: Progress = noop) -> ExportOutcome:
    """Do a prepared export (see ``export``)."""
    folder = req.folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for s in req.skipped:
        progress("note", {"message": f"skipped {s['format']} {s['precision']}: {s['reason']}"})
    t_start = time.perf_counter()
    key = export_cache.cache_key(req.cache_parts()) if req.use_cache else None
    hit = export_cache.lookup(key) if key else None
    recovery = None
    with ExportLog(folder / LOG_NAME, f"edgepipe export of {req.model.source} to {folder}",
                   enabled=req.capture_output) as log:
        if key and hit:
            progress("cache", {"key": key})
            manifest = _restore(hit, key, folder, t_start)
            log.served_from_cache(key, hit / LOG_NAME)
        else:
            manifest, recovery = _fresh(req, key, progress, t_start)
    outcome = ExportOutcome(manifest, folder, list(req.skipped), recovery, cache_hit=hit is not None,
                            gate_failures=_gates(req, manifest))
    if key and not hit and not outcome.failed:
        export_cache.store(key, folder, artifact_files(manifest) + [LOG_NAME])
    return outcome


def _fresh(req: ExportRequest, key: Optional[str], progress: Progress,
           t_start: float) -> tuple[Manifest, Optional[RecoveryReport]]:
    er = ExportRun.start(req, progress)
    recovery = None
    try:
        manifest = er.new_manifest(key)
        er.export_all(manifest)
        manifest.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        manifest.save(req.folder)
        if req.max_drop is not None:
            recovery = recover_int8(er, manifest, req.max_drop, req.eval_data)
            manifest.save(req.folder)
    finally:
        er.close()
    return manifest, recovery


def _restore(hit: Path, key: str, folder: Path, t_start: float) -> Manifest:
    m = Manifest.from_dict(json.loads((hit / "manifest.json").read_text()))
    export_cache.restore(hit, folder, artifact_files(m))
    m.extra["cache"] = {"hit": True, "key": key, "seconds": round(time.perf_counter() - t_start, 3)}
    m.save(folder)
    return m


def artifact_files(m: Manifest) -> list[str]:
    """Every file of an export folder the manifest names (artifacts and side files)."""
    files = [a.path for a in m.artifacts if a.path] + [PREPROCESSING_NAME]
    if m.reference and m.reference.get("path"):
        files.append(m.reference["path"])
    for a in m.artifacts:
        files.extend((a.extra or {}).get("files", []))
    return list(dict.fromkeys(files))


def _gates(req: ExportRequest, m: Manifest) -> list[GateFailure]:
    """--require-full-edgetpu: every artifact carrying an Edge TPU placement must map fully."""
    failures = []
    if req.require_full_edgetpu:
        for a in m.artifacts:
            if a.ok and EDGETPU in (a.extra or {}):
                try:
                    edgetpu_gate(a.extra[EDGETPU])
                except GateFailure as e:
                    failures.append(e)
    return failures
