"""Edge TPU: the TFLite full-integer int8 model, compiled by edgetpu_compiler when it is installed.

The int8 conversion is the TFLite format's own (``TFLiteFormat.export(..., "int8", ...)``);
this module adds only the Edge TPU step:

* ``edgetpu_compiler`` on PATH (x86-64 Linux): compile, keep the compiler's console log and
  operation log beside the artifact, and record what the compiler mapped.
* no compiler (macOS, ARM, CI): the artifact is the uncompiled int8 model, and the placement
  *prediction* from ``edgepipe.devices.edgetpu.analyze_tflite`` is recorded instead. The Edge TPU
  runtime refuses uncompiled artifacts with a reason, so nothing pretends it was compiled.

Either way ``ExportResult.extra["edgetpu"]`` holds ``compiled`` (bool), ``compiler_version``,
``counts`` ({"edgetpu", "cpu", "total"}), the per-op (prediction) or per-op-type (compiler) table,
and ``log_path`` (relative to the artifact's folder, or None). ``require_full_edgetpu`` in
``edgepipe.devices.edgetpu`` turns that dict into a gate.

Options read from ``ExportOptions.extra``: ``edgetpu_compiler`` (name or path, default
"edgetpu_compiler"), ``edgetpu_timeout`` (seconds, default 180), ``artifact_dir`` (where the logs
go; default: the folder the artifact is renamed into).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgepipe.export.base import ExportOptions, ExportResult, Format

SUFFIX = "_edgetpu.tflite"


def _final_folder(dest: Path, options: ExportOptions) -> Path:
    """Where the artifact lands once the caller renames ``dest`` into place."""
    if options.extra.get("artifact_dir"):
        return Path(options.extra["artifact_dir"])
    # the export stage hands us <folder>/.tmp-<name>-XXXX/<name> (pipeline.util.atomic_path)
    return dest.parent.parent if dest.parent.name.startswith(".tmp-") else dest.parent


class EdgeTPUFormat(Format):
    name = "edgetpu"
    suffix = SUFFIX
    precisions = ("int8",)
    default_precision = "int8"

    def export(self, traced, precision, calibration, dest: Path, options: ExportOptions) -> ExportResult:
        from edgepipe.devices.graph.edgetpu import analyze_tflite

        from . import edgetpu_compiler as et
        from edgepipe.pipeline.base.errors import ConversionError

        from edgepipe.export.tflite import TFLiteFormat

        if precision != "int8":
            raise ValueError(f"the Edge TPU format exports int8 only, not {precision}")
        dest = Path(dest)
        stem = dest.name[: -len(SUFFIX)] if dest.name.endswith(SUFFIX) else dest.stem
        work = Path(tempfile.mkdtemp(prefix=".tmp-edgetpu-", dir=dest.parent))
        try:
            int8_path = work / f"{stem}.tflite"
            base = TFLiteFormat().export(traced, "int8", calibration, int8_path, options)
            prediction = analyze_tflite(int8_path).to_dict()
            compiler = options.extra.get("edgetpu_compiler", "edgetpu_compiler")
            exe = et.find_compiler(compiler)
            used = {**base.options, "edgetpu_compiler": exe}
            files: list[str] = []
            if exe is None:
                os.replace(int8_path, dest)
                info = et.report_from_prediction(prediction, f"{compiler} not found on PATH")
                used["edgetpu_compiled"] = False
            else:
                timeout = float(options.extra.get("edgetpu_timeout", 180))
                res = et.compile_edgetpu(int8_path, work / "out", timeout=timeout, compiler=exe)
                folder = _final_folder(dest, options)
                folder.mkdir(parents=True, exist_ok=True)
                kept = {}
                for key, p in (("log_path", res.log_path), ("operation_log_path", res.operation_log_path)):
                    if p is not None and Path(p).is_file():
                        target = folder / Path(p).name
                        shutil.copyfile(p, target.with_name(f".{target.name}.part"))
                        os.replace(target.with_name(f".{target.name}.part"), target)
                        kept[key] = target.name
                        files.append(target.name)
                if not res.ok:
                    where = kept.get("log_path", "the compiler log")
                    raise ConversionError(f"edgetpu_compiler failed: {res.error}", f"See {where}")
                os.replace(res.artifact, dest)
                info = et.report_from_compile(res, prediction)
                info["log_path"] = kept.get("log_path")
                info["operation_log_path"] = kept.get("operation_log_path")
                used["edgetpu_compiled"] = True
                used["edgetpu_compiler_version"] = res.log.version
            extra = {"edgetpu": info}
            if files:
                extra["files"] = files
            # a compiled model needs the Edge TPU delegate to open, so its I/O comes from the int8 model
            return ExportResult(dest, base.inputs, base.outputs, used, base.calibration, extra=extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)
