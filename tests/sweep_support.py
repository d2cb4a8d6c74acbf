"""Helpers for the sweep tests: a real OpenSSH server on 127.0.0.1 (the pattern of test_remote_ssh.py),
Ray nodes started with `edgepipe node start --block` in their own sessions (each with its own short temp
dir), their process trees, and the TCP sockets those processes listen on (from /proc/net/tcp{,6}).

Only processes these helpers started are ever stopped, by pid (never `ray stop`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from local_servers import free_port, keygen, wait_listening

SSHD = "/usr/sbin/sshd"
PY = sys.executable
STRACE = shutil.which("strace")
FAST_ENV = {  # the head notices a dead node in ~2 s instead of ~30 s
    "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "1000",
    "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_USAGE_STATS_ENABLED": "0",
}
# the test cluster's token (every node and driver of it gets it; nothing is written to ~/.ray)
AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(24).hex()}


def cli(*args: str, env: dict | None = None, timeout: int = 900, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "edgepipe.pipeline", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)


# ------------------------------------------------------------------------------------------ sshd
def start_sshd(d: Path) -> SimpleNamespace:
    host_key, user_key = keygen(d / "host_ed25519"), keygen(d / "user_ed25519")
    (d / "authorized_keys").write_text(Path(str(user_key) + ".pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", "PidFile none",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", "LogLevel VERBOSE", ""]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    wait_listening(proc, port, "sshd", d / "sshd.log")
    user = os.environ.get("USER") or __import__("getpass").getuser()
    return SimpleNamespace(proc=proc, log=log, port=port, user=user, key=user_key, dir=d,
                           url=f"ssh://{user}@127.0.0.1:{port}")


def stop_sshd(s: SimpleNamespace) -> None:
    s.proc.terminate()
    try:
        s.proc.wait(10)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.proc.wait(10)
    s.log.close()


def register(config: Path, name: str, sshd: SimpleNamespace, tmpdir: Path) -> None:
    tmpdir.mkdir(parents=True, exist_ok=True)
    r = cli("devices", "add", name, sshd.url, "--key", str(sshd.key), "--python", PY, "--tmpdir", str(tmpdir),
            "--accept-new-host-key", "--config", str(config), "--replace", timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), int(fields[3])


def tree(root: int) -> set[int]:
    """``root``, its descendants, and every process of its session (start_new_session=True makes
    the session id the root's pid): what `ray start --block` and its children are."""
    procs = {int(p.name): st for p in Path("/proc").glob("[0-9]*") if (st := _stat(int(p.name)))}
    out = {pid for pid, (_, sid) in procs.items() if sid == root} | ({root} if root in procs else set())
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in procs.items() if ppid in out and pid not in out}
        out |= new
        grew = bool(new)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        st = Path(f"/proc/{pid}/stat")
        try:
            if st.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except OSError:
            pass
    return out


def kill_tree(root: int, sig: int = signal.SIGKILL) -> set[int]:
    pids = tree(root)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return pids


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket in LISTEN state owned by one of ``pids``."""
    inodes: dict[str, int] = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*") if Path(f"/proc/{pid}/fd").exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = pid
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                addr, port = f[1].split(":")
                out.append((inodes[f[9]], _addr(addr, v6), int(port, 16)))
    return out


def _addr(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def loopback_only(addr: str) -> bool:
    return addr in ("127.0.0.1", "::ffff:127.0.0.1")


def traced(cmd: list[str], trace: Path) -> list[str]:
    """``cmd`` under strace (when installed), logging every connect() and bind() of it and its children."""
    if not STRACE:
        return cmd
    return [STRACE, "--seccomp-bpf", "-f", "-qq", "-e", "trace=connect,bind", "-o", str(trace), *cmd]


_SOCK = re.compile(r'(connect|bind)\(\d+, \{sa_family=AF_INET6?, sin6?_port=htons\((\d+)\).*?inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"')


def foreign_addresses(trace: Path) -> list[str]:
    """Every connect()/bind() in a strace log to an address other than 127.0.0.1. The one exception:
    psutil's IPv6 check in each Ray process binds [::1]:0 (IPv6 loopback) and closes it at once."""
    bad = []
    for line in trace.read_text().splitlines():
        m = _SOCK.search(line)
        if m and not (loopback_only(m.group(3)) or (m.group(1) == "bind" and m.group(3) == "::1" and m.group(2) == "0")):
            bad.append(f"{m.group(1)} {m.group(3)}:{m.group(2)} (pid {line.split()[0]})")
    return sorted(set(bad))


# ------------------------------------------------------------------------------------------ Ray nodes
class Node:
    """One `edgepipe node start ... --block` (a `ray start`) in its own session and temp dir."""

    def __init__(self, name: str, devices: list[str], config: Path, env: dict, logs: Path,
                 head_port: int | None = None, address: str | None = None, cpus: int = 1):
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix=f"eprt-{name[:4]}-", dir="/tmp")  # short: unix socket paths
        args = ["node", "start", "--name", name, "--num-cpus", str(cpus), "--temp-dir", self.tmp,
                "--config", str(config), "--block"]
        args += ["--devices", ",".join(devices)] if devices else []
        args += ["--head", "--port", str(head_port), "--node-ip", "127.0.0.1"] if head_port else ["--address", address]
        self.log_path, self.trace = logs / f"{name}.log", logs / f"{name}.trace"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(traced([PY, "-m", "edgepipe.pipeline", *args], self.trace), stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **FAST_ENV, **AUTH_ENV, **env},
                                     start_new_session=True)

    @property
    def pids(self) -> set[int]:
        return tree(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the node's whole process tree (a machine dying), strace aside: it then exits by
        itself, with its log complete."""
        for pid in self.pids - ({self.proc.pid} if STRACE else set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def stop(self, hard: bool = False) -> None:
        """SIGTERM `ray start` (it stops its children), then SIGKILL whatever of its tree is left."""
        pids = self.pids
        if not hard and self.proc.poll() is None:
            os.kill(self._ray_start_pid(), signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        pids |= self.pids
        for pid in alive(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _ray_start_pid(self) -> int:
        """The `ray start` process: the Popen'd one, or strace's child when traced."""
        if not STRACE:
            return self.proc.pid
        kids = [p for p in self.pids if (_stat(p) or (0, 0))[0] == self.proc.pid]
        return kids[0] if kids else self.proc.pid

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:]


CLUSTER_PROBE = """
import json, sys
from edgepipe.pipeline.sweep import raynet
raynet.quiet_env(); raynet.keep_loopback()
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([{"id": n["NodeID"], "name": n.get("NodeName"), "alive": n["Alive"],
                   "resources": n.get("Resources", {})} for n in ray.nodes()]))
ray.shutdown()
"""


def cluster_nodes(address: str) -> list[dict]:
    r = subprocess.run([PY, "-c", CLUSTER_PROBE, address], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **AUTH_ENV})
    if r.returncode != 0:
        return []
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_nodes(address: str, names: set[str], nodes: list[Node], timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in nodes:
            if n.proc.poll() is not None:
                raise RuntimeError(f"node {n.name} exited with {n.proc.returncode}: {n.tail()}")
        got = cluster_nodes(address)
        if names <= {x["name"] for x in got if x["alive"]}:
            return got
        time.sleep(1)
    raise RuntimeError(f"nodes {names} did not join within {timeout} s: " + " | ".join(n.tail() for n in nodes))
