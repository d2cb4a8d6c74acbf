"""RemoteRunner: bench rows (and eval's predictions) on one registered device, through a Transport.

How a row runs on a device (``RemoteRunner.run``; the transports are ssh.py and adb.py):
  1. ``mktemp -d`` on the device (under ``--tmpdir``, else $TMPDIR or /tmp; /data/local/tmp on Android)
  2. copy devices/onboard/agent.py - the same file the local runner uses - and the artifact (and the
     input samples) into it
  3. run the agent with the device's Python under ``timeout``, with the row's MeasureSpec as its
     command line; it prints one JSON object
  4. copy the outputs back (for the cpu/gpu agreement figures)
  5. remove the temp dir: always, also when a step failed or timed out (and once more, for every dir
     this session made, when the session closes). The run script also traps HUP/INT/TERM.
Every step has a timeout; a step that fails makes that row ``failed`` with the reason, never a partial
row reported as complete, and the next row goes on. Rows are planned by measure/plan.py, the same
planner as local rows; a device runs what its agent runs (TFLite, ONNX), as its probe (probe.py,
pushed with the agent) says. Phones without Python run TensorFlow Lite's ``benchmark_model``
instead (adb.py). Never imports TensorFlow.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.pipeline.base.bench import BenchRow
from edgepipe.pipeline.base.manifest import Artifact

from edgepipe.devices.measure.bench import apply_agent_output
from edgepipe.devices.measure.host import default_threads
from edgepipe.devices.measure.plan import Job, plan_row
from edgepipe.devices.measure.settings import BenchSettings
from edgepipe.devices.onboard.agent import MeasureSpec
from edgepipe.devices.remote.facts import FACTS_SCRIPT, parse_facts
from edgepipe.devices.remote.registry import Device
from edgepipe.devices.remote.transport import ShellResult, Transport, TransportError, push_timeout, tail
from edgepipe.devices.runtimes.base import Runtime
from edgepipe.devices.runtimes.hostprobe import AGENT, PREDICT, PROBE

PROBED_TARGETS = ("cpu", "gpu", "edgetpu")
AGENT_FORMATS = ("tflite", "onnx")
_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/+-]*/edgepipe\.[A-Za-z0-9._]+$")
#: environment variables forwarded to the remote agent when set here (the agent's test hooks)
FORWARD_ENV = ("EDGEPIPE_AGENT_CRASH",)


def _json_line(stdout: str) -> Optional[dict]:
    lines = [ln for ln in (stdout or "").strip().splitlines() if ln.startswith("{")]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


class RemoteRunner:
    """Runs bench rows on one registered device (the run_bench runner seam; see bench.LocalRunner).

    Use as a context manager: it connects on enter (a failure is kept, not raised: every row of this
    device then fails with the reason), probes the device once, and on exit removes whatever this
    session left on the device and disconnects.
    """

    runner_label = "agent"
    mode: Optional[str] = "agent"  # how rows run there (adb.py: agent or benchmark_model)

    def __init__(self, device: Device, transport: Transport, step_timeout: float = 120.0):
        self.device, self.name, self.t, self.step_timeout = device, device.name, transport, step_timeout
        self.error: Optional[TransportError] = None
        self._facts: Optional[dict] = None
        self._probe: Optional[dict] = None
        self._dirs: set[str] = set()
        self._opened = False

    # -------------------------------------------------------------- session
    def __enter__(self) -> "RemoteRunner":
        self.open()
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def open(self) -> None:
        if self._opened:
            return
        self._opened = True
        try:
            self.t.open()
            self._load()
        except TransportError as e:
            self.error = e

    def close(self) -> None:
        try:
            for d in sorted(self._dirs):
                self._rmdir(d)
        finally:
            self.t.close()
            self._opened = False

    # -------------------------------------------------------------- remote steps
    def _base_expr(self) -> str:
        return shlex.quote(self.device.tmpdir) if self.device.tmpdir else '"${TMPDIR:-/tmp}"'

    def mktemp(self) -> str:
        script = (f"b={self._base_expr()}\n"
                  'mktemp -d "$b/edgepipe.XXXXXXXX" 2>/dev/null || '
                  '{ d="$b/edgepipe.$$$(date +%s)"; mkdir -m 700 "$d" && echo "$d"; }')
        res = self.t.shell(script, self.step_timeout)
        if res.rc is None:
            raise self.t.failure(res, "mktemp on the device")
        d = res.stdout.strip().splitlines()[-1].strip() if res.stdout.strip() else ""
        if res.rc != 0 or not _REMOTE_DIR.match(d):
            raise TransportError(f"cannot make a temp dir on {self.name} under {self._base_expr()}: "
                                 f"{tail(res.stderr or res.stdout, 2) or 'mktemp printed ' + repr(d)}", "error",
                                 "Pass --tmpdir with a writable directory at `devices add`")
        self._dirs.add(d)
        return d

    def _close_row(self, row: BenchRow, d: Optional[str], t0: float) -> None:
        """End of every measured row: remove its temp dir (noting a failure) and stamp its wall time."""
        why = self._rmdir(d) if d is not None else None
        if why:
            row.notes.append(f"temp dir left on the device: {why}")
        row.wall_s = time.perf_counter() - t0

    def _rmdir(self, d: str) -> Optional[str]:
        """Remove a temp dir this session made; returns a reason when it could not."""
        if not _REMOTE_DIR.match(d):  # never rm -rf anything but our own mktemp dirs
            return f"refused to remove {d!r}"
        try:
            res = self.t.shell(f"cd / && rm -rf -- {shlex.quote(d)} && ! [ -e {shlex.quote(d)} ]",
                               min(60.0, self.step_timeout))
        except TransportError as e:
            return e.one_line()
        if res.rc == 0:
            self._dirs.discard(d)
            return None
        return f"could not remove {d} on {self.name}: {tail(res.stderr, 1) or 'exit ' + str(res.rc)}"

    def _env_prefix(self) -> str:
        env = {**self.device.env, **{k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}}
        return "env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items())) + " " if env else ""

    def run_script(self, d: str, argv: list[str], timeout_s: float, merge_stderr: bool = False) -> str:
        """The sh script for one measurement in ``d``: traps that clean up if the session dies, the
        device's ``timeout`` where it has one, and the command."""
        qd = shlex.quote(d)
        return "\n".join([
            f"cd {qd} || exit 97",
            *(f"trap 'cd /; rm -rf -- {qd}; exit {code}' {sig}" for sig, code in
              (("HUP", 129), ("INT", 130), ("PIPE", 141), ("TERM", 143))),
            'T=""',
            f'if timeout -k 1 5 true >/dev/null 2>&1; then T="timeout -k 5 {max(1, int(timeout_s))}"; fi',
            f"$T {self._env_prefix()}{' '.join(shlex.quote(a) for a in argv)}{' 2>&1' if merge_stderr else ''}",
        ])

    def _run_onboard(self, d: str, files: list[Path], script: Path, args: list[str], timeout_s: float) -> ShellResult:
        """Push ``files`` with the onboard scripts into ``d`` and run ``script`` (agent, probe, predict) there."""
        files = [AGENT, *([script] if script != AGENT else []), *files]
        self.t.push(files, d, push_timeout(files, self.step_timeout))
        argv = [self.device.python, script.name, *args]
        return self.t.shell(self.run_script(d, argv, timeout_s), timeout_s + self.step_timeout)

    # -------------------------------------------------------------- facts and probes
    def _load_facts(self) -> dict:
        res = self.t.shell(FACTS_SCRIPT.replace("PY", shlex.quote(self.device.python)), self.step_timeout)
        if res.rc is None:
            raise self.t.failure(res, "reading the device's facts")
        self._facts = parse_facts(res.stdout, self.device.python)
        return self._facts

    def _load(self) -> None:
        self._load_facts()
        self._probe = self._probe_targets()

    def _everywhere(self, why: str) -> dict:
        return {t: {fmt: {"reason": why} for fmt in AGENT_FORMATS} for t in PROBED_TARGETS}

    def _probe_targets(self) -> dict:
        f = self._facts or {}
        if f.get("python_error"):
            return self._everywhere(f"no working Python at '{self.device.python}' on {self.name} "
                                    f"({f['python_error'][:200]}): install python3 (3.9+) there or pass --python at "
                                    f"`devices add`")
        if f.get("numpy_error"):
            return self._everywhere(f"numpy is not installed for {self.device.python} on {self.name}: "
                                    f"pip install numpy there")
        d = self.mktemp()
        try:
            res = self._run_onboard(d, [], PROBE, [",".join(PROBED_TARGETS)], self.step_timeout)
        finally:
            self._rmdir(d)
        if res.rc is None:
            raise self.t.failure(res, "probing the device's targets")
        data = _json_line(res.stdout) or {}
        if not isinstance(data.get("targets"), dict):
            return self._everywhere(f"the probe failed on {self.name} (exit {res.rc}): {tail(res.stderr, 2)}")
        versions = self._facts.setdefault("versions", {})
        for p in (data["targets"].get("cpu", {}).get(fmt) or {} for fmt in AGENT_FORMATS):
            if p.get("available") and p.get("runtime"):
                versions[p["runtime"]] = p.get("version")
        self._facts["agent_version"] = data.get("agent_version")
        return data["targets"]

    def identity(self) -> dict:
        out = {"name": self.name, **self.device.identity(), "runner": f"{self.t.kind}:{self.runner_label}"}
        if getattr(self.t, "copy", None):
            out["copy"] = self.t.copy
        if self.error is not None:
            out["error"] = self.error.one_line()
        if self._facts:
            out["facts"] = self._facts
        if self._probe:
            out["targets"] = self._offers()
        return out

    def _offers(self) -> dict:
        """target -> {format: True or the reason}: what `edgepipe devices` shows."""
        out = {}
        for t in PROBED_TARGETS:
            p = (self._probe or {}).get(t) or {}
            out[t] = {fmt: True if (p.get(fmt) or {}).get("available") else
                      (p.get(fmt) or {}).get("reason") or p.get("reason") or "not probed" for fmt in AGENT_FORMATS}
        return out

    def facts(self) -> dict:
        if self.error is not None:
            return {"hostname": None, "os": "?", "cpu": {"model": f"{self.name} (unreachable)"},
                    "device": self.identity(), "error": self.error.one_line()}
        return {**(self._facts or {}), "device": self.device.identity()}

    def probe(self, target: str) -> dict:
        if self.error is not None:
            return {"reason": self.error.one_line()}
        return (self._probe or {}).get(target) or {"reason": f"{target} was not probed on {self.name}"}

    def default_threads(self) -> int:
        return default_threads(((self._facts or {}).get("cpu") or {}).get("usable_cores") or 4)

    # -------------------------------------------------------------- planning (measure/plan.py's Where)
    def skip_reason(self, rt: Runtime, art: Artifact) -> Optional[str]:
        if rt.agent_format is None:
            return f"{self.name} runs TFLite and ONNX artifacts; {art.format} artifacts are measured locally only"
        return None

    def unavailable(self, rt: Runtime, target: str) -> Optional[tuple[str, str]]:
        if self.error is not None:
            return "failed", f"{self.name}: {self.error.one_line()}"
        p = ((self._probe or {}).get(target) or {}).get(rt.agent_format) or {}
        return None if p.get("available") else ("unavailable", f"on {self.name}: {p.get('reason') or 'not available'}")

    def plan(self, art: Artifact, target: str, folder: Path) -> tuple[BenchRow, Optional[Job]]:
        row, job = plan_row(art, target, folder, self)
        p = ((self._probe or {}).get(target) or {}).get(job.agent_format) if job else None
        if p and p.get("runtime") == "tflite_runtime":
            row.notes.append(f"runtime on {self.name}: tflite_runtime {p.get('version') or ''}".strip())
        return row, job

    # -------------------------------------------------------------- measuring
    def run(self, job: Job, s: BenchSettings, threads: int, inputs: Optional[Path],
            outputs: Optional[Path]) -> BenchRow:
        row = job.row
        row.runner, row.threads = f"{self.t.kind}:{self.runner_label}", threads
        t0, d = time.perf_counter(), None
        try:
            spec = job.spec(s, threads, Path(inputs.name) if inputs else None,
                            Path("outputs.npz") if outputs else None, artifact=job.path.name)
            d = self.mktemp()
            res = self._run_onboard(d, [job.path] + ([inputs] if inputs else []), AGENT, spec.to_argv(), s.timeout_s)
            self._finish(row, res, s)
            if outputs is not None and row.ok:
                try:
                    self.t.pull(f"{d}/outputs.npz", outputs, self.step_timeout)
                except TransportError as e:
                    row.notes.append(f"outputs not copied back (no agreement figures): {e.one_line()}")
        except TransportError as e:
            row.status, row.reason = "failed", f"{self.name}: {e.one_line()}"
            row.latency_ms, row.samples_ms = {}, []
        finally:
            self._close_row(row, d, t0)
        return row

    def _finish(self, row: BenchRow, res: ShellResult, s: BenchSettings) -> None:
        """Map the remote exit status onto the local runner's conventions, then let bench fill the row."""
        has_json = _json_line(res.stdout) is not None
        why = None
        if res.rc is None:
            why = f"{self.name}: {self.t.failure(res, 'the measurement').one_line()}"
        elif res.rc in (124, 137) and not has_json:
            why = f"timed out on {self.name} after {s.timeout_s:.0f} s (killed by the device's timeout)"
        elif res.rc == 127 and not has_json:
            why = (f"'{self.device.python}' was not found on {self.name}: install python3 there or pass --python at "
                   f"`devices add`")
        if why:
            row.status, row.reason, row.stderr_tail = "failed", why, tail(res.stderr, 6, 1500) or None
            return
        rc = -(res.rc - 128) if res.rc > 128 and not has_json else res.rc  # sh reports a signal as 128 + n
        apply_agent_output(row, rc, res.stdout, res.stderr)
        if row.status == "failed" and row.signal and row.reason:
            row.reason = f"{row.reason} on {self.name}"

    # -------------------------------------------------------------- predicting (edgepipe eval --device)
    def predict_reason(self, fmt: str, target: str = "cpu") -> Optional[str]:
        """Why this device cannot run ``fmt`` artifacts on ``target`` in predict mode, or None."""
        if self.error is not None:
            return None  # a connection failure is a failure, not a skip: predict() raises it
        if self.mode == "benchmark_model":
            return f"{self.name} runs benchmark_model (no Python + numpy there), which cannot return outputs"
        if fmt not in AGENT_FORMATS:
            return f"{self.name} runs TFLite and ONNX artifacts; {fmt} artifacts are evaluated locally only"
        p = ((self._probe or {}).get(target) or {}).get(fmt) or {}
        return None if p.get("available") else f"on {self.name}: {p.get('reason') or 'not available'}"

    def predict(self, path: Path, fmt: str, inputs: Path, target: str = "cpu", threads: int = 0,
                timeout_s: float = 600.0) -> tuple[dict, dict]:
        """Run every sample of ``inputs`` (.npz) through ``path`` with predict.py on the device. Returns
        ({output_i: array}, its JSON). The temp dir is always removed. Raises TransportError (connection,
        timeout, or the run failing)."""
        if self.error is not None:
            raise self.error
        path, inputs, d = Path(path), Path(inputs), None
        spec = MeasureSpec(artifact=path.name, format=fmt, target=target, threads=int(threads or 0) or None,
                           inputs=inputs.name, predict_out="predictions.npz")
        try:
            d = self.mktemp()
            res = self._run_onboard(d, [path, inputs], PREDICT, spec.to_argv(), timeout_s)
            info = self._predicted(res, timeout_s)
            with tempfile.TemporaryDirectory(prefix="edgepipe-predict-") as td:
                local = Path(td) / "predictions.npz"
                self.t.pull(f"{d}/predictions.npz", local, self.step_timeout)
                with np.load(local) as z:
                    return {k: z[k] for k in z.files}, info
        finally:
            if d is not None:
                self._rmdir(d)

    def _predicted(self, res: ShellResult, timeout_s: float) -> dict:
        if res.rc is None:
            raise self.t.failure(res, "the prediction run")
        info = _json_line(res.stdout)
        if res.rc != 0 or (info or {}).get("status") != "ok":
            why = (info or {}).get("error") or (info or {}).get("reason") or tail(res.stderr, 2) or f"exit {res.rc}"
            if res.rc in (124, 137) and info is None:
                why = f"timed out after {timeout_s:.0f} s (killed by the device's timeout)"
            raise TransportError(f"the agent's predict mode failed on {self.name}: {why}", "error")
        return info
