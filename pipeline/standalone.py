"""A .tflite or .onnx file that no `edgepipe export` wrote: bench and eval it without a manifest.

``file_manifest(path)`` describes the file the way an export's manifest would (one artifact, its
inputs and outputs, precision read from the file), in memory, so that the bench planner and the
eval loop run it like any exported artifact. There is no source model: eval reports absolute
accuracy only, with no drop against a source. Preprocessing, which eval needs, comes from (in
order) ``--preprocess``, the file's own metadata (edgepipe's ONNX ``metadata_props``), or a
``preprocessing.json`` beside it; without any of them eval refuses and says how to give it.
Results go to ``edgepipe-out/<file stem>/`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import MANIFEST_NAME, Artifact, Manifest, SourceModel, TensorInfo, Verification
from edgepipe.pipeline.base.preprocessing import MODES, Preprocessing
from edgepipe.pipeline.base.util import sha256_file, write_json_atomic
from edgepipe.pipeline.inspect_stage import inspect_artifact

FILE_SUFFIXES = (".tflite", ".onnx")
DEFAULT_OUT = Path("edgepipe-out")
_WHAT = "Give the folder `edgepipe export` wrote (e.g. edgepipe-out/mobilenet), its manifest.json, or a .tflite/.onnx file"
_DTYPES = {"float": "float32", "double": "float64"}


def is_artifact_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names one model file rather than an export (its folder or manifest.json).

    A wrong path or a file of an unknown type is a one-line UserError."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() == ".json":
        return False
    if not p.exists():
        raise UserError(f"{p} does not exist", _WHAT)
    if p.suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"{p} is not a .tflite or .onnx file, nor an export folder", _WHAT)
    return True


def default_out(path: str | os.PathLike) -> Path:
    """Where a standalone file's bench/eval results go by default: edgepipe-out/<stem>/."""
    return DEFAULT_OUT / Path(path).stem


def _precision(info: dict) -> str:
    if info["format"] == "tflite":
        q = info["quantization"]
        if q.startswith("dynamic"):
            return "dynamic"
        if q == "float16 weights":
            return "fp16"
        if info["quantized"]:
            return "int16x8" if "int16" in info.get("tensor_dtypes", {}) else "int8"
        return "fp32"
    if info["quantized"]:
        return "int8"
    dtypes = info.get("initializer_dtypes") or {}
    return "fp16" if dtypes.get("float16", 0) > dtypes.get("float", 0) else "fp32"


def _tensor(t: dict) -> TensorInfo:
    shape = [int(d) if isinstance(d, int) and d > 0 else -1 for d in (t.get("shape") or [])]
    q = t.get("quantization")
    dtype = _DTYPES.get(str(t["dtype"]), str(t["dtype"]))
    return TensorInfo(name=str(t["name"]), shape=shape, dtype=dtype, quantization=q if q and q.get("scale") else None)


def _onnx_metadata(path: Path) -> dict:
    """edgepipe's ONNX metadata_props (preprocessing, labels), when the file carries them."""
    import onnx  # heavy (~0.5 s): only for a standalone ONNX file

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - inspect already reported an unreadable file
        return {}
    props = {p.key: p.value for p in m.metadata_props}
    out = {}
    for key in ("preprocessing", "labels"):
        raw = props.get(f"edgepipe.{key}")
        if raw:
            try:
                out[key] = json.loads(raw)
            except ValueError:
                pass
    return out


def _sidecar(path: Path) -> dict:
    p = path.parent / "preprocessing.json"
    try:
        d = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {k: d[k] for k in ("preprocessing", "labels") if isinstance(d, dict) and d.get(k)}


def _preprocessing(path: Path, fmt: str, preprocess: Optional[str]) -> tuple[Optional[dict], Optional[list], str]:
    """(preprocessing dict or None, labels, where it came from)."""
    found = _onnx_metadata(path) if fmt == "onnx" else {}
    where = "file metadata"
    if not found.get("preprocessing"):
        found, where = _sidecar(path), "preprocessing.json"
    if preprocess is not None:
        if preprocess not in MODES:
            raise UserError(f"unknown --preprocess '{preprocess}'", f"Use one of: {', '.join(MODES)}")
        return Preprocessing.from_mode(preprocess).to_dict(), found.get("labels"), "--preprocess"
    return found.get("preprocessing"), found.get("labels"), where


def file_manifest(path: str | os.PathLike, preprocess: Optional[str] = None) -> Manifest:
    """An in-memory manifest for one standalone .tflite/.onnx file (its path is absolute)."""
    is_artifact_file(path)  # raises for a wrong path or type
    p = Path(path).resolve()
    info = inspect_artifact(p)
    fmt = info["format"]
    ins, outs = [_tensor(t) for t in info["inputs"]], [_tensor(t) for t in info["outputs"]]
    if not ins or not outs:
        raise UserError(f"{p} has no inputs or no outputs", "Give a model file with one image input")
    pp, labels, where = _preprocessing(p, fmt, preprocess)
    out_shape = outs[0].shape
    classes = out_shape[-1] if len(out_shape) == 2 and out_shape[-1] > 1 else None
    src = SourceModel(name=p.stem, kind="file", path=str(p), sha256=None, input_name=ins[0].name,
                      input_shape=[1 if d < 1 else d for d in ins[0].shape], input_dtype=ins[0].dtype,
                      output_shape=out_shape, num_classes=classes, preprocessing=pp or {}, labels=labels,
                      trained=True, options={"preprocessing_from": where if pp else None})
    precision = _precision(info)
    art = Artifact(id=f"{fmt}-{precision}", format=fmt, precision=precision, path=str(p), status="ok",
                   sha256=sha256_file(p), size_bytes=p.stat().st_size, inputs=ins, outputs=outs,
                   verification=Verification(status="not_verified",
                                             reason="a standalone file: no source model to verify against"))
    return Manifest(model=src, artifacts=[art], verify=False, extra={"standalone": True})


def write_file_manifest(m: Manifest, folder: Path) -> Path:
    """Save the in-memory manifest into a (temporary) folder for the planners that read one."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MANIFEST_NAME, m.to_dict())
    return folder / MANIFEST_NAME


def require_preprocessing(m: Manifest, path: str | os.PathLike) -> None:
    """Eval needs to know how the model expects its pixels."""
    if not m.model.preprocessing:
        raise UserError(f"{path} records no preprocessing (how the model expects its pixels)",
                        f"Pass --preprocess {'|'.join(MODES)} (e.g. unit for x/255, tf for x/127.5-1)")
    shape = m.model.input_shape
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise UserError(f"{path} takes input {shape}, not one NHWC image with 1 or 3 channels",
                        "edgepipe eval runs image classifiers with channels-last input (1, H, W, C)")
