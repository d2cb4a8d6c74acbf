"""The format seam. A format is a small class registered by name:

    class MyFormat(Format):
        name = "myformat"
        suffix = ".ext"                 # or a directory suffix like ".mlpackage"
        precisions = ("fp32", "int8")
        def export(self, traced, precision, calibration, dest, options) -> ExportResult: ...

`dest` is a temporary path (the caller renames it into place once it is complete),
so a format never leaves a half-written artifact. TensorFlow and converters are
imported inside `export`, never at module import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from edgepipe.pipeline.base.manifest import TensorInfo

# Every precision edgepipe knows, in the order they are listed/exported.
PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8", "palettized")
# precisions that need calibration data
CALIBRATED = ("int8", "int16x8")


@dataclass
class ExportOptions:
    seed: int = 0
    onnx_opset: int = 17
    onnx_int8: str = "u8s8-reduce-range"  # see export/onnx.py
    int8_io: str = "int8"  # int8 | uint8 | float32 : TFLite full-integer I/O type
    palette_bits: int = 6
    calib_method: Optional[str] = None
    extra: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    path: Path
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # what was really used (recorded in the manifest)
    calibration: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    # "image" when the artifact takes raw 0-255 pixels (Core ML ImageType), else "tensor"
    input_kind: str = "tensor"


class Format:
    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ()
    default_precision: ClassVar[str] = "fp32"
    registry: ClassVar[dict[str, type["Format"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.name:
            return
        if cls.name in Format.registry:
            raise RuntimeError(f"format '{cls.name}' registered twice")
        bad = [p for p in cls.precisions if p not in PRECISIONS]
        if bad:
            raise RuntimeError(f"format '{cls.name}' names unknown precisions {bad}")
        Format.registry[cls.name] = cls

    def filename(self, model_name: str, precision: str) -> str:
        return f"{model_name}_{precision}{self.suffix}"

    def export(self, traced: Any, precision: str, calibration: Any, dest: Path,
               options: ExportOptions) -> ExportResult:
        raise NotImplementedError
