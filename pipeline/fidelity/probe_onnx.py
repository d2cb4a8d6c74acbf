"""ONNX int8 (QDQ) artifacts, layer by layer.

Accumulated: every activation the QDQ model quantizes (``X -> QuantizeLinear -> DequantizeLinear``)
is exposed as an extra graph output (the quantized ``X_QuantizeLinear_Output``, dequantized here
with its scale and zero point, so onnxruntime still runs its fused integer kernels), and the float
model exposes ``X`` under the same name: the matching onnxruntime.quantization.qdq_loss_debug
does, without holding every activation of every image in memory.

Isolated and fallback: onnxruntime's ``quantize_static`` with ``nodes_to_quantize`` (one layer) or
``nodes_to_exclude`` (the layers kept float), reusing one calibration (``calibration_cache_path``),
so a variant costs milliseconds. A layer is the node producing ``X`` plus, when ``X`` comes out of
a Relu/Clip the quantizer folds away, the node before it.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from edgepipe.pipeline.base import lazy
from edgepipe.export import FormatOptions
from edgepipe.pipeline.base.records import Calibration, Traced
from edgepipe.pipeline.fidelity.layers import LayerInfo, LayerProbe, ImageRunner
from edgepipe.pipeline.fidelity.names import display, layers_in
from edgepipe.pipeline.fidelity.sources import onnx_quantize_kwargs

Q_SUFFIX = "_QuantizeLinear_Output"
REMOVABLE = ("Relu", "Clip")


class _NoPreprocessAdvice(logging.Filter):
    """quantize_static logs the same pre-processing advice on every call: once per report is plenty."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


class _Reader:
    def __init__(self, name: str, data: np.ndarray):
        self.name, self.it = name, iter(data[i:i + 1] for i in range(data.shape[0]))

    def get_next(self) -> Optional[dict]:
        x = next(self.it, None)
        return None if x is None else {self.name: x}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: dict[str, int]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n, elem in names.items():
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None))
    return m


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


