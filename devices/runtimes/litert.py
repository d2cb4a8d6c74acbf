"""TFLite artifacts through LiteRT (ai-edge-litert), falling back to tflite-runtime on old boards."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.pipeline.base.manifest import TensorInfo

from edgepipe.devices.runtimes.base import RunOptions, Runtime, Session


def import_interpreter():
    """(Interpreter class, module name). ai_edge_litert first; tflite_runtime for old devices."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore

        return Interpreter, "ai_edge_litert"
    except Exception:  # pragma: no cover - old boards only
        from tflite_runtime.interpreter import Interpreter  # type: ignore

        return Interpreter, "tflite_runtime"


def _tensor_info(d: dict) -> TensorInfo:
    q = d.get("quantization_parameters") or {}
    scales = [float(s) for s in np.asarray(q.get("scales", [])).ravel()]
    zps = [int(z) for z in np.asarray(q.get("zero_points", [])).ravel()]
    quant = {"scale": scales, "zero_point": zps} if scales else None
    shape = [int(s) for s in d.get("shape_signature", d["shape"])]
    return TensorInfo(name=d["name"], shape=shape, dtype=np.dtype(d["dtype"]).name, quantization=quant)


def tflite_io(path: str | Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    Interpreter, _ = import_interpreter()
    it = Interpreter(model_path=str(path))
    return ([_tensor_info(d) for d in it.get_input_details()],
            [_tensor_info(d) for d in it.get_output_details()])


class LiteRTSession(Session):
    def __init__(self, path: Path, options: RunOptions):
        Interpreter, self.module = import_interpreter()
        kw = {}
        if options.threads:
            kw["num_threads"] = int(options.threads)
        self.interp = Interpreter(model_path=str(path), **kw)
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [_tensor_info(d) for d in self._in]
        self.outputs = [_tensor_info(d) for d in self._out]
        self.facts = {"runtime": self.module, "delegate": "xnnpack", "threads": options.threads}
        # per-call work kept minimal: eval runs this once per image
        self._in_slots = [[d["index"], tuple(d["shape"])] for d in self._in]
        self._out_idx = [d["index"] for d in self._out]

    def run_native(self, inputs):
        it = self.interp
        for slot, x in zip(self._in_slots, inputs):
            if x.shape != slot[1]:
                it.resize_tensor_input(slot[0], list(x.shape))
                it.allocate_tensors()
                slot[1] = tuple(x.shape)
            it.set_tensor(slot[0], x)
        it.invoke()
        return [it.get_tensor(i) for i in self._out_idx]  # get_tensor already returns a copy


class LiteRTCPU(Runtime):
    name = "litert"
    target = "cpu"
    formats = ("tflite",)

    def available(self) -> Optional[str]:
        try:
            import_interpreter()
        except Exception as e:  # pragma: no cover
            return f"no TFLite interpreter: pip install ai-edge-litert ({e})"
        return None

    def load(self, path, options=None):
        return LiteRTSession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"ai-edge-litert": pkg_version("ai-edge-litert"), "tflite-runtime": pkg_version("tflite-runtime")}
