"""TFLite artifacts on the CPU through LiteRT (ai-edge-litert; tflite-runtime on old boards), XNNPACK.

The session is the agent's TFLiteSession (or its CompiledModelSession with ``api="compiled_model"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.manifest import TensorInfo
from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import Runtime, to_tensor_info


def tflite_io(path: str | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The inputs and outputs of a .tflite file, as the manifest records them (-1: a dynamic dimension)."""
    ins, outs = agent.tflite_io(path)
    return [to_tensor_info(t) for t in ins], [to_tensor_info(t) for t in outs]


class LiteRTCPU(Runtime):
    name = "litert"
    target = "cpu"
    formats = ("tflite",)
    agent_format = "tflite"

    def available(self) -> Optional[str]:
        try:
            agent.import_tflite()
        except agent.Unavailable as e:
            return str(e)
        return None

    def versions(self) -> dict:
        return {"ai-edge-litert": pkg_version("ai-edge-litert"), "tflite-runtime": pkg_version("tflite-runtime")}
