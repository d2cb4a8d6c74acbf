"""`edgepipe eval`: accuracy of the source model and of every artifact on a labelled set.

For each artifact and each target a runtime can run it on here (cpu, gpu, reference), the
labelled images are run through the runtime seam (``edgepipe.devices.runtimes``) and compared with
the labels (top-1, top-5) and with the source model's own predictions (agreement). The drop of
an artifact is ``source metric - artifact metric`` in percentage points on the same images
(for agreement: ``100 - agreement``, since the source agrees with itself).

Throughput: this process never imports TensorFlow. The source model's predictions on a
dataset are computed once, in a child process that rebuilds the model from the manifest
(``models.resolve/load``), checks it against ``reference.npz`` and predicts; they are cached
in the model folder as ``source_predictions-<key>.npz``, ``key`` hashing the dataset's content
(images at the model's input size + labels) and the source model's identity. The artifact loop
quantizes the whole set once, calls ``Session.run_native`` per image and dequantizes once, so
it costs little more than a bare interpreter loop (``benchmarks/bench_eval.py``).

eval.json (next to manifest.json; ``schema_version`` 1) is what ``edgepipe check`` reads:
``dataset`` (source, split, samples, hash, class mapping), ``source`` (metrics), ``results``
(one row per artifact x target: status ok | skipped | error, metrics, drops, artifact sha256,
images/s). Metrics are percentages.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from edgepipe.pipeline.datasets import DEFAULT_MIN_SAMPLES, LabelledSet, load_labelled
from edgepipe.pipeline.base.errors import EdgepipeError, UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, load_manifest
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.util import atomic_path, pkg_version, sha256_file, write_json_atomic

EVAL_NAME = "eval.json"
EVAL_SCHEMA_VERSION = 1
METRICS = ("top1", "top5", "agreement")
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "agreement": "agreement"}
DEFAULT_TARGETS = ("cpu", "gpu", "reference")

Progress = Callable[[str, dict], None]


def _noop(event: str, info: dict) -> None:
    pass


@dataclass
class EvalRequest:
    model_dir: str | os.PathLike  # OUT/<model>, or its manifest.json
    data: str  # ImageFolder directory or "digits"
    targets: Optional[Sequence[str]] = None  # default: every target available here
    limit: Optional[int] = None
    min_samples: int = DEFAULT_MIN_SAMPLES
    labels_map: Optional[str] = None
    source_model: Optional[str] = None  # the source model file, when it moved since the export
    threads: Optional[int] = None
    seed: int = 0
    artifacts: Optional[Sequence[str]] = None  # artifact ids; default all
    device: Optional[str] = None  # a registered remote device (devices/remote.py); None/"local": here
    config: Optional[str] = None  # the device registry (default: $EDGEPIPE_CONFIG or ~/.config/edgepipe)


# --------------------------------------------------------------------------- metrics
def topk_hits(outputs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, outputs.shape[1])
    top = np.argpartition(-outputs, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def classification_metrics(outputs: np.ndarray, labels: np.ndarray,
                           source_pred: Optional[np.ndarray] = None) -> dict:
    """top-1 / top-5 (percent), and agreement with the source's top-1 when given."""
    outputs = np.asarray(outputs, np.float32).reshape(len(labels), -1)
    pred = outputs.argmax(axis=1)
    correct = pred == labels
    d = {"top1": 100.0 * float(correct.mean()), "top5": 100.0 * float(topk_hits(outputs, labels, 5).mean()),
         "correct": int(correct.sum()), "samples": int(len(labels))}
    if not np.isfinite(outputs).all():
        d["non_finite"] = int((~np.isfinite(outputs)).any(axis=1).sum())
    if source_pred is not None:
        d["agreement"] = 100.0 * float((pred == source_pred).mean())
        src_correct = source_pred == labels
        d["lost"] = int((src_correct & ~correct).sum())  # right before, wrong now
        d["gained"] = int((~src_correct & correct).sum())
    return d


def drops(source: dict, art: dict) -> dict:
    return {"top1": source["top1"] - art["top1"], "top5": source["top5"] - art["top5"],
            "agreement": 100.0 - art["agreement"]}


# --------------------------------------------------------------------------- the source model
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


