"""Edge TPU: the TFLite full-integer int8 model, compiled by edgetpu_compiler when it is installed.

The int8 conversion is the TFLite format's own (this format builds on the export's TFLite
instance, so both share one conversion); this module adds only the Edge TPU step:

* ``edgetpu_compiler`` on PATH (x86-64 Linux): compile, keep the compiler's console log and
  operation log beside the artifact, and record what the compiler mapped.
* no compiler (macOS, ARM, CI): the artifact is the uncompiled int8 model. The Edge TPU runtime
  refuses uncompiled artifacts with a reason, so nothing pretends it was compiled.

The pipeline attaches devices' placement *prediction* (``placement = "edgetpu"``), read from the
uncompiled model (``ExportResult.described_by``), and ``placement_report`` merges it with the
compile: ``artifact.extra["edgetpu"]`` holds ``compiled`` (bool), ``compiler_version``, ``counts``
({"edgetpu", "cpu", "total"}), the per-op (prediction) or per-op-type (compiler) table, and
``log_path`` (relative to the artifact's folder, or None).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from edgepipe.export import edgetpu_compiler as et
from edgepipe.export.base import ExportFailed, ExportResult, Format, FormatOptions, WorkerJob, option
from edgepipe.export.tflite import TFLiteFormat, TFLiteOptions
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration, Traced

SUFFIX = "_edgetpu.tflite"
COMPILED_MARK = b"edgetpu-custom-op"


@dataclass(frozen=True)
class EdgeTPUOptions(TFLiteOptions):
    compiler: str = option("edgetpu_compiler", flag="--edgetpu-compiler", key="edgetpu_compiler",
                           help="edgetpu_compiler name or path")
    timeout: float = option(180.0, flag="--edgetpu-timeout", key="edgetpu_timeout",
                            help="seconds the compiler may take")

    def validate(self) -> None:
        super().validate()
        if not self.timeout > 0:
            raise UserError(f"bad --edgetpu-timeout {self.timeout}", "Give a positive number of seconds")

    def tflite(self) -> TFLiteOptions:
        return TFLiteOptions(int8_io=self.int8_io)


class EdgeTPUFormat(Format):
    name = "edgetpu"
    suffix = SUFFIX
    precisions = ("int8",)
    default_precision = "int8"
    default = False
    Options = EdgeTPUOptions
    verifier = ("litert", "cpu")  # an uncompiled Edge TPU artifact is a full-int8 TFLite model
    runtime_format = "tflite"
    target = "edgetpu"
    placement = "edgetpu"
    builds_on = ("tflite",)
    worker = True

    def __init__(self, tflite: Optional[TFLiteFormat] = None):
        self.tflite = tflite or TFLiteFormat()

    def unverifiable(self, path: Path) -> Optional[str]:
        with open(path, "rb") as fh:
            if COMPILED_MARK in fh.read():
                return "compiled for the Edge TPU: it runs only with libedgetpu on an Edge TPU"
        return None

    def worker_jobs(self, precision: str, options: FormatOptions) -> list[tuple[Format, WorkerJob]]:
        assert isinstance(options, EdgeTPUOptions)
        return self.tflite.worker_jobs("int8", options.tflite())

    def export(self, traced: Traced, precision: str, calibration: Optional[Calibration], dest: Path,
               options: FormatOptions) -> ExportResult:
        assert isinstance(options, EdgeTPUOptions)
        if precision != "int8":
            raise ValueError(f"the Edge TPU format exports int8 only, not {precision}")
        stem = dest.name[: -len(SUFFIX)] if dest.name.endswith(SUFFIX) else dest.stem
        int8_path = dest.with_name(f"{stem}.tflite")  # beside dest: the pipeline reads placement from it
        base = self.tflite.export(traced, "int8", calibration, int8_path, options.tflite())
        exe = et.find_compiler(options.compiler)
        used = {**base.options, "edgetpu_compiler": exe}
        if exe is None:
            os.replace(int8_path, dest)
            used["edgetpu_compiled"] = False
            return ExportResult(dest, options=used, calibration=base.calibration, seconds=base.seconds,
                                extra={"edgetpu": {"why_not_compiled": f"{options.compiler} not found on PATH"}})
        return self._compile(int8_path, dest, exe, options, base, used)

    def _compile(self, int8_path: Path, dest: Path, exe: str, options: EdgeTPUOptions, base: ExportResult,
                 used: dict) -> ExportResult:
        work = Path(tempfile.mkdtemp(prefix=".tmp-edgetpu-", dir=dest.parent))
        try:
            res = et.compile_edgetpu(int8_path, work, timeout=options.timeout, compiler=exe)
            kept = {}
            for key, p in (("log_path", res.log_path), ("operation_log_path", res.operation_log_path)):
                if p is not None and Path(p).is_file():
                    os.replace(p, dest.parent / Path(p).name)
                    kept[key] = dest.parent / Path(p).name
            files = list(kept.values())
            if not res.ok:
                where = kept["log_path"].name if "log_path" in kept else "the compiler log"
                raise ExportFailed(f"edgetpu_compiler failed: {res.error}", f"See {where}", files=files)
            assert res.artifact is not None
            os.replace(res.artifact, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        compiled = res.summary()
        compiled.update({k: kept[k].name if k in kept else None for k in ("log_path", "operation_log_path")})
        used.update(edgetpu_compiled=True, edgetpu_compiler_version=res.log.version)
        seconds = (base.seconds or 0.0) + res.seconds
        # a compiled model needs the Edge TPU delegate to open: I/O and placement come from the int8 model
        return ExportResult(dest, options=used, calibration=base.calibration, files=files, described_by=int8_path,
                            seconds=seconds, extra={"edgetpu": {"compile": compiled}})

    def float_format(self) -> Format:
        return self.tflite

    def int8_weight_levels(self, options: FormatOptions) -> Optional[int]:
        return 127

    def options_from_record(self, used: Mapping[str, Any], calibration: Optional[Mapping[str, Any]]) -> FormatOptions:
        return self.tflite.options_from_record(used, calibration)

    def placement_report(self, prediction: dict, result: ExportResult) -> dict:
        got = result.extra.get("edgetpu") or {}
        if "compile" in got:
            return et.report_from_compile(got["compile"], prediction)
        return et.report_from_prediction(prediction, got.get("why_not_compiled") or "not compiled")
