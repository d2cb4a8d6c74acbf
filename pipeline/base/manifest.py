"""The manifest: the versioned contract between export, verify, bench, eval and check.

Every later command reads an artifact's properties from here, never from its file name.
Plain dataclasses + JSON; no heavy imports.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import pkg_version, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    # {"scale": [...], "zero_point": [...]} for quantized tensors
    quantization: Optional[dict] = None


@dataclass
class Verification:
    status: str = "not_run"  # passed | failed | not_verified | skipped | not_run
    checker: Optional[str] = None  # litert | onnxruntime | coreml | coreml-reference
    reason: Optional[str] = None
    samples: int = 0
    data: Optional[str] = None  # calibration | random
    max_abs: Optional[float] = None
    mean_abs: Optional[float] = None
    cosine: Optional[float] = None
    centered_cosine: Optional[float] = None
    input_correlation: Optional[float] = None
    top1_agreement: Optional[float] = None
    thresholds: dict = field(default_factory=dict)
    seconds: Optional[float] = None


@dataclass
class Artifact:
    id: str
    format: str
    precision: str
    path: Optional[str] = None  # relative to the manifest's folder
    status: str = "pending"  # ok | failed | verify_failed | pending
    error: Optional[str] = None
    sha256: Optional[str] = None
    size_bytes: Optional[int] = None
    converter: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    verification: Verification = field(default_factory=Verification)
    calibration: Optional[dict] = None
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    metadata_path: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class SourceModel:
    name: str
    kind: str  # builtin | keras | h5 | savedmodel
    path: Optional[str] = None
    sha256: Optional[str] = None
    weights: Optional[str] = None
    seed: Optional[int] = None
    options: dict = field(default_factory=dict)
    input_name: str = "input"
    input_shape: list[int] = field(default_factory=list)  # static, batch 1, NHWC
    input_dtype: str = "float32"
    output_shape: list[int] = field(default_factory=list)
    num_classes: Optional[int] = None
    preprocessing: dict = field(default_factory=dict)
    labels: Optional[list[str]] = None
    parameters: Optional[int] = None
    trained: bool = True  # False for built-ins with --weights none


@dataclass
class Manifest:
    model: SourceModel
    artifacts: list[Artifact] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
    edgepipe_version: Optional[str] = None
    created: Optional[str] = None
    verify: bool = True
    calibration: Optional[dict] = None
    timings: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    cache_key: Optional[str] = None
    reference: Optional[dict] = None  # {"path": "reference.npz", ...}: source-model outputs
    extra: dict = field(default_factory=dict)

    # -- io ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, folder: str | os.PathLike) -> Path:
        if self.edgepipe_version is None:
            self.edgepipe_version = pkg_version("edgepipe")
        if self.created is None:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        v = d.get("schema_version")
        if not isinstance(v, int):
            raise UserError("manifest has no schema_version", "Re-run `edgepipe export` to write a new one")
        if v > SCHEMA_VERSION:
            raise UserError(
                f"manifest schema {v} is newer than this edgepipe understands ({SCHEMA_VERSION})",
                "Upgrade edgepipe (pip install -U edgepipe)",
            )
        model = _build(SourceModel, d["model"])
        arts = []
        for a in d.get("artifacts", []):
            a = dict(a)
            a["verification"] = _build(Verification, a.get("verification") or {})
            a["inputs"] = [_build(TensorInfo, t) for t in a.get("inputs", [])]
            a["outputs"] = [_build(TensorInfo, t) for t in a.get("outputs", [])]
            arts.append(_build(Artifact, a))
        top = {k: v for k, v in d.items() if k not in ("model", "artifacts")}
        return _build(cls, {**top, "model": model, "artifacts": arts})

    # -- queries ------------------------------------------------------------
    def artifact(self, artifact_id: str) -> Artifact:
        for a in self.artifacts:
            if a.id == artifact_id:
                return a
        raise UserError(f"no artifact '{artifact_id}' in the manifest",
                        f"Known: {', '.join(a.id for a in self.artifacts) or 'none'}")


def _build(cls: Any, d: dict) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def find_manifest(path: str | os.PathLike) -> Path:
    """A manifest file, or a folder holding one (directly or one level down)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / MANIFEST_NAME).is_file():
            return p / MANIFEST_NAME
        found = sorted(p.glob(f"*/{MANIFEST_NAME}"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(
                f"{p} holds {len(found)} model folders",
                f"Name one of them, e.g. {found[0].parent}",
            )
    raise UserError(f"no manifest at {p}", "Give the folder `edgepipe export` wrote (e.g. edgepipe-out/mobilenet)")


def load_manifest(path: str | os.PathLike) -> tuple[Manifest, Path]:
    """Load a manifest; returns it and the folder artifact paths are relative to."""
    mp = find_manifest(path)
    try:
        d = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read manifest {mp}: {e}", "Re-run `edgepipe export`") from e
    if not isinstance(d, dict) or "model" not in d:
        raise UserError(f"{mp} is not an edgepipe manifest", "Give the folder `edgepipe export` wrote")
    return Manifest.from_dict(d), mp.parent


TFLITE_MAGIC = b"TFL3"


def artifact_problem(art: Artifact, folder: str | os.PathLike, check_hash: bool = True) -> Optional[str]:
    """Why an artifact the manifest lists cannot be used (None when its file is there and intact).

    The one integrity check every later stage (bench, eval, check, remote runs) applies: the export
    produced it, the file exists and is not empty, its sha256 is the manifest's, and a .tflite file
    is a TFLite flatbuffer.
    """
    if art.status not in ("ok", "verify_failed"):
        return f"export failed: {art.error}" if art.status == "failed" and art.error else f"export {art.status}: no artifact"
    if not art.path:
        return f"artifact '{art.id}' has no path in the manifest"
    p = Path(folder) / art.path
    if not p.exists():
        return f"artifact file {art.path} is missing"
    if p.is_file() and p.stat().st_size == 0:
        return f"artifact file {art.path} is empty"
    if check_hash and art.sha256 and sha256_file(p) != art.sha256:
        return f"{art.path} changed since the export (sha256 differs from the manifest's)"
    if p.is_file() and p.suffix.lower() == ".tflite":
        with open(p, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or head[4:8] != TFLITE_MAGIC:
            return f"{art.path} is not a TFLite flatbuffer"
    return None
