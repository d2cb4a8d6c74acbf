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
from typing import Any, Callable, Mapping, Optional

from edgepipe.export import FormatOptions
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration, Traced
from edgepipe.pipeline.fidelity import sources
from edgepipe.pipeline.fidelity.fallback import STEPS, Recovery, float_fallback
from edgepipe.pipeline.fidelity.layers import (DEFAULT_ISOLATED_CAP, DEFAULT_ISOLATED_IMAGES, DEFAULT_SAMPLES,
                                               LayerProbe, LayerReport, build_report)
from edgepipe.pipeline.fidelity.sources import FormatLike
from edgepipe.pipeline.fidelity.stats import DropResult

# float format -> (module, class); an Edge TPU artifact's float format is TFLite (export/edgetpu.py)
PROBES = {"tflite": ("probe_tflite", "TFLiteProbe"), "onnx": ("probe_onnx", "OnnxProbe"),
          "coreml": ("probe_coreml", "CoreMLProbe")}


def probe_class(fmt: FormatLike) -> type[LayerProbe]:
    try:
        name = sources.format_of(fmt).float_format().name
    except UserError:  # not a format edgepipe exports
        name = str(fmt)
    if name not in PROBES:
        shown = fmt if isinstance(fmt, str) else fmt.name
        raise UserError(f"no per-layer report for {shown} artifacts",
                        f"Use an int8 artifact of one of: {', '.join(sorted(set(PROBES) | {'edgetpu'}))}")
    mod, cls = PROBES[name]
    return getattr(importlib.import_module(f"edgepipe.pipeline.fidelity.{mod}"), cls)


def make_probe(fmt: FormatLike, artifact: Path, workdir: Path, *, traced: Optional[Traced] = None,
               calibration: Optional[Calibration] = None, reference: Optional[Path] = None,
               options: Optional[FormatOptions] = None, artifact_options: Optional[Mapping[str, Any]] = None,
               calibration_record: Optional[Mapping[str, Any]] = None) -> LayerProbe:
    """The probe for one artifact, with a float reference built from ``traced`` when none is given.
    ``fmt``: a format name or an export's own Format instance (which reuses its conversions);
    ``options``: the artifact's export options, else rebuilt from ``artifact_options`` (the manifest's
    ``artifact.options``) and ``calibration_record`` (``artifact.calibration``)."""
    cls = probe_class(fmt)
    why = sources.format_of(fmt).unverifiable(Path(artifact))
    if why:
        raise UserError(f"{Path(artifact).name} is {why}",
                        "Report the full-int8 TFLite artifact it was compiled from (the tflite-int8 artifact)")
    if options is None:
        options = sources.recorded_options(fmt, artifact_options, calibration_record)
    if reference is None:
        if traced is None:
            raise UserError(f"a per-layer report of {Path(artifact).name} needs a float reference",
                            "Export the fp32 variant too, or give the source model")
        reference = sources.float_reference(traced, fmt, workdir, options)
    return cls.open(Path(artifact), Path(reference), traced=traced, calibration=calibration, options=options,
                    known_layers=sources.keras_layer_names(traced))


def layer_report(artifact: str | Path, fmt: FormatLike, images: Calibration, *, traced: Optional[Traced] = None,
                 calibration: Optional[Calibration] = None, reference: Optional[Path] = None,
                 options: Optional[FormatOptions] = None, artifact_options: Optional[Mapping[str, Any]] = None,
                 calibration_record: Optional[Mapping[str, Any]] = None, samples: int = DEFAULT_SAMPLES,
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


def fallback_recovery(artifact: str | Path, fmt: FormatLike, calibration: Calibration,
                      measure: Callable[[Path], DropResult], budget: float, workdir: Path, *, traced: Traced,
                      options: Optional[FormatOptions] = None, artifact_options: Optional[Mapping[str, Any]] = None,
                      calibration_record: Optional[Mapping[str, Any]] = None,
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