class OnnxProbe(LayerProbe):
    format = "onnx"
    supports_fallback = True

    def __init__(self, artifact: Path, fp32: Path, *, calibration: Optional[Calibration] = None,
                 quant_kwargs: Optional[dict] = None, known_layers: Optional[Iterable[str]] = None,
                 reference_name: str = "the float ONNX model"):
        self.artifact, self.fp32 = Path(artifact), Path(fp32)
        self.qmodel, self.fmodel = onnx.load(str(self.artifact)), onnx.load(str(self.fp32))
        self.calibration = calibration
        self.quant_kwargs = quant_kwargs  # quantize_static arguments (export/onnx.py); default options if None
        self.known = set(known_layers) if known_layers is not None else None
        self.reference = reference_name
        self.input_name = self.qmodel.graph.input[0].name
        self.qinit = _inits(self.qmodel)
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self._infos = self._scan()
        exposed = {i.tensor + Q_SUFFIX: self._elem(i.tensor) for i in self._infos}
        self._qsess = _session(_with_outputs(self.qmodel, exposed))
        self._fsess = _session(_with_outputs(self.fmodel, {i.tensor: onnx.TensorProto.FLOAT for i in self._infos}))

    @classmethod
    def open(cls, artifact: Path, reference: Path, *, traced: Optional[Traced] = None,
             calibration: Optional[Calibration] = None, options: Optional[FormatOptions] = None,
             known_layers: Optional[set[str]] = None) -> "OnnxProbe":
        return cls(artifact, reference, calibration=calibration, quant_kwargs=onnx_quantize_kwargs(options),
                   known_layers=known_layers)

    # -- structure -------------------------------------------------------------------------
    def _scan(self) -> list[LayerInfo]:
        q = self.qmodel.graph
        producer = {o: n for n in q.node for o in n.output}
        fnames = {o for n in self.fmodel.graph.node for o in n.output} | {i.name for i in self.fmodel.graph.input}
        self.qparams: dict[str, tuple] = {}
        infos = []
        for n in q.node:
            x = n.input[0] if n.op_type == "QuantizeLinear" else None
            if x is None or x in self.qinit or x not in fnames or n.output[0] != x + Q_SUFFIX:
                continue
            scale, zp = self.qinit.get(n.input[1]), self.qinit.get(n.input[2]) if len(n.input) > 2 else None
            if scale is None or zp is None:
                continue
            self.qparams[x] = (float(np.ravel(scale)[0]), int(np.ravel(zp)[0]), zp.dtype)
            p = producer.get(x)
            op = p.op_type if p is not None else "INPUT"
            facts = {"qrange": self._qrange(x),
                     **(self._node_facts(p, producer) if p is not None else {})}
            layer = display(layers_in(x, self.known) + (layers_in(p.name, self.known) if p else [])
                            + self._weight_layers(p), (p.name if p is not None else x))
            ins = [self._src(i, producer) for i in p.input] if p is not None else []
            infos.append(LayerInfo(x, op, layer, [i for i in ins if i], "NCHW", facts, isolable=p is not None))
        return infos

    def _elem(self, x: str) -> int:
        """The ONNX element type of x's quantized form (uint8 or int8)."""
        return onnx.helper.np_dtype_to_tensor_dtype(self.qparams[x][2])

    def _qrange(self, x: str) -> tuple[float, float]:
        s, z, dt = self.qparams[x]
        info = np.iinfo(dt)
        return (s * (info.min - z), s * (info.max - z))

    def _src(self, t: str, producer: dict) -> Optional[str]:
        """The activation a DequantizeLinear output carries (its QuantizeLinear's input)."""
        dq = producer.get(t)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        qn = producer.get(dq.input[0])
        return qn.input[0] if qn is not None and qn.op_type == "QuantizeLinear" else None

    def _weight_layers(self, p) -> list[str]:
        if p is None:
            return []
        return [l for i in p.input[1:] for l in layers_in(i, self.known)]

    def _node_facts(self, p, producer: dict) -> dict:
        f: dict = {}
        if p.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(p.input) > 1:
            dq = producer.get(p.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self.qinit:
                scales = np.ravel(self.qinit.get(dq.input[1], np.ones(1)))
                f["weights"] = "per-channel" if scales.size > 1 else "per-tensor"
                live = scales[scales > 0]
                if live.size > 1:
                    f["weight_channel_ratio"] = float(live.max() / np.median(live))
            group = next((a.i for a in p.attribute if a.name == "group"), 1)
            f["depthwise"] = p.op_type == "Conv" and group > 1
        if p.op_type in ("Concat", "Add"):
            srcs = [self._src(i, producer) for i in p.input]
            scales = [self.qparams[s][0] for s in srcs if s in self.qparams]
            if len(scales) >= 2 and min(scales) > 0:
                f["concat_scale_ratio" if p.op_type == "Concat" else "add_scale_ratio"] = max(scales) / min(scales)
        return f

    def layers(self) -> list[LayerInfo]:
        return self._infos

    # -- running -------------------------------------------------------------------------------
    def _deq(self, x: str, v: np.ndarray) -> np.ndarray:
        s, z, _ = self.qparams[x]
        return (v.astype(np.float32) - z) * s

    def run(self, raw: np.ndarray, data: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
        names = [i.tensor for i in self._infos]
        feed = {self.input_name: np.ascontiguousarray(data, np.float32)}
        qo = self._qsess.run(None, feed)
        fo = self._fsess.run(None, feed)
        qd = dict(zip((o.name for o in self._qsess.get_outputs()), qo))
        fd = dict(zip((o.name for o in self._fsess.get_outputs()), fo))
        got = {n: self._deq(n, qd[n + Q_SUFFIX]) for n in names if n + Q_SUFFIX in qd}
        ref = {n: np.asarray(fd[n], np.float32) for n in names if n in fd}
        return ref, got, np.asarray(fo[0], np.float32), np.asarray(qo[0], np.float32)

    def reference_tensors(self, raw: np.ndarray, data: np.ndarray, names: set[str]) -> dict:
        fo = self._fsess.run(None, {self.input_name: np.ascontiguousarray(data, np.float32)})
        fd = dict(zip((o.name for o in self._fsess.get_outputs()), fo))
        return {n: np.asarray(fd[n], np.float32) for n in names if n in fd}

    # -- variants --------------------------------------------------------------------------------
    def isolation(self) -> Optional[str]:
        if self.calibration is None:
            return "needs the calibration images to re-quantize one layer at a time"
        return None

    def group(self, x: str) -> list[str]:
        """The float model's node names that make up the layer producing ``x``."""
        producer = {o: n for n in self.fmodel.graph.node for o in n.output}
        p = producer.get(x)
        if p is None:
            return []
        nodes = [p.name]
        if p.op_type in REMOVABLE and p.input and p.input[0] in producer:
            nodes.insert(0, producer[p.input[0]].name)
        return nodes

    def _dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgepipe-fidelity-onnx-")
        return Path(self._tmp.name)

    def _quantize(self, dest: Path, **kw) -> Path:
        cache = self._dir() / "calibration.json"
        reader = None if cache.exists() else _Reader(self.input_name, self.calibration.data)
        quiet = _NoPreprocessAdvice()
        logging.getLogger().addFilter(quiet)
        try:
            kwargs = self.quant_kwargs if self.quant_kwargs is not None else onnx_quantize_kwargs(None)
            lazy.ort_quantization().quantize_static(str(self.fp32), str(dest), reader,
                                                    calibration_cache_path=str(cache), **kwargs, **kw)
        finally:
            logging.getLogger().removeFilter(quiet)
        return dest

    def isolated(self, info: LayerInfo) -> ImageRunner:
        dest = self._dir() / "isolated.onnx"
        self._quantize(dest, nodes_to_quantize=self.group(info.tensor))
        m = onnx.load(str(dest))
        made = {o for n in m.graph.node for o in n.output}
        extra = {info.tensor + Q_SUFFIX: self._elem(info.tensor)} if info.tensor + Q_SUFFIX in made else {}
        sess = _session(_with_outputs(m, extra))  # (an op like MaxPool alone keeps its input's quantization)
        names = [o.name for o in sess.get_outputs()]
        inits = _inits(m)
        qn = next((n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == info.tensor), None)

        def run(raw: np.ndarray, data: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
            outs = dict(zip(names, sess.run(None, {self.input_name: np.ascontiguousarray(data, np.float32)})))
            t = outs.get(info.tensor + Q_SUFFIX)
            if t is not None and qn is not None:
                s, z = float(np.ravel(inits[qn.input[1]])[0]), int(np.ravel(inits[qn.input[2]])[0])
                t = (t.astype(np.float32) - z) * s
            return t, np.asarray(outs[names[0]], np.float32)

        return run

    def float_nodes(self, tensors: list[str]) -> list[str]:
        """Float-model nodes to leave unquantized so these tensors stay float: the layer producing
        each and every node consuming it."""
        keep: list[str] = []
        for x in tensors:
            keep += self.group(x)
            keep += [n.name for n in self.fmodel.graph.node if x in n.input]
        return list(dict.fromkeys(keep))

    def fallback_options(self) -> dict:
        return {"quantizer": "onnxruntime.quantization.quantize_static (nodes_to_exclude)", "format": "QDQ",
                "per_channel": True}

    def fallback(self, float_layers: list[str], dest: Path) -> Path:
        """Write the artifact re-quantized with ``float_layers`` (tensor names) kept float."""
        if self.calibration is None:
            raise RuntimeError(self.isolation())
        self._quantize(dest, nodes_to_exclude=self.float_nodes(float_layers))
        m = onnx.load(str(dest))
        del m.metadata_props[:]
        m.metadata_props.extend(self.qmodel.metadata_props)
        onnx.save(m, str(dest))
        return dest

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
