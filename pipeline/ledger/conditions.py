"""Run conditions the ledger records beside every result: what a reader needs to reproduce a figure.

``capture()`` is cheap (a few /sys reads and two ``git`` calls with a timeout) and standard library
only. Take one before a run (``before = capture()``) and pass it to ``record_*``; the recorder takes
the "after" snapshot itself. Host facts (CPU model, ISA, memory, runtime versions) come from the
report itself (bench reports carry ``host``) or from ``edgepipe.devices.measure.host``.

Readings that are not readable here (no cpufreq in a container, no thermal zones in a VM) are
left out rather than guessed.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgepipe.devices.measure import host

NODE_ENV = "EDGEPIPE_NODE"
_CPU_DIR = Path("/sys/devices/system/cpu")
_THERMAL_DIR = Path("/sys/class/thermal")
_HWMON_DIR = Path("/sys/class/hwmon")
_MAX_SENSORS = 24


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _read(p: Path) -> Optional[str]:
    try:
        return p.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(p: Path) -> Optional[int]:
    v = _read(p)
    return int(v) if v is not None and re.fullmatch(r"-?\d+", v) else None


def _spread(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"min": round(min(values), 1), "max": round(max(values), 1),
            "mean": round(sum(values) / len(values), 1), "cpus": len(values)}


def cpu_frequency() -> Optional[dict]:
    """Governor(s) and current / maximum frequency (MHz) over the CPUs, where readable."""
    cur, top, govs = [], [], set()
    for d in sorted(_CPU_DIR.glob("cpu[0-9]*/cpufreq")):
        g = _read(d / "scaling_governor")
        if g:
            govs.add(g)
        f = _int(d / "scaling_cur_freq")
        if f:
            cur.append(f / 1000.0)
        m = _int(d / "cpuinfo_max_freq")
        if m:
            top.append(m / 1000.0)
    if not cur:  # no cpufreq (containers, VMs): /proc/cpuinfo's "cpu MHz" lines
        text = _read(Path("/proc/cpuinfo")) or ""
        cur = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    out = {"governor": ",".join(sorted(govs)) if govs else None, "current_mhz": _spread(cur),
           "max_mhz": max(top) if top else None}
    return out if any(v is not None for v in out.values()) else None


def thermal() -> Optional[dict]:
    """Temperatures in °C by sensor name (thermal zones, then hwmon), where readable."""
    out: dict[str, float] = {}
    for z in sorted(_THERMAL_DIR.glob("thermal_zone*")):
        t = _int(z / "temp")
        if t is not None and len(out) < _MAX_SENSORS:
            out[f"{_read(z / 'type') or z.name}#{z.name[len('thermal_zone'):]}"] = t / 1000.0
    for h in sorted(_HWMON_DIR.glob("hwmon*")):
        name = _read(h / "name") or h.name
        for s in sorted(h.glob("temp*_input")):
            t = _int(s)
            if t is not None and len(out) < _MAX_SENSORS:
                label = _read(s.with_name(s.name.replace("_input", "_label"))) or s.name[:-len("_input")]
                out[f"{name}/{label}"] = t / 1000.0
    return out or None


def _git(cwd: Path, *args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=3,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(cwd: Optional[os.PathLike] = None) -> Optional[dict]:
    """The commit checked out in the working directory (and whether tracked files differ from it)."""
    where = Path(cwd or os.getcwd())
    commit = _git(where, "rev-parse", "HEAD")
    if not commit or not re.fullmatch(r"[0-9a-f]{40,64}", commit):
        return None
    status = _git(where, "status", "--porcelain", "--untracked-files=no")
    branch = _git(where, "rev-parse", "--abbrev-ref", "HEAD")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": branch if branch and branch != "HEAD" else None}


def node_name() -> str:
    """The node that produced a result: $EDGEPIPE_NODE (sweep workers set it), else the host name."""
    return os.environ.get(NODE_ENV) or platform.node() or "?"


def loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def capture(cwd: Optional[os.PathLike] = None, git: bool = True) -> dict:
    """One snapshot of what changes between runs on the same host (``git=False``: skip the two
    ``git`` calls, e.g. for the "after" snapshot when "before" has them)."""
    return {"taken": now_iso(), "hostname": platform.node(), "node": node_name(), "loadavg": loadavg(),
            "cpu_frequency": cpu_frequency(), "thermal": thermal(), "git": git_state(cwd) if git else None}


def host_facts() -> dict:
    """The static facts of this host (CPU model, ISA, memory, OS, runtime versions)."""
    return host.host_facts()


def run_conditions(facts: Optional[dict], before: Optional[dict], after: Optional[dict],
                   extra: Optional[dict] = None) -> dict:
    """The run-level conditions record: host facts + snapshots before and after (+ caller's extra)."""
    after = after or {}
    out = {
        "host": facts or {},
        "before": before,
        "after": after,
        "loadavg_before": (before or {}).get("loadavg") or (facts or {}).get("loadavg"),
        "loadavg_after": after.get("loadavg"),
        "git": after.get("git") or (before or {}).get("git"),
        "node": after.get("node") or node_name(),
    }
    out.update(extra or {})
    return out
