"""TFLite: fp32, fp16, dynamic-range, full-integer int8, int16x8 (all static batch 1).

Keras models convert from one static-batch SavedModel, in the worker process when the pipeline
overlaps formats (``worker = True``); SavedModels without Keras metadata from the traced
concrete function, in this process. Accuracy recovery offers int16x8 activations, then the most
sensitive layers kept in float (TFLite's quantization debugger).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from edgepipe.export.base import ExportResult, Format, FormatOptions, Recovery, WorkerJob, option
from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.records import Calibration, Traced

INT8_IO = ("int8", "uint8", "float32")
DENYLIST_STEPS = (1, 2, 4, 8)
DEBUG_SAMPLES = 32
REQUANTIZE_SAMPLES = 8  # the debugger's own pass; re-quantizing reuses the converter's calibration
#: ``requantize(denylisted tensor names, fully_quantize) -> .tflite bytes``
Requantize = Callable[[list, bool], bytes]


@dataclass(frozen=True)
class TFLiteOptions(FormatOptions):
    int8_io: str = option("int8", flag="--int8-io", choices=INT8_IO,
                          help="full-integer I/O type: int8 | uint8 | float32")


def _representative(batches: list) -> Any:
    def gen() -> Iterator[list]:
        for x in batches:
            yield [x]

    return gen


def configure(c: Any, precision: str, batches: list, options: TFLiteOptions) -> dict:
    """Set a TFLiteConverter up for a precision; returns what was used (for the manifest)."""
    tf = lazy.tensorflow()
    used: dict = {}
    if precision in ("fp16", "dynamic", "int8", "int16x8"):
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        c.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        c.representative_dataset = _representative(batches)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if options.int8_io != "float32":
            c.inference_input_type = getattr(tf, options.int8_io)
            c.inference_output_type = getattr(tf, options.int8_io)
        used.update(io=options.int8_io, per_channel=True, ops="TFLITE_BUILTINS_INT8")
    elif precision == "int16x8":
        c.representative_dataset = _representative(batches)
        c.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        used.update(io="float32", activations="int16", weights="int8")
    return used


def converter(traced: Traced) -> tuple[Any, str]:
    """A fresh TFLiteConverter for the traced model, and its name for the manifest."""
    tf = lazy.tensorflow()
    if traced.loaded.is_keras:
        # A static-batch SavedModel of the Keras model, exported once for all precisions.
        # (from_concrete_functions silently drops Keras 3 weights: a 16.8 MB model came
        # out at 98 KB; from_keras_model works but re-exports the model every time.)
        return (tf.lite.TFLiteConverter.from_saved_model(str(traced.saved_model_dir())),
                "TFLiteConverter.from_saved_model")
    return (tf.lite.TFLiteConverter.from_concrete_functions([traced.concrete], traced.model),
            "TFLiteConverter.from_concrete_functions")


def _batches(calibration: Optional[Calibration]) -> list:
    return list(calibration.batches()) if calibration is not None else []


class TFLiteFormat(Format):
    name = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "dynamic", "int8", "int16x8")
    Options = TFLiteOptions
    packages = ("tensorflow", "keras")
    verifier = ("litert", "cpu")
    worker = True

    def __init__(self) -> None:
        # (precision, options) -> (flatbuffer, used, seconds), or a worker conversion under way
        self._converted: dict[tuple[str, FormatOptions], Any] = {}

    def worker_jobs(self, precision: str, options: FormatOptions) -> list[tuple[Format, WorkerJob]]:
        return [(self, WorkerJob(self.name, precision, options))]

    def receive(self, job: WorkerJob, pending: Any) -> None:
        self._converted.setdefault((job.precision, job.options), pending)

    @classmethod
    def convert_saved_model(cls, saved_model: Path, precision: str, calibration: Optional[Calibration],
                            options: FormatOptions) -> tuple[bytes, dict]:
        assert isinstance(options, TFLiteOptions)
        c = lazy.tensorflow().lite.TFLiteConverter.from_saved_model(str(saved_model))
        used = {"converter": "TFLiteConverter.from_saved_model", **configure(c, precision, _batches(calibration), options)}
        return c.convert(), used

    def convert(self, traced: Traced, precision: str, calibration: Optional[Calibration],
                options: FormatOptions) -> tuple[bytes, dict, float]:
        """The flatbuffer for one precision, converted once per export (here or in the worker)."""
        assert isinstance(options, TFLiteOptions)
        key = (precision, options)
        got = self._converted.get(key)
        if got is None:
            t0 = time.perf_counter()
            c, how = converter(traced)
            used = {"converter": how, **configure(c, precision, _batches(calibration), options)}
            got = (c.convert(), used, time.perf_counter() - t0)
        elif hasattr(got, "result"):  # a worker conversion: wait for it (re-raises its error)
            got = got.result()
        self._converted[key] = got
        return got

    def export(self, traced: Traced, precision: str, calibration: Optional[Calibration], dest: Path,
               options: FormatOptions) -> ExportResult:
        t0 = time.perf_counter()
        data, used, seconds = self.convert(traced, precision, calibration, options)
        dest.write_bytes(data)
        calib = None
        if precision in ("int8", "int16x8") and calibration is not None:
            calib = {**calibration.describe(), "method": "minmax (TFLite converter)"}
        return ExportResult(dest, options=dict(used), calibration=calib,
                            seconds=seconds + (time.perf_counter() - t0) if seconds is not None else None)

    def recoveries(self, traced: Traced, calibration: Calibration,
                   options: FormatOptions) -> Iterator[list[Recovery]]:
        yield [Recovery("int16x8 activations", "int16x8", "int16x8",
                        lambda d: self.export(traced, "int16x8", calibration, d, options))]
        for k, nodes, model, secs in _denylisted_models(traced, calibration, DENYLIST_STEPS):
            yield [Recovery(f"{k} sensitive layer(s) in float", "int8", "int8_mixed", partial(_write_mixed, model=model),
                            info={"float_nodes": nodes}, convert_s=secs)]

    def options_from_record(self, used: Mapping[str, Any], calibration: Optional[Mapping[str, Any]]) -> FormatOptions:
        io = used.get("io")
        return TFLiteOptions(int8_io=io) if io in INT8_IO else TFLiteOptions()

    def int8_weight_levels(self, options: FormatOptions) -> Optional[int]:
        return 127  # symmetric per-channel int8

    @staticmethod
    def requantizer(traced: Traced, calibration: Calibration, debug_samples: int = REQUANTIZE_SAMPLES) -> Requantize:
        """The traced model calibrated once by TFLite's QuantizationDebugger; ``requantize(denylist,
        fully_quantize)`` re-quantizes it with the denylisted tensors' ops kept in float (milliseconds)."""
        dbg = _debugger(traced, calibration, debug_samples)
        tf = lazy.tensorflow()

        def requantize(denylist: list, fully_quantize: bool) -> bytes:
            dbg.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylist),
                                                                        fully_quantize=bool(fully_quantize))
            return bytes(dbg.get_nondebug_quantized_model())

        return requantize

    def close(self) -> None:
        self._converted.clear()


