"""The eval artifact loop: each artifact on each target a runtime runs it on here -> EvalRows.

Planning comes first (``plan``): every (artifact, runtime) pair is either a job or a row saying
why not (export failed, file changed, runtime unavailable, or a slow target left out by
default), so the progress display knows the total before the first image runs.

Default targets are the fast ones: ``cpu``, and ``gpu`` where the GPU is hardware. The software
GPU (lavapipe, ~1 image/s) and the Core ML reference interpreter (~3 images/s at 224 px) run
only when asked for (``--targets gpu,reference`` or ``all``); an artifact that only a slow target
could run gets a "skipped" row saying how to ask.

The hot loop quantizes the whole set once, calls ``Session.run_native`` per image and
dequantizes once, so it costs little more than a bare interpreter loop
(``benchmarks/bench_eval.py``); progress is reported every ``CHUNK`` images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from edgepipe.devices.measure.host import probe_target
from edgepipe.devices import RunOptions, Runtime, dequantize, quantize, runtimes_for
from edgepipe.pipeline.base.errors import UnsupportedArtifact
from edgepipe.pipeline.base.evaluation import EvalRow, classification_metrics, drops, topk_hits
from edgepipe.pipeline.base.manifest import Artifact, artifact_problem
from edgepipe.pipeline.datasets import LabelledSet
from edgepipe.pipeline.fidelity.stats import class_counts

EVAL_TARGETS = ("cpu", "gpu", "reference")  # the default targets, before the slow ones are left out
CHUNK = 64  # images between two progress reports

Progress = Callable[[str, dict], None]


def _noop(event: str, info: dict) -> None:
    pass


@dataclass
class EvalContext:
    """What every row needs: the set, preprocessed, and the source model's figures (None for a
    standalone artifact, which then gets absolute accuracy only)."""

    ds: LabelledSet
    data: np.ndarray
    num_classes: int
    source: Optional[dict] = None
    source_pred: Optional[np.ndarray] = None
    threads: Optional[int] = None
    progress: Progress = field(default=_noop)
    source_top5: Optional[np.ndarray] = None  # per image: is the label among the source's top 5


@dataclass
class Job:
    row: EvalRow
    path: Path
    runtime: Runtime


# --------------------------------------------------------------------------- targets
def slow_reason(rt: Runtime, fmt: str) -> Optional[str]:
    """Why a runtime is too slow to run by default (None when it is fast)."""
    if rt.target == "reference":
        return f"{rt.name} is an interpreter (a few images/s)"
    if rt.target == "gpu":
        adapters = (probe_target("gpu").get(fmt) or {}).get("vulkan_adapters") or []
        if adapters and all(a.get("type") == "cpu" for a in adapters):
            return f"the GPU here is software ({adapters[0].get('name', 'lavapipe')}, about 1 image/s)"
    return None


# --------------------------------------------------------------------------- planning
def base_row(a: Artifact) -> EvalRow:
    return EvalRow(artifact=a.id, format=a.format, precision=a.precision, sha256=a.sha256,
                   verification=a.verification.status)


def artifact_path(a: Artifact, folder: Path) -> tuple[Optional[Path], Optional[EvalRow]]:
    """(the artifact's file, or an error row when it cannot be evaluated)."""
    why = artifact_problem(a, folder)
    if why:
        row = base_row(a)
        row.status, row.reason = "error", why
        return None, row
    return Path(folder) / a.path, None


def _plan_one(a: Artifact, folder: Path, targets: Sequence[str], explicit: bool) -> list[Union[Job, EvalRow]]:
    path, err = artifact_path(a, folder)
    if err is not None:
        return [err]
    items: list[Union[Job, EvalRow]] = []
    for rt in (rt for t in targets for rt in runtimes_for(a.format, t)):
        row = base_row(a)
        row.target, row.runtime = rt.target, rt.name
        why = rt.check(path, a.format)
        slow = None if (why or explicit) else slow_reason(rt, a.format)
        if why or slow:
            row.status = "skipped"
            row.reason = why or f"not run by default: {slow}; ask for it with --targets {rt.target}"
            items.append(row)
        else:
            items.append(Job(row, path, rt))
    if not items:
        row = base_row(a)
        row.status, row.reason = "skipped", f"no runtime runs {a.format} artifacts on {', '.join(targets)}"
        return [row]
    if not explicit and any(isinstance(i, Job) for i in items):
        # default targets: keep a target's "skipped" row only when no other target runs the artifact
        items = [i for i in items if isinstance(i, Job)]
    return items


def plan(arts: Sequence[Artifact], folder: Path, targets: Sequence[str], explicit: bool) -> list[Union[Job, EvalRow]]:
    return [item for a in arts for item in _plan_one(a, folder, targets, explicit)]


# --------------------------------------------------------------------------- running
def pick_output(outs: list[np.ndarray], num_classes: int) -> int:
    for i, o in enumerate(outs):
        if o.shape[-1] == num_classes:
            return i
    return 0


def _run_images(session, ds: LabelledSet, num_classes: int, tick: Callable[[int], None]) -> np.ndarray:
    """Core ML ImageType inputs: raw 0-255 pixels, one image at a time (slow runtimes: tick each)."""
    outs = []
    for i in range(ds.n):
        ys = session.run([ds.raw[i:i + 1]])
        outs.append(np.asarray(ys[pick_output(ys, num_classes)], np.float32).reshape(1, -1))
        tick(1)
    return np.concatenate(outs)


def run_session(session, ds: LabelledSet, data: np.ndarray, num_classes: int,
                tick: Callable[[int], None] = lambda k: None) -> np.ndarray:
    """All images through one loaded session, batch of 1; (N, K) float outputs."""
    n = ds.n
    if getattr(session, "input_kind", "tensor") == "image":
        return _run_images(session, ds, num_classes, tick)
    native = quantize(data, session.inputs[0])  # once for the whole set
    run = session.run_native
    first = run([native[0:1]])
    j = pick_output(first, num_classes)
    outs = [first[j]]
    append = outs.append
    tick(1)
    for start in range(1, n, CHUNK):
        end = min(n, start + CHUNK)
        for i in range(start, end):  # the hot loop: nothing but the runtime call
            append(run([native[i:i + 1]])[j])
        tick(end - start)
    return dequantize(np.concatenate(outs), session.outputs[j]).reshape(n, -1).astype(np.float32)


def metrics_row(row: EvalRow, out: np.ndarray, ctx: EvalContext, load_s: float, secs: float,
                facts: dict) -> EvalRow:
    """An artifact's (N, K) outputs -> its result row (metrics; drops when there is a source model)."""
    ds, k = ctx.ds, ctx.num_classes
    if out.shape != (ds.n, k):
        row.status = "error"
        row.reason = f"artifact outputs {out.shape[1:]} per image, the source model {k} classes"
        return row
    met = classification_metrics(out, ds.labels, ctx.source_pred)
    row.status, row.top1, row.top5, row.correct = "ok", met["top1"], met["top5"], met["correct"]
    if ctx.source is not None:
        row.agreement, row.drop = met["agreement"], drops(ctx.source, met)
        row.lost, row.gained = met["lost"], met["gained"]
        _flip_counts(row, out, ctx)
    row.non_finite, row.samples = met.get("non_finite", 0), ds.n
    row.load_s, row.seconds = round(load_s, 4), round(secs, 4)
    row.images_per_s = round(ds.n / secs, 1) if secs > 0 else None
    row.facts = facts
    return row


def _flip_counts(row: EvalRow, out: np.ndarray, ctx: EvalContext) -> None:
    """The counts `check` builds intervals from: per-class flips, and top-5 flips when the source's are known."""
    if ctx.source_pred is None:
        return
    pred, labels = out.argmax(axis=1), ctx.ds.labels
    row.per_class = [list(c) for c in class_counts(ctx.source_pred, pred, labels)]
    row.per_class_agreement = [list(c) for c in class_counts(ctx.source_pred, pred, None)]
    if ctx.source_top5 is not None:
        hits = topk_hits(out, labels, 5)
        row.top5_lost = int((ctx.source_top5 & ~hits).sum())
        row.top5_gained = int((~ctx.source_top5 & hits).sum())


def evaluate_file(path: Path, fmt: str, runtime: Runtime, row: EvalRow, ctx: EvalContext) -> EvalRow:
    """One artifact file on one runtime: the row, filled (status ok | skipped | error)."""
    row.target, row.runtime = runtime.target, runtime.name
    why = runtime.check(path, fmt)
    if why:
        row.status, row.reason = "skipped", why
        return row
    tick = lambda k: ctx.progress("images", {"count": k})  # noqa: E731
    try:
        t0 = time.perf_counter()
        with runtime.load(path, RunOptions(threads=ctx.threads)) as s:
            t1 = time.perf_counter()
            out = run_session(s, ctx.ds, ctx.data, ctx.num_classes, tick)
            secs = time.perf_counter() - t1
            facts = {k: v for k, v in (getattr(s, "facts", {}) or {}).items()
                     if isinstance(v, (str, int, float, bool)) or v is None}
    except Exception as e:  # noqa: BLE001 - one failing runtime never stops the other rows
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        row.status = "skipped" if isinstance(e, UnsupportedArtifact) else "error"
        row.reason = f"{type(e).__name__}: {first}"
        return row
    return metrics_row(row, out, ctx, t1 - t0, secs, facts)


def run_plan(items: Sequence[Union[Job, EvalRow]], ctx: EvalContext) -> list[EvalRow]:
    """Run the jobs in order (rows already decided pass through); progress per job and per images."""
    jobs = [i for i in items if isinstance(i, Job)]
    ctx.progress("plan", {"jobs": len(jobs), "images": len(jobs) * ctx.ds.n})
    rows = []
    for item in items:
        if isinstance(item, EvalRow):
            rows.append(item)
            continue
        ctx.progress("start", {"id": item.row.artifact, "where": item.runtime.target})
        row = evaluate_file(item.path, item.row.format, item.runtime, item.row, ctx)
        ctx.progress("done", {"row": row})
        rows.append(row)
    return rows
