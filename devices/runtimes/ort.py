"""ONNX artifacts through onnxruntime."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.manifest import TensorInfo

from edgepipe.devices.runtimes.base import RunOptions, Runtime, Session

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
}


def _info(x) -> TensorInfo:
    shape = [d if isinstance(d, int) else -1 for d in x.shape]
    return TensorInfo(name=x.name, shape=shape, dtype=_ORT_TYPES.get(x.type, x.type))


class ORTSession(Session):
    provider = "CPUExecutionProvider"

    def __init__(self, path: Path, options: RunOptions):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if options.threads:
            so.intra_op_num_threads = int(options.threads)
            so.inter_op_num_threads = 1
        if options.profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(options.extra.get("profile_prefix", "ort_profile"))
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), sess_options=so, providers=[self.provider])
        self.inputs = [_info(x) for x in self.sess.get_inputs()]
        self.outputs = [_info(x) for x in self.sess.get_outputs()]
        self.facts = {"runtime": "onnxruntime", "providers": self.sess.get_providers(),
                      "threads": options.threads}

    def run_native(self, inputs):
        feed = {t.name: x for t, x in zip(self.inputs, inputs)}
        return self.sess.run(None, feed)


class ORTCPU(Runtime):
    name = "onnxruntime"
    target = "cpu"
    formats = ("onnx",)

    def available(self) -> Optional[str]:
        try:
            import onnxruntime  # noqa: F401  (is it importable?)
        except Exception as e:  # pragma: no cover
            return f"onnxruntime is not installed: pip install onnxruntime ({e})"
        return None

    def load(self, path, options=None):
        return ORTSession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"onnxruntime": pkg_version("onnxruntime", "onnxruntime-gpu")}
