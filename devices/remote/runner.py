"""Remote devices: a registry of ssh boards and adb phones, and the runner that takes `edgepipe bench`
to them and brings the figures back into the same report.

    edgepipe devices add pi4 ssh://pi@10.0.0.7 --key ~/.ssh/id_ed25519 --accept-new-host-key
    edgepipe devices add pixel adb://R58M123ABC --benchmark-binary ./benchmark_model
    edgepipe bench OUT --device pi4 --targets cpu         # or --device pi4,pixel,local, or --device all

The registry is one small JSON file: ``--config PATH``, else ``$EDGEPIPE_CONFIG``, else
``$XDG_CONFIG_HOME/edgepipe/devices.json`` (``~/.config/edgepipe/devices.json``). edgepipe's own ssh
``known_hosts`` lives next to it.

How a row runs on a device (``RemoteRunner.run``; the transports are devices/ssh.py and devices/adb.py):
  1. ``mktemp -d`` on the device (under ``--tmpdir``, else $TMPDIR or /tmp; /data/local/tmp on Android)
  2. copy devices/agent.py - the same file the local runner uses - and the artifact (and the input
     samples) into it
  3. run the agent with the device's Python under ``timeout``; it prints one JSON object
  4. copy the outputs back (for the cpu/gpu agreement figures)
  5. remove the temp dir: always, also when a step failed or timed out (and once more, for every dir
     this session made, when the session closes). The run script also traps HUP/INT/TERM.
Every step has a timeout; a step that fails makes that row ``failed`` with the reason, never a
partial row reported as complete, and the next row goes on. Phones without Python run TensorFlow
Lite's ``benchmark_model`` instead (devices/adb.py).

Never imports TensorFlow.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from edgepipe.pipeline.base.errors import UserError

from edgepipe.devices.measure.bench import (AGENT, AGENT_NATIVE, BENCH_TARGETS, EDGETPU_PRECISIONS, BenchReport, BenchRow, BenchSettings, _agent_format, _command, _Job, apply_agent_output)

CONFIG_ENV = "EDGEPIPE_CONFIG"
CONFIG_VERSION = 1
RESERVED_NAMES = ("local", "all")
KINDS = ("ssh", "adb")
VIA = ("auto", "agent", "benchmark_model")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])$")
_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_ENVNAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/+-]*/edgepipe\.[A-Za-z0-9._]+$")
#: environment variables forwarded to the remote agent when set here (the agent's test hooks)
FORWARD_ENV = ("EDGEPIPE_AGENT_CRASH",)
MARK = "@@edgepipe-rc="


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
@dataclass
class Device:
    """A registered device. ``url`` is what the user typed; the other fields are parsed from it or set
    with ``devices add`` options."""

    name: str
    kind: str  # ssh | adb
    url: str
    host: Optional[str] = None  # ssh host, or adb-over-TCP host
    port: Optional[int] = None
    user: Optional[str] = None
    serial: Optional[str] = None  # adb serial (adb://SERIAL) or "host:port" (adb://host:port)
    key: Optional[str] = None  # ssh identity file
    known_hosts: Optional[str] = None  # None: edgepipe's own file; "user": ssh's default; else a path
    accept_new_host_key: bool = False
    python: str = "python3"
    tmpdir: Optional[str] = None  # base directory for mktemp on the device
    env: dict = field(default_factory=dict)  # extra environment for the remote agent
    benchmark_binary: Optional[str] = None  # adb: local path of TFLite's benchmark_model for the phone
    via: str = "auto"  # adb: agent | benchmark_model | auto (agent where Python + numpy answer)
    connect_timeout: float = 10.0
    added: Optional[str] = None

    @property
    def address(self) -> str:
        if self.kind == "ssh":
            return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"
        return self.serial or "?"

    def identity(self) -> dict:
        return {"kind": self.kind, "url": self.url, "address": self.address, "python": self.python,
                **({"via": self.via} if self.kind == "adb" else {})}

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, {}, False) or k in ("name", "kind", "url")}

    @classmethod
    def from_dict(cls, d: dict) -> "Device":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_url(url: str) -> dict:
    """``ssh://[user@]host[:port]`` or ``adb://SERIAL`` / ``adb://host:port`` -> Device fields."""
    url = (url or "").strip()
    m = re.match(r"^(ssh|adb)://(.*)$", url)
    if not m:
        raise UserError(f"device address '{url}' is not ssh://user@host[:port] or adb://SERIAL",
                        "Use e.g. ssh://pi@raspberrypi.local or adb://R58M123ABC (adb://192.168.1.20:5555 over TCP)")
    kind, rest = m.group(1), m.group(2).rstrip("/")
    if kind == "ssh":
        user = None
        if "@" in rest:
            user, rest = rest.rsplit("@", 1)
            if not _USER.match(user):
                raise UserError(f"user name '{user}' in {url} is not a valid login name",
                                "Use letters, digits, '.', '_' and '-' (not starting with '-')")
        port = None
        hm = re.match(r"^(\[[^\]]+\]|[^:]+)(?::(\d+))?$", rest)
        if not hm:
            raise UserError(f"cannot read host and port from {url}", "Use ssh://user@host or ssh://user@host:2222")
        host, p = hm.group(1), hm.group(2)
        if not _HOST.match(host) or host.startswith("-"):
            raise UserError(f"host '{host}' in {url} is not a host name or address",
                            "Use a name such as raspberrypi.local, an IPv4 address, or [IPv6]")
        if p is not None:
            port = int(p)
            if not 0 < port < 65536:
                raise UserError(f"port {port} in {url} is out of range", "Use a port between 1 and 65535")
        return {"kind": "ssh", "host": host.strip("[]") if host.startswith("[") else host, "port": port,
                "user": user}
    if not rest or not _SERIAL.match(rest):
        raise UserError(f"'{rest}' in {url} is not an adb serial or host:port",
                        "Use the serial `adb devices` lists, e.g. adb://R58M123ABC, or adb://192.168.1.20:5555")
    out = {"kind": "adb", "serial": rest}
    hm = re.match(r"^(.+):(\d+)$", rest)
    if hm:
        out["host"], out["port"] = hm.group(1), int(hm.group(2))
    return out


