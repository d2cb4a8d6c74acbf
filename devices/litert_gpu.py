"""TFLite artifacts on LiteRT's GPU accelerator (CompiledModel, GPU with CPU fallback).

On Linux the accelerator LiteRT ships is WebGPU over Vulkan: a real GPU driver, or Mesa's
software driver (lavapipe, Mesa >= 25) on machines without a GPU, which is slow and good for
correctness only. ``available()`` asks a fresh subprocess to run a one-op model on the GPU, so a
missing or broken driver becomes a reason, not a crash. Sessions record
``facts["fully_accelerated"]`` and, when the delegate logs it, how many ops fell back to the CPU.
Artifacts need static shapes (batch 1): the check says so instead of "Failed to modify graph".
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from .base import RunOptions, Runtime, Session


def _ensure_xdg_runtime_dir() -> None:
    if not os.environ.get("XDG_RUNTIME_DIR"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="edgepipe-xdg-")


class LiteRTGPUSession(Session):
    def __init__(self, path: Path, options: RunOptions):
        from edgepipe.devices.agent import AgentError, LiteRTCompiledBackend

        from .litert import tflite_io

        _ensure_xdg_runtime_dir()
        self.inputs, self.outputs = tflite_io(path)
        try:
            self._b = LiteRTCompiledBackend(path, "gpu", options.threads)
        except AgentError as e:
            from edgepipe.pipeline.errors import UnsupportedArtifact

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

    def available(self) -> Optional[str]:
        from .host import probe_target

        p = probe_target("gpu").get("tflite", {})
        if p.get("available"):
            return None
        return p.get("reason") or "LiteRT's GPU accelerator is unavailable (no reason given)"

    def check(self, path, fmt) -> Optional[str]:
        why = super().check(path, fmt)
        if why:
            return why
        from edgepipe.devices.agent import _check_static_shapes

        return _check_static_shapes(path)

    def load(self, path, options=None):
        return LiteRTGPUSession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.util import pkg_version

        return {"ai-edge-litert": pkg_version("ai-edge-litert")}
