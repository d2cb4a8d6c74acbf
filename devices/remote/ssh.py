"""The ssh transport: a Raspberry Pi, a Coral Dev Board or any Linux board with Python, over OpenSSH
or dropbear.

Only the system ``ssh``/``scp``, always with an argument list (never a local shell); every remote
command is one ``sh -c`` string whose user-given parts are quoted with shlex.quote. Options:

* ``BatchMode=yes``: never a password or passphrase prompt (a key in an agent or ``--key``);
* host keys checked: ``StrictHostKeyChecking=yes`` against edgepipe's own known_hosts file (next to
  the device registry), or ssh's default file with ``--known-hosts user``. A first contact fails
  with a message that says to pass ``--accept-new-host-key`` (``StrictHostKeyChecking=accept-new``:
  a new key is recorded, a changed key is still refused);
* ``ConnectTimeout`` and ``ServerAlive*`` on every call, and a subprocess timeout on each step;
* one connection per session (``ControlMaster``), so a row's five steps cost one handshake.

Files: ``scp``, which in OpenSSH 9 speaks SFTP. Many boards have no SFTP server (dropbear on embedded
images, an sshd without sftp-server), and some no scp either (a minimal busybox image). On connecting,
the transport asks for the SFTP subsystem once; where it is missing (or this machine has no scp), files
are streamed over the ssh channel instead (``cat > file`` on the board, byte counts checked both ways),
which needs nothing on the board but a shell and ``cat``/``wc``. ``copy`` says which, and why.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Optional, Union

from edgepipe.devices.remote.registry import Device
from edgepipe.devices.remote.transport import MARK, ShellResult, Transport, TransportError, tail


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
        return TransportError(f"{where} refused the login ({tail(s, 1)})", "auth",
                              "Pass --key with a private key whose public half is in the device's "
                              "~/.ssh/authorized_keys (edgepipe never asks for passwords)")
    for pat in ("connection refused", "connection timed out", "no route to host", "network is unreachable",
                "could not resolve hostname", "name or service not known", "operation timed out",
                "connection closed by", "connection reset"):
        if pat in low:
            return TransportError(f"{where} is unreachable: {tail(s, 1)}", "unreachable",
                                  "Check that the device is on, on the network, and runs sshd")
    if "load key" in low or "no such identity" in low or "bad permissions" in low:
        return TransportError(f"ssh cannot use the key for {where}: {tail(s, 1)}", "auth",
                              "Check the --key file (chmod 600) and add the device again")
    return TransportError(f"ssh to {where} failed: {tail(s, 2) or 'no error message'}", "error")


class SSHTransport(Transport):
    kind = "ssh"

    def __init__(self, device: Device, known_hosts: Optional[Path] = None, ssh: str = "ssh", scp: str = "scp"):
        super().__init__(device)
        self.known_hosts = Path(known_hosts) if known_hosts else None
        self.ssh, self.scp = ssh, scp
        self._ctl_dir: Optional[str] = None
        self._sock: Optional[str] = None
        self.copy: Optional[dict] = None  # {"mode": "scp" | "stream", "reason": why not scp, or None}

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
        return f"[{self._host}]" if ":" in self._host else self._host

    def _env(self) -> dict:
        return dict(os.environ, LC_ALL="C")

    # -------------------------------------------------------------- session
    def open(self) -> None:
        if not shutil.which(self.ssh):
            raise TransportError(f"'{self.ssh}' is not installed on this machine", "missing",
                                 "Install the OpenSSH client (apt install openssh-client)")
        if self.known_hosts is not None:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            if not self.known_hosts.exists():
                self.known_hosts.touch(mode=0o600)
        self._ctl_dir = tempfile.mkdtemp(prefix="ep-ssh-")
        sock = os.path.join(self._ctl_dir, "c")
        argv = [self.ssh, *self.options(), "-o", "ControlMaster=yes", "-o", f"ControlPath={sock}",
                "-o", "ControlPersist=no", "-N", "-f", "-T", "--", self._host]
        wait = self.device.connect_timeout + 20
        with tempfile.TemporaryFile() as err:
            try:
                r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                   timeout=wait, env=self._env())
            except subprocess.TimeoutExpired:
                self.close()
                raise TransportError(f"{self.device.name} ({self.device.address}) did not complete the ssh "
                                     f"handshake within {wait:.0f} s", "unreachable",
                                     "Check that the device is on and reachable") from None
            err.seek(0)
            text = err.read().decode(errors="replace")
        if r.returncode != 0:
            self.close()
            raise classify(text, self.device, self.known_hosts)
        self._sock = sock
        self.copy = self._choose_copy()

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

    def _choose_copy(self) -> dict:
        """scp where the device has an SFTP server (OpenSSH 9's scp needs one) and this machine has scp;
        else stream files through the ssh channel. Asked once per session, over the open connection."""
        if not shutil.which(self.scp):
            return {"mode": "stream", "reason": f"'{self.scp}' is not installed on this machine"}
        argv = [self.ssh, *self.options(), "-T", "-s", "--", self._host, "sftp"]
        try:  # an SFTP server reads its (empty) input and exits 0
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                               timeout=self.device.connect_timeout + 20, env=self._env())
        except subprocess.TimeoutExpired:
            return {"mode": "stream", "reason": "the SFTP subsystem did not answer"}
        if r.returncode == 0:
            return {"mode": "scp", "reason": None}
        return {"mode": "stream", "reason": f"{self.device.name} has no SFTP server, which scp needs "
                                            f"({tail(r.stderr, 1) or 'exit ' + str(r.returncode)})"}

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
        if r.returncode == 255 and MARK not in (r.stdout or ""):
            raise classify(r.stderr, self.device, self.known_hosts)
        return ShellResult(None, r.stdout, r.stderr, r.returncode)

    def _scp(self, args: list[str], timeout: float, what: str) -> None:
        argv = [self.scp, "-q", *self.options(), "--", *args]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env=self._env(), errors="replace")
        except subprocess.TimeoutExpired:
            raise TransportError(f"{what}: scp to {self.device.name} did not finish within {timeout:.0f} s",
                                 "timeout") from None
        if r.returncode == 0:
            return
        if r.returncode == 255 or "ssh:" in r.stderr.lower() or "lost connection" in r.stderr.lower():
            e = classify(r.stderr, self.device, self.known_hosts)
            e.message = f"{what}: {e.message}"
            raise e
        raise TransportError(f"{what} failed on {self.device.name}: {tail(r.stderr, 2)}", "error")

    def _stream(self, script: str, stdin: Union[int, IO[bytes]], timeout: float, what: str) -> bytes:
        """Run ``script`` with ``stdin`` streamed to it; its stdout as bytes (TransportError on failure)."""
        argv = [self.ssh, *self.options(), "-T", "--", self._host, f"sh -c {shlex.quote(script)}"]
        try:
            r = subprocess.run(argv, stdin=stdin, capture_output=True, timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired:
            raise TransportError(f"{what}: {self.device.name} did not finish within {timeout:.0f} s",
                                 "timeout") from None
        err = r.stderr.decode(errors="replace")
        if r.returncode == 255:
            e = classify(err, self.device, self.known_hosts)
            e.message = f"{what}: {e.message}"
            raise e
        if r.returncode != 0:
            raise TransportError(f"{what} failed on {self.device.name}: {tail(err, 2) or 'exit ' + str(r.returncode)}",
                                 "error")
        return r.stdout

    def _stream_push(self, path: Path, remote_dir: str, timeout: float) -> None:
        dest = shlex.quote(f"{remote_dir.rstrip('/')}/{path.name}")
        what = f"copying {path.name} through the ssh channel"
        with open(path, "rb") as fh:
            out = self._stream(f"cat > {dest} && wc -c < {dest}", fh, timeout, what)
        got, want = out.decode(errors="replace").split()[-1:], path.stat().st_size
        if got != [str(want)]:
            raise TransportError(f"{what}: {self.device.name} received {got[0] if got else 'nothing'} of {want} "
                                 f"bytes", "error")

    def _stream_pull(self, remote_path: str, local: Path, timeout: float) -> None:
        src, what = shlex.quote(remote_path), f"copying back {Path(remote_path).name} through the ssh channel"
        head, _, body = self._stream(f"wc -c < {src} && cat {src}", subprocess.DEVNULL, timeout, what).partition(b"\n")
        if head.strip().decode(errors="replace") != str(len(body)):
            raise TransportError(f"{what}: got {len(body)} bytes, the device has {head.strip().decode()}", "error")
        tmp = Path(local).with_name(Path(local).name + ".part")
        tmp.write_bytes(body)
        os.replace(tmp, local)

    def push(self, paths: list[Path], remote_dir: str, timeout: float) -> None:
        if (self.copy or {}).get("mode") == "stream":
            for p in paths:
                self._stream_push(Path(p), remote_dir, timeout)
            return
        self._scp([*(str(p) for p in paths), f"{self._scp_host()}:{remote_dir}/"], timeout,
                  f"copying {', '.join(Path(p).name for p in paths)}")

    def pull(self, remote_path: str, local: Path, timeout: float) -> None:
        if (self.copy or {}).get("mode") == "stream":
            return self._stream_pull(remote_path, local, timeout)
        self._scp([f"{self._scp_host()}:{remote_path}", str(local)], timeout, f"copying back {Path(remote_path).name}")
