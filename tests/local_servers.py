"""Helpers for the real servers the tests start on 127.0.0.1 (sshd, dropbear, adbd, the sweep's sshd)."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    """An unencrypted ed25519 key pair at ``path`` (+ .pub)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgepipe-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)
    return path


def wait_listening(proc: subprocess.Popen, port: int, name: str, log: Path, seconds: float = 20) -> None:
    """Return once ``proc`` accepts connections on 127.0.0.1:``port``; RuntimeError (with the end of its
    log) when it exits first or does not listen within ``seconds`` (then it is killed)."""
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not listen on {port}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
