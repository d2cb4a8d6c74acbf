"""Where the fidelity tools meet export/: float references of a traced model, the re-quantizers the
probes use (TFLite's quantization debugger, onnxruntime's ``quantize_static`` arguments), and the
options an artifact was exported with, rebuilt from its manifest entry. Kept in one module so the
calls into export/ live in one place.

Everything here takes a ``Traced`` model (pipeline/base/records.py), i.e. the caller has loaded
and traced the source model; nothing imports TensorFlow until a function that needs it runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from edgepipe.export import Format, FormatOptions, get_format
from edgepipe.export.onnx import ONNXFormat
from edgepipe.export.tflite import Requantize, TFLiteFormat
from edgepipe.pipeline.base.records import Calibration, Traced

FormatLike = Union[str, Format]


def format_of(fmt: FormatLike) -> Format:
    """An export Format instance (UserError for an unknown name)."""
    return fmt if isinstance(fmt, Format) else get_format(fmt)


def keras_layer_names(traced: Optional[Traced]) -> Optional[set[str]]:
    """Every layer name of the source Keras model (nested models included), for name mapping."""
    if traced is None or not traced.loaded.is_keras:
        return None
    names: set[str] = set()
    stack = [traced.model]
    while stack:
        m = stack.pop()
        for layer in getattr(m, "layers", []):
            names.add(layer.name)
            if getattr(layer, "layers", None):
                stack.append(layer)
    return names


def recorded_options(fmt: FormatLike, artifact_options: Optional[Mapping[str, Any]],
                     calibration_record: Optional[Mapping[str, Any]]) -> FormatOptions:
    """The options of the format an artifact's float reference and re-quantization use, rebuilt from
    what its manifest entry recorded (an Edge TPU artifact: the TFLite options it was converted with)."""
    f = format_of(fmt)
    opts = f.options_from_record(artifact_options or {}, calibration_record)
    ref = f.float_format()
    return opts if isinstance(opts, ref.Options) else ref.Options()


def float_reference(traced: Traced, fmt: FormatLike, workdir: Path, options: Optional[FormatOptions] = None) -> Path:
    """An fp32 artifact of the source model in ``fmt``'s float format (the per-layer report's
    reference). ``fmt`` may be an export's own Format instance, which reuses its conversions."""
    ref = format_of(fmt).float_format()
    opts = options if isinstance(options, ref.Options) else ref.Options()
    workdir.mkdir(parents=True, exist_ok=True)
    dest = workdir / f"reference_fp32{ref.suffix}"
    return ref.export(traced, "fp32", None, dest, opts).path


def tflite_requantizer(traced: Traced, calibration: Calibration) -> Requantize:
    """``requantize(denylist, fully_quantize) -> .tflite bytes`` (export/tflite.py)."""
    return TFLiteFormat.requantizer(traced, calibration)


def onnx_quantize_kwargs(options: Optional[FormatOptions]) -> dict:
    """onnxruntime ``quantize_static`` arguments the artifact was quantized with (export/onnx.py)."""
    return ONNXFormat.quantize_kwargs(options if options is not None else ONNXFormat.Options())
