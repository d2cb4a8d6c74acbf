"""TFLite int8 artifacts, layer by layer.

Accumulated: the int8 artifact and a float TFLite conversion of the same model run side by side
in LiteRT with ``experimental_preserve_all_tensors=True`` (and without the XNNPACK delegate,
which would hide intermediates); both conversions keep the same tensor names, so op outputs
match by name. Int8 tensors are dequantized with their own scale and zero point.

Isolated and fallback: a ``requantize(denylist, fully_quantize) -> bytes`` callable, built on
TFLite's ``QuantizationDebugger`` over the source model (see sources.py), re-quantizes the
calibrated model with every other layer denylisted (kept float): ~10 ms per variant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from edgepipe.devices.graph.tflite_graph import TFLiteGraph, read_tflite, read_tflite_bytes
from edgepipe.devices.onboard.agent import import_tflite
from edgepipe.export import FormatOptions
from edgepipe.export.tflite import Requantize
from edgepipe.pipeline.base.records import Calibration, Traced
from edgepipe.pipeline.fidelity.layers import LayerInfo, LayerProbe, ImageRunner
from edgepipe.pipeline.fidelity.names import display, layers_in
from edgepipe.pipeline.fidelity.sources import tflite_requantizer

WEIGHTED = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1}


def _interpreter(model: Path | bytes):
    _, module = import_tflite()
    kw: dict = {"experimental_preserve_all_tensors": True}
    resolver = getattr(module, "OpResolverType", None)
    if resolver is not None:  # without the default XNNPACK delegate, which hides intermediates
        kw["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    if isinstance(model, (bytes, bytearray)):
        it = module.Interpreter(model_content=bytes(model), **kw)
    else:
        it = module.Interpreter(model_path=str(model), **kw)
    it.allocate_tensors()
    return it


def _dequant(arr: np.ndarray, d: dict) -> np.ndarray:
    if np.asarray(arr).dtype.kind == "f":
        return np.asarray(arr, np.float32)
    q = d.get("quantization_parameters") or {}
    scale, zp = np.asarray(q.get("scales", [])), np.asarray(q.get("zero_points", []))
    if scale.size == 0:
        return np.asarray(arr, np.float32)
    if scale.size > 1:  # per-channel (only constants are): broadcast along the quantized dimension
        shape = [1] * arr.ndim
        shape[q.get("quantized_dimension", 0)] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((np.asarray(arr, np.float32) - zp.astype(np.float32)) * scale.astype(np.float32)).astype(np.float32)


class Runner:
    """One TFLite model in LiteRT with every intermediate kept: float in, float tensors out."""

    def __init__(self, model: Path | bytes):
        self.it = _interpreter(model)
        self.details = {d["name"]: d for d in self.it.get_tensor_details()}
        self._in = self.it.get_input_details()[0]
        self._outs = self.it.get_output_details()

    def invoke(self, x: np.ndarray) -> None:
        d = self._in
        if np.dtype(d["dtype"]).kind != "f":
            scale, zp = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale + zp), info.min, info.max)
        self.it.set_tensor(d["index"], np.ascontiguousarray(x, dtype=d["dtype"]))
        self.it.invoke()

    def tensor(self, name: str) -> Optional[np.ndarray]:
        d = self.details.get(name)
        if d is None:
            return None
        try:
            return _dequant(self.it.get_tensor(d["index"]), d)
        except ValueError:  # a tensor the interpreter did not keep
            return None

    def output(self) -> np.ndarray:
        d = self._outs[0]
        return _dequant(self.it.get_tensor(d["index"]), d)

    def run(self, x: np.ndarray, names: Iterable[str]) -> tuple[dict, np.ndarray]:
        self.invoke(x)
        out = {}
        for n in names:
            t = self.tensor(n)
            if t is not None:
                out[n] = t
        return out, self.output()


def _qrange(q: dict, dtype: str) -> Optional[tuple[float, float]]:
    if not q or not q.get("scale") or len(q["scale"]) != 1:
        return None
    info = np.iinfo(dtype)
    s, z = q["scale"][0], (q.get("zero_point") or [0])[0]
    return (float(s * (info.min - z)), float(s * (info.max - z)))


def _weight_facts(g: TFLiteGraph, op) -> dict:
    k = WEIGHTED.get(op.opcode)
    if k is None or len(op.inputs) <= k:
        return {}
    w = g.tensor(op.inputs[k])
    if w is None or not w.quantization:
        return {}
    scales = np.asarray(w.quantization["scale"], np.float64)
    if scales.size > 1:
        live = scales[scales > 0]
        ratio = float(live.max() / np.median(live)) if live.size else None
        return {"weights": "per-channel", "weight_channel_ratio": ratio}
    val = g.constant_value(w)
    facts: dict = {"weights": "per-tensor"}
    if val is not None and val.ndim >= 2:
        axis = 3 if op.opcode == "DEPTHWISE_CONV_2D" else 0
        amax = np.abs(np.moveaxis(val.astype(np.float64), axis, 0).reshape(val.shape[axis], -1)).max(axis=1)
        live = amax[amax > 0]
        if live.size:
            facts["weight_channel_ratio"] = float(live.max() / np.median(live))
    return facts


def _input_scale_ratio(g: TFLiteGraph, op) -> Optional[float]:
    scales = []
    for t in g.op_inputs(op):
        if t is not None and not t.is_constant and t.quantization and t.quantization.get("scale"):
            scales.append(t.quantization["scale"][0])
    if len(scales) < 2 or min(scales) <= 0:
        return None
    return float(max(scales) / min(scales))


def _facts(g: TFLiteGraph, op, out) -> dict:
    f = {"qrange": _qrange(out.quantization, out.dtype) if out.quantization else None,
         "depthwise": op.opcode == "DEPTHWISE_CONV_2D", **_weight_facts(g, op)}
    if op.opcode == "CONCATENATION":
        f["concat_scale_ratio"] = _input_scale_ratio(g, op)
    elif op.opcode == "ADD":
        f["add_scale_ratio"] = _input_scale_ratio(g, op)
    return {k: v for k, v in f.items() if v is not None}


class TFLiteProbe(LayerProbe):
    format = "tflite"
    supports_fallback = True

    def __init__(self, artifact: Path, reference: Path | bytes, *, requantize: Optional[Requantize] = None,
                 known_layers: Optional[Iterable[str]] = None, reference_name: str = "a float TFLite conversion"):
        self.artifact = Path(artifact)
        self.graph = read_tflite(self.artifact)
        self.art = Runner(self.artifact)
        self.ref = Runner(reference)
        self.requantize = requantize
        self.known = set(known_layers) if known_layers is not None else None
        self.reference = reference_name
        self.io_dtype = np.dtype(self.art._in["dtype"]).name
        self._infos: Optional[list[LayerInfo]] = None

    @classmethod
    def open(cls, artifact: Path, reference: Path, *, traced: Optional[Traced] = None,
             calibration: Optional[Calibration] = None, options: Optional[FormatOptions] = None,
             known_layers: Optional[set[str]] = None) -> "TFLiteProbe":
        req = tflite_requantizer(traced, calibration) if traced is not None and calibration is not None else None
        return cls(artifact, reference, requantize=req, known_layers=known_layers)

    def layers(self) -> list[LayerInfo]:
        if self._infos is not None:
            return self._infos
        g, sub = self.graph, self.graph.main
        infos = []
        for t in (g.tensor(i) for i in sub.inputs):
            if t is not None and t.quantization and t.name in self.ref.details:
                infos.append(LayerInfo(t.name, "INPUT", "input", [], "NHWC",
                                       {"qrange": _qrange(t.quantization, t.dtype)}, isolable=False))
        for op in sub.operators:
            for out in g.op_outputs(op):
                if out is None or out.dtype not in ("int8", "uint8", "int16") or out.name not in self.ref.details:
                    continue
                ins = [t.name for t in g.op_inputs(op) if t is not None and not t.is_constant]
                layer = display(layers_in(out.name, self.known), out.name.split(";")[0][:60])
                infos.append(LayerInfo(out.name, op.opcode, layer, ins, "NHWC", _facts(g, op, out),
                                       isolable=op.opcode not in ("QUANTIZE", "DEQUANTIZE")))
        self._infos = infos
        return infos

    def _names(self) -> list[str]:
        return [i.tensor for i in self.layers()]

    def run(self, raw: np.ndarray, data: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
        names = self._names()
        ref, ref_out = self.ref.run(data, names)
        got, got_out = self.art.run(data, names)
        return ref, got, ref_out, got_out

    def reference_tensors(self, raw: np.ndarray, data: np.ndarray, names: set[str]) -> dict:
        return self.ref.run(data, names)[0]

    def isolation(self) -> Optional[str]:
        if self.requantize is None:
            return "needs the source model: TFLite's QuantizationDebugger re-quantizes it one layer at a time"
        return None

    def quantizable(self) -> list[str]:
        return [i.tensor for i in self.layers() if i.isolable]

    def isolated(self, info: LayerInfo) -> ImageRunner:
        others = [n for n in self.quantizable() if n != info.tensor]
        runner = Runner(self.requantize(others, False))

        def run(raw: np.ndarray, data: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
            runner.invoke(data)
            return runner.tensor(info.tensor), runner.output()

        return run

    def float_nodes(self, tensors: list[str]) -> list[str]:
        """Ops to keep float so these tensors stay float: their producers and every consumer
        (an int8 consumer would quantize the tensor again with the same range)."""
        g = self.graph
        keep = list(dict.fromkeys(tensors))
        for op in g.main.operators:
            if any(t is not None and t.name in tensors for t in g.op_inputs(op)):
                keep += [t.name for t in g.op_outputs(op) if t is not None and t.name not in keep]
        return keep

    def fallback_options(self) -> dict:
        return {"converter": "tf.lite.experimental.QuantizationDebugger (denylisted_nodes)", "io": self.io_dtype,
                "per_channel": True}

    def fallback(self, float_layers: list[str], dest: Path) -> Path:
        """Write the artifact re-quantized with ``float_layers`` (tensor names) kept float, same I/O."""
        if self.requantize is None:
            raise RuntimeError(self.isolation())
        if self.io_dtype == "uint8":  # the debugger writes int8 or float I/O only
            raise RuntimeError("TFLite's quantization debugger cannot keep uint8 I/O: export with --int8-io int8 "
                               "or float32 to recover by float fallback")
        data = self.requantize(self.float_nodes(float_layers), self.io_dtype != "float32")
        read_tflite_bytes(data, "fallback")  # refuse to write something LiteRT cannot read
        dest.write_bytes(data)
        return dest
