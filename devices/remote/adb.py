"""The adb transport and runner: Android phones (TensorFlow Lite's ``benchmark_model``) and Linux
boards reached over adb (the same Python agent as the ssh runner).

    edgepipe devices add pixel adb://R58M123ABC --benchmark-binary ./benchmark_model   # USB
    edgepipe devices add board adb://192.168.1.20:5555                                  # adb over TCP

Which way a device is measured (``--via``, default ``auto``): where the device's ``python3`` (or
``--python``) imports numpy, the agent runs (``adb push agent.py`` + the artifact, ``adb shell
python3 agent.py ...``) and rows look exactly like local and ssh rows; otherwise, with a
``--benchmark-binary`` (given at ``devices add`` or bench time: it cannot be downloaded here), the
binary is pushed once to ``/data/local/tmp/edgepipe-bin/`` (named by its hash, so it is reused
until it changes) and runs each TFLite artifact with ``--graph``, ``--num_threads``, ``--use_gpu``,
``--use_xnnpack``, ``--enable_op_profiling``; measure/benchmark_model.py parses what it prints.
ONNX artifacts need the agent.

Only the system ``adb``, with argument lists; every shell command is one quoted ``sh -c`` string.
Set ANDROID_ADB_SERVER_PORT to use a private adb server. Never imports TensorFlow.
"""
from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.bench import BenchRow
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import Artifact

from edgepipe.devices.measure import benchmark_model as bm
from edgepipe.devices.measure.host import signal_name
from edgepipe.devices.measure.plan import Job
from edgepipe.devices.measure.settings import BenchSettings
from edgepipe.devices.remote.registry import Device, arch_family, check_benchmark_binary, elf_machine
from edgepipe.devices.remote.runner import PROBED_TARGETS, RemoteRunner
from edgepipe.devices.remote.transport import MARK, ShellResult, Transport, TransportError, push_timeout, tail

ANDROID_TMP = "/data/local/tmp"


def classify(text: str, device: Device) -> TransportError:
    low = (text or "").lower()
    where = f"{device.name} ({device.serial})"
    if "unauthorized" in low:
        return TransportError(f"{where} has not authorised this computer for debugging", "auth",
                              "Unlock the phone and accept the 'Allow USB debugging?' prompt, then retry")
    if "offline" in low:
        return TransportError(f"{where} is offline", "unreachable",
                              "Reconnect the cable (or `adb reconnect`), then retry")
    if "not found" in low or "no devices" in low or "cannot connect" in low or "failed to connect" in low \
            or "connection refused" in low or "unable to connect" in low:
        return TransportError(f"{where} is not connected: {tail(text, 1)}", "unreachable",
                              "Check `adb devices` lists it (for adb over TCP: the phone's IP and port, and "
                              "`adb tcpip 5555` on the phone)")
    if "closed" in low or "protocol fault" in low:
        return TransportError(f"lost the adb connection to {where}: {tail(text, 1)}", "lost")
    return TransportError(f"adb failed for {where}: {tail(text, 2) or 'no message'}", "error")


