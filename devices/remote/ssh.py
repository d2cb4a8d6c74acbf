"""The ssh transport: a Raspberry Pi, a Coral Dev Board or any Linux board with Python, over OpenSSH.

Only the system ``ssh``/``scp``, always with an argument list (never a local shell); every remote
command is one ``sh -c`` string whose user-given parts are quoted with shlex.quote. Options:

* ``BatchMode=yes``: never a password or passphrase prompt (a key in an agent or ``--key``);
* host keys checked: ``StrictHostKeyChecking=yes`` against edgepipe's own known_hosts file (next to
  the device registry), or ssh's default file with ``--known-hosts user``. A first contact fails
  with a message that says to pass ``--accept-new-host-key`` (``StrictHostKeyChecking=accept-new``:
  a new key is recorded, a changed key is still refused);
* ``ConnectTimeout`` and ``ServerAlive*`` on every call, and a subprocess timeout on each step;
* one connection per session (``ControlMaster``), so a row's five steps cost one handshake.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from edgepipe.devices.remote.runner import Device, ShellResult, Transport, TransportError, _tail


def classify(stderr: str, device: Device, known_hosts: Optional[Path]) -> TransportError:
    """ssh/scp's stderr -> a TransportError whose message says what to do."""
    s = stderr or ""
    low = s.lower()
    where = f"{device.name} ({device.address})"
    kh = str(known_hosts) if known_hosts else "~/.ssh/known_hosts"
    if "remote host identification has changed" in low or "host key for" in low and "has changed" in low:
        host = f"[{device.host}]:{device.port}" if device.port else device.host
        return TransportError(f"the host key of {where} has CHANGED since it was recorded in {kh}", "hostkey",
                              f"If the device was re-installed, remove the old key (ssh-keygen -R '{host}' -f {kh}) "
                              f"and add the device again with --accept-new-host-key; otherwise do not connect")
    if "host key verification failed" in low or "no " in low and "host key is known" in low:
        return TransportError(f"the host key of {where} is not known to edgepipe ({kh}) and host-key checking "
                              f"is on", "hostkey",
                              f"Check the key, then run `edgepipe devices add {device.name} {device.url} "
                              f"--accept-new-host-key --replace` to record it on first contact")
    if "permission denied" in low:
        return TransportError(f"{where} refused the login ({_tail(s, 1)})", "auth",
                              "Pass --key with a private key whose public half is in the device's "
                              "~/.ssh/authorized_keys (edgepipe never asks for passwords)")
    for pat in ("connection refused", "connection timed out", "no route to host", "network is unreachable",
                "could not resolve hostname", "name or service not known", "operation timed out",
                "connection closed by", "connection reset"):
        if pat in low:
            return TransportError(f"{where} is unreachable: {_tail(s, 1)}", "unreachable",
                                  "Check that the device is on, on the network, and runs sshd")
    if "load key" in low or "no such identity" in low or "bad permissions" in low:
        return TransportError(f"ssh cannot use the key for {where}: {_tail(s, 1)}", "auth",
                              "Check the --key file (chmod 600) and add the device again")
    return TransportError(f"ssh to {where} failed: {_tail(s, 2) or 'no error message'}", "error")


