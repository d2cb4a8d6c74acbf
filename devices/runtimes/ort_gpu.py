"""ONNX artifacts on onnxruntime's CUDAExecutionProvider (needs onnxruntime-gpu, CUDA, cuDNN).

onnxruntime silently falls back to the CPU when the CUDA libraries do not load; the agent's
ORTSession checks the providers it really got and refuses, with the reason, instead of reporting CPU
figures as GPU ones.
"""
from __future__ import annotations

from typing import Optional

from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.onboard import agent
from edgepipe.devices.runtimes.base import Runtime


class ORTCUDA(Runtime):
    name = "onnxruntime"
    target = "gpu"
    formats = ("onnx",)
    agent_format = "onnx"
    load_hint = "Check the CUDA and cuDNN libraries onnxruntime-gpu needs"

    def available(self) -> Optional[str]:
        try:
            ort = agent.need("onnxruntime", "onnxruntime is not installed: pip install onnxruntime-gpu")
        except agent.Unavailable as e:
            return str(e)
        return agent.cuda_reason(ort)

    def versions(self) -> dict:
        return {"onnxruntime-gpu": pkg_version("onnxruntime-gpu"), "onnxruntime": pkg_version("onnxruntime")}
