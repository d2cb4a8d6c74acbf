"""TFLite: fp32, fp16, dynamic-range, full-integer int8, int16x8 (all static batch 1)."""
from __future__ import annotations

from pathlib import Path

from edgepipe.export.base import ExportOptions, ExportResult, Format

INT8_IO = ("int8", "uint8", "float32")


def _converter(traced):
    import tensorflow as tf

    if traced.loaded.is_keras:
        # A static-batch SavedModel of the Keras model, exported once for all precisions.
        # (from_concrete_functions silently drops Keras 3 weights: a 16.8 MB model came
        # out at 98 KB; from_keras_model works but re-exports the model every time.)
        return tf.lite.TFLiteConverter.from_saved_model(str(traced.saved_model_dir(traced.scratch())))
    return tf.lite.TFLiteConverter.from_concrete_functions([traced.concrete], traced.model)


def _representative(batches):
    def gen():
        for x in batches:
            yield [x]

    return gen


def configure(c, precision: str, batches, options: ExportOptions) -> dict:
    """Set a TFLiteConverter up for a precision; returns what was used (for the manifest)."""
    import tensorflow as tf

    used: dict = {}
    if precision == "fp16":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = _representative(batches)
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io = options.int8_io
        if io not in INT8_IO:
            raise ValueError(f"int8_io must be one of {INT8_IO}")
        if io != "float32":
            c.inference_input_type = getattr(tf, io)
            c.inference_output_type = getattr(tf, io)
        used.update(io=io, per_channel=True, ops="TFLITE_BUILTINS_INT8")
    elif precision == "int16x8":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = _representative(batches)
        c.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        used.update(io="float32", activations="int16", weights="int8")
    return used


def _key(precision: str, options: ExportOptions) -> str:
    return f"tflite_{precision}_{options.int8_io if precision == 'int8' else ''}"


class TFLiteFormat(Format):
    name = "tflite"
    suffix = ".tflite"
    precisions = ("fp32", "fp16", "dynamic", "int8", "int16x8")

    def convert(self, traced, precision, calibration, options: ExportOptions) -> tuple[bytes, dict]:
        """Run the converter once for this precision; returns the flatbuffer and what was used."""
        c = _converter(traced)
        used: dict = {"converter": "TFLiteConverter.from_saved_model" if traced.loaded.is_keras
                      else "TFLiteConverter.from_concrete_functions"}
        used.update(configure(c, precision, list(calibration.batches()) if calibration is not None else [], options))
        return c.convert(), used

    def prefetch(self, traced, precision, calibration, options: ExportOptions) -> str:
        """Key under which a (possibly background) conversion result is shared."""
        return _key(precision, options)

    def export(self, traced, precision, calibration, dest: Path, options: ExportOptions) -> ExportResult:
        from edgepipe.devices.runtimes.litert import tflite_io

        key = _key(precision, options)
        got = traced.shared.get(key)
        if got is None:
            got = traced.shared[key] = self.convert(traced, precision, calibration, options)
        elif hasattr(got, "result"):  # a background conversion: wait for it (re-raises its error)
            got = traced.shared[key] = got.result()
        data, used = got
        dest.write_bytes(data)
        ins, outs = tflite_io(dest)
        calib = None
        if precision in ("int8", "int16x8"):
            calib = {**calibration.describe(), "method": "minmax (TFLite converter)"}
        return ExportResult(dest, ins, outs, dict(used), calib)
