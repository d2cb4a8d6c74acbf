"""The Edge TPU runtime: compiled artifacts through LiteRT with ``libedgetpu.so.1`` (the agent's
TFLiteSession with the Edge TPU delegate). Whether an artifact is compiled for the Edge TPU is read
from its graph (an ``edgetpu-custom-op`` node), not guessed from its name."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import platform
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.graph.tflite_graph import EDGETPU_CUSTOM_OP, read_tflite
from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import MeasureSpec, Runtime, Session

NOT_COMPILED_REASON = ("artifact is not compiled for the Edge TPU: run edgetpu_compiler or export "
                       "--formats edgetpu on a host with the compiler")

_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}  # Coral USB Accelerator before/after firmware load


def edgetpu_library_name() -> str:
    return agent.EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")


def find_edgetpu_devices() -> list[str]:
    """PCIe (/dev/apex_N) and USB Coral devices visible to this host."""
    found = sorted(glob.glob("/dev/apex_*"))
    for d in glob.glob("/sys/bus/usb/devices/*"):
        try:
            vid = Path(d, "idVendor").read_text().strip().lower()
            pid = Path(d, "idProduct").read_text().strip().lower()
        except OSError:
            continue
        if (vid, pid) in _USB_IDS:
            found.append(f"usb:{vid}:{pid}@{Path(d).name}")
    return found


def load_edgetpu_delegate(options: Optional[dict] = None):
    return agent.import_tflite()[1].load_delegate(edgetpu_library_name(), options or {})


@functools.lru_cache(maxsize=1)
def _availability() -> Optional[str]:
    lib = edgetpu_library_name()
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        found = ctypes.util.find_library("edgetpu")
        hint = f" (found {found}, but it does not load)" if found else ""
        return (f"{lib} cannot be loaded{hint}: install the Edge TPU runtime (libedgetpu1-std) "
                f"[{str(e).splitlines()[0] if str(e) else type(e).__name__}]")
    devices = find_edgetpu_devices()
    if not devices:
        return (f"{lib} loads but no Edge TPU device is present (no /dev/apex_* PCIe device, no USB "
                "accelerator 1a6e:089a or 18d1:9302): connect a Coral device")
    try:
        load_edgetpu_delegate()
    except Exception as e:  # noqa: BLE001 - the reason is the answer
        return f"the Edge TPU delegate failed to load on {', '.join(devices)}: {e}"
    return None


class EdgeTPURuntime(Runtime):
    name = "litert-edgetpu"
    target = "edgetpu"
    formats = ("tflite", "edgetpu")
    agent_format = "tflite"
    load_hint = "Compile the int8 artifact with edgetpu_compiler and connect a Coral device"

    def available(self) -> Optional[str]:
        try:
            agent.import_tflite()
        except agent.Unavailable as e:
            return str(e)
        return _availability()

    def artifact_reason(self, path, fmt) -> Optional[str]:
        why = super().artifact_reason(path, fmt)
        if why:
            return why
        try:
            compiled = read_tflite(Path(path), keep_constants=False).is_edgetpu_compiled
        except Exception as e:  # noqa: BLE001 - an unreadable file is a reason, not a crash
            return f"artifact {path} is not a readable TFLite model ({getattr(e, 'message', e)})"
        return None if compiled else NOT_COMPILED_REASON

    def load(self, path: str | Path, spec: Optional[MeasureSpec] = None) -> Session:
        session = super().load(path, spec)
        ops = read_tflite(Path(path), keep_constants=False).main.operators
        custom = sum(1 for op in ops if op.custom_code == EDGETPU_CUSTOM_OP)
        session.facts = {**session.facts, "edgetpu_subgraphs": custom, "cpu_ops": len(ops) - custom,
                         "devices": find_edgetpu_devices()}
        return session

    def versions(self) -> dict:
        return {"libedgetpu": ctypes.util.find_library("edgetpu"), "ai-edge-litert": pkg_version("ai-edge-litert"),
                "tflite-runtime": pkg_version("tflite-runtime")}
