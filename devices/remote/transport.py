"""How commands and files reach a device: the Transport base (ssh.py, adb.py implement it), its errors
and shell results. A remote script's exit status comes back on a marker line the script prints last, so
a lost connection is never mistaken for an answer."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edgepipe.devices.remote.registry import Device

MARK = "@@edgepipe-rc="


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
        return TransportError(f"{what}: lost contact with {self.device.name} ({tail(res.stderr, 2) or 'no output'})",
                              "lost")


def tail(text: str, n: int = 3, width: int = 600) -> str:
    lines = [ln.strip() for ln in (text or "").replace("\r", "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-width:]


def push_timeout(paths: list[Path], base: float) -> float:
    size = sum(p.stat().st_size for p in paths if p.exists())
    return base + 30.0 + size / 1e6  # at least 1 MB/s