def _write_mixed(dest: Path, *, model: bytes) -> ExportResult:
    dest.write_bytes(model)
    return ExportResult(dest, options={"converter": "tf.lite.experimental.QuantizationDebugger",
                                       "io": "float32", "per_channel": True})


def _layer_scores(dbg: Any) -> dict[str, float]:
    """RMSE / scale of each layer's quantization error, from the debugger's statistics."""
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    buf.seek(0)
    scores: dict[str, float] = {}
    for row in csv.DictReader(buf):
        try:
            s = math.sqrt(float(row["mean_squared_error"])) / float(row["scale"])
        except (ValueError, ZeroDivisionError, KeyError):
            continue
        if math.isfinite(s):
            scores[row["tensor_name"]] = max(s, scores.get(row["tensor_name"], 0.0))
    return scores


def _debugger(traced: Traced, calibration: Calibration, debug_samples: int) -> Any:
    """TFLite's QuantizationDebugger over the traced model, calibrated on ``calibration``."""
    tf = lazy.tensorflow()
    conv, _ = converter(traced)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(_batches(calibration))
    debug = list(calibration.batches(limit=debug_samples))
    return tf.lite.experimental.QuantizationDebugger(converter=conv, debug_dataset=_representative(debug))


def _denylisted_models(traced: Traced, calibration: Calibration,
                       steps: tuple[int, ...]) -> Iterator[tuple[int, list[dict], bytes, float]]:
    """Yield (k, denylisted tensor names, model bytes, seconds): the k layers with the largest
    RMSE/scale kept in float. The debugger runs once, on the first step's demand."""
    tf = lazy.tensorflow()
    t0 = time.perf_counter()
    dbg = _debugger(traced, calibration, DEBUG_SAMPLES)
    dbg.run()
    scores = _layer_scores(dbg)
    ranked = sorted(scores, key=lambda n: scores[n], reverse=True)
    for k in steps:
        if k > len(ranked):
            break
        nodes = ranked[:k]
        dbg.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        model = dbg.get_nondebug_quantized_model()
        yield (k, [{"tensor": n, "rmse_over_scale": round(scores[n], 4)} for n in nodes], model,
               time.perf_counter() - t0)
        t0 = time.perf_counter()
