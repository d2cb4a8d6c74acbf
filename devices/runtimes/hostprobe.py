"""This host's probe: onboard/probe.py in a fresh process (a crashing driver takes only it down).

``probe_target(target)`` answers per format ``{"available": True, ...}`` or ``{"reason": ...}`` and is
cached for the life of the process; ``agent_env()`` is the environment every agent, probe and worker
subprocess gets (GPU drivers want an XDG_RUNTIME_DIR). Never imports a runtime library here.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ONBOARD = Path(__file__).resolve().parent.parent / "onboard"
AGENT, PROBE, PREDICT = ONBOARD / "agent.py", ONBOARD / "probe.py", ONBOARD / "predict.py"

_probe_cache: dict[str, dict] = {}


def agent_env() -> dict:
    """Environment for agent subprocesses: a private XDG_RUNTIME_DIR when none is set (one per user, reused)."""
    env = dict(os.environ)
    if not env.get("XDG_RUNTIME_DIR"):
        d = Path(tempfile.gettempdir()) / f"edgepipe-xdg-{os.getuid() if hasattr(os, 'getuid') else 0}"
        d.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(d)
    return env


def signal_name(returncode: int) -> str:
    """SIGSEGV for -11, or 'signal N'."""
    try:
        return signal.Signals(-returncode).name
    except (ValueError, AttributeError):
        return f"signal {-returncode}"


def tail(text: str, n: int) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def probe_target(target: str, timeout: float = 120.0) -> dict:
    """What probe.py says about one target here, in a fresh process (cached)."""
    if target in _probe_cache:
        return _probe_cache[target]
    try:
        r = subprocess.run([sys.executable, str(PROBE), target], capture_output=True, text=True, timeout=timeout,
                           env=agent_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        res = {"reason": f"the {target} probe did not answer within {timeout:.0f} s"}
    else:
        if r.returncode < 0:
            res = {"reason": f"the {target} probe crashed with {signal_name(r.returncode)} (a driver or runtime "
                             f"fault): {tail(r.stderr, 1)}"}
        else:
            try:
                res = json.loads(r.stdout.strip().splitlines()[-1])["targets"][target]
            except (ValueError, KeyError, IndexError):
                res = {"reason": f"the {target} probe failed: {tail(r.stderr, 2)}"}
    _probe_cache[target] = res
    return res
