"""Typed stage outputs: LoadedModel -> Traced -> (Artifact, Verified) in the manifest.

Each stage takes the previous type and returns the next, so stages cannot be called out of order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from edgepipe.pipeline.base.manifest import SourceModel
from edgepipe.pipeline.base.preprocessing import Preprocessing


@dataclass
class Calibration:
    """Calibration/verification images, already resized to the model's input.

    raw:  (N, H, W, C) float32 pixels 0-255 in the model's channel count (RGB or gray)
    data: the same images preprocessed exactly as the model expects
    """

    raw: np.ndarray
    data: np.ndarray
    source: str  # folder | digits | random
    location: Optional[str] = None
    skipped: int = 0  # files that failed to decode

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    def batches(self, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Batches of one, as the static-batch-1 artifacts take them."""
        n = self.n if limit is None else min(limit, self.n)
        for i in range(n):
            yield self.data[i : i + 1]

    def describe(self) -> dict:
        return {"source": self.source, "location": self.location, "samples": self.n, "skipped": self.skipped}


@dataclass
class LoadedModel:
    source: SourceModel
    model: Any  # keras.Model, or a tf.Module for SavedModels without Keras metadata
    preprocessing: Preprocessing
    is_keras: bool = True
    saved_model_dir: Optional[Path] = None


@dataclass
class Traced:
    """The model traced once with a static batch of 1; every format reuses it."""

    loaded: LoadedModel
    function: Any  # tf.function with a static (1, H, W, C) input signature
    concrete: Any  # its concrete function
    input_shape: tuple
    output_shape: tuple
    timings: dict = field(default_factory=dict)
    #: work shared between formats (e.g. the fp32 ONNX model that fp16/int8 derive from)
    shared: dict = field(default_factory=dict)

    @property
    def source(self) -> SourceModel:
        return self.loaded.source

    @property
    def preprocessing(self) -> Preprocessing:
        return self.loaded.preprocessing

    @property
    def model(self) -> Any:
        return self.loaded.model

    def static_keras_model(self) -> Any:
        """The Keras model re-wrapped with a static (1, H, W, C) input, built once."""
        if "static_keras" not in self.shared:
            import keras

            src = self.source
            inp = keras.Input(batch_shape=tuple(src.input_shape), name=src.input_name)
            out = self.model(inp)
            self.shared["static_keras"] = keras.Model(inp, out, name=f"{src.name}_static")
        return self.shared["static_keras"]

    def saved_model_dir(self, scratch: Path) -> Path:
        """A static-batch SavedModel of the Keras model, written once and shared by every
        TFLite precision (from_keras_model would re-export it for each one)."""
        if "saved_model" not in self.shared:
            import tensorflow as tf

            d = scratch / "saved_model"
            src = self.source
            # An explicit signature: Model.export would widen the batch to None.
            sig = [tf.TensorSpec(tuple(src.input_shape), tf.float32, name=src.input_name)]
            self.model.export(str(d), verbose=False, input_signature=sig)
            self.shared["saved_model"] = d
        return self.shared["saved_model"]

    def scratch(self) -> Path:
        """A temporary folder for intermediate files, removed after the export."""
        import tempfile

        if "scratch" not in self.shared:
            self.shared["scratch"] = tempfile.TemporaryDirectory(prefix="edgepipe-")
        return Path(self.shared["scratch"].name)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """Source-model outputs for preprocessed inputs (any batch), one trace call per image."""
        import tensorflow as tf

        outs = [np.asarray(self.function(tf.constant(x[i : i + 1], tf.float32))) for i in range(x.shape[0])]
        return np.concatenate(outs, axis=0)
