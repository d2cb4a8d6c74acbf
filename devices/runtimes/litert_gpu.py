"""TFLite artifacts on LiteRT's GPU accelerator (the agent's CompiledModelSession, GPU with CPU fallback).

On Linux the accelerator LiteRT ships is WebGPU over Vulkan: a real GPU driver, or Mesa's software
driver (lavapipe, Mesa >= 25) on machines without a GPU, which is slow and good for correctness only.
``host_available()`` asks a fresh process (onboard/probe.py) to run a one-op model on the GPU, so a
missing or broken driver becomes a reason, not a crash. Sessions record ``facts["fully_accelerated"]``
and, when the delegate logs it, how many ops fell back to the CPU. Artifacts need static shapes
(batch 1): the check says so instead of "Failed to modify graph".

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

from edgepipe.pipeline.base.errors import UnsupportedArtifact
from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import MeasureSpec, Runtime, Session
from edgepipe.devices.runtimes.hostprobe import agent_env, probe_target


def tensorflow_clash() -> Optional[str]:
    """Why the GPU cannot be used in *this* process (software Vulkan + TensorFlow loaded), or None."""
    if "tensorflow" not in sys.modules:
        return None
    adapters = probe_target("gpu").get("tflite", {}).get("vulkan_adapters") or []
    if adapters and all(a.get("type") == "cpu" for a in adapters):
        return ("software Vulkan (lavapipe) crashes in a process that has imported TensorFlow (both carry LLVM): "
                "use LiteRT's GPU from a process without TensorFlow, as `edgepipe bench` does")
    return None


class LiteRTGPU(Runtime):
    name = "litert"
    target = "gpu"
    formats = ("tflite",)
    agent_format = "tflite"
    load_hint = "Export with a static batch of 1 for the GPU"

    def host_available(self) -> Optional[str]:
        """Whether a fresh process on this host can use the GPU (what `edgepipe bench` needs)."""
        p = probe_target("gpu").get("tflite", {})
        if not p.get("available"):
            return p.get("reason") or "LiteRT's GPU accelerator is unavailable (no reason given)"
        return None

    def available(self) -> Optional[str]:
        """Whether *this* process can load a GPU session."""
        return self.host_available() or tensorflow_clash()

    def artifact_reason(self, path, fmt) -> Optional[str]:
        return super().artifact_reason(path, fmt) or agent.check_static_shapes(path)

    def check(self, path, fmt) -> Optional[str]:
        """Reasons about the artifact first (they hold on any host), then about this host."""
        return self.artifact_reason(path, fmt) or self.host_available()

    def load(self, path: str | Path, spec: Optional[MeasureSpec] = None) -> Session:
        why = tensorflow_clash()
        if why:
            raise UnsupportedArtifact(why, "Run it from `edgepipe bench`/`eval`, or before importing TensorFlow")
        if not os.environ.get("XDG_RUNTIME_DIR"):  # GPU drivers want one
            os.environ["XDG_RUNTIME_DIR"] = agent_env()["XDG_RUNTIME_DIR"]
        return super().load(path, spec)

    def versions(self) -> dict:
        return {"ai-edge-litert": pkg_version("ai-edge-litert")}
