"""The benchmark runner: every (artifact x target) of a manifest, each in a fresh process.

    report = run_bench("edgepipe-out/mobilenet", BenchSettings(targets=["cpu", "gpu"]))
    write_reports(report, out_dir)          # bench.json, bench.md, bench.html
    cmp = compare(old_report, report)       # ratio of medians per row

Each measurement runs ``devices/agent.py`` (or, for runtimes the agent does not know, this
module's ``--worker`` mode, which measures a registered Runtime with the agent's method) in a
subprocess with a timeout. One model's memory cannot pollute the next row's figure, and a runtime
that dies (a segfault in a delegate) fails only its own row, with the signal's name.

Rows are one of: ``ok`` (measured), ``failed`` (the runtime crashed, timed out or raised),
``skipped`` (this artifact cannot run on this target: fp32 on an Edge TPU, Core ML on Linux,
a failed export, a dynamic batch on the GPU) or ``unavailable`` (the target's runtime, driver
or device is not on this host). Every row that is not ``ok`` carries its reason.

Never imports TensorFlow.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import Artifact, Manifest, load_manifest

from edgepipe.devices.measure import host
from edgepipe.devices.runtimes.base import TARGETS

SCHEMA_VERSION = 1
REPORT_KIND = "edgepipe-bench"
AGENT = Path(__file__).resolve().parent.parent / "onboard" / "agent.py"
# (agent format, target) pairs the standalone agent measures itself
AGENT_NATIVE = {("tflite", "cpu"), ("tflite", "gpu"), ("tflite", "edgetpu"), ("onnx", "cpu"), ("onnx", "gpu")}
BENCH_TARGETS = ("cpu", "gpu", "edgetpu")
STATUSES = ("ok", "failed", "skipped", "unavailable")
EDGETPU_PRECISIONS = ("int8",)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    targets: list[str] = field(default_factory=lambda: ["cpu"])
    threads: Optional[int] = None  # None: host.default_threads()
    runs: int = 50  # at least this many measured runs ...
    min_seconds: float = 1.0  # ... and at least this long
    warmup: int = 5
    artifacts: Optional[list[str]] = None  # ids; None: all
    profile: bool = False
    timeout_s: float = 600.0  # per row
    inputs: Optional[str] = None  # .npz of preprocessed samples; None: the manifest's, else random
    agreement: bool = True  # compare every target's outputs with the cpu row of the same artifact

    def validate(self) -> "BenchSettings":
        if self.runs < 1:
            raise UserError(f"--runs must be at least 1 (got {self.runs})", "Use e.g. --runs 50")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more (got {self.warmup})", "Use e.g. --warmup 5")
        if self.min_seconds < 0:
            raise UserError(f"--min-seconds must be 0 or more (got {self.min_seconds})", "Use e.g. --min-seconds 1")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1 (got {self.threads})", "Leave it out for the default")
        if self.timeout_s <= 0:
            raise UserError("the timeout must be positive", "Use e.g. --timeout 600")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise UserError(f"unknown target '{bad[0]}'", f"Use one or more of: {', '.join(BENCH_TARGETS)}")
        if not self.targets:
            raise UserError("no target given", f"Use one or more of: {', '.join(BENCH_TARGETS)}")
        if self.inputs is not None and not Path(self.inputs).is_file():
            raise UserError(f"inputs file {self.inputs} does not exist", "Give an .npz of preprocessed samples")
        return self


@dataclass
class BenchRow:
    artifact: str
    format: str
    precision: str
    target: str
    runtime: str
    status: str  # ok | failed | skipped | unavailable
    reason: Optional[str] = None
    path: Optional[str] = None
    size_bytes: Optional[int] = None
    runner: Optional[str] = None  # agent | worker
    runtime_version: Optional[str] = None
    runtime_api: Optional[str] = None
    threads: Optional[int] = None
    load_ms: Optional[float] = None
    first_ms: Optional[float] = None
    warmup_ms: list = field(default_factory=list)
    latency_ms: dict = field(default_factory=dict)  # n p50 p90 p99 mean std min max cv ci95_p50 ci_coverage
    samples_ms: list = field(default_factory=list)
    throughput_ips: Optional[float] = None
    measured_s: Optional[float] = None
    truncated: bool = False
    memory: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    profile: Optional[dict] = None
    agreement: Optional[dict] = None
    input_source: Optional[str] = None
    inputs: list = field(default_factory=list)
    signal: Optional[str] = None
    stderr_tail: Optional[str] = None
    wall_s: Optional[float] = None
    loadavg: Optional[list] = None
    notes: list = field(default_factory=list)
    device: str = "local"  # where it ran: "local", or a registered device's name (devices/remote.py)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.device, self.artifact, self.target, self.runtime)

    def stat(self, name: str) -> Optional[float]:
        v = (self.latency_ms or {}).get(name)
        return float(v) if isinstance(v, (int, float)) else None


@dataclass
class BenchReport:
    rows: list[BenchRow] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    manifest: Optional[str] = None
    host: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # probe answers per target
    settings: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    created: Optional[str] = None
    wall_s: Optional[float] = None
    edgepipe_version: Optional[str] = None
    devices: dict = field(default_factory=dict)  # device name -> its identity and facts (one per runner)
    schema_version: int = SCHEMA_VERSION
    kind: str = REPORT_KIND

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "bench report") -> "BenchReport":
        if not isinstance(d, dict) or d.get("kind") != REPORT_KIND:
            raise UserError(f"{source} is not an edgepipe bench report",
                            "Give the bench.json that `edgepipe bench` wrote")
        v = d.get("schema_version")
        if not isinstance(v, int):
            raise UserError(f"{source} has no schema_version", "Re-run `edgepipe bench`")
        if v > SCHEMA_VERSION:
            raise UserError(f"{source} uses bench schema {v}, newer than this edgepipe understands ({SCHEMA_VERSION})",
                            "Upgrade edgepipe (pip install -U edgepipe)")
        names = {f.name for f in fields(BenchRow)}
        try:
            rows = [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in d.get("rows", [])]
        except TypeError as e:
            raise UserError(f"{source} has malformed rows ({e})", "Re-run `edgepipe bench`") from e
        top = {f.name for f in fields(cls)} - {"rows"}
        return cls(rows=rows, **{k: v for k, v in d.items() if k in top})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BenchReport":
        p = Path(path)
        if p.is_dir():
            p = p / "bench.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"no bench report at {p}", "Give the bench.json that `edgepipe bench` wrote") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read bench report {p}: {e}", "Re-run `edgepipe bench` to write it again") from e
        return cls.from_dict(d, source=str(p))

    def save(self, path: str | os.PathLike) -> Path:
        from edgepipe.pipeline.base.util import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    def row(self, artifact: str, target: str) -> Optional[BenchRow]:
        for r in self.rows:
            if r.artifact == artifact and r.target == target:
                return r
        return None

    def counts(self) -> dict:
        c = {s: 0 for s in STATUSES}
        for r in self.rows:
            c[r.status] = c.get(r.status, 0) + 1
        return c


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    row: BenchRow
    path: Path
    agent_format: Optional[str]  # agent mode when set, else the in-process worker
    runtime_name: str


def _agent_format(art: Artifact, path: Path) -> Optional[str]:
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".onnx":
        return "onnx"
    return art.format if art.format in ("tflite", "onnx") else None


def _preflight(arts: list[Artifact], folder: Path) -> None:
    """Missing or corrupt artifacts the manifest calls good are bad input: fail before measuring."""
    from edgepipe.pipeline.base.util import sha256_file

    for a in arts:
        if a.status not in ("ok", "verify_failed"):
            continue
        if not a.path:
            raise UserError(f"artifact '{a.id}' has no path in the manifest", "Re-run `edgepipe export`")
        p = folder / a.path
        if not p.exists():
            raise UserError(f"artifact '{a.id}' is missing: {p}", "Re-run `edgepipe export` to write it again")
        if a.sha256:
            got = sha256_file(p)
            if got != a.sha256:
                raise UserError(f"artifact '{a.id}' is corrupt or changed since export: sha256 {got[:12]} is not "
                                f"the manifest's {a.sha256[:12]} ({p})",
                                "Re-run `edgepipe export` to write it again")
        if p.is_file() and p.suffix.lower() == ".tflite":
            with open(p, "rb") as fh:
                head = fh.read(8)
            if len(head) < 8 or head[4:8] != b"TFL3":
                raise UserError(f"artifact '{a.id}' is not a TFLite flatbuffer: {p}",
                                "Re-run `edgepipe export` to write it again")
        if p.is_file() and p.stat().st_size == 0:
            raise UserError(f"artifact '{a.id}' is empty: {p}", "Re-run `edgepipe export` to write it again")


def _plan(art: Artifact, target: str, folder: Path) -> tuple[BenchRow, Optional[_Job]]:
    from edgepipe.devices.runtimes.base import runtimes_for

    row = BenchRow(artifact=art.id, format=art.format, precision=art.precision, target=target, runtime="-",
                   status="skipped", path=art.path, size_bytes=art.size_bytes)
    if art.status not in ("ok", "verify_failed"):
        row.reason = (f"export failed: {art.error}" if art.status == "failed" and art.error
                      else f"export {art.status}: no artifact to run")
        return row, None
    path = folder / art.path
    if row.size_bytes is None and path.is_file():
        row.size_bytes = path.stat().st_size
    if target == "edgetpu" and (art.precision not in EDGETPU_PRECISIONS or art.format not in ("tflite", "edgetpu")):
        row.runtime = "litert-edgetpu"
        row.reason = (f"the Edge TPU runs only full-int8 TFLite artifacts compiled with edgetpu_compiler; "
                      f"this one is {art.precision} {art.format}")
        return row, None
    if art.format == "coreml" and sys.platform != "darwin" and target != "reference":
        row.runtime = "coreml"
        row.reason = "Core ML runtime needs macOS"
        return row, None
    afmt = _agent_format(art, path)
    rts = runtimes_for(art.format, target)
    if not rts and target == "edgetpu" and afmt == "tflite":
        # no Edge TPU runtime module registered: the agent loads libedgetpu itself
        row.runtime = "litert-edgetpu"
        p = host.probe_target("edgetpu").get("tflite", {})
        if not p.get("available"):
            row.status, row.reason = "unavailable", p.get("reason", "Edge TPU unavailable")
            return row, None
        with open(path, "rb") as fh:
            if b"edgetpu-custom-op" not in fh.read():
                row.reason = "not compiled for the Edge TPU: run edgetpu_compiler on this int8 artifact"
                return row, None
        return row, _Job(row, path, "tflite", row.runtime)
    if not rts:
        row.reason = f"no runtime runs {art.format} artifacts on {target}"
        return row, None
    rt = rts[0]
    row.runtime = rt.name
    try:
        # rows run in fresh processes: ask about the host, not about this process, where a runtime
        # offers both (LiteRT's software GPU cannot share a process with TensorFlow, the agent's can)
        why_host = getattr(rt, "host_available", rt.available)()
    except Exception as e:  # noqa: BLE001 - a runtime's check must not stop the others
        why_host = f"availability check failed: {e}"
    try:
        why_art = rt.check(path, art.format)
    except Exception as e:  # noqa: BLE001
        why_art = f"check failed: {e}"
    # A reason about the artifact (not compiled for the Edge TPU, dynamic batch on the GPU) is a
    # skip wherever it runs; a reason about this host (no driver, no library) makes it unavailable.
    if why_art and why_art != why_host:
        row.reason = why_art
        return row, None
    if why_host:
        row.status, row.reason = "unavailable", why_host
        return row, None
    if afmt and (afmt, target) in AGENT_NATIVE:
        return row, _Job(row, path, afmt, rt.name)
    return row, _Job(row, path, None, rt.name)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def manifest_inputs(manifest: Manifest, folder: Path, tmp: Path) -> tuple[Optional[Path], str]:
    """An .npz of real preprocessed samples from the manifest (calibration/reference), if it has one."""
    import numpy as np

    cands = []
    for holder in (manifest.reference, manifest.calibration):
        if isinstance(holder, dict):
            for k in ("inputs_path", "path", "samples_path"):
                if isinstance(holder.get(k), str):
                    cands.append(folder / holder[k])
    want = [int(s) for s in manifest.model.input_shape[1:]] if manifest.model.input_shape else None
    for c in cands:
        if not c.is_file() or c.suffix != ".npz":
            continue
        try:
            with np.load(c) as z:
                for key in ("inputs", "x", "input", "data", "calibration", "images"):
                    if key in z.files:
                        a = z[key]
                        if a.dtype.kind == "f" and a.ndim >= 2 and (want is None or list(a.shape[1:]) == want):
                            out = tmp / "inputs.npz"
                            extra = {}
                            if "raw" in z.files and z["raw"].shape[0] >= min(32, a.shape[0]):
                                extra["raw"] = z["raw"][:32].astype(np.float32)  # 0-255 pixels, image inputs
                            np.savez(out, inputs=a[:32].astype(np.float32), **extra)
                            return out, f"{c.name}:{key}"
        except Exception:  # noqa: BLE001 - an unreadable reference only means random inputs
            continue
    return None, "random"


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _tail(text: str, n: int = 6, width: int = 1500) -> str:
    noise = ("INFO:", "I0000", "W0000", "Warning: maxDynamic", "edgepipe-agent: stage")
    # LiteRT's start-up chatter about plugins this host does not have says nothing about a failure
    chatter = ("npu_registry", "compiler_plugin", "Could not load shared library", "Logging before InitGoogle",
               "Created a WebGPU environment")
    lines = [ln.rstrip() for ln in (text or "").splitlines()
             if ln.strip() and not ln.startswith(noise) and not any(c in ln for c in chatter)]
    s = "\n".join(lines[-n:])
    return s[-width:]


def _command(job: _Job, s: BenchSettings, threads: int, inputs: Optional[Path], outputs: Optional[Path]) -> list[str]:
    common = {
        "runs": s.runs, "min_seconds": s.min_seconds, "warmup": s.warmup,
        "max_seconds": max(s.min_seconds, 0.5 * s.timeout_s),
    }
    if job.agent_format:
        cmd = [sys.executable, str(AGENT), "--artifact", str(job.path), "--format", job.agent_format,
               "--target", job.row.target, "--threads", str(threads), "--runs", str(s.runs),
               "--min-seconds", str(s.min_seconds), "--warmup", str(s.warmup),
               "--max-seconds", str(common["max_seconds"])]
        if inputs:
            cmd += ["--inputs", str(inputs)]
        if outputs:
            cmd += ["--save-outputs", str(outputs)]
        if s.profile:
            cmd.append("--profile")
        return cmd
    spec = dict(common, runtime=job.runtime_name, target=job.row.target, artifact=str(job.path), threads=threads,
                inputs=str(inputs) if inputs else None, save_outputs=str(outputs) if outputs else None,
                profile=s.profile, format=job.row.format)
    return [sys.executable, "-m", "edgepipe.devices.measure.bench", "--worker", json.dumps(spec)]


def _fill(row: BenchRow, d: dict, s: Optional[BenchSettings] = None) -> None:
    rt = d.get("runtime") or {}
    row.runtime_version = rt.get("version")
    row.runtime_api = rt.get("api")
    for k in ("threads", "load_ms", "first_ms", "warmup_ms", "latency_ms", "samples_ms", "throughput_ips",
              "measured_s", "truncated", "placement", "profile", "input_source", "inputs", "loadavg"):
        if k in d and d[k] is not None:
            setattr(row, k, d[k])
    mem_end = d.get("memory") or {}
    base = (d.get("memory_baseline") or {}).get("vmrss_kb")
    after = (d.get("memory_after_load") or {}).get("vmrss_kb")
    # VmHWM is the process's own high-water mark. ru_maxrss is not, on Linux: it survives execve, so a
    # child started by a big parent reports the parent's peak. Use it only where /proc is absent (macOS).
    peak = mem_end.get("vmhwm_kb") or mem_end.get("ru_maxrss_kb")
    row.memory = {"peak_rss_kb": peak, "ru_maxrss_kb": mem_end.get("ru_maxrss_kb"),
                  "vmhwm_kb": mem_end.get("vmhwm_kb"), "baseline_rss_kb": base, "after_load_rss_kb": after,
                  "model_peak_kb": (peak - base) if peak and base else None}
    row.samples_ms = [round(x, 5) for x in row.samples_ms]
    if row.truncated:
        asked = f"{s.runs} runs and {s.min_seconds:g} s" if s else "the runs and seconds asked for"
        row.notes.append(f"stopped after {row.measured_s:.0f} s and {row.latency_ms.get('n')} runs, short of "
                         f"{asked} (half the --timeout)")


def run_row(job: _Job, s: BenchSettings, threads: int, inputs: Optional[Path], outputs: Optional[Path]) -> BenchRow:
    row = job.row
    row.runner = "agent" if job.agent_format else "worker"
    row.threads = threads
    cmd = _command(job, s, threads, inputs, outputs)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout_s, env=host.agent_env(),
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        row.wall_s = time.perf_counter() - t0
        row.status = "failed"
        row.reason = f"timed out after {s.timeout_s:g} s"
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        row.stderr_tail = _tail(err)
        return row
    row.wall_s = time.perf_counter() - t0
    return apply_agent_output(row, r.returncode, r.stdout, r.stderr, s)


def apply_agent_output(row: BenchRow, returncode: int, stdout: str, stderr: str,
                       settings: Optional[BenchSettings] = None) -> BenchRow:
    """Fill ``row`` from what one agent run printed (its JSON line) and its exit status (negative: the
    signal that killed it). Shared by the local subprocess and the remote runners (devices/remote.py)."""
    r = subprocess.CompletedProcess([], returncode, stdout or "", stderr or "")
    row.stderr_tail = _tail(r.stderr) or None
    d = None
    for line in reversed(r.stdout.strip().splitlines()):
        try:
            d = json.loads(line)
            break
        except ValueError:
            continue
    if r.returncode < 0:
        row.status = "failed"
        row.signal = host.signal_name(r.returncode)
        stages = re.findall(r"^edgepipe-agent: stage (.+)$", r.stderr or "", re.M)
        where = {"load": " while loading/compiling the model", "loaded": " after loading the model",
                 "first inference": " in the first inference",
                 "measure": " while measuring", "inputs": " while preparing inputs"}.get(stages[-1] if stages else "",
                                                                                         f" ({stages[-1]})" if stages else "")
        row.reason = f"the runtime crashed with {row.signal}{where}"
        return row
    if not isinstance(d, dict):
        row.status = "failed"
        row.reason = f"the agent exited with status {r.returncode} and no result: {_tail(r.stderr, 1, 300)}"
        return row
    st = d.get("status")
    if st == "ok":
        row.status = "ok"
        row.reason = None
        _fill(row, d, settings)
    elif st == "unavailable":
        row.status, row.reason = "unavailable", d.get("reason")
    else:
        row.status, row.reason = "failed", d.get("error") or f"agent status {st}"
    return row


def _agreement(ref: dict, got: dict) -> dict:
    import numpy as np

    out = {"against": "cpu", "outputs": []}
    top1 = []
    for k in sorted(ref):
        if k not in got:
            continue
        a, b = np.asarray(ref[k], np.float32), np.asarray(got[k], np.float32)
        if a.shape != b.shape:
            out["outputs"].append({"output": k, "error": f"shape {list(b.shape)} vs cpu {list(a.shape)}"})
            continue
        diff = np.abs(a - b)
        scale = float(np.max(np.abs(a))) or 1.0
        o = {"output": k, "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
             "max_rel_to_range": float(diff.max()) / scale, "samples": int(a.shape[0])}
        if a.ndim >= 2 and a.shape[-1] > 1:
            ag = float(np.mean(a.reshape(a.shape[0], -1).argmax(-1) == b.reshape(b.shape[0], -1).argmax(-1)))
            o["top1_agreement"] = ag
            top1.append(ag)
        out["outputs"].append(o)
    vals = [o["max_abs"] for o in out["outputs"] if "max_abs" in o]
    if vals:
        out["max_abs"] = max(vals)
        out["max_rel_to_range"] = max(o["max_rel_to_range"] for o in out["outputs"] if "max_rel_to_range" in o)
    if top1:
        out["top1_agreement"] = min(top1)
    return out


ProgressFn = Callable[[str, BenchRow, int, int], None]


def resolve_targets(spec: Optional[str | list[str]]) -> list[str]:
    """'cpu,gpu' or a list -> validated targets ('all' = every device target)."""
    from edgepipe.devices.runtimes.base import parse_targets

    if spec is None:
        return ["cpu"]
    if isinstance(spec, str):
        if spec.strip() == "":
            raise UserError("no target given", f"Use one or more of: {', '.join(BENCH_TARGETS)}")
        items = [t.strip() for t in spec.split(",") if t.strip()]
    else:
        items = list(spec)
    out: list[str] = []
    for t in items:
        ts = list(BENCH_TARGETS) if t == "all" else parse_targets(t)
        out += [x for x in ts if x not in out]
    return out


class LocalRunner:
    """Where and how run_bench measures: this host, the agent in a fresh local subprocess.

    The seam for remote devices: a runner has a ``name`` (the rows' ``device``) and answers
    ``identity()``, ``facts()`` (the report's host facts), ``probe(target)``, ``default_threads()``,
    ``plan(artifact, target, folder) -> (BenchRow, job or None)`` and
    ``run(job, settings, threads, inputs, outputs) -> BenchRow``. devices/remote.py has the ssh and
    adb runners; their callers open the connection around run_bench (``with runner: ...``).
    """

    name = "local"

    def identity(self) -> dict:
        return {"kind": "local", "hostname": host.platform.node()}

    def facts(self) -> dict:
        return host.host_facts()

    def probe(self, target: str) -> dict:
        return host.probe_target(target)

    def default_threads(self) -> int:
        return host.default_threads()

    def plan(self, art: Artifact, target: str, folder: Path) -> tuple[BenchRow, Optional[_Job]]:
        return _plan(art, target, folder)

    def run(self, job: _Job, s: BenchSettings, threads: int, inputs: Optional[Path],
            outputs: Optional[Path]) -> BenchRow:
        return run_row(job, s, threads, inputs, outputs)


def run_bench(manifest_path: str | os.PathLike, targets: Optional[list[str] | str] = None,
              settings: Optional[BenchSettings] = None, progress: Optional[ProgressFn] = None,
              runner: Optional[LocalRunner] = None) -> BenchReport:
    """Measure every selected artifact on every target (``targets`` overrides ``settings.targets``).
    ``runner`` decides where it runs (default: this host; devices/remote.py: ssh boards, adb phones).

    Bad input (unknown target or artifact, missing or corrupt artifact, newer manifest) raises
    UserError before any measurement. ``progress(event, row, done, total)`` is called with
    event "start"/"done" around each measured row.
    """
    s = settings or BenchSettings()
    if targets is not None:
        s.targets = resolve_targets(targets)
    s.targets = resolve_targets(s.targets)
    s.validate()
    manifest, folder = load_manifest(manifest_path)
    if s.artifacts:
        arts = [manifest.artifact(i) for i in s.artifacts]  # UserError on an unknown id
    else:
        arts = list(manifest.artifacts)
    if not arts:
        raise UserError(f"the manifest at {folder} lists no artifacts", "Run `edgepipe export` first")
    _preflight(arts, folder)
    runner = runner or LocalRunner()
    threads = s.threads or runner.default_threads()
    t_start = time.perf_counter()
    report = BenchReport(
        model={"name": manifest.model.name, "input_shape": manifest.model.input_shape,
               "num_classes": manifest.model.num_classes, "source_kind": manifest.model.kind},
        manifest=str(folder / "manifest.json"),
        host=runner.facts(),
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
                      "after imports, before loading the model. GPU memory on a real GPU is not in RSS",
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edgepipe_version=host.pkg_version("edgepipe"),
    )
    for t in s.targets:
        report.targets[t] = runner.probe(t) if t in BENCH_TARGETS else {}
    plans = [runner.plan(a, t, folder) for a in arts for t in s.targets]
    report.rows = [r for r, _ in plans]
    for r in report.rows:
        r.device = runner.name
    report.devices = {runner.name: runner.identity()}
    jobs = [j for _, j in plans if j is not None]
    # cpu first: it is the reference the other targets' outputs are compared with
    jobs.sort(key=lambda j: (j.row.target != "cpu",))
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as td:
        tmp = Path(td)
        if s.inputs:
            inputs, source = Path(s.inputs), f"file:{Path(s.inputs).name}"
        else:
            inputs, source = manifest_inputs(manifest, folder, tmp)
        report.settings["inputs"] = source
        outs: dict[tuple[str, str], Path] = {}
        for i, job in enumerate(jobs):
            if progress:
                progress("start", job.row, i, len(jobs))
            out_npz = tmp / f"out-{i}.npz" if s.agreement else None
            runner.run(job, s, threads, inputs, out_npz)
            if out_npz is not None and job.row.ok and out_npz.exists():
                outs[(job.row.artifact, job.row.target)] = out_npz
            if progress:
                progress("done", job.row, i + 1, len(jobs))
        if s.agreement:
            import numpy as np

            for (aid, t), p in outs.items():
                ref = outs.get((aid, "cpu"))
                if t == "cpu" or ref is None:
                    continue
                with np.load(ref) as a, np.load(p) as b:
                    row = report.row(aid, t)
                    if row is not None:
                        row.agreement = _agreement({k: a[k] for k in a.files}, {k: b[k] for k in b.files})
    unverified = {a.id for a in arts if a.status == "verify_failed"}
    for r in report.rows:
        if r.ok and r.artifact in unverified:
            r.notes.append("verification failed at export: figures are for a model that does not match its source")
    gpu = report.targets.get("gpu", {}).get("tflite", {})
    adapters = gpu.get("vulkan_adapters") or []
    if adapters and all(a.get("type") == "cpu" for a in adapters):
        for r in report.rows:
            if r.ok and r.target == "gpu" and r.runtime == "litert":
                r.notes.append(f"software GPU ({adapters[0].get('name')}): correctness only, not a speed figure")
    report.wall_s = time.perf_counter() - t_start
    return report


def failed_rows(report: BenchReport) -> list[BenchRow]:
    return [r for r in report.rows if r.status == "failed"]


# re-exported for callers: the writers and the comparison live in report.py
def write_reports(report: BenchReport, out_dir: str | os.PathLike, comparison=None) -> dict[str, Path]:
    from edgepipe.devices.measure.report import write_reports as _w

    return _w(report, out_dir, comparison)


def compare(old: BenchReport, new: BenchReport, threshold: float = 0.10):
    from edgepipe.devices.measure.report import compare as _c

    return _c(old, new, threshold)


# ---------------------------------------------------------------------------------------------
# worker: measure a registered Runtime (Core ML, third-party runtimes) with the agent's method
# ---------------------------------------------------------------------------------------------
def _worker(spec: dict) -> int:
    import argparse

    from edgepipe.devices.onboard import agent
    from edgepipe.devices.runtimes.base import Runtime, RunOptions, _load_all

    _load_all()
    cls = Runtime.registry.get((spec["runtime"], spec["target"]))
    if cls is None:
        raise agent.Unavailable(f"no runtime {spec['runtime']} on {spec['target']} is registered")

    class SessionBackend(agent.Backend):
        api = "edgepipe.Session"

        def __init__(self):
            rt = cls()
            self.runtime = rt.name
            vs = {k: v for k, v in (rt.versions() or {}).items() if v}
            self.version = next(iter(vs.values()), None)
            self.session = rt.load(spec["artifact"], RunOptions(threads=spec.get("threads") or None))
            self.inputs = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                            "scale": list((t.quantization or {}).get("scale") or []),
                            "zero_point": list((t.quantization or {}).get("zero_point") or [])}
                           for t in self.session.inputs]
            self.outputs = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                             "scale": list((t.quantization or {}).get("scale") or []),
                             "zero_point": list((t.quantization or {}).get("zero_point") or [])}
                            for t in self.session.outputs]

            # Core ML ImageType inputs take raw 0-255 pixels, not the preprocessed tensor
            if getattr(self.session, "input_kind", "tensor") == "image" and args.inputs:
                import numpy as np

                with np.load(args.inputs) as z:
                    if "raw" in z.files:
                        raw = Path(args.inputs).with_name("inputs-raw.npz")
                        np.savez(raw, inputs=z["raw"])
                        args.inputs = str(raw)

        def run(self, feeds):
            return self.session.run_native(feeds)

        def placement(self):
            return dict(getattr(self.session, "facts", {}) or {})

        def close(self):
            self.session.close()

    args = argparse.Namespace(artifact=spec["artifact"], format=spec.get("format"), target=spec["target"],
                              threads=spec.get("threads") or 0, runs=spec["runs"], min_seconds=spec["min_seconds"],
                              max_seconds=spec.get("max_seconds"), warmup=spec["warmup"], inputs=spec.get("inputs"),
                              profile=spec.get("profile", False), save_outputs=spec.get("save_outputs"),
                              delegate=None, api=None)
    return agent.main_with(lambda: agent.run_agent(args, opener=SessionBackend))


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(json.loads(sys.argv[2])))
    sys.stderr.write("usage: python -m edgepipe.devices.bench --worker SPEC_JSON\n")
    sys.exit(2)
