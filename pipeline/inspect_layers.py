"""`edgepipe inspect --layers`: where an int8 artifact departs from its float reference, layer by layer,
and why (the per-layer report, pipeline/fidelity/layers.py).

    reports = inspect_layers("edgepipe-out/mobilenet")                      # every int8 artifact
    reports = inspect_layers("edgepipe-out/mobilenet", artifact="onnx-int8")

For each int8 artifact (TFLite, ONNX, Core ML) of an export folder:

* **images**: the calibration images the manifest records, read again the same way (reader,
  location, seed, count; a label-free export's held-out images left out again); when they cannot
  be read (the folder moved), the real images reference.npz keeps;
* **reference**: the fp32 artifact of the same format in the manifest when there is one, else an
  fp32 conversion of the source model, loaded and traced here (this imports TensorFlow);
* **the source model**, when it can be loaded: for TFLite's isolated pass (TFLite's quantization
  debugger re-quantizes it one layer at a time) and readable layer names. When the export
  equalized the model (``model.options["ptq"]``), the same rewrite is applied again on the same
  calibration images, so the reference computes what the artifact was converted from.

Each report is written to ``<folder>/layers/<artifact id>/`` (layers.json, layers.html). Bad input
(no int8 artifact, an artifact compiled for the Edge TPU, neither a float reference nor a source
model) raises UserError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.export import get_format
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, artifact_problem, find_manifest, load_manifest
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.records import Calibration, Traced, VerificationSet
from edgepipe.pipeline.calibration import calibrate, make_reader
from edgepipe.pipeline.fidelity.holdout import split_for_budget
from edgepipe.pipeline.fidelity.layers import DEFAULT_ISOLATED_CAP, DEFAULT_ISOLATED_IMAGES, DEFAULT_SAMPLES, write_report
from edgepipe.pipeline.fidelity.layer_rows import LayerReport
from edgepipe.pipeline.fidelity.ptq import strengthen
from edgepipe.pipeline.fidelity.report import PROBES, layer_report
from edgepipe.pipeline.source_predictions import load_source_model
from edgepipe.pipeline.trace import trace

LAYERS_DIR = "layers"
Progress = Callable[[str], None]


@dataclass
class LayerInspection:
    """One artifact's report and where it was written."""

    artifact: str
    report: LayerReport
    folder: Path  # holds layers.json and layers.html
    notes: list[str]

    def to_dict(self) -> dict:
        """layers.json's keys (``artifact`` is the file name), and the artifact ``id``, files written, notes."""
        return {**self.report.to_dict(), "id": self.artifact,
                "written": {"json": str(self.folder / "layers.json"), "html": str(self.folder / "layers.html")},
                "notes": list(self.notes)}


def _manifest(path: str | os.PathLike) -> tuple[Manifest, Path, Optional[str]]:
    """(manifest, folder, the artifact id a file path names)."""
    p = Path(path)
    if p.is_file() and p.name != "manifest.json" or (p.is_dir() and p.suffix == ".mlpackage"):
        try:
            m, folder = load_manifest(find_manifest(p.parent))
        except UserError:
            raise UserError(f"{p.name} has no export manifest beside it: the per-layer report needs the export "
                            "folder (calibration images, source model, float reference)",
                            "Give the folder `edgepipe export` wrote, or the artifact inside it") from None
        ids = [a.id for a in m.artifacts if a.path and (folder / a.path).resolve() == p.resolve()]
        if not ids:
            raise UserError(f"{p} is not an artifact of the manifest in {folder}", "Give an artifact the export wrote")
        return m, folder, ids[0]
    m, folder = load_manifest(p)
    return m, folder, None


def export_folder(path: str | os.PathLike) -> Path:
    """The export folder of ``path`` (the folder itself, its manifest, or an artifact inside it)."""
    return _manifest(path)[1]


def _targets(m: Manifest, folder: Path, artifact: Optional[str]) -> list[Artifact]:
    if artifact is not None:
        a = m.artifact(artifact)
        if a.precision != "int8":
            raise UserError(f"{a.id} is {a.precision}: the per-layer report is for int8 artifacts",
                            f"Pick an int8 one: {', '.join(x.id for x in m.artifacts if x.precision == 'int8') or 'none'}")
        arts = [a]
    else:
        arts = [a for a in m.artifacts if a.precision == "int8" and get_format(a.format).float_format().name in PROBES]
        if not arts:
            raise UserError(f"{folder} has no int8 TFLite, ONNX or Core ML artifact to report",
                            "Export one with `edgepipe export ... --int8`")
    for a in arts:
        why = artifact_problem(a, folder)
        if why:
            raise UserError(f"artifact {a.id}: {why}", "Re-run `edgepipe export` to write it again")
    return arts


