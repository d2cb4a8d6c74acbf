"""One export's work: load -> trace -> calibrate -> verification set -> per (format, precision):
convert, describe, verify -> manifest. One failing artifact never stops the others.

An ``ExportRun`` holds what every artifact (and the accuracy recovery after them) reuses: the
traced model, the calibration data, the verification set, one instance per format and the worker
process. Inputs and outputs of each artifact are described by the runtime that verifies its format
(unless the format describes them itself), and formats that ask for a placement prediction
(``Format.placement``) get it here, so export/ never imports devices/.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.devices.graph.edgetpu import analyze_tflite
from edgepipe.export import CALIBRATED, ExportFailed, ExportResult, Format, WorkerJob, create, format_class
from edgepipe.export.worker import Worker
from edgepipe.pipeline import models
from edgepipe.pipeline.base.manifest import Artifact, Manifest
from edgepipe.pipeline.base.records import Calibration, LoadedModel, Traced, VerificationSet
from edgepipe.pipeline.base.util import atomic_path, converter_versions, path_size, pkg_version, sha256_file, write_json_atomic
from edgepipe.pipeline.calibration import calibrate
from edgepipe.pipeline.export_plan import ExportRequest
from edgepipe.pipeline.fidelity.holdout import split_for_budget
from edgepipe.pipeline.fidelity.ptq import strengthen
from edgepipe.pipeline.trace import trace
from edgepipe.pipeline.verify import describe_io, verify_artifact

Progress = Callable[[str, dict], None]
REFERENCE_NAME = "reference.npz"
BENCH_INPUTS = 32
PREPROCESSING_NAME = "preprocessing.json"

# placement predictors a format can ask for (Format.placement) -> path -> report dict
PLACEMENT_PREDICTORS: dict[str, Callable[[Path], dict]] = {
    "edgetpu": lambda path: analyze_tflite(path).to_dict(),
}


def noop(event: str, info: dict) -> None:
    pass


def one_line(e: BaseException, width: int = 500) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:width] if msg else ''}"


def package_versions(packages: tuple[str, ...]) -> dict:
    v = converter_versions()
    return {k: v[k] if k in v else pkg_version(k) for k in packages}


def _seconds(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


@dataclass
class ExportRun:
    req: ExportRequest
    traced: Traced  # the model every artifact converts from (equalized, when that applied)
    calibration: Optional[Calibration]
    vset: VerificationSet
    formats: dict[str, Format]
    progress: Progress = noop
    timings: dict = field(default_factory=dict)
    worker: Optional[Worker] = None
    original: Optional[LoadedModel] = None  # the source model as loaded: what artifacts are verified against
    reference: Optional[Callable[[np.ndarray], np.ndarray]] = None  # the original's outputs for inputs
    holdout: Optional[Calibration] = None  # label-free budget: calibration images never calibrated on
    bench_inputs: dict = field(default_factory=dict)  # reference.npz: more real inputs for bench's output check

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def start(cls, req: ExportRequest, progress: Progress = noop,
              vset: Optional[VerificationSet] = None) -> "ExportRun":
        """Load and calibrate once, strengthen the model for int8 (pipeline/fidelity/ptq.py), trace it once;
        build the verification set (the ORIGINAL model's outputs) unless one is given."""
        progress("stage", {"name": "load", "detail": req.model.source})
        t0 = time.perf_counter()
        loaded = models.load(req.model)
        timings = {"load_s": _seconds(t0)}
        calibration, holdout = read_calibration(req, loaded, progress, timings)
        converted = strengthen_model(req, loaded, calibration, progress, timings)
        progress("stage", {"name": "trace"})
        traced = trace(converted)
        timings.update(traced.timings)
        reference = traced.reference if converted is loaded else original_reference(loaded)
        if vset is None:
            progress("stage", {"name": "reference outputs"})
            t0 = time.perf_counter()
            vset = verification_set(traced, calibration, req.verify_samples, req.model.seed, reference)
            timings["reference_s"] = _seconds(t0)
        run = cls(req, traced, calibration, vset, create(req.formats), progress, timings, original=loaded,
                  reference=reference, holdout=holdout)
        run.bench_inputs = bench_inputs(calibration, reference)
        return run

    def _convert_again(self, manifest: Manifest, i: int) -> None:
        """Convert one failed artifact again (from ``self.traced``); keep whichever is good, and the
        first one's file as it was when the second is no better."""
        a, folder = manifest.artifacts[i], self.req.folder
        first = folder / a.path if a.path else None
        kept = folder / f".{a.path}.before-fallback" if a.path else None
        if first is not None and kept is not None and first.exists():
            os.replace(first, kept)
        again = self.export_one(a.format, a.precision)
        if again.ok and again.status != "verify_failed":
            again.extra = {**again.extra, "ptq": "converted from the model as loaded: from the equalized model "
                                                 f"it failed ({a.error})"}
            manifest.artifacts[i] = again
            self.progress("done", {"id": again.id, "status": again.status})
            manifest.save(folder)
            if kept is not None and kept.exists():
                kept.unlink()
            return
        if again.path and again.path != a.path and (folder / again.path).exists():
            (folder / again.path).unlink()
        if first is not None and kept is not None and kept.exists():
            os.replace(kept, first)

    def format(self, name: str) -> Format:
        """This export's instance of a format (made on first use for one outside the plan)."""
        if name not in self.formats:
            self.formats[name] = create([name])[name]
        return self.formats[name]

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        for f in self.formats.values():
            f.close()
        self.traced.close()

    def new_manifest(self, cache_key: Optional[str]) -> Manifest:
        """Write reference.npz and preprocessing.json; the manifest they belong to."""
        folder, src, cal = self.req.folder, self.traced.source, self.calibration
        self.vset.save(folder / REFERENCE_NAME, self.bench_inputs)
        write_json_atomic(folder / PREPROCESSING_NAME,
                          {"model": src.name, "input_shape": src.input_shape, "input_layout": "NHWC",
                           "preprocessing": self.traced.preprocessing.to_dict(), "labels": src.labels})
        m = Manifest(model=src, verify=self.req.verify, timings=dict(self.timings), versions=converter_versions(),
                     cache_key=cache_key, calibration=cal.describe() if cal else None,
                     reference={"path": REFERENCE_NAME, "samples": self.vset.n, "data": self.vset.source})
        if self.holdout is not None and m.calibration is not None:
            m.calibration["held_out"] = self.holdout.n  # judged the label-free budget, never calibrated on
        if "inputs" in self.bench_inputs and m.reference is not None:
            m.reference["inputs"] = int(self.bench_inputs["inputs"].shape[0])
        if self.req.skipped:
            m.extra["skipped"] = self.req.skipped
        return m

    # -- the artifacts -----------------------------------------------------------------------
    def export_all(self, manifest: Manifest) -> None:
        plan = self.req.plan
        self.progress("artifacts", {"total": len(plan)})
        self.worker = self._start_worker()
        # formats converting in this process first; the worker's conversions are then mostly ready
        order = sorted(plan, key=lambda fp: self.formats[fp[0]].worker) if self.worker else plan
        for fmt, precision in order:
            art = self.export_one(fmt, precision)
            manifest.artifacts.append(art)
            self.progress("done", {"id": art.id, "status": art.status})
            manifest.save(self.req.folder)  # keep the manifest current: a crash later loses nothing
        self.unrewritten_fallback(manifest)
        manifest.artifacts.sort(key=lambda a: plan.index((a.format, a.precision)))

    def unrewritten_fallback(self, manifest: Manifest) -> None:
        """A format whose artifacts failed from the rewritten (equalized) model is converted again, all
        its precisions, from the model as loaded (a converter may choke on the rewritten graph: tf2onnx
        fuses ResNet50's folded residual biases into an invalid Conv). An artifact that then works
        replaces the failed one and says why in ``extra["ptq"]``."""
        if self.original is None or self.traced.loaded is self.original:
            return
        failed = {a.format for a in manifest.artifacts if not a.ok or a.status == "verify_failed"}
        if not failed:
            return
        rewritten, formats = self.traced, self.formats
        self.progress("stage", {"name": "converting again without equalization", "detail": ", ".join(failed)})
        try:
            self.traced = trace(self.original)
        except Exception:  # noqa: BLE001 - the failed artifacts stay as they were
            self.traced = rewritten
            return
        self.formats = {**formats, **create(list(failed))}
        try:
            for i, a in enumerate(manifest.artifacts):
                if a.format in failed and (not a.ok or a.status == "verify_failed"):
                    self._convert_again(manifest, i)
        finally:
            for name in failed:
                self.formats[name].close()
            self.formats = formats
            self.traced.close()
            self.traced = rewritten

    def _start_worker(self) -> Optional[Worker]:
        """Start the conversions formats can run in the worker process, when there is something else
        to overlap them with. None: everything converts here, in plan order."""
        req = self.req
        pairs = [pair for f, p in req.plan for pair in self.formats[f].worker_jobs(p, req.options_for(f))]
        others = [f for f, _ in req.plan if not self.formats[f].worker]
        if (not pairs or not others or not req.parallel or not self.traced.loaded.is_keras
                or (os.cpu_count() or 1) < 2):
            return None
        jobs: list[WorkerJob] = list(dict.fromkeys(job for _, job in pairs))
        worker = Worker(self.traced.saved_model_dir(), self.calibration, jobs, self.traced.scratch())
        for instance, job in pairs:
            instance.receive(job, worker.pending(job))
        return worker

    def export_one(self, fmt: str, precision: str) -> Artifact:
        f, folder = self.formats[fmt], self.req.folder
        fname = f.filename(self.traced.source.name, precision)
        art = Artifact(id=f"{fmt}-{precision}", format=fmt, precision=precision, path=fname,
                       metadata_path=PREPROCESSING_NAME, converter=package_versions(f.packages))
        self.progress("convert", {"id": art.id})
        t0 = time.perf_counter()
        calibration = self.calibration if precision in CALIBRATED else None
        try:
            with atomic_path(folder / fname) as tmp:
                res = self.convert(f, lambda dest: f.export(self.traced, precision, calibration, dest,
                                                            self.req.options_for(fmt)), tmp)
        except Exception as e:  # recorded per artifact; the others go on
            art.status, art.path, art.error = "failed", None, one_line(e)
            art.timings["convert_s"] = _seconds(t0)
            return art
        art.timings["convert_s"] = round(res.seconds, 3) if res.seconds is not None else _seconds(t0)
        self.record(art, res, folder / fname)
        self.verify(art)
        return art

    def convert(self, f: Format, run: Callable[[Path], ExportResult], dest: Path,
                keep_files: bool = True) -> ExportResult:
        """Run a conversion into ``dest``, keep its side files in the artifact folder, describe its
        I/O and its placement while the files it describes still exist."""
        try:
            res = run(dest)
        except ExportFailed as e:
            if keep_files:
                self._keep(e.files)
            raise
        describe(f, res, res.described_by or dest)
        kept = self._keep(res.files) if keep_files else []
        if kept:
            res.extra = {**res.extra, "files": kept}
        return res

    def _keep(self, files: list[Path]) -> list[str]:
        """Move side files into the artifact folder (each atomically); their names."""
        names = []
        for p in files:
            if p.is_file():
                with atomic_path(self.req.folder / p.name) as tmp:
                    shutil.copyfile(p, tmp)
                names.append(p.name)
        return names

    def record(self, art: Artifact, res: ExportResult, path: Path) -> None:
        """Fill an artifact's manifest entry from a finished conversion."""
        art.sha256 = sha256_file(path)
        art.size_bytes = path_size(path)
        art.inputs, art.outputs = res.inputs, res.outputs
        art.options = {**res.options, "input_kind": res.input_kind}
        art.calibration = res.calibration or self._calibration_record(art.precision)
        art.extra = res.extra or {}
        art.status, art.error = "ok", None

    def _calibration_record(self, precision: str) -> Optional[dict]:
        if precision not in CALIBRATED or self.calibration is None:
            return None
        return {**self.calibration.describe(), "method": "unknown (not recorded by the exporter)"}

    def verify(self, art: Artifact) -> None:
        """Verify an ok artifact on the verification set, with its precision's thresholds (untrained
        models: a structural bound for quantized artifacts)."""
        if not art.ok or art.path is None:
            return
        if not self.req.verify:
            art.verification.status, art.verification.reason = "skipped", "--no-verify"
            return
        self.progress("verify", {"id": art.id})
        art.verification = verify_artifact(self.req.folder / art.path, art.format, art.precision, self.vset,
                                           trained=self.traced.source.trained)
        art.timings["verify_s"] = art.verification.seconds
        if art.verification.status == "failed":
            art.status, art.error = "verify_failed", art.verification.reason


def describe(f: Format, res: ExportResult, path: Path) -> None:
    """Complete a conversion's result: I/O from the format's verifier runtime (unless the format gave
    it), and the placement prediction the format asks for, read from ``path``."""
    if not res.inputs and not res.outputs:
        try:
            res.inputs, res.outputs = describe_io(path, f.name)
        except LookupError as e:  # no runtime for it here: the manifest says so
            res.extra = {**res.extra, "io": f"not described: {e}"}
    if f.placement:
        prediction = PLACEMENT_PREDICTORS[f.placement](path)
        res.extra = {**res.extra, f.placement: f.placement_report(prediction, res)}


def verification_set(traced: Traced, calibration: Optional[Calibration], samples: int, seed: int,
                     reference: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> VerificationSet:
    """Real calibration images when given, else seeded noise; with the source model's outputs
    (``reference``: the original model's, when the traced one was rewritten)."""
    if calibration is not None and calibration.source != "random":
        raw, source = calibration.raw[:samples], calibration.source
    else:
        rng = np.random.default_rng(seed + 1)
        raw = rng.integers(0, 256, size=(samples, *traced.source.input_shape[1:])).astype(np.float32)
        source = "random"
    data = traced.preprocessing.apply(raw).astype(np.float32)
    return VerificationSet(raw=raw, data=data, reference=(reference or traced.reference)(data), source=source)


def read_calibration(req: ExportRequest, loaded: LoadedModel, progress: Progress,
                     timings: dict) -> tuple[Optional[Calibration], Optional[Calibration]]:
    """(the images to calibrate on, the held-out ones a label-free budget is judged on, or None)."""
    if req.reader is None:
        return None, None
    progress("stage", {"name": "calibration data", "detail": req.reader.name})
    t0 = time.perf_counter()
    n = req.calib_samples + (req.holdout_samples if req.label_free else 0)
    calibration = calibrate(req.reader, n, loaded.source.input_shape, loaded.preprocessing)
    timings["calibration_data_s"] = _seconds(t0)
    if not req.label_free:
        return calibration, None
    return split_for_budget(calibration, req.calib_samples, req.model.seed)


def strengthen_model(req: ExportRequest, loaded: LoadedModel, calibration: Optional[Calibration],
                     progress: Progress, timings: dict) -> LoadedModel:
    """The model to convert: equalized and/or bias-corrected when int8 artifacts are planned; what was
    applied goes to ``model.options["ptq"]`` in the manifest."""
    if not req.quantizes or not (req.equalize or req.bias_correction):
        return loaded
    progress("stage", {"name": "equalizing" if req.equalize else "bias correction"})
    t0 = time.perf_counter()
    levels = bias_levels(req) if req.bias_correction else None
    converted, record = strengthen(loaded, calibration.data if calibration is not None else None,
                                   equalize=req.equalize, bias_levels=levels)
    loaded.source.options = {**(loaded.source.options or {}), "ptq": record}
    timings["ptq_s"] = _seconds(t0)
    return converted


def bias_levels(req: ExportRequest) -> Optional[int]:
    """The int8 weight grid of the first calibrated artifact of the plan (formats differ: 127 or 63)."""
    for f, p in req.plan:
        if p in CALIBRATED:
            levels = format_class(f)().int8_weight_levels(req.options_for(f))
            if levels:
                return levels
    return None


def original_reference(lm: LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    """The source model's outputs as loaded (before any rewrite), one image at a time like the trace."""
    def reference(x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(x.shape[0]):
            y = lm.model(x[i:i + 1], training=False)
            if isinstance(y, dict):
                y = [y[k] for k in sorted(y)]
            outs.append(np.asarray(y[0] if isinstance(y, (list, tuple)) and len(y) == 1 else y))
        return np.concatenate(outs, axis=0)

    return reference


def bench_inputs(calibration: Optional[Calibration], reference: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Up to BENCH_INPUTS real calibration images and the source model's outputs on them: bench checks
    each accelerator's outputs on these (reference.npz keys inputs, inputs_raw, inputs_outputs)."""
    if calibration is None or calibration.source == "random" or calibration.n == 0:
        return {}
    data = calibration.data[:BENCH_INPUTS].astype(np.float32)
    return {"inputs": data, "inputs_raw": calibration.raw[:BENCH_INPUTS].astype(np.float32),
            "inputs_outputs": np.asarray(reference(data), np.float32)}
