"""One writer per format. Importing a module listed here registers its Format."""
from __future__ import annotations

import importlib

from edgepipe.export.base import CALIBRATED, PRECISIONS, ExportOptions, ExportResult, Format

# One line per format module.
FORMAT_MODULES = ["tflite", "onnx", "coreml", "edgetpu"]


def formats() -> dict[str, type[Format]]:
    for m in FORMAT_MODULES:
        importlib.import_module(f"edgepipe.export.{m}")
    return dict(Format.registry)


def get_format(name: str) -> Format:
    from edgepipe.pipeline.base.errors import UserError

    fm = formats()
    if name not in fm:
        raise UserError(f"unknown format '{name}'", f"Use one or more of: {', '.join(fm)}")
    return fm[name]()


__all__ = ["CALIBRATED", "PRECISIONS", "ExportOptions", "ExportResult", "Format", "formats", "get_format"]
