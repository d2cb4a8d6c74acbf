"""The source model's outputs on a labelled set: computed once, cached beside the manifest.

The eval process never imports TensorFlow. The source model's predictions on a dataset are
computed in a child process (``python -m edgepipe.pipeline.source_predictions``) that rebuilds
the model from the manifest (``models.resolve/load``), checks it reproduces the export's
``reference.npz`` and predicts; they are cached in the model folder as
``source_predictions-<key>.npz``, ``key`` hashing the dataset's content (images at the model's
input size + labels) and the source model's identity. The export's recovery step, which holds
the model already, passes a ``predictor`` instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.pipeline import models, trace
from edgepipe.pipeline.base.errors import EdgepipeError, UserError
from edgepipe.pipeline.base.manifest import Manifest, load_manifest
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.util import atomic_path, quiet_tensorflow, sha256_file
from edgepipe.pipeline.datasets import LabelledSet
from edgepipe.pipeline.verify import compare

Progress = Callable[[str, dict], None]


def _noop(event: str, info: dict) -> None:
    pass


# --------------------------------------------------------------------------- the cache key
def source_identity(m: Manifest, folder: Path) -> dict:
    s = m.model
    ref = None
    if m.reference and m.reference.get("path") and (folder / m.reference["path"]).is_file():
        ref = sha256_file(folder / m.reference["path"])
    return {"name": s.name, "kind": s.kind, "sha256": s.sha256, "weights": s.weights, "seed": s.seed,
            "options": s.options, "preprocessing": s.preprocessing, "input_shape": s.input_shape,
            "output_shape": s.output_shape, "reference": ref}


def predictions_key(m: Manifest, folder: Path, ds: LabelledSet) -> str:
    payload = json.dumps({"dataset": ds.hash, "model": source_identity(m, folder)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def predictions_path(folder: Path, key: str) -> Path:
    return Path(folder) / f"source_predictions-{key}.npz"


# --------------------------------------------------------------------------- rebuilding the model
def load_source_model(m: Manifest, source_model: Optional[str] = None):
    """Rebuild/load the source model the manifest describes (imports TensorFlow)."""
    s = m.model
    _, h, w, _ = s.input_shape
    size = f"{h}x{w}"
    seed = s.seed if s.seed is not None else 0
    if s.kind == "builtin":
        weights = s.weights
        if weights not in ("imagenet", "none"):
            weights = _checked_file(source_model or s.path, s.sha256, "weights file")
        o = s.options or {}
        req = models.resolve(s.name, weights=weights, input_size=size, alpha=o.get("alpha"),
                             classes=o.get("classes"), seed=seed)
    else:
        path = _checked_file(source_model or s.path, s.sha256, "source model")
        req = models.resolve(path, input_size=size if s.kind != "savedmodel" else None, seed=seed)
    req.preprocessing = Preprocessing.from_dict(s.preprocessing)
    req.labels = s.labels
    return models.load(req)


def _checked_file(path: Optional[str], sha: Optional[str], what: str) -> str:
    if not path or not Path(path).exists():
        raise UserError(f"the {what} {path} recorded in the manifest is not there",
                        "Pass --source-model PATH (the file that was exported), or run eval where the export ran")
    if sha and sha256_file(path) != sha:
        raise UserError(f"the {what} {path} differs from the one that was exported (sha256 mismatch)",
                        "Give the exported file with --source-model, or re-run `edgepipe export`")
    return str(path)


def keras_predictor(lm, batch: int = 64) -> Callable[[np.ndarray], np.ndarray]:
    """Batched source-model outputs for preprocessed inputs (the trace's batch-1 path for SavedModels)."""
    if not lm.is_keras:
        return trace.trace(lm).reference

    def predict(x: np.ndarray) -> np.ndarray:
        outs = []
        for i in range(0, len(x), batch):
            y = lm.model(x[i:i + batch], training=False)
            if isinstance(y, dict):
                y = [y[k] for k in sorted(y)]
            if isinstance(y, (list, tuple)):
                y = y[0]
            outs.append(np.asarray(y, np.float32))
        return np.concatenate(outs).reshape(len(x), -1)

    return predict


def check_against_reference(predict: Callable, m: Manifest, folder: Path) -> dict:
    """Raise unless the (rebuilt) source model reproduces the export's reference outputs."""
    if not m.reference or not (folder / m.reference.get("path", "")).is_file():
        raise UserError(f"{folder} has no reference.npz to check the source model against",
                        "Re-run `edgepipe export` (it writes reference.npz)")
    with np.load(folder / m.reference["path"]) as z:
        data, ref = z["data"], z["outputs"]
    out = predict(data)
    c = compare(out.reshape(len(ref), -1), ref.reshape(len(ref), -1), "fp32")
    info = {"samples": int(len(ref)), "max_abs": c.max_abs, "centered_cosine": c.centered_cosine,
            "passed": c.passed}
    if not c.passed:
        raise UserError(
            f"the source model rebuilt from the manifest does not reproduce reference.npz ({'; '.join(c.failures)})",
            "The model file, weights or Keras version changed since the export: re-run `edgepipe export`")
    return info


def compute_source_predictions(folder: Path, raw: np.ndarray,
                               source_model: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Child-process side: rebuild, check against reference.npz, predict (imports TensorFlow)."""
    m, folder = load_manifest(folder)
    t0 = time.perf_counter()
    lm = load_source_model(m, source_model)
    predict = keras_predictor(lm)
    check = check_against_reference(predict, m, folder)
    t1 = time.perf_counter()
    out = predict(Preprocessing.from_dict(m.model.preprocessing).apply(raw).astype(np.float32))
    return out, {"reference_check": check, "load_s": round(t1 - t0, 3),
                 "predict_s": round(time.perf_counter() - t1, 3)}


# --------------------------------------------------------------------------- the child process
def _predict_in_subprocess(folder: Path, ds: LabelledSet, source_model: Optional[str]) -> tuple[np.ndarray, dict]:
    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as td:
        inp, outp, errp = Path(td) / "in.npy", Path(td) / "out.npz", Path(td) / "error.json"
        np.save(inp, ds.raw)
        cmd = [sys.executable, "-m", "edgepipe.pipeline.source_predictions", str(folder), str(inp),
               str(outp), str(errp)] + ([source_model] if source_model else [])
        env = {**os.environ}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if errp.is_file():
            e = json.loads(errp.read_text())
            cls = UserError if e.get("type") == "UserError" else EdgepipeError
            raise cls(e["message"], e.get("hint"))
        if r.returncode != 0 or not outp.is_file():
            tail = " | ".join((r.stderr or "").strip().splitlines()[-3:])
            raise EdgepipeError(f"computing the source model's predictions failed (exit {r.returncode}): {tail}",
                                "Re-run with --debug, or run `edgepipe export` again")
        with np.load(outp) as z:
            return z["outputs"], json.loads(str(z["info"]))


def child_main(argv: list[str]) -> int:
    """``python -m edgepipe.pipeline.source_predictions FOLDER IN.npy OUT.npz ERR.json [MODEL]``."""
    if len(argv) < 4:
        sys.stderr.write("usage: python -m edgepipe.pipeline.source_predictions FOLDER IN.npy OUT.npz ERR.json "
                         "[MODEL]\n")
        return 2
    folder, inp, outp, errp = (Path(a) for a in argv[:4])
    source_model = argv[4] if len(argv) > 4 else None
    try:
        quiet_tensorflow()
        out, info = compute_source_predictions(folder, np.load(inp), source_model)
    except EdgepipeError as e:
        errp.write_text(json.dumps({"type": type(e).__name__, "message": e.message, "hint": e.hint}))
        return 2
    with open(outp, "wb") as fh:
        np.savez(fh, outputs=out.astype(np.float32), info=json.dumps(info))
    return 0


# --------------------------------------------------------------------------- cached predictions
def _cached(path: Path, ds: LabelledSet) -> Optional[np.ndarray]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            out, labels = z["outputs"], z["labels"]
    except Exception:  # noqa: BLE001 - an unreadable cache is recomputed
        return None
    return out if len(out) == ds.n and np.array_equal(labels, ds.labels) else None


def source_predictions(m: Manifest, folder: Path, ds: LabelledSet, *, predictor: Optional[Callable] = None,
                       source_model: Optional[str] = None, progress: Progress = _noop) -> tuple[np.ndarray, dict]:
    """The source model's outputs on ``ds`` (N, K): from the folder's cache, else computed and cached.

    ``predictor`` (preprocessed inputs -> outputs) is used when the caller already holds the
    model (the export's recovery step); otherwise a child process rebuilds it, so this process
    stays free of TensorFlow.
    """
    key = predictions_key(m, folder, ds)
    path = predictions_path(folder, key)
    out = _cached(path, ds)
    if out is not None:
        return out, {"cached": True, "path": path.name, "key": key}
    t0 = time.perf_counter()
    if predictor is not None:
        out, info = predictor(ds.data(Preprocessing.from_dict(m.model.preprocessing))), {}
    else:
        progress("source", {"detail": "computing the source model's predictions (imports TensorFlow, once per dataset)"})
        out, info = _predict_in_subprocess(folder, ds, source_model)
    out = np.asarray(out, np.float32).reshape(ds.n, -1)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, outputs=out, labels=ds.labels, dataset_hash=ds.hash)
    return out, {"cached": False, "path": path.name, "key": key, "seconds": round(time.perf_counter() - t0, 3), **info}


if __name__ == "__main__":  # the source-prediction child process
    sys.exit(child_main(sys.argv[1:]))