def load_source_model(m: Manifest, source_model: Optional[str] = None):
    """Rebuild/load the source model the manifest describes (imports TensorFlow)."""
    from edgepipe.pipeline import models

    s = m.model
    pp = Preprocessing.from_dict(s.preprocessing)
    _, h, w, _ = s.input_shape
    size = f"{h}x{w}"
    if s.kind == "builtin":
        weights = s.weights
        if weights not in ("imagenet", "none"):
            weights = _checked_file(source_model or s.path, s.sha256, "weights file")
        o = s.options or {}
        req = models.resolve(s.name, weights=weights, input_size=size, alpha=o.get("alpha"),
                             classes=o.get("classes"), seed=s.seed if s.seed is not None else 0)
    else:
        path = _checked_file(source_model or s.path, s.sha256, "source model")
        req = models.resolve(path, input_size=size if s.kind != "savedmodel" else None,
                             seed=s.seed if s.seed is not None else 0)
    req.preprocessing = pp
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
        from edgepipe.pipeline import trace

        traced = trace.trace(lm)
        return traced.reference

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
    from edgepipe.pipeline.verify import compare

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


def compute_source_predictions(folder: Path, raw: np.ndarray, source_model: Optional[str] = None) -> tuple[np.ndarray, dict]:
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


def _predict_in_subprocess(folder: Path, ds: LabelledSet, source_model: Optional[str]) -> tuple[np.ndarray, dict]:
    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as td:
        inp, outp, errp = Path(td) / "in.npy", Path(td) / "out.npz", Path(td) / "error.json"
        np.save(inp, ds.raw)
        cmd = [sys.executable, "-m", "edgepipe.pipeline.evaluate", "source-predictions", str(folder), str(inp),
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


def _child_main(argv: list[str]) -> int:
    folder, inp, outp, errp = (Path(a) for a in argv[:4])
    source_model = argv[4] if len(argv) > 4 else None
    try:
        from edgepipe.pipeline.base.util import quiet_tensorflow

        quiet_tensorflow()
        out, info = compute_source_predictions(folder, np.load(inp), source_model)
    except EdgepipeError as e:
        errp.write_text(json.dumps({"type": type(e).__name__, "message": e.message, "hint": e.hint}))
        return 2
    with open(outp, "wb") as fh:
        np.savez(fh, outputs=out.astype(np.float32), info=json.dumps(info))
    return 0


def source_predictions(m: Manifest, folder: Path, ds: LabelledSet, *, predictor: Optional[Callable] = None,
                       source_model: Optional[str] = None, progress: Progress = _noop) -> tuple[np.ndarray, dict]:
    """The source model's outputs on ``ds`` (N, K): from the folder's cache, else computed and cached.

    ``predictor`` (preprocessed inputs -> outputs) is used when the caller already holds the
    model (the export's recovery step); otherwise a child process rebuilds it, so this process
    stays free of TensorFlow.
    """
    key = predictions_key(m, folder, ds)
    path = predictions_path(folder, key)
    if path.is_file():
        try:
            with np.load(path) as z:
                out, labels = z["outputs"], z["labels"]
            if len(out) == ds.n and np.array_equal(labels, ds.labels):
                return out, {"cached": True, "path": path.name, "key": key}
        except Exception:
            pass  # unreadable cache: recompute
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


# --------------------------------------------------------------------------- artifacts
def pick_output(outs: list[np.ndarray], num_classes: int) -> int:
    for i, o in enumerate(outs):
        if o.shape[-1] == num_classes:
            return i
    return 0


def run_session(session, ds: LabelledSet, data: np.ndarray, num_classes: int) -> np.ndarray:
    """All images through one loaded session, batch of 1; (N, K) float outputs."""
    from edgepipe.devices.runtimes.base import dequantize, quantize

    n = ds.n
    if getattr(session, "input_kind", "tensor") == "image":  # Core ML ImageType: raw 0-255 pixels
        outs = []
        for i in range(n):
            ys = session.run([ds.raw[i:i + 1]])
            outs.append(np.asarray(ys[pick_output(ys, num_classes)], np.float32).reshape(1, -1))
        return np.concatenate(outs)
    native = quantize(data, session.inputs[0])  # once for the whole set
    run = session.run_native
    first = run([native[0:1]])
    j = pick_output(first, num_classes)
    outs = [first[j]]
    append = outs.append
    for i in range(1, n):  # the hot loop: nothing but the runtime call
        append(run([native[i:i + 1]])[j])
    return dequantize(np.concatenate(outs), session.outputs[j]).reshape(n, -1).astype(np.float32)


def evaluate_file(path: Path, fmt: str, runtime, ds: LabelledSet, data: np.ndarray, source: dict,
                  source_pred: np.ndarray, num_classes: int, threads: Optional[int] = None) -> dict:
    """One artifact file on one runtime: a result row (status ok | skipped | error)."""
    from edgepipe.devices.runtimes.base import RunOptions

    row = {"target": runtime.target, "runtime": runtime.name}
    why = runtime.check(path, fmt)
    if why:
        return {**row, "status": "skipped", "reason": why}
    try:
        t0 = time.perf_counter()
        with runtime.load(path, RunOptions(threads=threads)) as s:
            t1 = time.perf_counter()
            out = run_session(s, ds, data, num_classes)
            secs = time.perf_counter() - t1
            facts = {k: v for k, v in (getattr(s, "facts", {}) or {}).items()
                     if isinstance(v, (str, int, float, bool)) or v is None}
    except Exception as e:
        from edgepipe.pipeline.base.errors import UnsupportedArtifact

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        status = "skipped" if isinstance(e, UnsupportedArtifact) else "error"
        return {**row, "status": status, "reason": f"{type(e).__name__}: {first}"}
    return metrics_row(row, out, ds, source, source_pred, num_classes, t1 - t0, secs, facts)


def metrics_row(row: dict, out: np.ndarray, ds: LabelledSet, source: dict, source_pred: np.ndarray,
                num_classes: int, load_s: float, secs: float, facts: dict) -> dict:
    """An artifact's (N, K) outputs -> its result row (metrics, drops vs the source)."""
    if out.shape != (ds.n, num_classes):
        return {**row, "status": "error",
                "reason": f"artifact outputs {out.shape[1:]} per image, the source model {num_classes} classes"}
    met = classification_metrics(out, ds.labels, source_pred)
    return {**row, "status": "ok", **{k: met[k] for k in ("top1", "top5", "agreement")},
            "drop": drops(source, met), "correct": met["correct"], "lost": met["lost"], "gained": met["gained"],
            "non_finite": met.get("non_finite", 0), "samples": ds.n, "load_s": round(load_s, 4),
            "seconds": round(secs, 4), "images_per_s": round(ds.n / secs, 1) if secs > 0 else None,
            "facts": facts}


def evaluate_on_device(runner, path: Path, fmt: str, ds: LabelledSet, inputs_npz: Path, source: dict,
                       source_pred: np.ndarray, num_classes: int, threads: Optional[int] = None) -> dict:
    """One artifact on a remote device (target cpu there) through the agent's predict mode."""
    from edgepipe.devices import TransportError, runtime_name

    row = {"target": "cpu", "runtime": runtime_name(fmt, "cpu") if fmt in ("tflite", "onnx") else None}
    why = runner.predict_reason(fmt, "cpu")
    if why:
        return {**row, "status": "skipped", "reason": why}
    try:
        outs, info = runner.predict(path, fmt, inputs_npz, "cpu", threads or 0)
    except TransportError as e:
        return {**row, "status": "error", "reason": e.one_line()}
    ys = [np.asarray(outs[k], np.float32) for k in sorted(outs, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    if not ys:
        return {**row, "status": "error", "reason": f"the agent on {runner.name} returned no outputs"}
    out = ys[pick_output([y.reshape(ds.n, -1) for y in ys], num_classes)].reshape(ds.n, -1)
    rt = info.get("runtime") or {}
    facts = {"device_runtime": rt.get("name"), "runtime_version": rt.get("version"), "python": info.get("python"),
             "threads": info.get("threads")}
    return metrics_row(row, out, ds, source, source_pred, num_classes, float(info.get("load_ms") or 0) / 1000.0,
                       float(info.get("predict_s") or 0.0), facts)


def _runtimes(fmt: str, targets: Sequence[str]) -> list:
    from edgepipe.devices.runtimes.base import runtimes_for

    return [rt for t in targets for rt in runtimes_for(fmt, t)]


def resolve_targets(targets: Optional[Sequence[str] | str]) -> tuple[list[str], bool]:
    """(targets, explicit). Default: every target edgepipe knows except edgetpu."""
    from edgepipe.devices.runtimes.base import parse_targets

    if targets is None or targets == "" or targets == []:
        return list(DEFAULT_TARGETS), False
    if isinstance(targets, str):
        return parse_targets(targets), True
    return parse_targets(",".join(targets)), True


def validate(req: EvalRequest) -> tuple[Manifest, Path, list[str], bool]:
    """Cheap checks before any expensive work."""
    from edgepipe.pipeline.datasets import check_spec

    m, folder = load_manifest(req.model_dir)
    check_spec(req.data)
    targets, explicit = resolve_targets(req.targets)
    if req.artifacts:
        for a in req.artifacts:
            m.artifact(a)  # raises UserError for unknown ids
    if req.device and req.device != "local":
        from edgepipe.devices import Registry

        Registry(req.config).get(req.device)  # UserError naming the registry when unknown
        if explicit and targets != ["cpu"]:
            raise UserError(f"--device {req.device} evaluates on the device's cpu; --targets {','.join(targets)} "
                            f"cannot be combined with it", "Leave --targets out (or use --targets cpu)")
        targets, explicit = ["cpu"], True
    return m, folder, targets, explicit


def evaluate(req: EvalRequest, progress: Progress = _noop, predictor: Optional[Callable] = None) -> dict:
    """Run the evaluation, write eval.json next to the manifest and return its content."""
    m, folder, targets, explicit = validate(req)
    src = m.model
    t_start = time.perf_counter()
    progress("stage", {"name": "loading eval data", "detail": req.data})
    ds = load_labelled(req.data, src.input_shape, src.num_classes, labels_map=req.labels_map,
                       model_labels=src.labels, limit=req.limit, min_samples=req.min_samples, seed=req.seed)
    k = int(src.num_classes)
    pp = Preprocessing.from_dict(src.preprocessing)
    data = ds.data(pp)
    progress("stage", {"name": "source model predictions"})
    src_out, src_info = source_predictions(m, folder, ds, predictor=predictor, source_model=req.source_model,
                                           progress=progress)
    if src_out.shape != (ds.n, k):
        raise UserError(f"cached source predictions have shape {src_out.shape}, expected {(ds.n, k)}",
                        f"Delete {src_info.get('path')} and re-run")
    src_pred = src_out.argmax(axis=1)
    smet = classification_metrics(src_out, ds.labels)
    source = {"top1": smet["top1"], "top5": smet["top5"], "correct": smet["correct"], "samples": ds.n,
              "predictions": src_info}

    arts = [a for a in m.artifacts if not req.artifacts or a.id in req.artifacts]
    results = []
    progress("artifacts", {"total": len(arts)})
    device = req.device if req.device and req.device != "local" else None
    if device is None:
        for a in arts:
            progress("artifact", {"id": a.id})
            results.extend(_evaluate_artifact(a, folder, targets, explicit, ds, data, source, src_pred, k,
                                              req.threads))
    else:
        results = _evaluate_remote(req, device, arts, folder, ds, data, source, src_pred, k, progress)
    for r in results:
        r.setdefault("device", device or "local")
    out = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "kind": "edgepipe-eval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgepipe_version": pkg_version("edgepipe"),
        "model": src.name,
        "manifest": "manifest.json",
        "targets": targets,
        "device": device or "local",
        "unit": "percent",
        "dataset": ds.describe(),
        "source": source,
        "results": results,
        "seconds": round(time.perf_counter() - t_start, 3),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }
    write_json_atomic(folder / EVAL_NAME, out)
    return out


def _evaluate_remote(req: EvalRequest, device: str, arts, folder: Path, ds, data, source, src_pred, k,
                     progress: Progress) -> list[dict]:
    """Every artifact on one registered device, in one session (the inputs are written once)."""
    from edgepipe.devices import Registry, make_runner

    registry = Registry(req.config)
    runner = make_runner(registry.get(device), registry)
    results = []
    progress("stage", {"name": f"connecting to {device}"})
    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as td, runner:
        inputs = Path(td) / "eval_inputs.npz"
        np.savez(inputs, inputs=np.asarray(data, np.float32))
        for a in arts:
            progress("artifact", {"id": f"{a.id} on {device}"})
            base, path, err = _artifact_file(a, folder)
            if err:
                results.append({**base, **err, "device": device})
                continue
            if runner.error is not None:
                results.append({**base, "target": "cpu", "runtime": None, "status": "error", "device": device,
                                "reason": f"{device}: {runner.error.one_line()}"})
                continue
            results.append({**base, **evaluate_on_device(runner, path, a.format, ds, inputs, source, src_pred, k,
                                                         req.threads), "device": device})
    return results


def _artifact_file(a: Artifact, folder: Path) -> tuple[dict, Optional[Path], Optional[dict]]:
    """(row base, the artifact's path, an error row when the file cannot be evaluated)."""
    base = {"artifact": a.id, "format": a.format, "precision": a.precision, "sha256": a.sha256,
            "verification": a.verification.status}
    if not a.path:
        return base, None, {"target": None, "runtime": None, "status": "error",
                            "reason": f"export failed: {a.error or a.status}"}
    path = folder / a.path
    if not path.exists():
        return base, None, {"target": None, "runtime": None, "status": "error",
                            "reason": f"artifact file {a.path} is missing"}
    if a.sha256 and sha256_file(path) != a.sha256:
        return base, None, {"target": None, "runtime": None, "status": "error",
                            "reason": f"{a.path} changed since the export (sha256 differs from the manifest's)"}
    return base, path, None


def _evaluate_artifact(a: Artifact, folder: Path, targets, explicit, ds, data, source, src_pred, k, threads) -> list[dict]:
    base = {"artifact": a.id, "format": a.format, "precision": a.precision, "sha256": a.sha256,
            "verification": a.verification.status}
    if not a.path:
        return [{**base, "target": None, "runtime": None, "status": "error",
                 "reason": f"export failed: {a.error or a.status}"}]
    path = folder / a.path
    if not path.exists():
        return [{**base, "target": None, "runtime": None, "status": "error", "reason": f"artifact file {a.path} is missing"}]
    if a.sha256 and sha256_file(path) != a.sha256:
        return [{**base, "target": None, "runtime": None, "status": "error",
                 "reason": f"{a.path} changed since the export (sha256 differs from the manifest's)"}]
    rts = _runtimes(a.format, targets)
    rows = []
    for rt in rts:
        rows.append({**base, **evaluate_file(path, a.format, rt, ds, data, source, src_pred, k, threads)})
    if not rows:
        rows.append({**base, "target": None, "runtime": None, "status": "skipped",
                     "reason": f"no runtime runs {a.format} artifacts on {', '.join(targets)}"})
    elif not explicit:
        # Default targets: keep a target's "skipped" row only when no other target ran the artifact.
        ran = [r for r in rows if r["status"] != "skipped"]
        if ran:
            rows = ran
    return rows


# --------------------------------------------------------------------------- reading eval.json
def load_eval(folder: str | os.PathLike) -> tuple[dict, Path]:
    """eval.json of a model folder (or beside a manifest)."""
    from edgepipe.pipeline.base.manifest import find_manifest

    p = Path(folder)
    if p.is_file() and p.name == EVAL_NAME:
        path = p
    else:
        path = find_manifest(p).parent / EVAL_NAME
    if not path.is_file():
        raise UserError(f"no {EVAL_NAME} in {path.parent}",
                        f"Run `edgepipe eval {path.parent} --data DIR|digits` first")
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}", "Re-run `edgepipe eval`") from e
    v = d.get("schema_version") if isinstance(d, dict) else None
    if not isinstance(v, int) or d.get("kind") != "edgepipe-eval":
        raise UserError(f"{path} is not an edgepipe eval file", "Re-run `edgepipe eval`")
    if v > EVAL_SCHEMA_VERSION:
        raise UserError(f"{path} has schema {v}, newer than this edgepipe understands ({EVAL_SCHEMA_VERSION})",
                        "Upgrade edgepipe")
    return d, path


if __name__ == "__main__":  # the source-prediction child process
    if len(sys.argv) >= 5 and sys.argv[1] == "source-predictions":
        sys.exit(_child_main(sys.argv[2:]))
    sys.stderr.write("usage: python -m edgepipe.pipeline.evaluate source-predictions FOLDER IN.npy OUT.npz ERR.json [MODEL]\n")
    sys.exit(2)