def _images(m: Manifest, folder: Path, notes: list[str]) -> Calibration:
    """The calibration images as the export read them, else the real images reference.npz keeps."""
    rec, pp = m.calibration or {}, Preprocessing.from_dict(m.model.preprocessing)
    n, held = int(rec.get("samples") or 0), int(rec.get("held_out") or 0)
    source = rec.get("source")
    if source and source != "random" and n:
        try:
            reader = make_reader(rec.get("location") if source == "folder" else None,
                                 None if source == "folder" else source, m.model.seed or 0)
            assert reader is not None
            cal = calibrate(reader, n + held, m.model.input_shape, pp)
            return split_for_budget(cal, n, m.model.seed or 0)[0] if held else cal
        except UserError as e:
            notes.append(f"calibration images not read again ({e.message}): using reference.npz")
    ref = m.reference or {}
    if not ref.get("path") or not (folder / ref["path"]).is_file():
        raise UserError(f"{folder} records no calibration images and has no reference.npz",
                        "Re-run `edgepipe export` with --data DIR or --calib digits")
    vs = VerificationSet.load(folder / ref["path"], ref.get("data") or "reference")
    with np.load(folder / ref["path"]) as z:
        if "inputs" in z.files and "inputs_raw" in z.files:
            return Calibration(raw=z["inputs_raw"], data=z["inputs"], source="reference.npz")
    return Calibration(raw=vs.raw, data=vs.data, source="reference.npz")


def _source(m: Manifest, calibration: Calibration, notes: list[str], progress: Progress) -> Optional[Traced]:
    """The source model, rewritten as the export rewrote it, traced; None when it cannot be loaded."""
    progress("loading the source model")
    try:
        lm = load_source_model(m)
    except Exception as e:  # noqa: BLE001 - a moved file or missing weights: fewer figures, said in a note
        notes.append(f"source model not loaded ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
        return None
    ptq = (m.model.options or {}).get("ptq") or {}
    eq, bias = (ptq.get("equalize") or {}).get("applied"), (ptq.get("bias_correction") or {})
    if eq or bias.get("applied"):
        lm, _ = strengthen(lm, calibration.data, equalize=bool(eq),
                           bias_levels=bias.get("levels") if bias.get("applied") else None)
        again = "the export's cross-layer equalization applied again to the source model"
        if calibration.source == "reference.npz":  # not the images the export equalized on
            again += (f", on the {calibration.n} images reference.npz keeps (not the export's calibration "
                      "images): per-layer figures may differ a little from the artifact's own")
        notes.append(again)
    return trace(lm)


def _reference(m: Manifest, folder: Path, a: Artifact) -> Optional[Path]:
    """The fp32 artifact of the artifact's float format in the same export, if there is one."""
    name = get_format(a.format).float_format().name
    for r in m.artifacts:
        if r.format == name and r.precision == "fp32" and r.path and not artifact_problem(r, folder):
            return folder / r.path
    return None


def inspect_layers(path: str | os.PathLike, *, artifact: Optional[str] = None, samples: int = DEFAULT_SAMPLES,
                   isolated_cap: int = DEFAULT_ISOLATED_CAP, isolated_images: int = DEFAULT_ISOLATED_IMAGES,
                   use_source: bool = True, progress: Optional[Progress] = None) -> list[LayerInspection]:
    """The per-layer report of each int8 artifact of an export folder (or of the artifact file given);
    see the module docstring."""
    if samples < 1 or isolated_cap < 0 or isolated_images < 1:
        raise UserError("bad --samples, --isolated-cap or --isolated-images",
                        "Give --samples >= 1, --isolated-cap >= 0, --isolated-images >= 1")
    say = progress or (lambda msg: None)
    m, folder, named = _manifest(path)
    arts = _targets(m, folder, artifact or named)
    notes: list[str] = []
    images = _images(m, folder, notes)
    traced = _source(m, images, notes, say) if use_source else None
    out = []
    try:
        for a in arts:
            ref = _reference(m, folder, a)
            if ref is None and traced is None:
                raise UserError(f"a per-layer report of {a.id} needs a float reference: the export has no fp32 "
                                f"{a.format} artifact and the source model could not be loaded",
                                "Export the fp32 variant too (--precisions fp32,int8), or make the source model "
                                "available where it was exported from")
            say(f"per-layer report of {a.id}")
            rep = layer_report(folder / str(a.path), a.format, images, traced=traced, calibration=images,
                               reference=ref, artifact_options=a.options, calibration_record=a.calibration,
                               samples=samples, isolated_cap=isolated_cap, isolated_images=isolated_images,
                               data=images.source, progress=say)
            dest = write_report(rep, folder / LAYERS_DIR / a.id)
            out.append(LayerInspection(a.id, rep, dest, list(notes)))
    finally:
        if traced is not None:
            traced.close()
    return out
