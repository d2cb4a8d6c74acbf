"""ONNX: fp32 via tf2onnx (converted once per export, shared), fp16, dynamic and static int8 QDQ.

int8 and the AVX2-without-VNNI trap: onnxruntime's u8s8 integer kernels use
vpmaddubsw, which sums pairs of u8*s8 products into int16 with saturation. With
full 8-bit weights that sum can overflow on AVX2 CPUs that lack VNNI (e.g. many
AMD EPYC/Zen 2-3 and pre-Cascade-Lake Intel parts) and the results go wrong. The
default here, "u8s8-reduce-range", quantizes weights to 7 bits (reduce_range=True),
which removes the overflow on every CPU at a small accuracy cost. "u8u8" (uint8
weights) avoids it too; "s8s8" and plain "u8s8" are offered for VNNI/ARM targets.

Accuracy recovery offers onnxruntime's other calibration methods.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from edgepipe.export.base import ExportResult, Format, FormatOptions, Recovery, option
from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import Calibration, Traced

ONNX_INT8_MODES = ("u8s8-reduce-range", "u8u8", "u8s8", "s8s8")
CALIB_METHODS = ("minmax", "entropy", "percentile")
OPSETS = range(13, 19)  # QDQ per-channel needs 13; tf2onnx 1.17 writes up to 18


@dataclass(frozen=True)
class ONNXOptions(FormatOptions):
    int8: str = option("u8s8-reduce-range", flag="--onnx-int8", key="onnx_int8", choices=ONNX_INT8_MODES,
                       help="int8 kernels: u8s8-reduce-range (safe on AVX2 without VNNI) | u8u8 | u8s8 | s8s8")
    calib_method: Optional[str] = option(None, flag="--calib-method", choices=(None, *CALIB_METHODS),
                                         help="int8 calibration: minmax | entropy | percentile")
    opset: int = option(17, flag="--onnx-opset", key="onnx_opset", help="ONNX opset")

    def validate(self) -> None:
        super().validate()
        if self.opset not in OPSETS:
            raise UserError(f"unsupported ONNX opset {self.opset}", f"Use {OPSETS.start}-{OPSETS.stop - 1}")


def _metadata(traced: Traced) -> dict:
    src = traced.source
    d = {"edgepipe.model": src.name,
         "edgepipe.preprocessing": json.dumps(traced.preprocessing.to_dict()),
         "edgepipe.input_layout": "NHWC"}
    if src.labels:
        d["edgepipe.labels"] = json.dumps(src.labels)
    return d


def _save(model: Any, dest: Path, traced: Traced) -> None:
    onnx = lazy.onnx()
    del model.metadata_props[:]
    for k, v in _metadata(traced).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save(model, str(dest))


class _Reader:
    """onnxruntime CalibrationDataReader over edgepipe's calibration batches."""

    def __init__(self, name: str, calibration: Calibration):
        self.name = name
        self.it = iter(calibration.batches())

    def get_next(self) -> Optional[dict]:
        x = next(self.it, None)
        return None if x is None else {self.name: x}

    def rewind(self) -> None:  # pragma: no cover - newer ORT versions call it
        pass


