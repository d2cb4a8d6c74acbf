"""The Edge TPU runtime: compiled artifacts through LiteRT with ``libedgetpu.so.1``."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
from pathlib import Path
from typing import Optional

from edgepipe.devices.graph.tflite_graph import EDGETPU_CUSTOM_OP, read_tflite
from edgepipe.devices.runtimes.base import RunOptions, Runtime

NOT_COMPILED_REASON = ("artifact is not compiled for the Edge TPU: run edgetpu_compiler or export "
                       "--formats edgetpu on a host with the compiler")

_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}  # Coral USB Accelerator before/after firmware load


def edgetpu_library_name() -> str:
    import platform

    return {"Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}.get(platform.system(), "libedgetpu.so.1")


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
    lib = edgetpu_library_name()
    try:
        from ai_edge_litert.interpreter import load_delegate  # type: ignore
    except Exception:  # pragma: no cover - old boards only
        from tflite_runtime.interpreter import load_delegate  # type: ignore
    return load_delegate(lib, options or {})


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
    except Exception as e:
        return f"the Edge TPU delegate failed to load on {', '.join(devices)}: {e}"
    return None


class EdgeTPURuntime(Runtime):
    name = "litert-edgetpu"
    target = "edgetpu"
    formats = ("tflite", "edgetpu")

    def available(self) -> Optional[str]:
        try:
            from edgepipe.devices.runtimes.litert import import_interpreter

            import_interpreter()
        except Exception as e:  # pragma: no cover
            return f"no TFLite interpreter: pip install ai-edge-litert ({e})"
        return _availability()

    def check(self, path, fmt) -> Optional[str]:
        if fmt not in self.formats:
            return f"{self.name} on {self.target} runs {', '.join(self.formats)} artifacts, not {fmt}"
        p = Path(path)
        if not p.exists():
            return f"artifact {path} is missing"
        try:
            compiled = read_tflite(p, keep_constants=False).is_edgetpu_compiled
        except Exception as e:
            return f"artifact {path} is not a readable TFLite model ({getattr(e, 'message', e)})"
        if not compiled:
            return NOT_COMPILED_REASON
        return self.available()

    def load(self, path, options=None):
        return EdgeTPUSession(Path(path), options or RunOptions())

    def versions(self) -> dict:
        from edgepipe.pipeline.base.util import pkg_version

        return {"libedgetpu": ctypes.util.find_library("edgetpu"), "ai-edge-litert": pkg_version("ai-edge-litert"),
                "tflite-runtime": pkg_version("tflite-runtime")}


def _session_base():
    from edgepipe.devices.runtimes.litert import LiteRTSession

    return LiteRTSession


class EdgeTPUSession(_session_base()):
    """A LiteRT interpreter with the Edge TPU delegate; run_native is LiteRT's."""

    def __init__(self, path: Path, options: RunOptions):  # noqa: D401 - same contract as LiteRTSession
        from edgepipe.devices.runtimes.litert import _tensor_info, import_interpreter

        Interpreter, self.module = import_interpreter()
        delegate = load_edgetpu_delegate(options.extra.get("edgetpu_options"))
        kw = {}
        if options.threads:
            kw["num_threads"] = int(options.threads)
        self.interp = Interpreter(model_path=str(path), experimental_delegates=[delegate], **kw)
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [_tensor_info(d) for d in self._in]
        self.outputs = [_tensor_info(d) for d in self._out]
        graph = read_tflite(path, keep_constants=False)
        n_custom = sum(1 for op in graph.main.operators if op.custom_code == EDGETPU_CUSTOM_OP)
        self.facts = {"runtime": self.module, "delegate": "edgetpu", "threads": options.threads,
                      "edgetpu_subgraphs": n_custom,
                      "cpu_ops": sum(1 for op in graph.main.operators if op.custom_code != EDGETPU_CUSTOM_OP),
                      "devices": find_edgetpu_devices()}