class SSHTransport(Transport):
    kind = "ssh"

    def __init__(self, device: Device, known_hosts: Optional[Path] = None, ssh: str = "ssh", scp: str = "scp"):
        super().__init__(device)
        self.known_hosts = Path(known_hosts) if known_hosts else None
        self.ssh = ssh
        self.scp = scp
        self._ctl_dir: Optional[str] = None
        self._sock: Optional[str] = None
        self._legacy_scp = False

    # -------------------------------------------------------------- argv
    def options(self) -> list[str]:
        d = self.device
        o = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(d.connect_timeout))}",
             "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
             "-o", f"StrictHostKeyChecking={'accept-new' if d.accept_new_host_key else 'yes'}"]
        if self.known_hosts is not None:
            o += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if d.key:
            o += ["-o", "IdentitiesOnly=yes", "-i", d.key]
        if d.user:
            o += ["-o", f"User={d.user}"]
        if d.port:
            o += ["-o", f"Port={d.port}"]
        if self._sock:
            o += ["-o", "ControlMaster=no", "-o", f"ControlPath={self._sock}"]
        return o

    @property
    def _host(self) -> str:
        return self.device.host or ""

    def _scp_host(self) -> str:
        h = self._host
        return f"[{h}]" if ":" in h else h

    def _env(self) -> dict:
        return dict(os.environ, LC_ALL="C")

    def _check_tools(self) -> None:
        for exe in (self.ssh, self.scp):
            if not shutil.which(exe):
                raise TransportError(f"'{exe}' is not installed on this machine", "missing",
                                     "Install the OpenSSH client (apt install openssh-client)")

    # -------------------------------------------------------------- session
    def open(self) -> None:
        self._check_tools()
        if self.known_hosts is not None:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            if not self.known_hosts.exists():
                self.known_hosts.touch(mode=0o600)
        self._ctl_dir = tempfile.mkdtemp(prefix="ep-ssh-")
        sock = os.path.join(self._ctl_dir, "c")
        argv = [self.ssh, *self.options(), "-o", "ControlMaster=yes", "-o", f"ControlPath={sock}",
                "-o", "ControlPersist=no", "-N", "-f", "-T", "--", self._host]
        with tempfile.TemporaryFile() as err:
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                   timeout=self.device.connect_timeout + 20, env=self._env())
            except subprocess.TimeoutExpired:
                self.close()
                raise TransportError(f"{self.device.name} ({self.device.address}) did not complete the ssh "
                                     f"handshake within {self.device.connect_timeout + 20:.0f} s", "unreachable",
                                     "Check that the device is on and reachable") from None
            err.seek(0)
            text = err.read().decode(errors="replace")
        if r.returncode != 0:
            self.close()
            raise classify(text, self.device, self.known_hosts)
        self._sock = sock

    def close(self) -> None:
        if self._sock:
            try:
                subprocess.run([self.ssh, "-o", f"ControlPath={self._sock}", "-O", "exit", "--", self._host],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=15, env=self._env())
            except (OSError, subprocess.SubprocessError):
                pass
            self._sock = None
        if self._ctl_dir:
            shutil.rmtree(self._ctl_dir, ignore_errors=True)
            self._ctl_dir = None

    # -------------------------------------------------------------- steps
    def _run_shell(self, script: str, timeout: float) -> ShellResult:
        argv = [self.ssh, *self.options(), "-T", "--", self._host, script]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env=self._env(), errors="replace")
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return ShellResult(None, out, err, None, timed_out=True)
        res = ShellResult(None, r.stdout, r.stderr, r.returncode)
        if r.returncode == 255 and MARK_MISSING(r.stdout):
            raise classify(r.stderr, self.device, self.known_hosts)
        return res

    def _scp(self, args: list[str], timeout: float, what: str) -> None:
        argv = [self.scp, "-q", *(["-O"] if self._legacy_scp else []), *self.options(), "--", *args]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env=self._env(), errors="replace")
        except subprocess.TimeoutExpired:
            raise TransportError(f"{what}: scp to {self.device.name} did not finish within {timeout:.0f} s",
                                 "timeout") from None
        if r.returncode != 0:
            low = r.stderr.lower()
            if not self._legacy_scp and ("subsystem request failed" in low or "sftp-server" in low
                                         or "connection closed" in low and "sftp" in low):
                self._legacy_scp = True  # a board without an SFTP server: scp's original protocol
                return self._scp(args, timeout, what)
            if r.returncode == 255 or "ssh:" in low or "lost connection" in low:
                e = classify(r.stderr, self.device, self.known_hosts)
                e.message = f"{what}: {e.message}"
                raise e
            raise TransportError(f"{what} failed on {self.device.name}: {_tail(r.stderr, 2)}", "error")

    def push(self, paths: list[Path], remote_dir: str, timeout: float) -> None:
        self._scp([*(str(p) for p in paths), f"{self._scp_host()}:{remote_dir}/"], timeout,
                  f"copying {', '.join(Path(p).name for p in paths)}")

    def pull(self, remote_path: str, local: Path, timeout: float) -> None:
        self._scp([f"{self._scp_host()}:{remote_path}", str(local)], timeout, f"copying back {Path(remote_path).name}")


def MARK_MISSING(stdout: str) -> bool:  # noqa: N802 - reads as a predicate at the call site
    from edgepipe.devices.remote.runner import MARK

    return MARK not in (stdout or "")
