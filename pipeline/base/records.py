"""Typed stage outputs: LoadedModel -> Traced -> (Artifact, Verification) in the manifest, and the
records the export hands back (VerificationSet, RecoveryReport, ExportOutcome).

Each stage takes the previous type and returns the next, so stages cannot be called out of order.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import GateFailure, StageFailure
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.util import atomic_path


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
class VerificationSet:
    """The fixed batch every artifact is verified on: raw pixels, the preprocessed inputs, the source
    model's outputs on them, and where the images came from (calibration images or seeded noise).
    Saved as ``reference.npz`` (keys raw, data, outputs) beside the manifest."""

    raw: np.ndarray
    data: np.ndarray
    reference: np.ndarray
    source: str

    @property
    def n(self) -> int:
        return int(self.data.shape[0])

    def save(self, path: Path, extra: Optional[dict] = None) -> None:
        """``extra``: more arrays stored beside (bench's inputs, say); ``load`` reads the three above."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, raw=self.raw.astype(np.float32), data=self.data, outputs=self.reference,
                                    **(extra or {}))

    @classmethod
    def load(cls, path: Path, source: str) -> "VerificationSet":
        with np.load(path) as z:
            return cls(raw=z["raw"], data=z["data"], reference=z["outputs"], source=source)


@dataclass
class LoadedModel:
    source: SourceModel
    model: Any  # keras.Model, or a tf.Module for SavedModels without Keras metadata
    preprocessing: Preprocessing
    is_keras: bool = True
    saved_model_dir: Optional[Path] = None


