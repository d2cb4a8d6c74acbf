"""The benchmark runner: every (artifact x target) of a manifest, each in a fresh process.

    report = run_bench("edgepipe-out/mobilenet", BenchSettings(targets=["cpu", "gpu"]))
    write_reports(report, out_dir)          # bench.json, bench.md, bench.html (report.py)

Each row is planned by plan.py (the same rules for this host and for devices) and measured by the
standalone agent (devices/onboard/agent.py) in a subprocess with a timeout, or, for a registered
runtime the agent does not run itself (the Core ML reference interpreter, a third-party runtime), by
the worker (worker.py), which measures that runtime's Session with the agent's method. One model's
memory cannot pollute the next row's figure, and a runtime that dies (a segfault in a delegate) fails
only its own row, with the signal's name. Rows: see edgepipe.pipeline.base.bench.STATUSES.

Never imports TensorFlow.
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgepipe.pipeline.base.bench import WRONG_OUTPUT, BenchReport, BenchRow
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, artifact_problem, load_manifest
from edgepipe.pipeline.base.outputs import check_outputs

from edgepipe.devices.measure import host
from edgepipe.devices.measure.plan import Job, LocalHost, plan_row
from edgepipe.devices.measure.settings import BenchSettings
from edgepipe.devices.runtimes.base import TARGETS
from edgepipe.devices.runtimes.hostprobe import AGENT

ProgressFn = Callable[[str, BenchRow, int, int], None]
OUTPUT_SAMPLES = 32  # inputs (and outputs the agent saves) for the output check against the CPU row
_STAGE_WORDS = {"load": " while loading/compiling the model", "loaded": " after loading the model",
                "first inference": " in the first inference", "measure": " while measuring",
                "inputs": " while preparing inputs"}


# --------------------------------------------------------------------------------------------- inputs
# in reference.npz: the inputs key -> (its raw pixels, the source model's outputs on them)
_BESIDE = {"inputs": ("inputs_raw", "inputs_outputs"), "data": ("raw", "outputs")}


def _beside(z, key: str, n: int) -> dict:
    """The raw pixels (image-input sessions) and the source model's outputs (``source_outputs``: the
    reference for the output check when no CPU row runs) that match the first ``n`` samples."""
    raw, outs = _BESIDE.get(key, ("raw", None))
    extra = {}
    if raw in z.files and z[raw].shape[0] >= n:
        extra["raw"] = z[raw][:n].astype(np.float32)
    if outs in z.files and z[outs].shape[0] >= n:
        extra["source_outputs"] = z[outs][:n].astype(np.float32)
    return extra


def manifest_inputs(manifest: Manifest, folder: Path, tmp: Path) -> tuple[Optional[Path], str]:
    """An .npz of real preprocessed samples from the manifest (reference/calibration), if it has one;
    raw 0-255 pixels ride along (``raw``) for image-input sessions, and the source model's outputs on
    them (``source_outputs``) when the reference holds them."""
    cands = [folder / holder[k] for holder in (manifest.reference, manifest.calibration) if isinstance(holder, dict)
             for k in ("inputs_path", "path", "samples_path") if isinstance(holder.get(k), str)]
    want = [int(s) for s in manifest.model.input_shape[1:]] if manifest.model.input_shape else None
    for c in (c for c in cands if c.is_file() and c.suffix == ".npz"):
        try:
            with np.load(c) as z:
                for key in ("inputs", "x", "input", "data", "calibration", "images"):
                    a = z[key] if key in z.files else None
                    fits = a is not None and a.dtype.kind == "f" and a.ndim >= 2
                    if fits and (want is None or list(a.shape[1:]) == want):
                        n = min(OUTPUT_SAMPLES, a.shape[0])
                        np.savez(tmp / "inputs.npz", inputs=a[:n].astype(np.float32), **_beside(z, key, n))
                        return tmp / "inputs.npz", f"{c.name}:{key}"
        except Exception:  # noqa: BLE001 - an unreadable reference only means random inputs
            continue
    return None, "random"


# --------------------------------------------------------------------------------------------- running
def tail(text: str, n: int = 6, width: int = 1500) -> str:
    """The last lines of a runtime's stderr that say something (LiteRT's plugin chatter left out)."""
    noise = ("INFO:", "I0000", "W0000", "Warning: maxDynamic", "edgepipe-agent: stage")
    chatter = ("npu_registry", "compiler_plugin", "Could not load shared library", "Logging before InitGoogle",
               "Created a WebGPU environment")
    lines = [ln.rstrip() for ln in (text or "").splitlines()
             if ln.strip() and not ln.startswith(noise) and not any(c in ln for c in chatter)]
    return "\n".join(lines[-n:])[-width:]


def command(job: Job, spec) -> list[str]:
    """The local command for one row: the agent for agent-run runtimes, else the worker."""
    if job.agent_format:
        return [sys.executable, str(AGENT), *spec.to_argv()]
    cls = type(job.runtime)
    return [sys.executable, "-m", "edgepipe.devices.measure.worker", "--runtime", cls.name, "--module",
            cls.__module__, "--file", inspect.getfile(cls), *spec.to_argv()]


def _fill(row: BenchRow, d: dict, s: Optional[BenchSettings] = None) -> None:
    rt = d.get("runtime") or {}
    row.runtime_version, row.runtime_api = rt.get("version"), rt.get("api")
    for k in ("threads", "load_ms", "first_ms", "warmup_ms", "latency_ms", "samples_ms", "throughput_ips",
              "measured_s", "truncated", "placement", "profile", "input_source", "inputs", "loadavg"):
        if d.get(k) is not None:
            setattr(row, k, d[k])
    mem_end = d.get("memory") or {}
    base = (d.get("memory_baseline") or {}).get("vmrss_kb")
    # VmHWM is the process's own high-water mark. ru_maxrss is not, on Linux: it survives execve, so a
    # child started by a big parent reports the parent's peak. Use it only where /proc is absent (macOS).
    peak = mem_end.get("vmhwm_kb") or mem_end.get("ru_maxrss_kb")
    row.memory = {"peak_rss_kb": peak, "ru_maxrss_kb": mem_end.get("ru_maxrss_kb"), "vmhwm_kb": mem_end.get("vmhwm_kb"),
                  "baseline_rss_kb": base, "after_load_rss_kb": (d.get("memory_after_load") or {}).get("vmrss_kb"),
                  "model_peak_kb": (peak - base) if peak and base else None}
    row.samples_ms = [round(x, 5) for x in row.samples_ms]
    if row.truncated:
        asked = f"{s.runs} runs and {s.min_seconds:g} s" if s else "the runs and seconds asked for"
        row.notes.append(f"stopped after {row.measured_s:.0f} s and {row.latency_ms.get('n')} runs, short of "
                         f"{asked} (half the --timeout)")


def _crash_reason(returncode: int, stderr: str) -> tuple[str, str]:
    """(signal name, reason) for an agent killed by a signal, naming the stage it died in."""
    sig = host.signal_name(returncode)
    stages = re.findall(r"^edgepipe-agent: stage (.+)$", stderr or "", re.M)
    last = stages[-1] if stages else ""
    return sig, f"the runtime crashed with {sig}{_STAGE_WORDS.get(last, f' ({last})' if last else '')}"


def apply_agent_output(row: BenchRow, returncode: int, stdout: str, stderr: str,
                       settings: Optional[BenchSettings] = None) -> BenchRow:
    """Fill ``row`` from what one agent run printed (its JSON line) and its exit status (negative: the
    signal that killed it). Shared by the local subprocess and the remote runners."""
    row.stderr_tail = tail(stderr) or None
    if returncode < 0:
        row.status = "failed"
        row.signal, row.reason = _crash_reason(returncode, stderr)
        return row
    d = None
    for line in reversed((stdout or "").strip().splitlines()):
        try:
            d = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(d, dict):
        row.status = "failed"
        row.reason = f"the agent exited with status {returncode} and no result: {tail(stderr, 1, 300)}"
    elif d.get("status") == "ok":
        row.status, row.reason = "ok", None
        _fill(row, d, settings)
    elif d.get("status") == "unavailable":
        row.status, row.reason = "unavailable", d.get("reason")
    else:
        row.status, row.reason = "failed", d.get("error") or f"agent status {d.get('status')}"
    return row


def run_row(job: Job, s: BenchSettings, threads: int, inputs: Optional[Path], outputs: Optional[Path]) -> BenchRow:
    """Measure one row in a fresh local process (agent or worker), with the row's timeout."""
    row = job.row
    row.runner, row.threads = ("agent" if job.agent_format else "worker"), threads
    t0 = time.perf_counter()
    try:
        r = subprocess.run(command(job, job.spec(s, threads, inputs, outputs)), capture_output=True, text=True,
                           timeout=s.timeout_s, env=host.agent_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        row.wall_s = time.perf_counter() - t0
        row.status, row.reason = "failed", f"timed out after {s.timeout_s:g} s"
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        row.stderr_tail = tail(err)
        return row
    row.wall_s = time.perf_counter() - t0
    return apply_agent_output(row, r.returncode, r.stdout, r.stderr, s)


def agreement(ref: dict, got: dict) -> dict:
    """How far another target's outputs are from the cpu row's, on the same inputs."""
    out, top1 = {"against": "cpu", "outputs": []}, []
    for k in sorted(k for k in ref if k in got):
        a, b = np.asarray(ref[k], np.float32), np.asarray(got[k], np.float32)
        if a.shape != b.shape:
            out["outputs"].append({"output": k, "error": f"shape {list(b.shape)} vs cpu {list(a.shape)}"})
            continue
        diff = np.abs(a - b)
        scale = float(np.max(np.abs(a))) or 1.0
        o = {"output": k, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
             "max_rel_to_range": float(diff.max()) / scale, "samples": int(a.shape[0])}
        if a.ndim >= 2 and a.shape[-1] > 1:
            same = a.reshape(a.shape[0], -1).argmax(-1) == b.reshape(b.shape[0], -1).argmax(-1)
            o["top1_agreement"] = float(np.mean(same))
            top1.append(o["top1_agreement"])
        out["outputs"].append(o)
    measured = [o for o in out["outputs"] if "max_abs" in o]
    if measured:
        out["max_abs"] = max(o["max_abs"] for o in measured)
        out["max_rel_to_range"] = max(o["max_rel_to_range"] for o in measured)
    if top1:
        out["top1_agreement"] = min(top1)
    return out


class LocalRunner(LocalHost):
    """Where and how run_bench measures by default: this host, a fresh local process per row.

    The runner seam: a ``name`` (the rows' ``device``), ``identity()``, ``facts()`` (the report's host
    facts), ``probe(target)``, ``default_threads()``, ``plan(artifact, target, folder)`` and ``run(job,
    settings, threads, inputs, outputs) -> BenchRow``. remote/runner.py has the ssh and adb runners;
    their callers open the connection around run_bench (``with runner: ...``).
    """

    def identity(self) -> dict:
        return {"kind": "local", "hostname": platform.node()}

    def facts(self) -> dict:
        return host.host_facts()

    def probe(self, target: str) -> dict:
        return host.probe_target(target) if target in ("cpu", "gpu", "edgetpu") else {}

    def default_threads(self) -> int:
        return host.default_threads()

    def plan(self, art: Artifact, target: str, folder: Path) -> tuple[BenchRow, Optional[Job]]:
        return plan_row(art, target, folder, self)

    def run(self, job: Job, s: BenchSettings, threads: int, inputs: Optional[Path],
            outputs: Optional[Path]) -> BenchRow:
        return run_row(job, s, threads, inputs, outputs)


# --------------------------------------------------------------------------------------------- the bench
def _artifacts(manifest: Manifest, folder: Path, s: BenchSettings) -> list[Artifact]:
    """The selected artifacts; a missing or corrupt one the manifest calls good is bad input (UserError)."""
    arts = [manifest.artifact(i) for i in s.artifacts] if s.artifacts else list(manifest.artifacts)
    if not arts:
        raise UserError(f"the manifest at {folder} lists no artifacts", "Run `edgepipe export` first")
    for a in arts:
        why = artifact_problem(a, folder) if a.status in ("ok", "verify_failed") else None
        if why:
            what = "is corrupt or changed since export" if "sha256" in why else "cannot be measured"
            raise UserError(f"artifact '{a.id}' {what}: {why}", "Re-run `edgepipe export` to write it again")
    return arts


def _new_report(manifest: Manifest, folder: Path, s: BenchSettings, runner, threads: int) -> BenchReport:
    return BenchReport(
        model={"name": manifest.model.name, "input_shape": manifest.model.input_shape,
               "num_classes": manifest.model.num_classes, "source_kind": manifest.model.kind},
        manifest=str(folder / "manifest.json"), host=runner.facts(),
        settings={"targets": s.targets, "threads": threads, "runs": s.runs, "min_seconds": s.min_seconds,
                  "warmup": s.warmup, "artifacts": s.artifacts, "profile": s.profile, "timeout_s": s.timeout_s},
        method={
            "isolation": "one fresh process per (artifact, target)",
            "timed_region": "write inputs + run + read every output back to host memory",
            "stop_rule": f"at least {s.runs} runs and at least {s.min_seconds:g} s",
            "warmup": f"first inference timed separately, then {s.warmup} warm-up runs",
            "ci": "95% distribution-free CI of the median (binomial order statistics)",
            "gc": "Python garbage collector off during the timed loop",
            "memory": "peak RSS of the measuring process (VmHWM; ru_maxrss where /proc is absent); baseline = RSS "
                      "after imports, before loading the model. GPU memory on a real GPU is not in RSS"},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edgepipe_version=host.pkg_version("edgepipe"), devices={runner.name: runner.identity()})


def _measure(jobs: list[Job], s: BenchSettings, runner, threads: int, inputs: Optional[Path], tmp: Path,
             progress: Optional[ProgressFn]) -> dict[tuple[str, str], Path]:
    """Run every job (cpu first: the reference for agreement); {(artifact, target): outputs .npz}."""
    outs = {}
    for i, job in enumerate(sorted(jobs, key=lambda j: j.row.target != "cpu")):
        if progress:
            progress("start", job.row, i, len(jobs))
        out_npz = tmp / f"out-{i}.npz" if s.agreement else None
        runner.run(job, s, threads, inputs, out_npz)
        if out_npz is not None and job.row.ok and out_npz.exists():
            outs[(job.row.artifact, job.row.target)] = out_npz
        if progress:
            progress("done", job.row, i + 1, len(jobs))
    return outs


def _npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _source_outputs(inputs: Optional[Path]) -> Optional[np.ndarray]:
    if inputs is None or not inputs.is_file():
        return None
    with np.load(inputs) as z:
        return z["source_outputs"] if "source_outputs" in z.files else None


def _agreements(report: BenchReport, outs: dict[tuple[str, str], Path], source: Optional[np.ndarray],
                trained: bool) -> None:
    """Every measured row's outputs against the CPU row of the same artifact (or, with no CPU row, the source
    model's on the same inputs, when the outputs have the source's shape): the ``agreement`` figures, and
    the output check that turns a row whose answers are wrong into ``wrong-output`` (no speed figure
    without correct outputs)."""
    for (aid, t), p in outs.items():
        ref, row = outs.get((aid, "cpu")), report.row(aid, t)
        if row is None:
            continue
        got = _npz(p)
        if t != "cpu" and ref is not None:
            cpu = _npz(ref)
            row.agreement = agreement(cpu, got)
            _judge_outputs(row, cpu, got, "cpu", trained)
        elif ref is None and source is not None and len(got) == 1:
            out = next(iter(got.values()))
            if np.asarray(out).reshape(len(out), -1).shape == np.asarray(source).reshape(len(source), -1).shape:
                _judge_outputs(row, source, out, "source model", trained)  # else: outputs it cannot map


def _judge_outputs(row: BenchRow, reference, outputs, against: str, trained: bool) -> None:
    check = check_outputs(reference, outputs, row.precision, against, trained=trained)
    row.agreement = {**(row.agreement or {"against": against}), "check": check.to_dict()}
    if not check.ok:
        row.status = WRONG_OUTPUT
        row.reason = (f"outputs disagree with {against} on {check.samples} inputs ({check.reason}): its figures "
                      "are not a speed figure")


def _notes(report: BenchReport, arts: list[Artifact]) -> None:
    unverified = {a.id for a in arts if a.status == "verify_failed"}
    adapters = report.targets.get("gpu", {}).get("tflite", {}).get("vulkan_adapters") or []
    software_gpu = bool(adapters) and all(a.get("type") == "cpu" for a in adapters)
    for r in (r for r in report.rows if r.ok):
        if r.artifact in unverified:
            r.notes.append("verification failed at export: figures are for a model that does not match its source")
        if software_gpu and r.target == "gpu" and r.runtime == "litert":
            r.notes.append(f"software GPU ({adapters[0].get('name')}): correctness only, not a speed figure")


def run_bench(manifest_path: str | os.PathLike, targets: Optional[list[str] | str] = None,
              settings: Optional[BenchSettings] = None, progress: Optional[ProgressFn] = None,
              runner: Optional[LocalRunner] = None) -> BenchReport:
    """Measure every selected artifact on every target (``targets`` overrides ``settings.targets``).
    ``runner`` decides where it runs (default: this host; remote/: ssh boards, adb phones).

    Bad input (unknown target or artifact, missing or corrupt artifact, newer manifest) raises
    UserError before any measurement. ``progress(event, row, done, total)`` is called with
    event "start"/"done" around each measured row.
    """
    s = settings or BenchSettings()
    if targets is not None:
        s.targets = targets
    s.validate()
    manifest, folder = load_manifest(manifest_path)
    arts = _artifacts(manifest, folder, s)
    runner = runner or LocalRunner()
    threads = s.threads or runner.default_threads()
    t_start = time.perf_counter()
    report = _new_report(manifest, folder, s, runner, threads)
    report.targets = {t: runner.probe(t) for t in s.targets if t in TARGETS}
    plans = [runner.plan(a, t, folder) for a in arts for t in s.targets]
    report.rows = [r for r, _ in plans]
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as td:
        inputs, source = (Path(s.inputs), f"file:{Path(s.inputs).name}") if s.inputs else \
            manifest_inputs(manifest, folder, Path(td))
        report.settings["inputs"] = source
        outs = _measure([j for _, j in plans if j is not None], s, runner, threads, inputs, Path(td), progress)
        _agreements(report, outs, _source_outputs(inputs) if not s.inputs else None, manifest.model.trained)
    _notes(report, arts)
    report.wall_s = time.perf_counter() - t_start
    return report
