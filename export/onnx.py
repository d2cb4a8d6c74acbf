"""ONNX: fp32 via tf2onnx (converted once, shared), fp16, dynamic and static int8 QDQ.

int8 and the AVX2-without-VNNI trap: onnxruntime's u8s8 integer kernels use
vpmaddubsw, which sums pairs of u8*s8 products into int16 with saturation. With
full 8-bit weights that sum can overflow on AVX2 CPUs that lack VNNI (e.g. many
AMD EPYC/Zen 2-3 and pre-Cascade-Lake Intel parts) and the results go wrong. The
default here, "u8s8-reduce-range", quantizes weights to 7 bits (reduce_range=True),
which removes the overflow on every CPU at a small accuracy cost. "u8u8" (uint8
weights) avoids it too; "s8s8" and plain "u8s8" are offered for VNNI/ARM targets.
"""
from __future__ import annotations

import json
from pathlib import Path

from edgepipe.export.base import ExportOptions, ExportResult, Format

ONNX_INT8_MODES = ("u8s8-reduce-range", "u8u8", "u8s8", "s8s8")


def _fp32_model(traced, options: ExportOptions):
    """Convert once with tf2onnx; fp16 and int8 derive from this model."""
    if "onnx_fp32" not in traced.shared:
        import tensorflow as tf
        import tf2onnx

        spec = tf.TensorSpec(tuple(traced.input_shape), tf.float32, name=traced.source.input_name)
        proto, _ = tf2onnx.convert.from_function(traced.function, input_signature=[spec],
                                                 opset=options.onnx_opset)
        traced.shared["onnx_fp32"] = proto
    return traced.shared["onnx_fp32"]


def _fp32_path(traced, options) -> Path:
    import onnx

    p = traced.scratch() / "fp32.onnx"
    if not p.exists():
        onnx.save(_fp32_model(traced, options), str(p))
    return p


def _metadata(traced) -> dict:
    src = traced.source
    d = {"edgepipe.model": src.name,
         "edgepipe.preprocessing": json.dumps(traced.preprocessing.to_dict()),
         "edgepipe.input_layout": "NHWC"}
    if src.labels:
        d["edgepipe.labels"] = json.dumps(src.labels)
    return d


def _save(model, dest: Path, traced) -> None:
    import onnx

    del model.metadata_props[:]
    for k, v in _metadata(traced).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(model, str(dest))


class _Reader:
    """onnxruntime CalibrationDataReader over edgepipe's calibration batches."""

    def __init__(self, name, calibration):
        self.name = name
        self.it = iter(calibration.batches())

    def get_next(self):
        x = next(self.it, None)
        return None if x is None else {self.name: x}

    def rewind(self):  # pragma: no cover - newer ORT versions call it
        pass


class ONNXFormat(Format):
    name = "onnx"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "dynamic", "int8")

    def export(self, traced, precision, calibration, dest: Path, options: ExportOptions) -> ExportResult:
        import onnx

        from edgepipe.devices.runtimes.base import to_tensor_info
        from edgepipe.devices.runtimes.ort import ORTCPU

        used: dict = {"converter": "tf2onnx.convert.from_function", "opset": options.onnx_opset}
        if precision == "fp32":
            _save(onnx.ModelProto.FromString(_fp32_model(traced, options).SerializeToString()), dest, traced)
        elif precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16

            m = convert_float_to_float16(onnx.ModelProto.FromString(_fp32_model(traced, options).SerializeToString()),
                                         keep_io_types=True)
            _save(m, dest, traced)
            used.update(quantizer="onnxruntime.transformers.float16", io="float32")
        elif precision == "dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            tmp = dest.with_name(dest.stem + ".q.onnx")
            quantize_dynamic(str(_fp32_path(traced, options)), str(tmp), weight_type=QuantType.QUInt8,
                             per_channel=False)
            _save(onnx.load(str(tmp)), dest, traced)
            tmp.unlink()
            used.update(quantizer="onnxruntime.quantization.quantize_dynamic", weights="uint8")
        elif precision == "int8":
            from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

            mode = options.onnx_int8
            if mode not in ONNX_INT8_MODES:
                raise ValueError(f"onnx int8 mode must be one of {ONNX_INT8_MODES}")
            act = QuantType.QInt8 if mode == "s8s8" else QuantType.QUInt8
            wt = QuantType.QUInt8 if mode == "u8u8" else QuantType.QInt8
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[options.calib_method or "minmax"]
            tmp = dest.with_name(dest.stem + ".q.onnx")
            quantize_static(str(_fp32_path(traced, options)), str(tmp),
                            _Reader(traced.source.input_name, calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=(mode == "u8s8-reduce-range"),
                            activation_type=act, weight_type=wt, calibrate_method=method)
            _save(onnx.load(str(tmp)), dest, traced)
            tmp.unlink()
            used.update(quantizer="onnxruntime.quantization.quantize_static", format="QDQ", mode=mode,
                        per_channel=True, reduce_range=(mode == "u8s8-reduce-range"))
        else:  # pragma: no cover - registry guards this
            raise ValueError(precision)
        with ORTCPU().load(dest) as s:
            ins, outs = [to_tensor_info(t) for t in s.inputs], [to_tensor_info(t) for t in s.outputs]
        calib = None
        if precision == "int8":
            calib = {**calibration.describe(), "method": options.calib_method or "minmax"}
        return ExportResult(dest, ins, outs, used, calib)
