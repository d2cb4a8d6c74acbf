"""`edgepipe inspect`: what is inside an artifact, without running it.

* ``.tflite``: op table (type, count, Edge TPU placement and the rule that decided it - a
  *prediction* unless the file is already Edge TPU compiled), tensor dtypes, whether the model
  is quantized, inputs and outputs.
* ``.onnx``: op types and counts, quantized or not (QLinear*, QuantizeLinear/DequantizeLinear,
  ConvInteger, MatMulInteger), opsets, inputs and outputs.

No TensorFlow import: the TFLite flatbuffer is read through LiteRT's schema module and ONNX
through the ``onnx`` package.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgepipe.devices.graph.edgetpu import analyze_graph
from edgepipe.devices.graph.tflite_graph import read_tflite
from edgepipe.pipeline.base.errors import UserError

ONNX_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def _kind(p: Path) -> str:
    if not p.exists():
        raise UserError(f"{p} does not exist", "Pass the path of a .tflite or .onnx artifact")
    if p.is_dir():
        raise UserError(f"{p} is a directory, not a .tflite or .onnx file",
                        "inspect reads .tflite and .onnx artifacts (Core ML packages are not supported)")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    suffix = p.suffix.lower()
    if suffix == ".tflite":
        raise UserError(f"{p} is not a TFLite flatbuffer (no TFL3 identifier)",
                        "Re-export the model; the file is empty, truncated or not a .tflite model")
    if suffix == ".onnx":
        return "onnx"
    raise UserError(f"{p} is not a .tflite or .onnx artifact", "Pass the path of a .tflite or .onnx file")


def inspect_artifact(path: str | Path) -> dict:
    """A JSON-ready description of a .tflite or .onnx artifact. Bad input raises UserError."""
    p = Path(path)
    kind = _kind(p)
    if kind == "tflite":
        return inspect_tflite(p)
    return inspect_onnx(p)


def _tflite_quantization(sg) -> str:
    """How a TFLite subgraph is quantized, in words."""
    activations = [t for t in sg.tensors if not t.is_constant]
    weights = [t for t in sg.tensors if t.is_constant and t.dtype in ("float32", "float16", "int8", "uint8")]
    io_idx = set(sg.inputs) | set(sg.outputs)
    float_act = [t for t in activations if t.dtype.startswith("float")]
    quantized_act = sum(1 for t in activations if t.quantized)
    if quantized_act and not float_act:
        return "full-integer"
    if quantized_act and all(t.index in io_idx for t in float_act):
        return "integer, float I/O"
    if quantized_act:
        return "mixed int8/float"
    if any(t.quantized for t in weights):
        return "dynamic-range (int8 weights, float activations)"
    if any(t.dtype == "float16" for t in weights):
        return "float16 weights"
    return "none"


def inspect_tflite(path: Path) -> dict:
    g = read_tflite(path)
    report = analyze_graph(g, ops_detail=False)
    sg = g.main
    types = Counter(t.dtype for t in sg.tensors)
    quant = _tflite_quantization(sg)

    def io(idx: list[int]) -> list[dict]:
        return [sg.tensors[i].to_dict() for i in idx]

    return {
        "path": str(path),
        "format": "tflite",
        "size_bytes": path.stat().st_size,
        "schema_version": g.schema_version,
        "subgraphs": len(g.subgraphs),
        "operators": len(sg.operators),
        "edgetpu_compiled": g.is_edgetpu_compiled,
        "quantized": quant != "none",
        "quantization": quant,
        "tensor_dtypes": dict(sorted(types.items())),
        "inputs": io(sg.inputs),
        "outputs": io(sg.outputs),
        "op_table": report.by_type(),
        "edgetpu": {k: v for k, v in report.to_dict().items() if k not in ("by_type",)},
    }


def inspect_onnx(path: Path) -> dict:
    import onnx  # heavy third-party (~0.5 s): imported only when an ONNX file is inspected

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        "Re-export the model; the file is truncated or not ONNX") from None
    g = model.graph
    if not g.node and not g.input and not g.output:
        raise UserError(f"{path} holds no ONNX graph", "Re-export the model; the file is empty or not ONNX")
    ops = Counter(n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}" for n in g.node)
    quant_ops = {k: v for k, v in ops.items()
                 if k.split(".")[-1].startswith("QLinear") or k.split(".")[-1] in ONNX_QUANT_OPS}
    inits = {i.name for i in g.initializer}
    elem = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def vi(v) -> dict:
        t = v.type.tensor_type
        dims: list[Any] = []
        for d in t.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or -1))
        return {"name": v.name, "dtype": elem.get(t.elem_type, str(t.elem_type)).lower(), "shape": dims}

    init_types = Counter(elem.get(i.data_type, str(i.data_type)).lower() for i in g.initializer)
    return {
        "path": str(path),
        "format": "onnx",
        "size_bytes": path.stat().st_size,
        "ir_version": int(model.ir_version),
        "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "operators": sum(ops.values()),
        "quantized": bool(quant_ops),
        "quantization_ops": dict(sorted(quant_ops.items())),
        "initializer_dtypes": dict(sorted(init_types.items())),
        "inputs": [vi(v) for v in g.input if v.name not in inits],
        "outputs": [vi(v) for v in g.output],
        "op_table": [{"type": k, "count": v} for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))],
    }
