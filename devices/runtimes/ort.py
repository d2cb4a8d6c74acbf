"""ONNX artifacts on the CPU through onnxruntime (the agent's ORTSession)."""
from __future__ import annotations

from typing import Optional

from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import Runtime

ORT_HINT = "onnxruntime is not installed: pip install onnxruntime"


class ORTCPU(Runtime):
    name = "onnxruntime"
    target = "cpu"
    formats = ("onnx",)
    agent_format = "onnx"

    def available(self) -> Optional[str]:
        try:
            agent.need("onnxruntime", ORT_HINT)
        except agent.Unavailable as e:
            return str(e)
        return None

    def versions(self) -> dict:
        return {"onnxruntime": pkg_version("onnxruntime", "onnxruntime-gpu")}
