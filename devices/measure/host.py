"""Facts about this host: CPU, memory, accelerators, runtimes, and which targets can run here.

Cheap facts (CPU model, ISA flags, memory) are read in-process from /proc or platform. Anything that
loads a native runtime or driver (LiteRT's GPU accelerator, libedgetpu) is asked in a fresh process
(onboard/probe.py, through runtimes.hostprobe), so a crashing driver cannot take the caller down.
Never imports TensorFlow.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.runtimes.base import all_runtimes
from edgepipe.devices.runtimes.hostprobe import agent_env, probe_target, signal_name

__all__ = ["agent_env", "cpu_facts", "default_threads", "host_facts", "isa_flags", "probe_target", "signal_name",
           "target_table"]

# ISA extensions that matter for inference kernels (XNNPACK, onnxruntime's MLAS).
X86_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
# ARM /proc/cpuinfo "Features": asimd = NEON, asimddp = dot product, i8mm, fphp/asimdhp = fp16
ARM_FLAGS = ("neon", "asimd", "asimdhp", "fphp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme")

_EDGETPU_USB_IDS = {("1a6e", "089a"): "Coral USB Accelerator (not yet initialised)",
                    ("18d1", "9302"): "Coral USB Accelerator"}


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


def isa_flags(machine: Optional[str], flags: set[str]) -> list[str]:
    """The ISA extensions that matter for inference kernels, in a fixed order (ARM: neon when asimd)."""
    m = (machine or "").lower()
    isa = [f for f in (ARM_FLAGS if m in ("aarch64", "arm64") or m.startswith("arm") else X86_FLAGS) if f in flags]
    return (["neon"] if "asimd" in flags and "neon" not in isa else []) + isa


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
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", info, re.M)
    flags = set(m.group(2).split()) if m else set()
    if sys.platform == "darwin" and machine == "arm64":
        flags |= {"neon", "asimd"}
        for feat, name in (("hw.optional.arm.FEAT_DotProd", "asimddp"), ("hw.optional.arm.FEAT_I8MM", "i8mm"),
                           ("hw.optional.arm.FEAT_FP16", "fphp"), ("hw.optional.arm.FEAT_BF16", "bf16")):
            if _sysctl(feat) == "1":
                flags.add(name)
    isa = isa_flags(machine, flags)
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


def default_threads(usable_cores: Optional[int] = None) -> int:
    """Threads used when the user names none: the usable cores (this host's, or a device's), at most 4
    (phones have 4 big cores)."""
    cores = usable_cores if usable_cores is not None else cpu_facts()["usable_cores"]
    return max(1, min(4, int(cores or 1)))


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


# --------------------------------------------------------------------------------------------- targets
def _runtime_row(rt, probe: bool) -> dict:
    try:  # about the host (a fresh process), not this process: see LiteRTGPU.host_available
        why = rt.platform_reason() or rt.host_available()
    except Exception as e:  # noqa: BLE001 - a runtime's own check must not take the listing down
        why = f"availability check failed: {e}"
    try:
        versions = rt.versions()
    except Exception:  # noqa: BLE001 - versions are a nicety
        versions = {}
    row = {"target": rt.target, "runtime": rt.name, "formats": list(rt.formats), "available": why is None,
           "reason": why, "versions": {k: v for k, v in versions.items() if v}}
    if rt.target == "gpu" and rt.agent_format == "tflite" and probe:
        p = probe_target("gpu").get("tflite", {})
        row["details"] = {k: p[k] for k in ("vulkan_adapters", "backend", "note", "accelerator_libraries") if k in p}
    if rt.target == "edgetpu":
        row["details"] = {"devices": edgetpu_devices()}
    return row


def target_table(probe: bool = True) -> list[dict]:
    """One row per registered (runtime, target): available, or the reason it is not."""
    order = {"cpu": 0, "gpu": 1, "edgetpu": 2, "reference": 3}
    return sorted((_runtime_row(rt, probe) for rt in all_runtimes()),
                  key=lambda r: (order.get(r["target"], 9), r["runtime"]))
