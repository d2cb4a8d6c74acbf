"""Facts about this host: CPU, memory, accelerators, runtimes, and which targets can run here.

Cheap facts (CPU model, ISA flags, memory) are read in-process from /proc or platform.
Anything that loads a native runtime or driver (LiteRT's GPU accelerator, libedgetpu) is asked
in a fresh subprocess (``agent.py --probe TARGET``), so a crashing driver cannot take the caller
down; the answer is cached for the life of the process. Never imports TensorFlow.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.util import pkg_version

AGENT = Path(__file__).resolve().parent.parent / "onboard" / "agent.py"

# ISA extensions that matter for inference kernels (XNNPACK, onnxruntime's MLAS).
_X86_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# ARM /proc/cpuinfo "Features": asimd = NEON, asimddp = dot product, i8mm, fphp/asimdhp = fp16
_ARM_FLAGS = ("neon", "asimd", "asimdhp", "fphp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")

_EDGETPU_USB_IDS = {("1a6e", "089a"): "Coral USB Accelerator (not yet initialised)",
                    ("18d1", "9302"): "Coral USB Accelerator"}

_probe_cache: dict[str, dict] = {}


# --------------------------------------------------------------------------------------------- CPU
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _sysctl(name: str) -> Optional[str]:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_facts() -> dict:
    info = _cpuinfo()
    machine = platform.machine()
    model = None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if m:
            model = m.group(1).strip()
            break
    if model is None and sys.platform == "darwin":
        model = _sysctl("machdep.cpu.brand_string")
    if model is None:
        model = platform.processor() or machine
    flags: set[str] = set()
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.M)
    if m:
        flags = set(m.group(2).split())
    if sys.platform == "darwin" and machine == "arm64":
        flags |= {"neon", "asimd"}
        for feat, name in (("hw.optional.arm.FEAT_DotProd", "asimddp"), ("hw.optional.arm.FEAT_I8MM", "i8mm"),
                           ("hw.optional.arm.FEAT_FP16", "fphp"), ("hw.optional.arm.FEAT_BF16", "bf16")):
            if _sysctl(feat) == "1":
                flags.add(name)
    wanted = _ARM_FLAGS if machine.lower() in ("aarch64", "arm64") or machine.startswith("arm") else _X86_FLAGS
    isa = [f for f in wanted if f in flags]
    if "asimd" in flags and "neon" not in isa:
        isa.insert(0, "neon")
    phys = set()
    cur = {}
    for line in info.splitlines() + [""]:
        if not line.strip():
            if "physical id" in cur or "core id" in cur:
                phys.add((cur.get("physical id"), cur.get("core id")))
            cur = {}
            continue
        k, _, v = line.partition(":")
        cur[k.strip()] = v.strip()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        affinity = os.cpu_count()
    out = {
        "model": model,
        "arch": machine,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(phys) or (int(_sysctl("hw.physicalcpu") or 0) or None),
        "usable_cores": affinity,
        "isa": isa,
    }
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.exists():
        try:
            out["governor"] = gov.read_text().strip()
        except OSError:
            pass
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)
    if m:
        out["mhz"] = float(m.group(1))
    return out


def memory_total_bytes() -> Optional[int]:
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    v = _sysctl("hw.memsize") if sys.platform == "darwin" else None
    return int(v) if v and v.isdigit() else None


def default_threads() -> int:
    """Threads used when the user names none: the usable cores, at most 4 (phones have 4 big cores)."""
    return max(1, min(4, cpu_facts()["usable_cores"] or 1))


# --------------------------------------------------------------------------------------------- accelerators
def edgetpu_devices() -> list[dict]:
    found = []
    for d in Path("/sys/bus/usb/devices").glob("*"):
        try:
            vid = (d / "idVendor").read_text().strip()
            pid = (d / "idProduct").read_text().strip()
        except OSError:
            continue
        name = _EDGETPU_USB_IDS.get((vid, pid))
        if name:
            found.append({"kind": "usb", "name": name, "id": f"{vid}:{pid}", "path": str(d)})
    for p in sorted(Path("/dev").glob("apex_*")):
        found.append({"kind": "pcie", "name": "Coral PCIe/M.2 Edge TPU", "path": str(p)})
    return found


def nvidia_gpus() -> list[dict]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            out.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return out


def runtime_versions() -> dict:
    return {
        "ai-edge-litert": pkg_version("ai-edge-litert"),
        "tflite-runtime": pkg_version("tflite-runtime"),
        "onnxruntime": pkg_version("onnxruntime", "onnxruntime-gpu"),
        "onnxruntime-gpu": pkg_version("onnxruntime-gpu"),
        "coremltools": pkg_version("coremltools"),
        "numpy": pkg_version("numpy"),
        "edgepipe": pkg_version("edgepipe"),
    }


def host_facts() -> dict:
    """Everything a reader needs to judge a benchmark figure from this host (no subprocesses)."""
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "memory_bytes": memory_total_bytes(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "nvidia_gpus": nvidia_gpus(),
        "edgetpu_devices": edgetpu_devices(),
        "versions": runtime_versions(),
    }


# --------------------------------------------------------------------------------------------- probes
def agent_env() -> dict:
    """Environment for agent subprocesses: a private XDG_RUNTIME_DIR when none is set (GPU drivers want one)."""
    env = dict(os.environ)
    if not env.get("XDG_RUNTIME_DIR"):
        d = Path(tempfile.gettempdir()) / f"edgepipe-xdg-{os.getuid() if hasattr(os, 'getuid') else 0}"
        d.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(d)
    return env


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except (ValueError, AttributeError):
        return f"signal {-returncode}"


def probe_target(target: str, timeout: float = 120.0) -> dict:
    """What the agent says about one target here, in a fresh process (cached)."""
    if target in _probe_cache:
        return _probe_cache[target]
    cmd = [sys.executable, str(AGENT), "--probe", target]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=agent_env())
    except subprocess.TimeoutExpired:
        res = {"reason": f"the {target} probe did not answer within {timeout:.0f} s"}
    else:
        if r.returncode < 0:
            res = {"reason": f"the {target} probe crashed with {signal_name(r.returncode)} "
                             f"(a driver or runtime fault): {_tail(r.stderr, 1)}"}
        else:
            try:
                res = json.loads(r.stdout.strip().splitlines()[-1])["targets"][target]
            except (ValueError, KeyError, IndexError):
                res = {"reason": f"the {target} probe failed: {_tail(r.stderr, 2)}"}
    _probe_cache[target] = res
    return res


def _tail(text: str, n: int) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "(no output)"


def target_table(probe: bool = True) -> list[dict]:
    """One row per (runtime, target) this edgepipe knows: available or the reason it is not."""
    from edgepipe.devices.runtimes.base import all_runtimes

    rows = []
    seen = set()
    for rt in all_runtimes():
        seen.add((rt.target, tuple(rt.formats)))
        try:
            # about the host (a fresh process), not this process: see LiteRTGPU.host_available
            why = getattr(rt, "host_available", rt.available)()
        except Exception as e:  # a runtime's own check must not take the listing down
            why = f"availability check failed: {e}"
        try:
            versions = rt.versions()
        except Exception:
            versions = {}
        row = {"target": rt.target, "runtime": rt.name, "formats": list(rt.formats), "available": why is None,
               "reason": why, "versions": {k: v for k, v in versions.items() if v}}
        if rt.target == "gpu" and "tflite" in rt.formats and probe:
            p = probe_target("gpu").get("tflite", {})
            row["details"] = {k: p[k] for k in ("vulkan_adapters", "backend", "note", "accelerator_libraries")
                              if k in p}
        rows.append(row)
    targets_with_rows = {(r["target"], f) for r in rows for f in r["formats"]}
    # Seams another module fills: say why they are empty here rather than leaving a gap.
    if not any(f == "coreml" for _, f in targets_with_rows):
        rows.append({"target": "cpu", "runtime": "coreml", "formats": ["coreml"], "available": False,
                     "reason": "Core ML runtime needs macOS" if sys.platform != "darwin"
                     else "no Core ML runtime module is registered", "versions": {}})
    if not any(t == "edgetpu" for t, _ in targets_with_rows):
        p = probe_target("edgetpu").get("tflite", {}) if probe else {}
        rows.append({"target": "edgetpu", "runtime": "litert-edgetpu", "formats": ["tflite"],
                     "available": bool(p.get("available")),
                     "reason": None if p.get("available") else p.get("reason", "not probed"),
                     "versions": {}, "details": {"devices": edgetpu_devices()}})
    order = {"cpu": 0, "gpu": 1, "edgetpu": 2, "reference": 3}
    rows.sort(key=lambda r: (order.get(r["target"], 9), r["runtime"]))
    return rows
