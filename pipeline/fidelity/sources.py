"""Where the fidelity tools meet the rest of edgepipe: float references of a traced model, TFLite's
quantization debugger, and what a manifest records about an int8 artifact. Kept in one module so
the calls into export/ move in one place when the library API is renamed.

Everything here takes a ``Traced`` model (pipeline/base/records.py), i.e. the caller has loaded
and traced the source model; nothing imports TensorFlow until a function that needs it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from edgepipe.export.base import ExportOptions
from edgepipe.export.coreml import CoreMLFormat
from edgepipe.export.onnx import ONNX_INT8_MODES as ONNX_MODES, ONNXFormat
from edgepipe.export.tflite import TFLiteFormat, _converter
from edgepipe.pipeline.base.records import Calibration, Traced

DEBUG_SAMPLES = 8
ONNX_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class OnnxQuant:
    """How the artifact was quantized (export/onnx.py records mode and method in the manifest)."""

    mode: str = "u8s8-reduce-range"
    method: str = "minmax"

    def kwargs(self) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        if self.mode not in ONNX_MODES or self.method not in ONNX_METHODS:
            raise ValueError(f"ONNX int8 mode must be one of {ONNX_MODES} and method one of {ONNX_METHODS}")
        return {"quant_format": QuantFormat.QDQ, "per_channel": True,
                "reduce_range": self.mode == "u8s8-reduce-range",
                "activation_type": QuantType.QInt8 if self.mode == "s8s8" else QuantType.QUInt8,
                "weight_type": QuantType.QUInt8 if self.mode == "u8u8" else QuantType.QInt8,
                "calibrate_method": {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                     "percentile": CalibrationMethod.Percentile}[self.method]}


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


def float_reference(traced: Traced, fmt: str, workdir: Path, options: Optional[ExportOptions] = None) -> Path:
    """An fp32 artifact of the source model in ``fmt`` (the per-layer report's reference)."""
    options = options or ExportOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    if fmt in ("tflite", "edgetpu"):
        data, _ = TFLiteFormat().convert(traced, "fp32", None, options)
        dest = workdir / "reference_fp32.tflite"
        dest.write_bytes(data)
        return dest
    if fmt == "onnx":
        dest = workdir / "reference_fp32.onnx"
        ONNXFormat().export(traced, "fp32", None, dest, options)
        return dest
    if fmt == "coreml":
        dest = workdir / "reference_fp32.mlpackage"
        CoreMLFormat().export(traced, "fp32", None, dest, options)
        return dest
    raise ValueError(f"no float reference for format {fmt}")


def tflite_requantizer(traced: Traced, calibration: Calibration,
                       debug_samples: int = DEBUG_SAMPLES) -> Callable[[list, bool], bytes]:
    """``requantize(denylist, fully_quantize) -> .tflite bytes``: the source model calibrated once by
    TFLite's QuantizationDebugger, re-quantized with the denylisted layers kept in float."""
    import tensorflow as tf

    conv = _converter(traced)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x] for x in calibration.batches())
    dbg = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=lambda: ([x] for x in calibration.batches(limit=debug_samples)))

    def requantize(denylist: list, fully_quantize: bool) -> bytes:
        dbg.options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=list(denylist), fully_quantize=bool(fully_quantize))
        return dbg.get_nondebug_quantized_model()

    return requantize


def onnx_quant(artifact_options: Optional[dict], calibration_record: Optional[dict]) -> OnnxQuant:
    """How an ONNX int8 artifact was quantized, from what the manifest recorded."""
    mode = (artifact_options or {}).get("mode") or ExportOptions().onnx_int8
    method = (calibration_record or {}).get("method") or "minmax"
    return OnnxQuant(mode=mode, method=method if method in ("minmax", "entropy", "percentile") else "minmax")
