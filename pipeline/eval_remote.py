"""`edgepipe eval --device NAME`: accuracy of the TFLite/ONNX artifacts on a registered ssh/adb device.

Every artifact runs on the device's cpu through the agent's predict mode, in one session (the
preprocessed inputs are written once); the outputs come back and are scored here exactly like
a local row. A device that cannot be reached fails each row with the reason, never the others.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepipe.devices import Registry, TransportError, make_runner
from edgepipe.devices import runtimes_for
from edgepipe.pipeline.base.evaluation import EvalRow
from edgepipe.pipeline.base.manifest import Artifact
from edgepipe.pipeline.eval_artifacts import EvalContext, artifact_path, base_row, metrics_row, pick_output

DEVICE_FORMATS = ("tflite", "onnx")


def _runtime_name(fmt: str) -> str | None:
    rts = runtimes_for(fmt, "cpu") if fmt in DEVICE_FORMATS else []
    return rts[0].name if rts else None


def evaluate_on_device(runner, path: Path, row: EvalRow, inputs_npz: Path, ctx: EvalContext) -> EvalRow:
    """One artifact on a remote device (target cpu there) through the agent's predict mode."""
    row.target, row.runtime = "cpu", _runtime_name(row.format)
    why = runner.predict_reason(row.format, "cpu")
    if why:
        row.status, row.reason = "skipped", why
        return row
    try:
        outs, info = runner.predict(path, row.format, inputs_npz, "cpu", ctx.threads or 0)
    except TransportError as e:
        row.status, row.reason = "error", e.one_line()
        return row
    n = ctx.ds.n
    ys = [np.asarray(outs[k], np.float32) for k in sorted(outs, key=lambda k: int(k.rsplit("_", 1)[-1]))]
    if not ys:
        row.status, row.reason = "error", f"the agent on {runner.name} returned no outputs"
        return row
    out = ys[pick_output([y.reshape(n, -1) for y in ys], ctx.num_classes)].reshape(n, -1)
    rt = info.get("runtime") or {}
    facts = {"device_runtime": rt.get("name"), "runtime_version": rt.get("version"), "python": info.get("python"),
             "threads": info.get("threads")}
    ctx.progress("images", {"count": n})
    return metrics_row(row, out, ctx, float(info.get("load_ms") or 0) / 1000.0, float(info.get("predict_s") or 0.0),
                       facts)


def evaluate_remote(device: str, config: str | None, arts: Sequence[Artifact], folder: Path,
                    ctx: EvalContext) -> list[EvalRow]:
    """Every artifact on one registered device, in one session."""
    registry = Registry(config)
    runner = make_runner(registry.get(device), registry)
    rows = []
    ctx.progress("stage", {"name": f"connecting to {device}"})
    ctx.progress("plan", {"jobs": len(arts), "images": len(arts) * ctx.ds.n})
    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as td, runner:
        inputs = Path(td) / "eval_inputs.npz"
        np.savez(inputs, inputs=np.asarray(ctx.data, np.float32))
        for a in arts:
            ctx.progress("start", {"id": a.id, "where": f"cpu@{device}"})
            rows.append(_one(runner, a, folder, inputs, ctx, device))
            ctx.progress("done", {"row": rows[-1]})
    return rows


def _one(runner, a: Artifact, folder: Path, inputs: Path, ctx: EvalContext, device: str) -> EvalRow:
    path, err = artifact_path(a, folder)
    if err is not None:
        err.device = device
        return err
    row = base_row(a)
    row.device = device
    if runner.error is not None:
        row.target, row.runtime = "cpu", None
        row.status, row.reason = "error", f"{device}: {runner.error.one_line()}"
        return row
    return evaluate_on_device(runner, path, row, inputs, ctx)
