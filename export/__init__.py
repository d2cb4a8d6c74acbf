"""One writer per format. Importing a module listed here registers its Format."""
from __future__ import annotations

import importlib
from typing import Iterable

from edgepipe.export.base import (CALIBRATED, PRECISIONS, ExportFailed, ExportResult, Format, FormatOptions,
                                  Recovery, WorkerJob, option)
from edgepipe.pipeline.base.errors import UserError

# One line per format module.
FORMAT_MODULES = [
    "edgepipe.export.tflite",
    "edgepipe.export.onnx",
    "edgepipe.export.coreml",
    "edgepipe.export.edgetpu",
]


def formats() -> dict[str, type[Format]]:
    """Every registered format, in FORMAT_MODULES order (then any registered elsewhere)."""
    for m in FORMAT_MODULES:
        importlib.import_module(m)
    order = {m: i for i, m in enumerate(FORMAT_MODULES)}  # not the order some caller happened to import them in
    return dict(sorted(Format.registry.items(), key=lambda kv: order.get(kv[1].__module__, len(order))))


def get_format(name: str) -> Format:
    return format_class(name)()


def format_class(name: str) -> type[Format]:
    fm = formats()
    if name not in fm:
        raise UserError(f"unknown format '{name}'", f"Use one or more of: {', '.join(fm)}")
    return fm[name]


def default_formats() -> list[str]:
    return [n for n, cls in formats().items() if cls.default]


def create(names: Iterable[str]) -> dict[str, Format]:
    """One instance per named format for one export; a format that builds on others gets their
    instances (so an Edge TPU export shares the TFLite int8 conversion)."""
    made: dict[str, Format] = {}

    def make(name: str) -> Format:
        if name not in made:
            cls = format_class(name)
            made[name] = cls(*(make(b) for b in cls.builds_on))
        return made[name]

    for n in names:
        make(n)
    return made


def option_keys() -> set[str]:
    """Every option key some registered format declares."""
    return {k for cls in formats().values() for k in cls.Options.keys()}


__all__ = ["CALIBRATED", "FORMAT_MODULES", "PRECISIONS", "ExportFailed", "ExportResult", "Format", "FormatOptions",
           "Recovery", "WorkerJob", "create", "default_formats", "format_class", "formats", "get_format", "option",
           "option_keys"]
