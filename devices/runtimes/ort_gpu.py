"""ONNX artifacts on onnxruntime's CUDAExecutionProvider (needs onnxruntime-gpu, CUDA, cuDNN).

onnxruntime silently falls back to the CPU when the CUDA libraries do not load; the session
checks the providers it really got and says so instead of reporting CPU figures as GPU ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgepipe.devices.runtimes.base import RunOptions, Runtime
from edgepipe.devices.runtimes.ort import ORTSession


class ORTCUDASession(ORTSession):
    provider = "CUDAExecutionProvider"

    def __init__(self, path: Path, options: RunOptions):
        super().__init__(path, options)
        got = self.sess.get_providers()
        if "CUDAExecutionProvider" not in got:
            from edgepipe.pipeline.base.errors import UnsupportedArtifact

            raise UnsupportedArtifact(f"CUDAExecutionProvider failed to initialise (session providers: {got})",
                                      "Check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        self.facts["accelerator"] = "cuda"


class ORTCUDA(Runtime):
    name = "onnxruntime"
    target = "gpu"
    formats = ("onnx",)

    def available(self) -> Optional[str]:
        try:
            import onnxruntime as ort
        except Exception as e:  # pragma: no cover
            return f"onnxruntime is not installed: pip install onnxruntime-gpu ({e})"
        have = ort.get_available_providers()
        if "CUDAExecutionProvider" not in have:
            return (f"onnxruntime has no CUDAExecutionProvider (providers: {', '.join(have)}): "
                    "install onnxruntime-gpu with CUDA and cuDNN")
        return None

    def load(self, path, options=None):
        return ORTCUDASession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"onnxruntime-gpu": pkg_version("onnxruntime-gpu"), "onnxruntime": pkg_version("onnxruntime")}
