"""A device's facts from one POSIX sh script (uname, /proc, getprop on Android, the device's Python and
numpy), shaped like this host's ``host.host_facts()`` so reports treat both alike."""
from __future__ import annotations

import re
from typing import Optional

from edgepipe.devices.measure.host import isa_flags
from edgepipe.devices.remote.transport import MARK

FACTS_SCRIPT = r"""
echo "@@uname"; uname -srm 2>/dev/null
echo "@@hostname"; hostname 2>/dev/null || cat /proc/sys/kernel/hostname 2>/dev/null
echo "@@nproc"; nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null
echo "@@cpuinfo"; head -c 32768 /proc/cpuinfo 2>/dev/null
echo "@@meminfo"; grep MemTotal /proc/meminfo 2>/dev/null
echo "@@os"; grep '^PRETTY_NAME=' /etc/os-release 2>/dev/null
echo "@@getprop"
if command -v getprop >/dev/null 2>&1; then
  for p in ro.product.manufacturer ro.product.model ro.product.cpu.abi ro.build.version.release \
           ro.build.version.sdk ro.soc.model ro.board.platform; do echo "$p=$(getprop $p)"; done
fi
echo "@@python"; PY -c 'import platform; print(platform.python_version())' 2>&1 | tail -n 1
echo "@@numpy"; PY -c 'import numpy; print(numpy.__version__)' 2>&1 | tail -n 1
echo "@@end"
"""
_VERSION = re.compile(r"^\d+\.\d+")


def sections(text: str) -> dict[str, str]:
    """The script's output split at its ``@@name`` lines."""
    out, cur = {}, None
    for ln in text.replace("\r", "").splitlines():
        if ln.startswith("@@") and not ln.startswith(MARK):
            cur = ln[2:].strip()
            out[cur] = ""
        elif cur:
            out[cur] += ln + "\n"
    return {k: v.strip() for k, v in out.items()}


def _search(pattern: str, text: str) -> Optional[str]:
    m = re.search(pattern, text, re.M)
    return m.group(1).strip() if m else None


def _cpu(sec: dict, props: dict, machine: Optional[str]) -> dict:
    info = sec.get("cpuinfo", "")
    model = next((v for v in (_search(rf"^{k}\s*:\s*(.+)$", info) for k in
                              ("model name", "Hardware", "Processor", "cpu model", "Model")) if v), None)
    model = model or props.get("ro.soc.model") or props.get("ro.board.platform") or machine
    flags = set((_search(r"^(?:flags|Features)\s*:\s*(.+)$", info) or "").split())
    nproc = _search(r"^(\d+)", sec.get("nproc", ""))
    cores = int(nproc) if nproc else None
    cpu = {"model": model, "arch": machine, "logical_cores": cores, "usable_cores": cores,
           "isa": isa_flags(machine, flags)}
    if props:
        cpu["abi"] = props.get("ro.product.cpu.abi")
    return cpu


def _os(sec: dict, props: dict, uname: list[str]) -> str:
    osname = _search(r'PRETTY_NAME="?([^"\n]+)"?', sec.get("os", ""))
    if props.get("ro.build.version.release"):
        osname = f"Android {props['ro.build.version.release']} (SDK {props.get('ro.build.version.sdk', '?')})"
    kernel = " ".join(uname[:2]) if len(uname) >= 2 else None
    return f"{osname} · {kernel}" if osname and kernel else osname or kernel or "?"


def parse_facts(text: str, python: str) -> dict:
    """What FACTS_SCRIPT printed -> host facts shaped like host.host_facts() (cpu, os, python...), with
    ``python_error``/``numpy_error`` when the device's Python or numpy did not answer."""
    sec = sections(text)
    uname = sec.get("uname", "").split()
    props = {k: v for k, v in (ln.split("=", 1) for ln in sec.get("getprop", "").splitlines() if "=" in ln) if v}
    mem = _search(r"MemTotal:\s*(\d+)\s*kB", sec.get("meminfo", ""))
    pyv, npv = sec.get("python", ""), sec.get("numpy", "")
    facts = {"hostname": sec.get("hostname") or None, "os": _os(sec, props, uname),
             "platform": " ".join(uname) or None, "python": pyv if _VERSION.match(pyv) else None,
             "python_path": python, "cpu": _cpu(sec, props, uname[-1] if uname else None),
             "memory_bytes": int(mem) * 1024 if mem else None,
             "versions": {"numpy": npv if _VERSION.match(npv) else None}}
    if props:
        facts["android"] = {"manufacturer": props.get("ro.product.manufacturer"),
                            "model": props.get("ro.product.model"),
                            "abi": props.get("ro.product.cpu.abi"), "release": props.get("ro.build.version.release"),
                            "sdk": props.get("ro.build.version.sdk"), "soc": props.get("ro.soc.model")}
    if not _VERSION.match(pyv):
        facts["python_error"] = pyv or f"{python} did not answer"
    elif not _VERSION.match(npv):
        facts["numpy_error"] = npv or "numpy did not answer"
    return facts
