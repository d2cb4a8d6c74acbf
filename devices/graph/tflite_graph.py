"""Read a ``.tflite`` file into plain Python objects, through the schema module LiteRT ships.

The flatbuffer is decoded by ``ai_edge_litert.schema_py_generated`` (the code generated from
the TFLite schema, with the ``flatbuffers`` runtime); nothing here decodes bytes by hand.
Per operator we keep what placement rules need: the op name (BuiltinOperator enum, or the
custom code), its version, its input/output tensors (type, shape, shape_signature with -1
for dynamic dimensions, quantization, whether the tensor is a constant with data) and the
builtin options as a dict with enum values turned into names.

No TensorFlow import here (devices/ code must stay light).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base.errors import UserError

EDGETPU_CUSTOM_OP = "edgetpu-custom-op"

# TFLite TensorType -> numpy dtype name (types numpy lacks keep the TFLite name, lower case)
_NUMPY_NAMES = {
    "FLOAT32": "float32", "FLOAT16": "float16", "FLOAT64": "float64", "INT32": "int32",
    "UINT8": "uint8", "INT64": "int64", "BOOL": "bool", "INT16": "int16", "INT8": "int8",
    "UINT64": "uint64", "UINT32": "uint32", "UINT16": "uint16", "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
}


def _schema():
    # lazy: the flatbuffer schema module costs ~35 ms to import, and only reading a .tflite file needs it
    from ai_edge_litert import schema_py_generated as schema

    return schema


@functools.lru_cache(maxsize=None)
def _enum_names(enum_name: str) -> dict[int, str]:
    cls = getattr(_schema(), enum_name)
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def builtin_op_name(code: int) -> str:
    return _enum_names("BuiltinOperator").get(int(code), f"BUILTIN_{int(code)}")


def tensor_type_name(code: int) -> str:
    return _enum_names("TensorType").get(int(code), f"TYPE_{int(code)}")


# Option fields whose integer value is an enum, by field name in the generated *OptionsT classes.
_ENUM_FIELDS = {
    "padding": "Padding",
    "fusedActivationFunction": "ActivationFunctionType",
    "weightsFormat": "FullyConnectedOptionsWeightsFormat",
    "mode": "MirrorPadMode",
    "kernelType": "LSTMKernelType",
    "combiner": "CombinerType",
    "type": "LSHProjectionType",
}
_ENUM_FIELDS_BY_TYPE = {"inDataType": "TensorType", "outDataType": "TensorType",
                        "outputType": "TensorType", "idxOutType": "TensorType",
                        "quantizedBiasType": "TensorType"}


def _snake(name: str) -> str:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    s = re.sub(r"([A-Z])([A-Z][a-z])", r"\1_\2", s)
    return s.lower()


def _options_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    out = {}
    for k, v in vars(obj).items():
        enum = _ENUM_FIELDS.get(k) or _ENUM_FIELDS_BY_TYPE.get(k)
        if enum and isinstance(v, (int, np.integer)):
            v = _enum_names(enum).get(int(v), int(v))
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.floating,)):
            v = float(v)
        elif isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        elif hasattr(v, "__dict__"):
            v = _options_dict(v)
        out[_snake(k)] = v
    return out


@dataclass
class TensorDesc:
    index: int
    name: str
    type: str  # TFLite TensorType name: INT8, UINT8, FLOAT32, INT32, ...
    dtype: str  # numpy-style name: int8, uint8, float32, ...
    shape: list[int]
    shape_signature: list[int]  # -1 marks a dynamic dimension
    buffer: int
    is_constant: bool  # backed by a buffer that holds data
    is_variable: bool = False
    nbytes: int = 0  # bytes of constant data
    quantization: Optional[dict] = None  # {"scale": [...], "zero_point": [...], "quantized_dimension": int}

    @property
    def rank(self) -> int:
        return len(self.shape_signature)

    @property
    def is_dynamic(self) -> bool:
        return any(int(d) < 0 for d in self.shape_signature)

    @property
    def quantized(self) -> bool:
        return bool(self.quantization and self.quantization.get("scale"))

    @property
    def num_elements(self) -> int:
        return int(np.prod([max(int(d), 1) for d in self.shape])) if self.shape else 1

    def to_dict(self, full_quant: bool = False) -> dict:
        q = self.quantization
        if q and not full_quant:
            n = len(q.get("scale") or [])
            q = {"scale": q["scale"][:1] if n > 1 else q["scale"],
                 "zero_point": (q.get("zero_point") or [])[:1] if n > 1 else q.get("zero_point"),
                 "quantized_dimension": q.get("quantized_dimension", 0),
                 "channels": n}
        return {"index": self.index, "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "shape_signature": list(self.shape_signature), "constant": self.is_constant,
                "quantization": q}


@dataclass
class OpDesc:
    index: int  # position in execution order within its subgraph
    opcode: str  # builtin name (CONV_2D, ...) or the custom code for CUSTOM ops
    builtin_code: int
    version: int
    inputs: list[int]  # tensor indices; -1 for an omitted optional input
    outputs: list[int]
    options: dict = field(default_factory=dict)
    options_type: Optional[str] = None
    custom_code: Optional[str] = None

    @property
    def is_custom(self) -> bool:
        return self.custom_code is not None


@dataclass
class SubgraphDesc:
    index: int
    name: str
    tensors: list[TensorDesc]
    operators: list[OpDesc]
    inputs: list[int]
    outputs: list[int]


@dataclass
class TFLiteGraph:
    path: Optional[str]
    schema_version: int
    description: str
    subgraphs: list[SubgraphDesc]
    _constants: dict = field(default_factory=dict, repr=False)

    @property
    def main(self) -> SubgraphDesc:
        return self.subgraphs[0]

    @property
    def is_edgetpu_compiled(self) -> bool:
        return any(op.custom_code == EDGETPU_CUSTOM_OP for sg in self.subgraphs for op in sg.operators)

    def tensor(self, index: int, subgraph: int = 0) -> Optional[TensorDesc]:
        if index is None or index < 0:
            return None
        return self.subgraphs[subgraph].tensors[index]

    def op_inputs(self, op: OpDesc, subgraph: int = 0) -> list[Optional[TensorDesc]]:
        return [self.tensor(i, subgraph) for i in op.inputs]

    def op_outputs(self, op: OpDesc, subgraph: int = 0) -> list[Optional[TensorDesc]]:
        return [self.tensor(i, subgraph) for i in op.outputs]

    def constant_value(self, t: Optional[TensorDesc]) -> Optional[np.ndarray]:
        """The data of a constant tensor as a numpy array of its dtype and shape (None if not constant)."""
        if t is None or not t.is_constant:
            return None
        raw = self._constants.get(t.buffer)
        if raw is None:
            return None
        try:
            dt = np.dtype(t.dtype)
        except TypeError:
            return None
        arr = np.frombuffer(raw, dtype=dt)
        try:
            return arr.reshape(t.shape) if t.shape else arr.reshape(())
        except ValueError:
            return arr


class TFLiteReadError(UserError):
    pass


def looks_like_tflite(head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] == b"TFL3"


def read_tflite(path: str | Path, keep_constants: bool = True) -> TFLiteGraph:
    """Parse a .tflite file. Raises TFLiteReadError (a UserError) for missing or corrupt files."""
    p = Path(path)
    if not p.exists():
        raise TFLiteReadError(f"{p} does not exist", "Pass the path of a .tflite file")
    if p.is_dir():
        raise TFLiteReadError(f"{p} is a directory, not a .tflite file", "Pass the path of a .tflite file")
    buf = p.read_bytes()
    return read_tflite_bytes(buf, str(p), keep_constants=keep_constants)


def read_tflite_bytes(buf: bytes, name: str = "<bytes>", keep_constants: bool = True) -> TFLiteGraph:
    schema = _schema()
    if not looks_like_tflite(buf[:8]):
        raise TFLiteReadError(f"{name} is not a TFLite flatbuffer (no TFL3 identifier)",
                              "Pass a .tflite model written by the TFLite/LiteRT converter")
    try:
        return _decode(schema, buf, name, keep_constants)
    except TFLiteReadError:
        raise
    except Exception as e:  # flatbuffers raises struct/index errors on truncated or corrupt data
        raise TFLiteReadError(f"{name} is a corrupt TFLite file ({type(e).__name__}: {e})",
                              "Re-export the model; the file is truncated or damaged") from None


def _quant(schema, t) -> Optional[dict]:
    q = t.Quantization()
    if q is None:
        return None
    scale = [float(x) for x in q.ScaleAsNumpy()] if not q.ScaleIsNone() else []
    zp = [int(x) for x in q.ZeroPointAsNumpy()] if not q.ZeroPointIsNone() else []
    if not scale and not zp:
        return None
    return {"scale": scale, "zero_point": zp, "quantized_dimension": int(q.QuantizedDimension())}


def _buffers(model, buf: bytes, name: str, keep_constants: bool) -> tuple[dict[int, int], dict[int, bytes]]:
    """({buffer: size in bytes}, {buffer: its bytes} when constants are kept)."""
    sizes: dict[int, int] = {}
    constants: dict[int, bytes] = {}
    for b in range(model.BuffersLength()):
        bb = model.Buffers(b)
        if bb is None:
            continue
        size = 0
        if not bb.DataIsNone() and bb.DataLength() > 0:
            size = bb.DataLength()
            if keep_constants:
                constants[b] = bb.DataAsNumpy()  # a view on buf, no copy
        elif bb.Offset() > 1 and bb.Size() > 0:  # data stored after the flatbuffer (models > 2 GiB)
            size, off = int(bb.Size()), int(bb.Offset())
            if keep_constants:
                if off + size > len(buf):
                    raise TFLiteReadError(f"{name}: buffer {b} points past the end of the file",
                                          "Re-export the model; the file is truncated")
                constants[b] = memoryview(buf)[off: off + size]
        sizes[b] = size
    return sizes, constants


def _opcodes(model) -> list[tuple[int, Optional[str], int]]:
    out = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        custom = oc.CustomCode()
        out.append((max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode())),
                    custom.decode("utf-8", "replace") if custom is not None else None, int(oc.Version()) or 1))
    return out


def _ints(obj, field: str) -> list[int]:
    return [] if getattr(obj, f"{field}IsNone")() else [int(x) for x in getattr(obj, f"{field}AsNumpy")()]


def _tensor(schema, t, ti: int, sizes: dict[int, int]) -> TensorDesc:
    tname = tensor_type_name(t.Type())
    shape = _ints(t, "Shape")
    b = int(t.Buffer())
    nbytes = sizes.get(b, 0) if b > 0 else 0
    return TensorDesc(index=ti, name=(t.Name() or b"").decode("utf-8", "replace"), type=tname,
                      dtype=_NUMPY_NAMES.get(tname, tname.lower()), shape=shape,
                      shape_signature=list(shape) if t.ShapeSignatureIsNone() else _ints(t, "ShapeSignature"),
                      buffer=b, is_constant=nbytes > 0, is_variable=bool(t.IsVariable()), nbytes=nbytes,
                      quantization=_quant(schema, t))


def _options(schema, op) -> tuple[dict, Optional[str]]:
    """(the builtin options as a dict, their type name): BuiltinOptions, else BuiltinOptions2."""
    opt_type = int(op.BuiltinOptionsType())
    if opt_type:
        return (_options_dict(schema.BuiltinOptionsCreator(opt_type, op.BuiltinOptions())),
                _enum_names("BuiltinOptions").get(opt_type))
    opt2 = int(op.BuiltinOptions2Type()) if hasattr(op, "BuiltinOptions2Type") else 0
    if opt2:
        return (_options_dict(schema.BuiltinOptions2Creator(opt2, op.BuiltinOptions2())),
                _enum_names("BuiltinOptions2").get(opt2))
    return {}, None


def _operator(schema, op, oi: int, opcodes: list, n_tensors: int, name: str) -> OpDesc:
    idx = int(op.OpcodeIndex())
    if idx >= len(opcodes):
        raise TFLiteReadError(f"{name}: operator {oi} names opcode {idx} of {len(opcodes)}",
                              "Re-export the model; the file is damaged")
    code, custom, version = opcodes[idx]
    is_custom = code == getattr(schema.BuiltinOperator, "CUSTOM", 32)
    ins, outs = _ints(op, "Inputs"), _ints(op, "Outputs")
    bad = next((ti for ti in ins + outs if ti >= n_tensors), None)
    if bad is not None:
        raise TFLiteReadError(f"{name}: operator {oi} names tensor {bad} of {n_tensors}",
                              "Re-export the model; the file is damaged")
    options, options_type = _options(schema, op)
    return OpDesc(index=oi, opcode=(custom or "CUSTOM") if is_custom else builtin_op_name(code), builtin_code=code,
                  version=version, inputs=ins, outputs=outs, options=options, options_type=options_type,
                  custom_code=custom if is_custom else None)


def _subgraph(schema, sg, s: int, sizes: dict[int, int], opcodes: list, name: str) -> SubgraphDesc:
    tensors = [_tensor(schema, sg.Tensors(ti), ti, sizes) for ti in range(sg.TensorsLength())]
    ops = [_operator(schema, sg.Operators(oi), oi, opcodes, len(tensors), name) for oi in range(sg.OperatorsLength())]
    sgname = sg.Name()
    return SubgraphDesc(index=s, name=sgname.decode("utf-8", "replace") if sgname else "", tensors=tensors,
                        operators=ops, inputs=_ints(sg, "Inputs"), outputs=_ints(sg, "Outputs"))


def _decode(schema, buf: bytes, name: str, keep_constants: bool) -> TFLiteGraph:
    model = schema.Model.GetRootAs(buf, 0)
    sizes, constants = _buffers(model, buf, name, keep_constants)
    opcodes = _opcodes(model)
    subgraphs = [_subgraph(schema, model.Subgraphs(s), s, sizes, opcodes, name) for s in range(model.SubgraphsLength())]
    if not subgraphs:
        raise TFLiteReadError(f"{name} holds no subgraph", "Re-export the model")
    desc = model.Description()
    return TFLiteGraph(path=name, schema_version=int(model.Version()),
                       description=desc.decode("utf-8", "replace") if desc else "",
                       subgraphs=subgraphs, _constants=constants)