class ONNXFormat(Format):
    name = "onnx"
    suffix = ".onnx"
    precisions = ("fp32", "fp16", "dynamic", "int8")
    Options = ONNXOptions
    packages = ("tensorflow", "tf2onnx", "onnx", "onnxruntime")
    verifier = ("onnxruntime", "cpu")

    def __init__(self) -> None:
        self._fp32: dict[int, Any] = {}  # opset -> the tf2onnx ModelProto every precision derives from

    def _fp32_model(self, traced: Traced, opset: int) -> Any:
        """Convert once with tf2onnx; a fresh copy per caller (they edit it)."""
        tf, onnx = lazy.tensorflow(), lazy.onnx()
        if opset not in self._fp32:
            spec = tf.TensorSpec(tuple(traced.input_shape), tf.float32, name=traced.source.input_name)
            self._fp32[opset], _ = lazy.tf2onnx().convert.from_function(traced.function, input_signature=[spec],
                                                                        opset=opset)
        return onnx.ModelProto.FromString(self._fp32[opset].SerializeToString())

    def _fp32_path(self, traced: Traced, opset: int) -> Path:
        p = traced.scratch() / f"fp32-opset{opset}.onnx"
        if not p.exists():
            lazy.onnx().save(self._fp32_model(traced, opset), str(p))
        return p

    def export(self, traced: Traced, precision: str, calibration: Optional[Calibration], dest: Path,
               options: FormatOptions) -> ExportResult:
        assert isinstance(options, ONNXOptions)
        used: dict = {"converter": "tf2onnx.convert.from_function", "opset": options.opset}
        calib = None
        if precision == "fp32":
            _save(self._fp32_model(traced, options.opset), dest, traced)
        elif precision == "fp16":
            m = lazy.ort_float16().convert_float_to_float16(self._fp32_model(traced, options.opset),
                                                            keep_io_types=True)
            _save(m, dest, traced)
            used.update(quantizer="onnxruntime.transformers.float16", io="float32")
        elif precision == "dynamic":
            used.update(self._dynamic(traced, dest, options))
        elif precision == "int8":
            if calibration is None:
                raise ValueError("int8 needs calibration data")
            used.update(self._int8(traced, calibration, dest, options))
            calib = {**calibration.describe(), "method": options.calib_method or "minmax"}
        else:  # pragma: no cover - the registry guards this
            raise ValueError(precision)
        return ExportResult(dest, options=used, calibration=calib)

    def _dynamic(self, traced: Traced, dest: Path, options: ONNXOptions) -> dict:
        q = lazy.ort_quantization()
        tmp = dest.with_name(dest.stem + ".q.onnx")
        q.quantize_dynamic(str(self._fp32_path(traced, options.opset)), str(tmp), weight_type=q.QuantType.QUInt8,
                           per_channel=False)
        _save(lazy.onnx().load(str(tmp)), dest, traced)
        tmp.unlink()
        return {"quantizer": "onnxruntime.quantization.quantize_dynamic", "weights": "uint8"}

    def _int8(self, traced: Traced, calibration: Calibration, dest: Path, options: ONNXOptions) -> dict:
        q = lazy.ort_quantization()
        mode = options.int8
        tmp = dest.with_name(dest.stem + ".q.onnx")
        q.quantize_static(str(self._fp32_path(traced, options.opset)), str(tmp),
                          _Reader(traced.source.input_name, calibration), **self.quantize_kwargs(options))
        _save(lazy.onnx().load(str(tmp)), dest, traced)
        tmp.unlink()
        return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "mode": mode,
                "per_channel": True, "reduce_range": mode == "u8s8-reduce-range"}

    @staticmethod
    def quantize_kwargs(options: FormatOptions) -> dict:
        """onnxruntime ``quantize_static`` arguments for an int8 QDQ model with these options."""
        assert isinstance(options, ONNXOptions)
        q = lazy.ort_quantization()
        mode = options.int8
        method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
                  "percentile": q.CalibrationMethod.Percentile}[options.calib_method or "minmax"]
        return {"quant_format": q.QuantFormat.QDQ, "per_channel": True, "reduce_range": mode == "u8s8-reduce-range",
                "activation_type": q.QuantType.QInt8 if mode == "s8s8" else q.QuantType.QUInt8,
                "weight_type": q.QuantType.QUInt8 if mode == "u8u8" else q.QuantType.QInt8,
                "calibrate_method": method}

    def int8_weight_levels(self, options: FormatOptions) -> Optional[int]:
        assert isinstance(options, ONNXOptions)
        return 63 if options.int8 == "u8s8-reduce-range" else 127  # reduce_range: 7-bit weights

    def options_from_record(self, used: Mapping[str, Any], calibration: Optional[Mapping[str, Any]]) -> FormatOptions:
        mode, method = used.get("mode"), (calibration or {}).get("method")
        opset = used.get("opset")
        return ONNXOptions(int8=mode if mode in ONNX_INT8_MODES else ONNXOptions().int8,
                           calib_method=method if method in CALIB_METHODS else None,
                           opset=opset if isinstance(opset, int) and opset in OPSETS else ONNXOptions().opset)

    def recoveries(self, traced: Traced, calibration: Calibration,
                   options: FormatOptions) -> Iterator[list[Recovery]]:
        """onnxruntime's other calibration methods, same size as the first artifact."""
        assert isinstance(options, ONNXOptions)
        used = options.calib_method or "minmax"
        group = []
        for method in CALIB_METHODS:
            if method != used:
                o = dataclasses.replace(options, calib_method=method)
                run = partial(self._export_to, traced, calibration, o)
                group.append(Recovery(f"{method} calibration", "int8", "int8", run, info={"method": method}))
        yield group

    def _export_to(self, traced: Traced, calibration: Calibration, options: ONNXOptions, dest: Path) -> ExportResult:
        return self.export(traced, "int8", calibration, dest, options)

    def close(self) -> None:
        self._fp32.clear()
