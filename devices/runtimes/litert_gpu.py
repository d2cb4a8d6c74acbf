"""TFLite artifacts on LiteRT's GPU accelerator (CompiledModel, GPU with CPU fallback).

On Linux the accelerator LiteRT ships is WebGPU over Vulkan: a real GPU driver, or Mesa's
software driver (lavapipe, Mesa >= 25) on machines without a GPU, which is slow and good for
correctness only. ``available()`` asks a fresh subprocess to run a one-op model on the GPU, so a
missing or broken driver becomes a reason, not a crash. Sessions record
``facts["fully_accelerated"]`` and, when the delegate logs it, how many ops fell back to the CPU.
Artifacts need static shapes (batch 1): the check says so instead of "Failed to modify graph".

lavapipe and TensorFlow must not share a process: lavapipe JIT-compiles shaders with LLVM, and
TensorFlow's libtensorflow_framework.so exports its own LLVM symbols, so the driver binds to the
wrong LLVM and segfaults in vkCreateDevice. In a process that has imported TensorFlow the software
GPU is therefore unavailable, with that reason; `edgepipe bench` and `eval` never import it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.devices.runtimes.base import RunOptions, Runtime, Session


def _ensure_xdg_runtime_dir() -> None:
    if not os.environ.get("XDG_RUNTIME_DIR"):
        from edgepipe.devices.measure.host import agent_env

        os.environ["XDG_RUNTIME_DIR"] = agent_env()["XDG_RUNTIME_DIR"]


def tensorflow_clash() -> Optional[str]:
    """Why the GPU cannot be used in *this* process (software Vulkan + TensorFlow loaded), or None."""
    if "tensorflow" not in sys.modules:
        return None
    from edgepipe.devices.measure.host import probe_target

    adapters = probe_target("gpu").get("tflite", {}).get("vulkan_adapters") or []
    if adapters and all(a.get("type") == "cpu" for a in adapters):
        return ("software Vulkan (lavapipe) crashes in a process that has imported TensorFlow (both carry LLVM): "
                "use LiteRT's GPU from a process without TensorFlow, as `edgepipe bench` does")
    return None


class LiteRTGPUSession(Session):
    def __init__(self, path: Path, options: RunOptions):
        from edgepipe.devices.onboard.agent import AgentError, LiteRTCompiledBackend
        from edgepipe.pipeline.base.errors import UnsupportedArtifact

        from edgepipe.devices.runtimes.litert import tflite_io

        why = tensorflow_clash()
        if why:
            raise UnsupportedArtifact(why, "Run it from `edgepipe bench`/`eval`, or before importing TensorFlow")
        _ensure_xdg_runtime_dir()
        self.inputs, self.outputs = tflite_io(path)
        try:
            self._b = LiteRTCompiledBackend(path, "gpu", options.threads)
        except AgentError as e:
            raise UnsupportedArtifact(str(e), "Export with a static batch of 1 for the GPU") from e
        placement = self._b.placement()
        self.facts = {"runtime": "ai_edge_litert", "accelerator": "gpu", "threads": options.threads,
                      "fully_accelerated": bool(placement.get("fully_accelerated")),
                      "placement": placement}

    def run_native(self, inputs):
        feeds = [np.ascontiguousarray(x) for x in inputs]
        return self._b.run(feeds)

    def close(self) -> None:
        if getattr(self, "_b", None) is not None:
            self._b.close()
            self._b = None


class LiteRTGPU(Runtime):
    name = "litert"
    target = "gpu"
    formats = ("tflite",)

    def host_available(self) -> Optional[str]:
        """Whether a fresh process on this host can use the GPU (what `edgepipe bench` needs)."""
        from edgepipe.devices.measure.host import probe_target

        p = probe_target("gpu").get("tflite", {})
        if not p.get("available"):
            return p.get("reason") or "LiteRT's GPU accelerator is unavailable (no reason given)"
        return None

    def available(self) -> Optional[str]:
        """Whether *this* process can load a GPU session."""
        return self.host_available() or tensorflow_clash()

    def check(self, path, fmt) -> Optional[str]:
        """Reasons about the artifact first (they hold on any host), then about this host."""
        from edgepipe.devices.onboard.agent import _check_static_shapes

        if fmt not in self.formats:
            return f"{self.name} on {self.target} runs {', '.join(self.formats)} artifacts, not {fmt}"
        if not Path(path).exists():
            return f"artifact {path} is missing"
        return _check_static_shapes(path) or self.host_available()

    def load(self, path, options=None):
        return LiteRTGPUSession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"ai-edge-litert": pkg_version("ai-edge-litert")}
