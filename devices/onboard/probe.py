#!/usr/bin/env python3
"""edgepipe host probe: what can this host run, and why not. One JSON object on stdout.

    python probe.py cpu,gpu,edgetpu

Standalone like agent.py beside it (the standard library, NumPy, the runtimes it asks about;
Python 3.9 syntax), and imports only that file: edgepipe runs it in a fresh process here (a driver
that crashes takes only the probe down) and copies both files to a remote board. Per target and
format it answers ``{"available": true, ...}`` or ``{"reason": ...}`` in words a user can act on:

* cpu: the TFLite runtime (ai_edge_litert, or tflite_runtime on old boards) and onnxruntime;
* gpu: LiteRT's GPU accelerator, checked by running a one-op ADD model on it (with the Vulkan
  adapters, read through the loader with ctypes), and onnxruntime's CUDAExecutionProvider;
* edgetpu: libedgetpu loads and a delegate opens on a device.
"""
from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:
    from . import agent  # inside the edgepipe package
except ImportError:  # a lone copy next to agent.py (a board, a temp dir)
    import agent  # type: ignore[no-redef]

_VK_KINDS = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}


class _VkInstanceCreateInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int32), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


def _vulkan_loader():
    for name in ("libvulkan.so.1", "libvulkan.so", "libvulkan.1.dylib", "libMoltenVK.dylib", "vulkan-1.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _adapter(lib, dev):
    buf = ctypes.create_string_buffer(4096)  # VkPhysicalDeviceProperties is < 1 KiB
    lib.vkGetPhysicalDeviceProperties(ctypes.c_void_p(dev), buf)
    api, _drv, vendor, device, typ = struct.unpack_from("<IIIIi", buf.raw, 0)
    return {"name": buf.raw[20:276].split(b"\0", 1)[0].decode("utf-8", "replace"), "type": _VK_KINDS.get(typ, str(typ)),
            "vulkan": "%d.%d.%d" % (api >> 22, (api >> 12) & 0x3FF, api & 0xFFF),
            "vendor_id": "0x%04x" % vendor, "device_id": "0x%04x" % device}


def vulkan_adapters() -> Tuple[List[dict], Optional[str]]:
    """Vulkan physical devices through the loader (ctypes, no bindings): (list, error or None)."""
    lib = _vulkan_loader()
    if lib is None:
        return [], "Vulkan loader (libvulkan.so.1) not found: install libvulkan1 and a Vulkan driver"
    ci = _VkInstanceCreateInfo(1, None, 0, None, 0, None, 0, None)  # VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO
    inst = ctypes.c_void_p()
    lib.vkCreateInstance.restype = ctypes.c_int32
    r = lib.vkCreateInstance(ctypes.byref(ci), None, ctypes.byref(inst))
    if r != 0:
        return [], "no Vulkan driver (vkCreateInstance returned %d): install mesa-vulkan-drivers or a GPU driver" % r
    try:
        n = ctypes.c_uint32(0)
        lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None)
        devs = (ctypes.c_void_p * max(1, n.value))()
        lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), devs)
        out = [_adapter(lib, devs[k]) for k in range(n.value)]
    finally:
        lib.vkDestroyInstance(inst, None)
    if not out:
        return [], "the Vulkan loader found no adapter: install mesa-vulkan-drivers (lavapipe) or a GPU driver"
    return out, None


def tiny_add_model() -> bytes:
    """A one-op (ADD) TFLite flatbuffer built with the schema LiteRT ships: the GPU smoke test."""
    flatbuffers = agent.need("flatbuffers", "cannot build the probe model: pip install flatbuffers")
    s = agent.need("ai_edge_litert.schema_py_generated", "this ai-edge-litert has no flatbuffer schema")
    m = s.ModelT()
    m.version, m.description, m.buffers = 3, "edgepipe gpu probe", [s.BufferT() for _ in range(3)]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    m.operatorCodes = [code]
    g = s.SubGraphT()
    g.tensors = []
    for i, n in enumerate(("a", "b", "y")):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1, 2, 2, 4], s.TensorType.FLOAT32, i, n
        g.tensors.append(t)
    g.inputs, g.outputs = [0, 1], [2]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
    g.operators, m.subgraphs = [op], [g]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def _gpu_add(cm_mod, ha_mod, data):
    """Run the one-op model on the GPU: (fully accelerated, result correct, error or None, the log)."""
    with agent.capture_stderr() as log:
        try:
            cm = cm_mod.CompiledModel.from_buffer(data, hardware_accel=ha_mod.HardwareAccelerator.GPU)
            ins, outs = cm.create_input_buffers(0), cm.create_output_buffers(0)
            a = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
            ins[0].write(a)
            ins[1].write(a)
            cm.run_by_index(0, ins, outs)
            ok = bool(np.allclose(outs[0].read(16, np.float32), 2 * a.ravel()))
            full, err = cm.is_fully_accelerated(), None
        except Exception as e:  # noqa: BLE001 - the reason is the answer
            full, ok, err = False, False, e
    return full, ok, err, log["text"]