class ADBTransport(Transport):
    kind = "adb"

    def __init__(self, device: Device, adb: str = "adb"):
        super().__init__(device)
        self.adb = adb
        self._connected_here = False

    @property
    def serial(self) -> str:
        return self.device.serial or ""

    @property
    def tcp(self) -> bool:
        return bool(self.device.host and self.device.port)

    def _run(self, args: list[str], timeout: float, serial: bool = True) -> subprocess.CompletedProcess:
        argv = [self.adb, *(["-s", self.serial] if serial else []), *args]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                              errors="replace")

    def open(self) -> None:
        if not shutil.which(self.adb):
            raise TransportError("'adb' is not installed on this machine", "missing",
                                 "Install Android platform-tools (apt install adb)")
        t = self.device.connect_timeout + 10
        try:
            if self.tcp:
                r = self._run(["connect", self.serial], t, serial=False)
                out = (r.stdout + r.stderr).strip()
                if "connected to" not in out.lower():
                    raise classify(out or f"adb connect {self.serial} failed", self.device)
                self._connected_here = "already connected" not in out.lower()
            deadline = time.monotonic() + t
            while True:
                r = self._run(["get-state"], t)
                state = r.stdout.strip()
                if state == "device":
                    return
                # a device that was just connected over TCP may need a moment to leave "offline"
                if time.monotonic() > deadline or "not found" in r.stderr.lower() and not self.tcp:
                    raise classify(r.stderr or state or "no state", self.device)
                time.sleep(0.5)
        except subprocess.TimeoutExpired:
            raise TransportError(f"adb did not answer for {self.device.name} within {t:.0f} s", "unreachable",
                                 "Check `adb devices`") from None

    def close(self) -> None:
        if self._connected_here:
            try:
                self._run(["disconnect", self.serial], 15, serial=False)
            except (OSError, subprocess.SubprocessError):
                pass
            self._connected_here = False

    def _run_shell(self, script: str, timeout: float) -> ShellResult:
        try:
            r = self._run(["shell", script], timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return ShellResult(None, out, err, None, timed_out=True)
        if MARK not in r.stdout and r.returncode != 0 and r.stderr.strip().lower().startswith(("error", "adb:")):
            raise classify(r.stderr, self.device)
        return ShellResult(None, r.stdout, r.stderr, r.returncode)

    def push(self, paths: list[Path], remote_dir: str, timeout: float) -> None:
        try:
            r = self._run(["push", *(str(p) for p in paths), remote_dir.rstrip("/") + "/"], timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"adb push to {self.device.name} did not finish within {timeout:.0f} s",
                                 "timeout") from None
        if r.returncode != 0:
            e = classify(r.stderr or r.stdout, self.device)
            e.message = f"copying {', '.join(Path(p).name for p in paths)}: {e.message}"
            raise e

    def pull(self, remote_path: str, local: Path, timeout: float) -> None:
        try:
            r = self._run(["pull", remote_path, str(local)], timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"adb pull from {self.device.name} did not finish within {timeout:.0f} s",
                                 "timeout") from None
        if r.returncode != 0:
            e = classify(r.stderr or r.stdout, self.device)
            e.message = f"copying back {Path(remote_path).name}: {e.message}"
            raise e


_ANDROID_OR_TMP = (f'"$(if [ -d {ANDROID_TMP} ] && [ -w {ANDROID_TMP} ]; then echo {ANDROID_TMP}; '
                   'else echo "${TMPDIR:-/tmp}"; fi)"')


class ADBRunner(RemoteRunner):
    """The adb runner: the agent where the device has Python + numpy, else benchmark_model."""

    def __init__(self, device: Device, transport: ADBTransport, benchmark_binary: Optional[str] = None,
                 step_timeout: float = 120.0):
        super().__init__(device, transport, step_timeout)
        self.binary = Path(benchmark_binary or device.benchmark_binary) if (benchmark_binary or
                                                                            device.benchmark_binary) else None
        self.mode: Optional[str] = None  # agent | benchmark_model, decided in _load
        self.mode_reason: Optional[str] = None
        self._remote_binary: Optional[str] = None
        self.binary_pushed: Optional[bool] = None  # this session copied the binary (False: reused)

    @property
    def runner_label(self) -> str:  # type: ignore[override]
        return self.mode or "agent"

    def _base_expr(self) -> str:
        return super()._base_expr() if self.device.tmpdir else _ANDROID_OR_TMP

    # -------------------------------------------------------------- facts, mode, probe
    def _load(self) -> None:
        self._load_facts()
        py_ok = not self._facts.get("python_error") and not self._facts.get("numpy_error")
        via = self.device.via
        if via == "agent" or (via == "auto" and py_ok):
            self.mode = "agent"
            self._probe = self._probe_targets()
            return
        if self.binary is None:
            self.mode = None
            py = (self._facts.get("python_error") or self._facts.get("numpy_error") or "")[:160]
            self.mode_reason = (f"{self.name} has no Python with numpy ({py}) and no benchmark_model binary was "
                                f"given: pass --benchmark-binary PATH (TFLite's benchmark_model built for the "
                                f"device's ABI) at `devices add` or bench time")
            self._probe = self._everywhere(self.mode_reason)
            return
        self.mode = "benchmark_model"
        self._probe = self._probe_benchmark_model()

    def _probe_benchmark_model(self) -> dict:
        onnx = {"reason": f"{self.name} is measured with benchmark_model, which runs TFLite only: install Python, "
                          f"numpy and onnxruntime on the device (--via agent) for ONNX"}
        abi = (self._facts or {}).get("cpu", {}).get("abi") or (self._facts or {}).get("cpu", {}).get("arch")
        built = elf_machine(self.binary) if self.binary else None
        if built and abi and arch_family(built) != arch_family(abi):
            why = f"benchmark binary {self.binary} is built for {built} but {self.name} is {abi}: build it for {abi}"
            return {t: {"tflite": {"reason": why}, "onnx": onnx} for t in PROBED_TARGETS}
        base = {"available": True, "runtime": "benchmark_model", "binary": str(self.binary), "built_for": built}
        return {"cpu": {"tflite": {**base, "delegate": "xnnpack"}, "onnx": onnx},
                "gpu": {"tflite": {**base, "delegate": "gpu",
                                   "note": "benchmark_model applies the GPU delegate at run time; a device or model "
                                           "it cannot serve fails that row with the tool's own message"},
                        "onnx": onnx},
                "edgetpu": {"tflite": {"reason": "benchmark_model has no Edge TPU delegate here; Coral boards run the "
                                                 "agent (--via agent)"}, "onnx": onnx}}

    def identity(self) -> dict:
        out = super().identity()
        out["runner"] = f"adb:{self.mode or 'none'}"
        if self.mode_reason:
            out["mode_reason"] = self.mode_reason
        if self.binary:
            out["benchmark_binary"] = str(self.binary)
        return out

    # -------------------------------------------------------------- benchmark_model
    def _ensure_binary(self) -> str:
        """Push the binary once (named by its hash under <tmp>/edgepipe-bin) and reuse it afterwards."""
        if self._remote_binary:
            return self._remote_binary
        h = hashlib.sha256(self.binary.read_bytes()).hexdigest()[:16]
        script = (f"b={self._base_expr()}/edgepipe-bin\nmkdir -p \"$b\" && chmod 755 \"$b\" && "
                  f"f=\"$b/benchmark_model-{h}\" && echo \"$f\" && if [ -x \"$f\" ]; then echo present; fi")
        res = self.t.shell(script, self.step_timeout)
        if res.rc is None:
            raise self.t.failure(res, "preparing the benchmark_model directory")
        lines = res.stdout.strip().splitlines()
        if res.rc != 0 or not lines or not lines[0].startswith("/"):
            raise TransportError(f"cannot make a directory for benchmark_model on {self.name}: "
                                 f"{tail(res.stderr or res.stdout, 1)}", "error")
        target = lines[0].strip()
        if "present" not in lines[1:]:
            staging = target.rsplit("/", 1)[0]
            tmp_name = Path(self.binary).name
            self.t.push([self.binary], staging, push_timeout([self.binary], self.step_timeout))
            res = self.t.shell(f"cd {shlex.quote(staging)} && mv -f -- {shlex.quote(tmp_name)} {shlex.quote(target)}"
                               f" && chmod 755 {shlex.quote(target)}", self.step_timeout)
            if res.rc != 0:
                raise TransportError(f"cannot install benchmark_model on {self.name}: {tail(res.stderr, 1)}", "error")
            self.binary_pushed = True
        else:
            self.binary_pushed = False
        self._remote_binary = target
        return target

    def plan(self, art: Artifact, target: str, folder: Path) -> tuple[BenchRow, Optional[Job]]:
        row, job = super().plan(art, target, folder)
        if job is not None and self.mode == "benchmark_model":
            row.runtime = "benchmark_model"
        return row, job

    def run(self, job: Job, s: BenchSettings, threads: int, inputs: Optional[Path],
            outputs: Optional[Path]) -> BenchRow:
        if self.mode != "benchmark_model":
            return super().run(job, s, threads, inputs, outputs)
        row = job.row
        row.runner = "adb:benchmark_model"
        row.threads = threads
        row.input_source = "random (benchmark_model)"
        t0 = time.perf_counter()
        d = None
        try:
            binary = self._ensure_binary()
            d = self.mktemp()
            self.t.push([job.path], d, push_timeout([job.path], self.step_timeout))
            argv = bm.command(binary, f"{d}/{job.path.name}", row.target, threads, s.runs, s.min_seconds, s.warmup,
                              max_secs=s.max_seconds, profile=s.profile)
            res = self.t.shell(self.run_script(d, argv, s.timeout_s, merge_stderr=True),
                               s.timeout_s + self.step_timeout)
            self._finish_bm(row, res, s)
        except TransportError as e:
            row.status, row.reason = "failed", f"{self.name}: {e.one_line()}"
            row.latency_ms = {}
        finally:
            self._close_row(row, d, t0)
        return row

    def _finish_bm(self, row: BenchRow, res: ShellResult, s: BenchSettings) -> None:
        text = res.stdout + ("\n" + res.stderr if res.stderr else "")
        if res.rc is None:
            e = self.t.failure(res, "benchmark_model")
            row.status, row.reason = "failed", f"{self.name}: {e.one_line()}"
            row.stderr_tail = tail(text, 6, 1500) or None
            return
        parsed = bm.parse(text)
        row.stderr_tail = tail(text, 6, 1500) or None
        if res.rc in (124, 137) and not parsed.complete:
            row.status = "failed"
            row.reason = f"timed out on {self.name} after {s.timeout_s:.0f} s (killed by the device's timeout)"
            return
        if res.rc > 128 and not parsed.complete:
            row.status, row.signal = "failed", signal_name(-(res.rc - 128))
            row.reason = f"benchmark_model crashed with {row.signal} on {self.name}"
            return
        if res.rc == 126 or res.rc == 127:
            row.status = "failed"
            row.reason = (f"benchmark_model could not be started on {self.name} (exit {res.rc}: "
                          f"{tail(text, 1)}): is the binary built for this device?")
            return
        if res.rc != 0 or not parsed.complete:
            row.status = "failed"
            row.reason = f"benchmark_model failed on {self.name} (exit {res.rc}): {parsed.error}"
            return
        f = bm.row_fields(parsed, row.target)
        notes = f.pop("notes")
        for k, v in f.items():
            if v is not None:
                setattr(row, k, v)
        row.notes.extend(notes)
        row.measured_s = None
        row.status, row.reason = "ok", None


def make_adb_runner(dev: Device, benchmark_binary: Optional[str] = None, adb: str = "adb") -> ADBRunner:
    if dev.via == "benchmark_model" and not (benchmark_binary or dev.benchmark_binary):
        raise UserError(f"device '{dev.name}' is measured with benchmark_model but no binary was given",
                        "Pass --benchmark-binary PATH (TFLite's benchmark_model for the device) to bench or "
                        "`devices add`")
    if benchmark_binary:
        check_benchmark_binary(benchmark_binary)
    return ADBRunner(dev, ADBTransport(dev, adb=adb), benchmark_binary=benchmark_binary)