@dataclass
class Traced:
    """The model traced once with a static batch of 1; every format reuses it.

    It owns a scratch folder for intermediate files (the static SavedModel TFLite converts from,
    the fp32 ONNX file the quantizers read); ``close()`` removes it."""

    loaded: LoadedModel
    function: Any  # tf.function with a static (1, H, W, C) input signature
    concrete: Any  # its concrete function
    input_shape: tuple
    output_shape: tuple
    timings: dict = field(default_factory=dict)
    _scratch: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)
    _saved_model: Optional[Path] = field(default=None, repr=False)

    @property
    def source(self) -> SourceModel:
        return self.loaded.source

    @property
    def preprocessing(self) -> Preprocessing:
        return self.loaded.preprocessing

    @property
    def model(self) -> Any:
        return self.loaded.model

    def scratch(self) -> Path:
        """A temporary folder for intermediate files, removed by ``close()``."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="edgepipe-")
        return Path(self._scratch.name)

    def saved_model_dir(self) -> Path:
        """A static-batch SavedModel of the Keras model, written once and shared by every
        TFLite precision (from_keras_model would re-export it for each one)."""
        if self._saved_model is None:
            tf = lazy.tensorflow()
            d = self.scratch() / "saved_model"
            src = self.source
            # An explicit signature: Model.export would widen the batch to None.
            sig = [tf.TensorSpec(tuple(src.input_shape), tf.float32, name=src.input_name)]
            self.model.export(str(d), verbose=False, input_signature=sig)
            self._saved_model = d
        return self._saved_model

    def reference(self, x: np.ndarray) -> np.ndarray:
        """Source-model outputs for preprocessed inputs (any batch), one trace call per image."""
        tf = lazy.tensorflow()
        outs = [np.asarray(self.function(tf.constant(x[i : i + 1], tf.float32))) for i in range(x.shape[0])]
        return np.concatenate(outs, axis=0)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
            self._saved_model = None


# --------------------------------------------------------------------------- accuracy recovery
@dataclass
class RecoveryAttempt:
    """One candidate for an int8 artifact over its accuracy budget (the first is the artifact itself)."""

    name: str
    precision: str
    size_bytes: Optional[int] = None
    drop: Optional[float] = None
    meets: bool = False
    method: Optional[str] = None
    float_nodes: Optional[list[dict]] = None
    convert_s: Optional[float] = None
    top1: Optional[float] = None
    agreement: Optional[float] = None
    runtime: Optional[str] = None
    error: Optional[str] = None
    # added keys: the drop's interval (a DropResult without per-class data), the float fallback's layers
    interval: Optional[dict] = None
    float_layers: Optional[list[str]] = None
    latency_ms: Optional[float] = None  # CPU latency per image (float fallback attempts)
    why: Optional[str] = None  # why these layers were kept float (the per-layer report's reasons)

    def to_dict(self) -> dict:
        d: dict = {"name": self.name, "precision": self.precision}
        for k in ("method", "float_nodes", "float_layers"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["size_bytes"] = self.size_bytes
        for k in ("convert_s", "latency_ms", "drop", "interval", "top1", "agreement", "runtime", "why", "error"):
            if getattr(self, k) is not None or k == "drop":
                d[k] = getattr(self, k)
        d["meets"] = self.meets
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryAttempt":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ArtifactRecovery:
    artifact: str
    attempts: list[RecoveryAttempt] = field(default_factory=list)
    chosen: Optional[str] = None
    note: Optional[str] = None
    cost: Optional[dict] = None  # the chosen float fallback's size and CPU latency against the artifact's
    layers: Optional[str] = None  # the per-layer report the float fallback chose from (layers.json)

    @property
    def meets(self) -> bool:
        return self.chosen is not None

    @property
    def best_drop(self) -> float:
        drops = [a.drop for a in self.attempts if a.drop is not None]
        return min(drops) if drops else float("inf")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"artifact": self.artifact, "attempts": [a.to_dict() for a in self.attempts]}
        if self.note:
            d["note"] = self.note
        d.update(chosen=self.chosen, meets=self.meets, best_drop=self.best_drop)
        for k in ("cost", "layers"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass
class RecoveryReport:
    """What `export --max-drop` found and did. Serialised into the manifest as ``extra.recovery``
    (per artifact and a summary), with the same keys as before it was a typed record."""

    metric: str
    budget: float
    eval_data: str
    artifacts: list[ArtifactRecovery] = field(default_factory=list)
    dataset: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "budget": self.budget, "eval_data": self.eval_data,
                "artifacts": [a.to_dict() for a in self.artifacts], "dataset": self.dataset, "source": self.source}

    def artifact_record(self, rec: ArtifactRecovery) -> dict:
        """What ``artifact.extra["recovery"]`` holds."""
        d = {k: v for k, v in rec.to_dict().items() if k != "artifact"}
        return d | {"metric": self.metric, "budget": self.budget, "eval_data": self.dataset}

    def summary(self) -> dict:
        """What ``manifest.extra["recovery"]`` holds."""
        return {"metric": self.metric, "budget": self.budget, "dataset": self.dataset, "source": self.source,
                "artifacts": {r.artifact: r.chosen for r in self.artifacts}}

    def missed(self) -> list[ArtifactRecovery]:
        return [r for r in self.artifacts if not r.meets]

    def raise_if_missed(self) -> None:
        """GateFailure when an int8 artifact still misses its budget."""
        missed = self.missed()
        if missed:
            parts = "; ".join(f"{r.artifact}: best {self.metric} drop {r.best_drop:.2f} > {self.budget:g} "
                              f"after {len(r.attempts)} attempt(s)" for r in missed)
            raise GateFailure(f"{len(missed)} int8 artifact(s) miss the --max-drop budget ({parts})",
                              "See extra.recovery in manifest.json; calibrate on more representative --data, "
                              "or raise --max-drop")


# --------------------------------------------------------------------------- the export's result
@dataclass
class ExportOutcome:
    """What ``edgepipe.pipeline.export(...)`` returns. Print it, then call ``raise_for_status()``:
    StageFailure when artifacts failed (the others were written), GateFailure when an Edge TPU
    artifact is not fully mapped under ``require_full_edgetpu`` or an int8 artifact misses the
    ``max_drop`` budget."""

    manifest: Manifest
    folder: Path
    skipped: list[dict] = field(default_factory=list)  # requested (format, precision) pairs a format lacks
    recovery: Optional[RecoveryReport] = None
    cache_hit: bool = False
    gate_failures: list[GateFailure] = field(default_factory=list)

    @property
    def failed(self) -> list[Artifact]:
        return [a for a in self.manifest.artifacts if not a.ok]

    def raise_for_status(self) -> None:
        failed = self.failed
        if failed:
            lines = "; ".join(f"{a.id}: {a.error}" for a in failed)
            raise StageFailure(f"{len(failed)} of {len(self.manifest.artifacts)} artifacts failed ({lines})",
                               "The others were written; see manifest.json")
        if self.gate_failures:
            raise self.gate_failures[0]
        if self.recovery is not None:
            self.recovery.raise_if_missed()