def config_path(explicit: Optional[str | os.PathLike] = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "edgepipe" / "devices.json"


class Registry:
    """The devices file: ``{"version": 1, "devices": {name: {...}}}``, written atomically."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = config_path(path)
        self.devices: dict[str, Device] = {}
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read the device registry {self.path}: {e}",
                                "Fix or delete the file, then add the devices again") from e
            if not isinstance(d, dict) or not isinstance(d.get("devices", {}), dict):
                raise UserError(f"{self.path} is not an edgepipe device registry",
                                f"Point --config or ${CONFIG_ENV} at a devices.json edgepipe wrote")
            if int(d.get("version", 1)) > CONFIG_VERSION:
                raise UserError(f"{self.path} was written by a newer edgepipe (version {d.get('version')})",
                                "Upgrade edgepipe")
            for name, dd in d.get("devices", {}).items():
                try:
                    self.devices[name] = Device.from_dict({**dd, "name": name})
                except TypeError as e:
                    raise UserError(f"device '{name}' in {self.path} is malformed ({e})",
                                    f"Remove it with `edgepipe devices remove {name}` and add it again") from e

    @property
    def known_hosts(self) -> Path:
        return self.path.parent / "known_hosts"

    def save(self) -> Path:
        from edgepipe.pipeline.base.util import write_json_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        return write_json_atomic(self.path, {"version": CONFIG_VERSION,
                                             "devices": {n: {k: v for k, v in d.to_dict().items() if k != "name"}
                                                         for n, d in sorted(self.devices.items())}})

    def get(self, name: str) -> Device:
        if name not in self.devices:
            known = ", ".join(sorted(self.devices)) or "none registered"
            raise UserError(f"no device named '{name}' in {self.path} ({known})",
                            "Add it with `edgepipe devices add NAME ssh://user@host` or adb://SERIAL")
        return self.devices[name]

    def add(self, dev: Device, replace: bool = False) -> Device:
        if dev.name in self.devices and not replace:
            raise UserError(f"a device named '{dev.name}' is already registered ({self.devices[dev.name].url})",
                            f"Remove it first (`edgepipe devices remove {dev.name}`) or pass --replace")
        dev.added = dev.added or datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.devices[dev.name] = dev
        return dev

    def remove(self, name: str) -> Device:
        dev = self.get(name)
        del self.devices[name]
        return dev


def make_device(name: str, url: str, *, key: Optional[str] = None, known_hosts: Optional[str] = None,
                accept_new_host_key: bool = False, python: Optional[str] = None, tmpdir: Optional[str] = None,
                env: Optional[dict] = None, benchmark_binary: Optional[str] = None, via: Optional[str] = None,
                connect_timeout: Optional[float] = None) -> Device:
    """Validate everything a user typed for `devices add` and build the Device (nothing is contacted)."""
    if not _NAME.match(name or "") or name in RESERVED_NAMES:
        raise UserError(f"'{name}' cannot name a device",
                        "Use letters, digits, '.', '_' and '-' (not 'local' or 'all'), e.g. pi4 or pixel7")
    f = parse_url(url)
    dev = Device(name=name, url=url.strip(), **f)
    if key:
        kp = Path(key).expanduser()
        if dev.kind != "ssh":
            raise UserError("--key is for ssh devices", "Leave it out for adb devices")
        if not kp.is_file():
            raise UserError(f"identity file {key} does not exist", "Give the private key that logs in to the device")
        dev.key = str(kp.resolve())
    if known_hosts:
        if dev.kind != "ssh":
            raise UserError("--known-hosts is for ssh devices", "Leave it out for adb devices")
        dev.known_hosts = known_hosts if known_hosts == "user" else str(Path(known_hosts).expanduser().resolve())
    if accept_new_host_key and dev.kind != "ssh":
        raise UserError("--accept-new-host-key is for ssh devices", "Leave it out for adb devices")
    dev.accept_new_host_key = bool(accept_new_host_key)
    if python:
        if not re.match(r"^[A-Za-z0-9_./~+-]+$", python):
            raise UserError(f"python path '{python}' has characters edgepipe does not pass to a shell",
                            "Give a plain path such as /usr/bin/python3 or /home/pi/venv/bin/python")
        dev.python = python
    if tmpdir:
        if not re.match(r"^/[A-Za-z0-9_./+-]*$", tmpdir):
            raise UserError(f"remote temp dir '{tmpdir}' must be an absolute plain path", "Use e.g. /home/pi/tmp")
        dev.tmpdir = tmpdir.rstrip("/") or "/"
    for k, v in (env or {}).items():
        if not _ENVNAME.match(k):
            raise UserError(f"'{k}' is not an environment variable name", "Use --env NAME=VALUE")
    dev.env = dict(env or {})
    if benchmark_binary:
        if dev.kind != "adb":
            raise UserError("--benchmark-binary is for adb devices",
                            "ssh devices run the Python agent; install numpy and a runtime there")
        dev.benchmark_binary = str(check_benchmark_binary(benchmark_binary))
    if via:
        if via not in VIA:
            raise UserError(f"unknown --via '{via}'", f"Use one of: {', '.join(VIA)}")
        if dev.kind != "adb" and via == "benchmark_model":
            raise UserError("--via benchmark_model is for adb devices", "ssh devices run the Python agent")
        dev.via = via
    if connect_timeout is not None:
        if not 0 < connect_timeout <= 300:
            raise UserError(f"--connect-timeout {connect_timeout} is out of range", "Use 1 to 300 seconds")
        dev.connect_timeout = float(connect_timeout)
    return dev


def check_benchmark_binary(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"benchmark binary {path} does not exist",
                        "Build TensorFlow Lite's benchmark_model for the phone (bazel build -c opt "
                        "--config=android_arm64 //tensorflow/lite/tools/benchmark:benchmark_model) and give its path")
    return p.resolve()


def elf_machine(path: str | os.PathLike) -> Optional[str]:
    """The architecture an ELF executable is built for (aarch64, arm, x86_64, x86), or None if not ELF."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "little" if head[5] == 1 else "big"
    em = int.from_bytes(head[18:20], order)
    return {183: "aarch64", 40: "arm", 62: "x86_64", 3: "x86", 243: "riscv64"}.get(em, f"e_machine {em}")


def _arch_family(a: Optional[str]) -> Optional[str]:
    if not a:
        return None
    a = a.lower()
    if a in ("aarch64", "arm64", "arm64-v8a", "armv8l") or a.startswith("arm64"):
        return "aarch64"
    if a.startswith("arm"):
        return "arm"
    if a in ("x86_64", "amd64"):
        return "x86_64"
    if a in ("i386", "i686", "x86"):
        return "x86"
    return a


# ---------------------------------------------------------------------------------------------
# transports
# ---------------------------------------------------------------------------------------------
class TransportError(Exception):
    """A remote step failed for a reason of the connection (not of the measurement)."""

    def __init__(self, message: str, kind: str = "error", hint: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.kind = kind  # unreachable | hostkey | auth | timeout | lost | missing | error
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


@dataclass
class ShellResult:
    rc: Optional[int]  # the remote script's exit status; None when the marker never came back
    stdout: str
    stderr: str
    transport_rc: Optional[int] = None
    timed_out: bool = False


class Transport:
    """How commands and files reach a device (ssh.py, adb.py implement it)."""

    kind = "?"

    def __init__(self, device: Device):
        self.device = device

    def open(self) -> None:
        """Connect (or check the device answers). Raises TransportError."""

    def close(self) -> None:
        pass

    def _run_shell(self, script: str, timeout: float) -> ShellResult:
        raise NotImplementedError

    def shell(self, script: str, timeout: float) -> ShellResult:
        """Run a POSIX sh script on the device. ``rc`` is the script's own exit status, read from a
        marker line the script prints last, so a lost connection is never mistaken for an answer."""
        full = f"{script}\n__ep_rc=$?\nprintf '\\n{MARK}%s\\n' \"$__ep_rc\"\n"
        res = self._run_shell(f"sh -c {shlex.quote(full)}", timeout)
        out = res.stdout.replace("\r\n", "\n")
        i = out.rfind(MARK)
        res.rc = None
        if i >= 0 and (i == 0 or out[i - 1] == "\n") and not res.timed_out:
            code = out[i + len(MARK):].split("\n", 1)[0].strip()
            if code.isdigit():
                res.rc = int(code)
                out = out[:i - 1] if i > 0 else ""
        res.stdout = out
        return res

    def push(self, paths: list[Path], remote_dir: str, timeout: float) -> None:
        raise NotImplementedError

    def pull(self, remote_path: str, local: Path, timeout: float) -> None:
        raise NotImplementedError

    def failure(self, res: ShellResult, what: str) -> TransportError:
        """A TransportError for a shell step whose marker did not come back."""
        if res.timed_out:
            return TransportError(f"{what}: no answer from {self.device.name} within the timeout", "timeout")
        return TransportError(f"{what}: lost contact with {self.device.name} ({_tail(res.stderr, 2) or 'no output'})",
                              "lost")


def _tail(text: str, n: int = 3, width: int = 600) -> str:
    lines = [ln.strip() for ln in (text or "").replace("\r", "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-width:]


def _push_timeout(paths: list[Path], base: float) -> float:
    size = sum(p.stat().st_size for p in paths if p.exists())
    return base + 30.0 + size / 1e6  # at least 1 MB/s


# ---------------------------------------------------------------------------------------------
# facts and probes
# ---------------------------------------------------------------------------------------------
_FACTS_SCRIPT = r"""
echo "@@uname"; uname -srm 2>/dev/null
echo "@@hostname"; hostname 2>/dev/null || cat /proc/sys/kernel/hostname 2>/dev/null
echo "@@nproc"; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null
echo "@@cpuinfo"; head -c 32768 /proc/cpuinfo 2>/dev/null
echo "@@meminfo"; grep MemTotal /proc/meminfo 2>/dev/null
echo "@@os"; grep '^PRETTY_NAME=' /etc/os-release 2>/dev/null
echo "@@getprop"
if command -v getprop >/dev/null 2>&1; then
  for p in ro.product.manufacturer ro.product.model ro.product.cpu.abi ro.build.version.release \
           ro.build.version.sdk ro.soc.model ro.board.platform; do echo "$p=$(getprop $p)"; done
fi
echo "@@python"; PY -c 'import platform; print(platform.python_version())' 2>&1 | tail -n 1
echo "@@numpy"; PY -c 'import numpy; print(numpy.__version__)' 2>&1 | tail -n 1
echo "@@end"
"""


def _sections(text: str) -> dict[str, str]:
    out, cur = {}, None
    for ln in text.replace("\r", "").splitlines():
        if ln.startswith("@@") and not ln.startswith(MARK):
            cur = ln[2:].strip()
            out[cur] = ""
            continue
        if cur:
            out[cur] += ln + "\n"
    return {k: v.strip() for k, v in out.items()}


def parse_facts(text: str, python: str) -> dict:
    """What the facts script printed -> host facts shaped like host.host_facts() (cpu, os, python...)."""
    from edgepipe.devices.measure.host import _ARM_FLAGS, _X86_FLAGS

    sec = _sections(text)
    uname = sec.get("uname", "").split()
    machine = uname[-1] if uname else None
    info = sec.get("cpuinfo", "")
    model = None
    for key in ("model name", "Hardware", "Processor", "cpu model", "Model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if m:
            model = m.group(1).strip()
            break
    props = dict(ln.split("=", 1) for ln in sec.get("getprop", "").splitlines() if "=" in ln)
    props = {k: v for k, v in props.items() if v}
    if props.get("ro.soc.model") or props.get("ro.board.platform"):
        model = model or props.get("ro.soc.model") or props.get("ro.board.platform")
    flags: set[str] = set()
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.M)
    if m:
        flags = set(m.group(2).split())
    arm = (machine or "").lower() in ("aarch64", "arm64") or (machine or "").lower().startswith("arm")
    isa = [f for f in (_ARM_FLAGS if arm else _X86_FLAGS) if f in flags]
    if "asimd" in flags and "neon" not in isa:
        isa.insert(0, "neon")
    try:
        nproc = int(sec.get("nproc", "").split()[0])
    except (ValueError, IndexError):
        nproc = None
    mem = None
    mm = re.search(r"MemTotal:\s*(\d+)\s*kB", sec.get("meminfo", ""))
    if mm:
        mem = int(mm.group(1)) * 1024
    osname = None
    om = re.search(r'PRETTY_NAME="?([^"\n]+)"?', sec.get("os", ""))
    if om:
        osname = om.group(1)
    if props.get("ro.build.version.release"):
        osname = f"Android {props['ro.build.version.release']} (SDK {props.get('ro.build.version.sdk', '?')})"
    kernel = " ".join(uname[:2]) if len(uname) >= 2 else None
    pyv = sec.get("python", "")
    pyok = bool(re.match(r"^\d+\.\d+", pyv))
    npv = sec.get("numpy", "")
    npok = bool(re.match(r"^\d+\.\d+", npv))
    facts = {
        "hostname": sec.get("hostname") or None,
        "os": (f"{osname} · {kernel}" if osname and kernel else osname or kernel or "?"),
        "platform": " ".join(uname) or None,
        "python": pyv if pyok else None,
        "python_path": python,
        "cpu": {"model": model or machine, "arch": machine, "logical_cores": nproc, "usable_cores": nproc, "isa": isa},
        "memory_bytes": mem,
        "versions": {"numpy": npv if npok else None},
    }
    if props:
        facts["android"] = {"manufacturer": props.get("ro.product.manufacturer"),
                            "model": props.get("ro.product.model"),
                            "abi": props.get("ro.product.cpu.abi"), "release": props.get("ro.build.version.release"),
                            "sdk": props.get("ro.build.version.sdk"), "soc": props.get("ro.soc.model")}
        facts["cpu"]["abi"] = props.get("ro.product.cpu.abi")
    if not pyok:
        facts["python_error"] = pyv or f"{python} did not answer"
    elif not npok:
        facts["numpy_error"] = npv or "numpy did not answer"
    return facts


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
_RUNTIME_NAMES = {("tflite", "cpu"): "litert", ("tflite", "gpu"): "litert-gpu", ("tflite", "edgetpu"): "litert-edgetpu",
                  ("onnx", "cpu"): "onnxruntime", ("onnx", "gpu"): "onnxruntime-cuda"}


def _runtime_name(fmt: str, target: str) -> str:
    try:
        from edgepipe.devices.runtimes.base import runtimes_for

        rts = runtimes_for(fmt, target)
        if rts:
            return rts[0].name
    except Exception:  # noqa: BLE001 - a name for the report, never worth failing over
        pass
    return _RUNTIME_NAMES.get((fmt, target), f"{fmt}-{target}")


class RemoteRunner:
    """Runs bench rows on one registered device (the run_bench runner seam; see bench.LocalRunner).

    Use as a context manager: it connects on enter (a failure is kept, not raised: every row of this
    device then fails with the reason), probes the device once, and on exit removes whatever this
    session left on the device and disconnects.
    """

    runner_label = "agent"

    def __init__(self, device: Device, transport: Transport, step_timeout: float = 120.0):
        self.device = device
        self.name = device.name
        self.t = transport
        self.step_timeout = step_timeout
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
        except TransportError as e:
            self.error = e
            return
        try:
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
        if self.device.tmpdir:
            return shlex.quote(self.device.tmpdir)
        return '"${TMPDIR:-/tmp}"'

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
                                 f"{_tail(res.stderr or res.stdout, 2) or 'mktemp printed ' + repr(d)}", "error",
                                 "Pass --tmpdir with a writable directory at `devices add`")
        self._dirs.add(d)
        return d

    def _close_row(self, row: BenchRow, d: Optional[str], t0: float) -> None:
        """End of every measured row: remove its temp dir (noting a failure) and stamp its wall time."""
        if d is not None:
            why = self._rmdir(d)
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
        return f"could not remove {d} on {self.name}: {_tail(res.stderr, 1) or 'exit ' + str(res.rc)}"

    def _env_prefix(self) -> str:
        env = dict(self.device.env)
        for k in FORWARD_ENV:
            if os.environ.get(k):
                env[k] = os.environ[k]
        if not env:
            return ""
        return "env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(env.items())) + " "

    def run_script(self, d: str, argv: list[str], timeout_s: float, merge_stderr: bool = False) -> str:
        """The sh script for one measurement in ``d``: traps that clean up if the session dies, the
        device's ``timeout`` where it has one, and the command."""
        qd = shlex.quote(d)
        secs = max(1, int(timeout_s))
        return "\n".join([
            f"cd {qd} || exit 97",
            *(f"trap 'cd /; rm -rf -- {qd}; exit {code}' {sig}" for sig, code in
              (("HUP", 129), ("INT", 130), ("PIPE", 141), ("TERM", 143))),
            'T=""',
            f'if timeout -k 1 5 true >/dev/null 2>&1; then T="timeout -k 5 {secs}"; fi',
            f"$T {self._env_prefix()}{' '.join(shlex.quote(a) for a in argv)}{' 2>&1' if merge_stderr else ''}",
        ])

    # -------------------------------------------------------------- facts and probes
    def _load_facts(self) -> dict:
        script = _FACTS_SCRIPT.replace("PY", shlex.quote(self.device.python))
        res = self.t.shell(script, self.step_timeout)
        if res.rc is None:
            raise self.t.failure(res, "reading the device's facts")
        self._facts = parse_facts(res.stdout, self.device.python)
        return self._facts

    def _load(self) -> None:
        self._load_facts()
        self._probe = self._probe_targets()

    def _probe_targets(self) -> dict:
        f = self._facts or {}
        if f.get("python_error"):
            why = (f"no working Python at '{self.device.python}' on {self.name} ({f['python_error'][:200]}): "
                   f"install python3 (3.9+) there or pass --python at `devices add`")
            return {t: {"tflite": {"reason": why}, "onnx": {"reason": why}} for t in BENCH_TARGETS}
        if f.get("numpy_error"):
            why = f"numpy is not installed for {self.device.python} on {self.name}: pip install numpy there"
            return {t: {"tflite": {"reason": why}, "onnx": {"reason": why}} for t in BENCH_TARGETS}
        d = self.mktemp()
        try:
            self.t.push([AGENT], d, _push_timeout([AGENT], self.step_timeout))
            argv = [self.device.python, AGENT.name, "--probe", ",".join(BENCH_TARGETS)]
            res = self.t.shell(self.run_script(d, argv, self.step_timeout), self.step_timeout + 15)
        finally:
            self._rmdir(d)
        if res.rc is None:
            raise self.t.failure(res, "probing the device's targets")
        try:
            data = json.loads([ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")][-1])
            targets = data["targets"]
        except (ValueError, KeyError, IndexError):
            why = f"the agent's probe failed on {self.name} (exit {res.rc}): {_tail(res.stderr, 2)}"
            return {t: {"tflite": {"reason": why}, "onnx": {"reason": why}} for t in BENCH_TARGETS}
        if self._facts is not None:
            v = self._facts.setdefault("versions", {})
            cpu = targets.get("cpu", {})
            for fmt in ("tflite", "onnx"):
                p = cpu.get(fmt) or {}
                if p.get("available") and p.get("runtime"):
                    v[p["runtime"]] = p.get("version")
            self._facts["agent_version"] = data.get("agent_version")
        return targets

    def identity(self) -> dict:
        out = {"name": self.name, **self.device.identity(), "runner": f"{self.t.kind}:{self.runner_label}"}
        if self.error is not None:
            out["error"] = self.error.one_line()
        if self._facts:
            out["facts"] = self._facts
        if self._probe:
            out["targets"] = self._offers()
        return out

    def _offers(self) -> dict:
        """target -> {format: available or the reason}: what `edgepipe devices` shows."""
        out = {}
        for t in BENCH_TARGETS:
            p = (self._probe or {}).get(t) or {}
            out[t] = {fmt: (True if (p.get(fmt) or {}).get("available") else (p.get(fmt) or {}).get("reason")
                            or p.get("reason") or "not probed") for fmt in ("tflite", "onnx")}
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
        n = ((self._facts or {}).get("cpu") or {}).get("usable_cores") or 4
        return max(1, min(4, int(n)))

    # -------------------------------------------------------------- planning
    def _base_row(self, art, target: str, folder: Path) -> tuple[BenchRow, Optional[Path], Optional[str]]:
        row = BenchRow(artifact=art.id, format=art.format, precision=art.precision, target=target, runtime="-",
                       status="skipped", path=art.path, size_bytes=art.size_bytes, device=self.name)
        if art.status == "verify_failed":
            row.notes.append("verification failed at export: figures are for a model that does not match its source")
        if art.status not in ("ok", "verify_failed"):
            row.reason = (f"export failed: {art.error}" if art.status == "failed" and art.error
                          else f"export {art.status}: no artifact to run")
            return row, None, None
        path = folder / art.path
        if row.size_bytes is None and path.is_file():
            row.size_bytes = path.stat().st_size
        afmt = _agent_format(art, path)
        if afmt is None:
            row.runtime = art.format
            row.reason = f"{self.name} runs TFLite and ONNX artifacts; {art.format} artifacts are measured locally only"
            return row, None, None
        row.runtime = _runtime_name(afmt, target)
        if target == "edgetpu":
            if art.precision not in EDGETPU_PRECISIONS:
                row.reason = (f"the Edge TPU runs only full-int8 TFLite artifacts compiled with edgetpu_compiler; "
                              f"this one is {art.precision} {art.format}")
                return row, None, None
            with open(path, "rb") as fh:
                if b"edgetpu-custom-op" not in fh.read():
                    row.reason = "not compiled for the Edge TPU: run edgetpu_compiler on this int8 artifact"
                    return row, None, None
        if (afmt, target) not in AGENT_NATIVE:
            row.reason = f"no runtime runs {afmt} artifacts on {target}"
            return row, None, None
        return row, path, afmt

    def plan(self, art, target: str, folder: Path) -> tuple[BenchRow, Optional[_Job]]:
        row, path, afmt = self._base_row(art, target, folder)
        if path is None:
            return row, None
        if self.error is not None:
            row.status, row.reason = "failed", f"{self.name}: {self.error.one_line()}"
            return row, None
        p = ((self._probe or {}).get(target) or {}).get(afmt) or {}
        if not p.get("available"):
            row.status = "unavailable"
            row.reason = f"on {self.name}: {p.get('reason') or 'not available'}"
            return row, None
        if p.get("runtime") == "tflite_runtime":
            row.notes.append(f"runtime on {self.name}: tflite_runtime {p.get('version') or ''}".strip())
        return row, _Job(row, path, afmt, row.runtime)

    # -------------------------------------------------------------- measuring
    def run(self, job: _Job, s: BenchSettings, threads: int, inputs: Optional[Path],
            outputs: Optional[Path]) -> BenchRow:
        row = job.row
        row.runner = f"{self.t.kind}:{self.runner_label}"
        row.threads = threads
        t0 = time.perf_counter()
        d = None
        try:
            d = self.mktemp()
            files = [AGENT, job.path] + ([inputs] if inputs else [])
            self.t.push(files, d, _push_timeout(files, self.step_timeout))
            rjob = copy.copy(job)
            rjob.path = Path(job.path.name)
            argv = _command(rjob, s, threads, Path(inputs.name) if inputs else None,
                            Path("outputs.npz") if outputs else None)
            assert argv[1] == str(AGENT), argv[:2]
            argv = [self.device.python, AGENT.name] + argv[2:]
            res = self.t.shell(self.run_script(d, argv, s.timeout_s), s.timeout_s + self.step_timeout)
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

    # -------------------------------------------------------------- predicting (edgepipe eval --device)
    def predict_reason(self, fmt: str, target: str = "cpu") -> Optional[str]:
        """Why this device cannot run ``fmt`` artifacts on ``target`` in predict mode, or None."""
        if self.error is not None:
            return None  # a connection failure is a failure, not a skip: predict() raises it
        if getattr(self, "mode", None) == "benchmark_model":
            return f"{self.name} runs benchmark_model (no Python + numpy there), which cannot return outputs"
        if fmt not in ("tflite", "onnx"):
            return f"{self.name} runs TFLite and ONNX artifacts; {fmt} artifacts are evaluated locally only"
        p = ((self._probe or {}).get(target) or {}).get(fmt) or {}
        if not p.get("available"):
            return f"on {self.name}: {p.get('reason') or 'not available'}"
        return None

    def predict(self, path: Path, fmt: str, inputs: Path, target: str = "cpu", threads: int = 0,
                timeout_s: float = 600.0) -> tuple[dict, dict]:
        """Run every sample of ``inputs`` (.npz) through ``path`` with the agent's predict mode.
        Returns ({output_i: array}, the agent's JSON). The temp dir is always removed. Raises
        TransportError (connection, timeout, or the agent failing)."""
        import numpy as np

        if self.error is not None:
            raise self.error
        path, inputs = Path(path), Path(inputs)
        d = None
        try:
            d = self.mktemp()
            files = [AGENT, path, inputs]
            self.t.push(files, d, _push_timeout(files, self.step_timeout))
            argv = [self.device.python, AGENT.name, "--artifact", path.name, "--format", fmt, "--target", target,
                    "--threads", str(int(threads or 0)), "--inputs", inputs.name, "--predict-out", "predictions.npz"]
            res = self.t.shell(self.run_script(d, argv, timeout_s), timeout_s + self.step_timeout)
            if res.rc is None:
                raise self.t.failure(res, "the prediction run")
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            try:
                info = json.loads(lines[-1]) if lines else {}
            except ValueError:
                info = {}
            if res.rc != 0 or info.get("status") != "ok":
                why = info.get("error") or info.get("reason") or _tail(res.stderr, 2) or f"exit {res.rc}"
                if res.rc in (124, 137) and not lines:
                    why = f"timed out after {timeout_s:.0f} s (killed by the device's timeout)"
                raise TransportError(f"the agent's predict mode failed on {self.name}: {why}", "error")
            import tempfile

            with tempfile.TemporaryDirectory(prefix="edgepipe-predict-") as td:
                local = Path(td) / "predictions.npz"
                self.t.pull(f"{d}/predictions.npz", local, self.step_timeout)
                with np.load(local) as z:
                    outs = {k: z[k] for k in z.files}
            return outs, info
        finally:
            if d is not None:
                self._rmdir(d)

    def _finish(self, row: BenchRow, res: ShellResult, s: BenchSettings) -> None:
        """Map the remote exit status onto the local runner's conventions, then let bench fill the row."""
        if res.rc is None:
            e = self.t.failure(res, "the measurement")
            row.status, row.reason = "failed", f"{self.name}: {e.one_line()}"
            row.stderr_tail = _tail(res.stderr, 6, 1500) or None
            return
        rc = res.rc
        has_json = any(ln.startswith("{") for ln in res.stdout.splitlines())
        if rc in (124, 137) and not has_json:
            row.status = "failed"
            row.reason = f"timed out on {self.name} after {s.timeout_s:.0f} s (killed by the device's timeout)"
            row.stderr_tail = _tail(res.stderr, 6, 1500) or None
            return
        if rc == 127 and not has_json:
            row.status = "failed"
            row.reason = (f"'{self.device.python}' was not found on {self.name}: install python3 there or pass "
                          f"--python at `devices add`")
            row.stderr_tail = _tail(res.stderr, 6, 1500) or None
            return
        if rc > 128 and not has_json:
            rc = -(rc - 128)  # the shell reports a signal death as 128 + n; bench expects -n
        apply_agent_output(row, rc, res.stdout, res.stderr)
        if row.status == "failed" and row.signal and row.reason:
            row.reason = f"{row.reason} on {self.name}"


# ---------------------------------------------------------------------------------------------
# factories, multi-device bench, merging
# ---------------------------------------------------------------------------------------------
def make_runner(dev: Device, registry: Optional[Registry] = None, benchmark_binary: Optional[str] = None):
    if dev.kind == "ssh":
        from edgepipe.devices.remote.ssh import SSHTransport

        kh = None if dev.known_hosts == "user" else Path(dev.known_hosts) if dev.known_hosts else \
            (registry.known_hosts if registry else config_path().parent / "known_hosts")
        return RemoteRunner(dev, SSHTransport(dev, known_hosts=kh))
    if dev.kind == "adb":
        from edgepipe.devices.remote.adb import make_adb_runner

        return make_adb_runner(dev, benchmark_binary=benchmark_binary)
    raise UserError(f"device '{dev.name}' has unknown kind '{dev.kind}'", "Remove it and add it again")


def resolve_devices(spec: str, registry: Registry) -> list[str]:
    """'pi4,pixel', 'all' (every registered device) and 'local' -> device names, validated."""
    names: list[str] = []
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        if item == "all":
            if not registry.devices:
                raise UserError(f"--device all: no devices are registered in {registry.path}",
                                "Add one with `edgepipe devices add NAME ssh://user@host` or adb://SERIAL")
            add = sorted(registry.devices)
        elif item == "local":
            add = ["local"]
        else:
            registry.get(item)  # UserError naming the registry when unknown
            add = [item]
        names += [n for n in add if n not in names]
    if not names:
        raise UserError("--device names no device", "Use --device NAME, a comma-separated list, 'local' or 'all'")
    return names


ProgressFn = Callable[[str, BenchRow, int, int], None]


def bench_devices(manifest_path, settings: BenchSettings, device_spec: str, config: Optional[str] = None,
                  benchmark_binary: Optional[str] = None, progress: Optional[ProgressFn] = None,
                  on_device: Optional[Callable[[str], None]] = None) -> BenchReport:
    """`edgepipe bench --device ...`: run_bench once per device (each in its own session), one report."""
    from edgepipe.devices.measure.bench import LocalRunner, run_bench

    registry = Registry(config)
    names = resolve_devices(device_spec, registry)
    if benchmark_binary:
        check_benchmark_binary(benchmark_binary)
    # every runner is built (and so every device's options checked) before the first measurement
    runners = [(n, LocalRunner() if n == "local" else make_runner(registry.get(n), registry, benchmark_binary))
               for n in names]
    reports = []
    for name, runner in runners:
        if on_device:
            on_device(name)
        s = copy.deepcopy(settings)
        if name == "local":
            reports.append(run_bench(manifest_path, settings=s, progress=progress, runner=runner))
            continue
        with runner:
            reports.append(run_bench(manifest_path, settings=s, progress=progress, runner=runner))
    return merge_reports(reports)


def merge_reports(reports: list[BenchReport]) -> BenchReport:
    """Reports of the same export from several devices -> one report with a row per device."""
    if not reports:
        raise ValueError("no reports to merge")
    if len(reports) == 1:
        return reports[0]
    base = copy.deepcopy(reports[0])
    base.rows = [r for rep in reports for r in rep.rows]
    base.devices = {}
    for rep in reports:
        for name, ident in (rep.devices or {}).items():
            base.devices[name] = {**ident, "host": rep.host, "targets_probe": rep.targets,
                                  "threads": (rep.settings or {}).get("threads")}
    from edgepipe.devices.measure.host import host_facts

    base.host = {**host_facts(), "role": "controller: the machine that ran edgepipe; see devices for each device"}
    base.settings = dict(base.settings or {})
    base.settings["devices"] = [next(iter(rep.devices), "local") for rep in reports]
    per = {next(iter(rep.devices), "local"): (rep.settings or {}).get("threads") for rep in reports}
    base.settings["threads_per_device"] = per
    if len(set(per.values())) > 1:
        base.settings["threads"] = ", ".join(f"{k} {v}" for k, v in per.items())
    base.wall_s = sum(rep.wall_s or 0.0 for rep in reports)
    return base


def predict_on_device(dev_name: str, artifact_path, fmt: str, inputs_npz, config: Optional[str] = None,
                      target: str = "cpu", threads: int = 0, timeout_s: float = 600.0) -> np.ndarray:
    """Outputs (N, ...) of the artifact's first output for every sample of ``inputs_npz``, computed on
    the registered device ``dev_name`` (one session: connect, copy, run, copy back, clean up).
    Raises UserError for an unknown device, TransportError when the device cannot do it."""
    registry = Registry(config)
    runner = make_runner(registry.get(dev_name), registry)
    with runner:
        if runner.error is not None:
            raise runner.error
        why = runner.predict_reason(fmt, target)
        if why:
            raise TransportError(why, "unsupported")
        outs, _ = runner.predict(Path(artifact_path), fmt, Path(inputs_npz), target, threads, timeout_s)
    return outs["output_0"]
