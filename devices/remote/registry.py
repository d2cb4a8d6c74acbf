"""The device registry: ssh boards and adb phones by name, in one small JSON file.

    edgepipe devices add pi4 ssh://pi@10.0.0.7 --key ~/.ssh/id_ed25519 --accept-new-host-key
    edgepipe devices add pixel adb://R58M123ABC --benchmark-binary ./benchmark_model

The file: ``--config PATH``, else ``$EDGEPIPE_CONFIG``, else ``$XDG_CONFIG_HOME/edgepipe/devices.json``
(``~/.config/edgepipe/devices.json``); edgepipe's own ssh ``known_hosts`` lives next to it. Everything
a user types is validated here (``make_device``, ``parse_url``) before anything is contacted.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import write_json_atomic

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


def arch_family(a: Optional[str]) -> Optional[str]:
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