def _accelerator_libraries():
    mod = agent.need("ai_edge_litert", "no ai-edge-litert: pip install ai-edge-litert")
    libdir = os.path.dirname(os.path.abspath(mod.__file__))
    names = ("libLiteRtGpuAccelerator.so", "libLiteRtWebGpuAccelerator.so", "libLiteRtMetalAccelerator.dylib",
             "libLiteRtOpenClAccelerator.so")
    return [f for f in names if os.path.exists(os.path.join(libdir, f))]


def probe_gpu_tflite() -> Dict[str, Any]:
    out = {"runtime": "ai_edge_litert", "version": agent.dist_version("ai-edge-litert")}
    adapters, err = vulkan_adapters()
    out["vulkan_adapters"] = adapters
    try:
        mods = [agent.need("ai_edge_litert." + m, "LiteRT CompiledModel API missing: pip install ai-edge-litert>=2")
                for m in ("compiled_model", "hardware_accelerator")]
        out["accelerator_libraries"] = _accelerator_libraries()
        data = tiny_add_model()
    except agent.Unavailable as e:
        return dict(out, reason=str(e))
    if not out["accelerator_libraries"]:
        return dict(out, reason="this ai-edge-litert build ships no GPU accelerator library")
    if err and platform.system() != "Darwin":
        return dict(out, reason=err)
    full, ok, e, log = _gpu_add(mods[0], mods[1], data)
    out.update({k: v for k, v in agent.parse_gpu_log(log).items() if k == "backend"})
    if e is not None:
        soft = "mesa" in log.lower() or any(a.get("type") == "cpu" for a in adapters)
        return dict(out, reason="LiteRT's GPU accelerator failed on a one-op model: %s%s" % (
            agent.one_line(e), " (lavapipe needs Mesa >= 25: see .ci/system-deps.sh)" if soft else ""))
    if not full or not ok:
        return dict(out, reason="LiteRT's GPU accelerator did not run a one-op ADD model correctly (fully accelerated: "
                                "%s, result correct: %s)" % (full, ok))
    out["available"] = True
    if adapters and all(a["type"] == "cpu" for a in adapters):
        out["note"] = "software Vulkan (%s): correctness only, never speed claims" % adapters[0]["name"]
    return out


def _tflite_cpu():
    try:
        name, _ = agent.import_tflite()
    except agent.Unavailable as e:
        return {"reason": str(e)}
    version = agent.dist_version("ai-edge-litert" if name == "ai_edge_litert" else "tflite-runtime")
    return {"available": True, "runtime": name, "version": version, "delegate": "xnnpack"}


def _onnx(target):
    try:
        ort = agent.need("onnxruntime", "onnxruntime is not installed: pip install onnxruntime")
    except agent.Unavailable as e:
        return {"reason": str(e)}
    out = {"runtime": "onnxruntime", "version": ort.__version__, "providers": ort.get_available_providers()}
    why = agent.cuda_reason(ort) if target == "gpu" else None
    return dict(out, reason=why) if why else dict(out, available=True)


def _edgetpu():
    lib = agent.EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")
    try:
        _, mod = agent.import_tflite()
    except agent.Unavailable as e:
        return {"reason": str(e)}
    try:
        ctypes.CDLL(lib)
    except OSError as e:
        return {"library": lib, "reason": "%s not found (install libedgetpu1-std): %s" % (lib, agent.one_line(e))}
    try:
        mod.load_delegate(lib)
    except Exception as e:  # noqa: BLE001 - the reason is the answer
        return {"library": lib, "reason": "%s loaded but no Edge TPU answered: %s" % (lib, agent.one_line(e))}
    return {"available": True, "library": lib}


def probe_target(target: str) -> Dict[str, Any]:
    """{format: answer} for one target (cpu, gpu, edgetpu)."""
    if target == "cpu":
        return {"tflite": _tflite_cpu(), "onnx": _onnx("cpu")}
    if target == "gpu":
        return {"tflite": probe_gpu_tflite(), "onnx": _onnx("gpu")}
    if target == "edgetpu":
        return {"tflite": _edgetpu()}
    return {"reason": "unknown target %s" % target}


def probe(targets: List[str]) -> Dict[str, Any]:
    out = {"agent_version": agent.AGENT_VERSION, "python": platform.python_version(), "system": platform.system(),
           "machine": platform.machine(), "targets": {}}
    for t in targets:
        try:
            out["targets"][t] = probe_target(t)
        except Exception as e:  # noqa: BLE001 - one target's probe must not hide the others
            out["targets"][t] = {"reason": "probe failed: %s" % agent.one_line(e)}
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python probe.py cpu,gpu,edgetpu\n")
        return 2
    return agent.main_with(lambda: probe([t.strip() for t in args[0].split(",") if t.strip()]))


if __name__ == "__main__":
    sys.exit(main())
