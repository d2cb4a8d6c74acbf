"""Entry point for the per-layer report of one int8 artifact (``edgepipe inspect --layers``).

    rep = layer_report(path, "tflite", images, traced=traced, calibration=calib)
    print(text_table(rep)); write_report(rep, folder)

``images``: the images the errors are measured on (raw pixels and preprocessed data; the
verification or calibration images). ``traced`` (the loaded source model) is needed to build
a float reference when none is given, and for TFLite's isolated pass; ``calibration`` for the
ONNX/TFLite isolated pass (they re-quantize). Without them the report still has every
accumulated figure and says why the isolated pass did not run.

Probes are loaded by name (PROBES), so importing this module pulls no runtime library in.
"""
from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Callable, Optional

from edgepipe.devices.graph.tflite_graph import read_tflite
from edgepipe.export.base import ExportOptions
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration, Traced
from edgepipe.pipeline.fidelity import sources
from edgepipe.pipeline.fidelity.fallback import STEPS, Recovery, float_fallback
from edgepipe.pipeline.fidelity.layers import (DEFAULT_ISOLATED_CAP, DEFAULT_ISOLATED_IMAGES, DEFAULT_SAMPLES,
                                               LayerProbe, LayerReport, build_report)
from edgepipe.pipeline.fidelity.stats import DropResult

# format -> (module, class); the Edge TPU artifact before compilation is a full-int8 TFLite model
PROBES = {"tflite": ("probe_tflite", "TFLiteProbe"), "edgetpu": ("probe_tflite", "TFLiteProbe"),
          "onnx": ("probe_onnx", "OnnxProbe"), "coreml": ("probe_coreml", "CoreMLProbe")}


def probe_class(fmt: str) -> type[LayerProbe]:
    if fmt not in PROBES:
        raise UserError(f"no per-layer report for {fmt} artifacts", f"Use one of: {', '.join(PROBES)}")
    mod, cls = PROBES[fmt]
    return getattr(importlib.import_module(f"edgepipe.pipeline.fidelity.{mod}"), cls)


def make_probe(fmt: str, artifact: Path, workdir: Path, *, traced: Optional[Traced] = None,
               calibration: Optional[Calibration] = None, reference: Optional[Path] = None,
               options: Optional[ExportOptions] = None, artifact_options: Optional[dict] = None,
               calibration_record: Optional[dict] = None) -> LayerProbe:
    """The probe for one artifact, with a float reference built from ``traced`` when none is given."""
    cls = probe_class(fmt)
    if fmt == "edgetpu" and read_tflite(artifact, keep_constants=False).is_edgetpu_compiled:
        raise UserError(f"{Path(artifact).name} is compiled for the Edge TPU and runs only there",
                        "Report the full-int8 TFLite artifact it was compiled from (the tflite-int8 artifact)")
    if reference is None:
        if traced is None:
            raise UserError(f"a per-layer report of {Path(artifact).name} needs a float reference",
                            "Export the fp32 variant too, or give the source model")
        reference = sources.float_reference(traced, fmt, workdir, options)
    known = sources.keras_layer_names(traced)
    if fmt in ("tflite", "edgetpu"):
        req = None
        if traced is not None and calibration is not None:
            req = sources.tflite_requantizer(traced, calibration)
        return cls(artifact, reference, requantize=req, known_layers=known)
    if fmt == "onnx":
        return cls(artifact, reference, calibration=calibration, known_layers=known,
                   quant=sources.onnx_quant(artifact_options, calibration_record))
    return cls(artifact, reference, known_layers=known)


def layer_report(artifact: str | Path, fmt: str, images: Calibration, *, traced: Optional[Traced] = None,
                 calibration: Optional[Calibration] = None, reference: Optional[Path] = None,
                 options: Optional[ExportOptions] = None, artifact_options: Optional[dict] = None,
                 calibration_record: Optional[dict] = None, samples: int = DEFAULT_SAMPLES,
                 isolated_cap: int = DEFAULT_ISOLATED_CAP, isolated_images: int = DEFAULT_ISOLATED_IMAGES,
                 data: str = "calibration", progress: Optional[Callable[[str], None]] = None) -> LayerReport:
    """Build the per-layer report of one int8 artifact (see layers.py for what it holds)."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise UserError(f"artifact {artifact} not found", "Give the path of an exported int8 artifact")
    with tempfile.TemporaryDirectory(prefix="edgepipe-layers-") as td:
        probe = make_probe(fmt, artifact, Path(td), traced=traced, calibration=calibration, reference=reference,
                           options=options, artifact_options=artifact_options,
                           calibration_record=calibration_record)
        try:
            rep = build_report(probe, images, samples=samples, isolated_cap=isolated_cap,
                               isolated_images=isolated_images, data=data, progress=progress)
        finally:
            probe.close()
    rep.artifact = artifact.name
    return rep


def fallback_recovery(artifact: str | Path, fmt: str, calibration: Calibration, measure: Callable[[Path], DropResult],
                      budget: float, workdir: Path, *, traced: Traced, options: Optional[ExportOptions] = None,
                      artifact_options: Optional[dict] = None, calibration_record: Optional[dict] = None,
                      steps: tuple = STEPS, isolated_images: int = DEFAULT_ISOLATED_IMAGES,
                      progress: Optional[Callable[[str], None]] = None) -> tuple[Recovery, LayerReport]:
    """Per-layer report of an int8 artifact on its calibration images, then float fallback of its worst
    layers until ``measure`` says the budget holds (fallback.py). Candidates are written under
    ``workdir``; ``fallback.adopt(recovery, dest)`` copies the chosen one out."""
    probe = make_probe(fmt, Path(artifact), workdir / "reference", traced=traced, calibration=calibration,
                       options=options, artifact_options=artifact_options, calibration_record=calibration_record)
    try:
        rep = build_report(probe, calibration, isolated_images=isolated_images, progress=progress)
        rec = float_fallback(probe, rep, measure, budget, workdir / "candidates", images=calibration, steps=steps)
    finally:
        probe.close()
    rep.artifact = Path(artifact).name
    return rec, rep
