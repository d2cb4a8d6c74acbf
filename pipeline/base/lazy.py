"""The heavy third-party imports edgepipe defers, in one place.

Every module imports at its top, except these libraries: importing them costs seconds (measured
on the 2-core build machine, warm file cache) and only export code paths need them, while
`edgepipe --help` must stay under a second and a cache hit under two (both asserted in
tests/test_export_cli.py). Code that needs one calls the helper below (``lazy.tensorflow()``)
instead of writing ``import tensorflow`` inside a function, so ``grep lazy.`` finds them all.
docs/architecture.md "Start-up cost" has the same list.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# module -> why it is deferred (wall time of the lone import in a fresh process)
HEAVY: dict[str, str] = {
    "tensorflow": "2.5 s and ~400 MB; needed only to load, trace and convert the source model",
    "keras": "2.6 s (imports TensorFlow)",
    "tf2onnx": "2.6 s (imports TensorFlow); ONNX export only",
    "onnx": "0.5 s (protobuf schemas); ONNX export only",
    "onnxruntime.quantization": "0.5 s (imports onnx); ONNX dynamic/int8 export and recovery only",
    "onnxruntime.transformers.float16": "0.5 s (imports onnx); ONNX fp16 export only",
    "coremltools": "3.1 s (imports TensorFlow when installed); Core ML export only",
    "coremltools.optimize.coreml": "3.0 s (imports coremltools); Core ML int8/palettized export only",
    "sklearn.datasets": "0.6 s (imports scipy); the built-in digits set only",
    "ray": "1-2 s, optional (the cluster extra); `edgepipe sweep` on Ray and `edgepipe node` only",
    "sklearn.model_selection": "0.6 s (imports scipy); the built-in digits set's fixed split only",
}


def load(name: str) -> Any:
    """Import one of the HEAVY modules (anything else is a bug: import it at module top)."""
    if name not in HEAVY:
        raise ValueError(f"{name} is not a deferred heavy import; import it at module top")
    if name in ("tensorflow", "keras", "tf2onnx"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return importlib.import_module(name)


def tensorflow() -> Any:
    return load("tensorflow")


def keras() -> Any:
    return load("keras")


def tf2onnx() -> Any:
    return load("tf2onnx")


def onnx() -> Any:
    return load("onnx")


def ort_quantization() -> Any:
    return load("onnxruntime.quantization")


def ort_float16() -> Any:
    return load("onnxruntime.transformers.float16")


def coremltools() -> Any:
    return load("coremltools")


def coreml_optimize() -> Any:
    return load("coremltools.optimize.coreml")


def sklearn_datasets() -> Any:
    return load("sklearn.datasets")


def sklearn_model_selection() -> Any:
    return load("sklearn.model_selection")
