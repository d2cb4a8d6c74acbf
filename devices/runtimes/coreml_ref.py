"""A numpy reference interpreter for Core ML ML programs (.mlpackage), so Core ML
artifacts can be checked numerically where Apple's runtime does not exist (Linux, CI).

What it reads
    An ``.mlpackage`` folder (or a bare ``.mlmodel`` file whose weights are all inline)
    holding an ML program (``Model.mlProgram``; the older neuralnetwork type is refused).
    The protobuf spec and the MIL weight blob file are decoded here, with no
    coremltools or TensorFlow import: loading a MobileNet takes milliseconds, and
    bench/eval processes stay free of TensorFlow (``import coremltools`` imports
    TensorFlow when it is installed, ~6 s here). Field numbers follow Apple's public
    ``Model.proto``/``MIL.proto``/``FeatureTypes.proto``; the weight file follows the
    public MILBlob storage format (64-byte header, 64-byte ``blob_metadata`` with
    sentinel 0xDEADBEEF before each blob, sub-byte types packed LSB first).

How it computes
    Operations follow the MIL op definitions (coremltools op reference): NCHW layout,
    ``pad_type`` valid/same/same_lower/custom (``same`` splits an odd total padding with
    the extra row/column at the end, like TensorFlow; ``same_lower`` at the start),
    strides, dilations, groups, ``keep_dims``, negative axes, avg_pool
    ``exclude_padding_from_average``, pool ``ceil_mode``, pad modes constant/reflect/replicate.

    Precision: every value is stored in the dtype the program declares for it, so an fp16
    program keeps fp16 activations. Each op reads fp16 operands as float32, computes in
    float32 and rounds its result to fp16 (for one elementwise op this is the correctly
    rounded fp16 result; convolutions and matmuls therefore accumulate in float32 and round
    once at the end, as Core ML's CPU kernels do to within fp16 rounding). This approximates
    an fp16 Core ML run; it is not bit-exact with any Apple device.

    Constants and ``constexpr_*`` decompression ops (affine dequantize, LUT/palettized,
    sparse, blockwise shift-scale, cast) are evaluated once at load time.

Inputs, as ``MilModel.predict`` and the runtime ``Session.run`` take them
    * Image inputs (``ct.ImageType``): raw pixels 0-255, NHWC (batch first; a single HWC
      image is accepted), float or uint8, channels in RGB order (1 channel for grayscale),
      whatever the model's declared color layout: the interpreter reorders to BGR when the
      spec says BGR, then feeds NCHW to the program, whose first ops apply the ImageType's
      scale and bias. Like a CVPixelBuffer, 8-bit images carry integers: values are rounded
      to the nearest integer; values outside 0-255 are refused (they mean the caller passed
      preprocessed data).
    * Tensor inputs: arrays of the declared shape (cast to the declared dtype).
    * A batch larger than the program's fixed batch of 1 runs sample by sample and the
      outputs are stacked.

Outputs
    ``predict`` returns ``{output name: np.ndarray}`` in the spec's output order. For a
    classifier (``ct.ClassifierConfig``) the probabilities output holds the probability
    tensor fed to the ``classify`` op (its own shape, class order of ``MilModel.classes``)
    and the label output holds the top class as a 0-d array.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from edgepipe.pipeline.base.errors import EdgepipeError, UnsupportedArtifact, UserError
from edgepipe.pipeline.base.manifest import TensorInfo

from edgepipe.devices.runtimes.base import RunOptions, Runtime, Session

__all__ = [
    "UnsupportedMilOp", "MilFormatError", "MilExecutionError", "MilModel", "IOSpec",
    "load_program", "describe", "run_mlpackage", "supported_ops",
    "CoreMLReference", "CoreMLNative", "CoreMLNativeGPU",
]

_HINT_OP = ("Verify this artifact with Core ML on macOS, or add the op to "
            "edgepipe/devices/coreml_ref.py")


class UnsupportedMilOp(UnsupportedArtifact):
    """The program uses an op (or an op mode) the reference interpreter does not implement."""

    def __init__(self, op_type: str, detail: str | None = None):
        msg = f"unsupported MIL op {op_type}" + (f" ({detail})" if detail else "")
        super().__init__(msg, _HINT_OP)
        self.op_type = op_type


class MilFormatError(UnsupportedArtifact):
    """The package is not a readable ML program (bad spec, missing or corrupt weights)."""


class MilExecutionError(EdgepipeError):
    """An op produced something inconsistent with the program's declared types."""


# --------------------------------------------------------------------------------------
# protobuf wire format (just what the Core ML spec needs)
# --------------------------------------------------------------------------------------

def _varint(buf, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _msg(buf) -> dict[int, list]:
    """Parse one message into {field number: [raw values]} (varints as int, the rest as bytes)."""
    out: dict[int, list] = {}
    i, n = 0, len(buf)
    try:
        while i < n:
            key, i = _varint(buf, i)
            wt = key & 7
            if wt == 0:
                v, i = _varint(buf, i)
            elif wt == 2:
                ln, i = _varint(buf, i)
                v = buf[i:i + ln]
                i += ln
            elif wt == 5:
                v = buf[i:i + 4]
                i += 4
            elif wt == 1:
                v = buf[i:i + 8]
                i += 8
            else:
                raise ValueError(f"wire type {wt}")
            out.setdefault(key >> 3, []).append(v)
        if i != n:
            raise ValueError("truncated message")
    except (IndexError, ValueError) as e:
        raise MilFormatError(f"Core ML spec is not valid protobuf ({e})",
                             "Re-export the Core ML artifact") from None
    return out


def _one(m: dict, f: int, default=None):
    v = m.get(f)
    return v[-1] if v else default


def _s(v) -> str:
    return bytes(v).decode("utf-8") if v is not None else ""


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _packed_varints(chunks: list) -> list[int]:
    vals: list[int] = []
    for c in chunks:
        if isinstance(c, int):
            vals.append(c)
            continue
        i = 0
        while i < len(c):
            v, i = _varint(c, i)
            vals.append(v)
    return vals


def _packed_fixed(chunks: list, fmt: str) -> np.ndarray:
    return np.frombuffer(b"".join(bytes(c) for c in chunks), dtype=np.dtype(fmt))


def _map(m: dict, f: int, value_fn) -> dict:
    out = {}
    for entry in m.get(f, []):
        e = _msg(entry)
        out[_s(_one(e, 1, b""))] = value_fn(_one(e, 2, b""))
    return out


# --------------------------------------------------------------------------------------
# MIL types and values
# --------------------------------------------------------------------------------------

_MIL_DTYPES = {
    1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16",
    21: "int8", 22: "int16", 23: "int32", 24: "int64", 25: "int4",
    31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64", 35: "uint4", 36: "uint2",
    37: "uint1", 38: "uint6", 39: "uint3", 40: "fp8e4m3fn", 41: "fp8e5m2",
}
# numpy storage type of each MIL dtype (sub-byte integers widen to 8 bits, bf16/fp8 to fp32)
_NP = {
    "bool": np.bool_, "string": np.object_, "fp16": np.float16, "fp32": np.float32,
    "fp64": np.float64, "bf16": np.float32, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "int4": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "uint4": np.uint8,
    "uint2": np.uint8, "uint1": np.uint8, "uint6": np.uint8, "uint3": np.uint8,
    "fp8e4m3fn": np.float32, "fp8e5m2": np.float32,
}
_SUBBYTE = {"int4": (4, True), "uint1": (1, False), "uint2": (2, False), "uint3": (3, False),
            "uint4": (4, False), "uint6": (6, False)}
_BLOB_DTYPES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16",
                8: "int4", 9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6",
                14: "int32", 15: "uint32", 16: "fp8e4m3fn", 17: "fp8e5m2"}
_RAW_FMT = {"fp16": "<f2", "fp32": "<f4", "fp64": "<f8", "int8": "i1", "uint8": "u1",
            "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "int64": "<i8",
            "uint64": "<u8", "bool": "u1"}
_CAST_NAMES = {"fp16": "fp16", "fp32": "fp32", "fp64": "fp64", "float16": "fp16",
               "float32": "fp32", "int8": "int8", "uint8": "uint8", "int16": "int16",
               "uint16": "uint16", "int32": "int32", "int64": "int64", "uint32": "uint32",
               "bool": "bool"}


@dataclass
class MilType:
    kind: str  # tensor | list | tuple | dict | state
    dtype: Optional[str] = None
    shape: Optional[tuple] = None  # ints, -1 where unknown; None: unknown rank
    elem: Optional["MilType"] = None

    @property
    def np_dtype(self):
        return _NP.get(self.dtype) if self.kind == "tensor" and self.dtype else None

    @property
    def known_shape(self) -> Optional[tuple]:
        if self.kind != "tensor" or self.shape is None or any(d < 0 for d in self.shape):
            return None
        return self.shape


def _parse_type(buf) -> MilType:
    m = _msg(buf or b"")
    if 1 in m:
        t = _msg(_one(m, 1))
        dtype = _MIL_DTYPES.get(_one(t, 1, 0), f"dtype{_one(t, 1, 0)}")
        rank = _signed(_one(t, 2, 0))
        dims = []
        for d in t.get(3, []):
            dm = _msg(d)
            if 1 in dm:
                dims.append(_signed(_one(_msg(_one(dm, 1)), 1, 0)))
            else:
                dims.append(-1)
        shape = tuple(dims) if rank >= 0 and len(dims) == rank else (None if rank < 0 else tuple(dims))
        return MilType("tensor", dtype, shape)
    if 2 in m:
        lt = _msg(_one(m, 2))
        return MilType("list", elem=_parse_type(_one(lt, 1, b"")))
    if 3 in m:
        return MilType("tuple")
    if 4 in m:
        return MilType("dict")
    if 5 in m:
        inner = _parse_type(_one(_msg(_one(m, 5)), 1, b""))
        return MilType("state", inner.dtype, inner.shape)
    return MilType("tensor", None, None)


def _unpack_bits(raw: bytes, nbits: int, count: int, signed: bool) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
    if bits.size < count * nbits:
        raise MilFormatError(f"packed {nbits}-bit data holds {bits.size // nbits} values, "
                             f"{count} declared", "Re-export the Core ML artifact")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.uint16)
    vals = bits @ (np.uint16(1) << np.arange(nbits, dtype=np.uint16))
    if signed:
        vals = vals.astype(np.int16)
        vals = np.where(vals >= (1 << (nbits - 1)), vals - (1 << nbits), vals).astype(np.int8)
        return vals
    return vals.astype(np.uint8)


def _fp8_to_f32(raw: np.ndarray, kind: str) -> np.ndarray:
    b = raw.astype(np.uint32)
    sign = np.where(b & 0x80, -1.0, 1.0).astype(np.float32)
    if kind == "fp8e4m3fn":
        e, m, bias, mb = (b >> 3) & 0xF, b & 0x7, 7, 3
    else:
        e, m, bias, mb = (b >> 2) & 0x1F, b & 0x3, 15, 2
    ef = e.astype(np.float32)
    mf = m.astype(np.float32) / (1 << mb)
    val = np.where(e == 0, mf * 2.0 ** (1 - bias), (1 + mf) * np.exp2(ef - bias))
    if kind == "fp8e4m3fn":
        val = np.where((e == 0xF) & (m == 0x7), np.nan, val)
    else:
        val = np.where(e == 0x1F, np.where(m == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)


def _decode_raw(raw: bytes, dtype: str, count: int) -> np.ndarray:
    if dtype in _SUBBYTE:
        nbits, signed = _SUBBYTE[dtype]
        return _unpack_bits(raw, nbits, count, signed)
    if dtype == "bf16":
        u = np.frombuffer(raw, "<u2")[:count].astype(np.uint32) << 16
        return u.view(np.float32)
    if dtype in ("fp8e4m3fn", "fp8e5m2"):
        return _fp8_to_f32(np.frombuffer(raw, np.uint8)[:count], dtype)
    fmt = _RAW_FMT.get(dtype)
    if fmt is None:
        raise MilFormatError(f"cannot decode MIL dtype {dtype}", "Re-export the Core ML artifact")
    arr = np.frombuffer(raw, np.dtype(fmt))
    if arr.size < count:
        raise MilFormatError(f"{dtype} data holds {arr.size} values, {count} declared",
                             "Re-export the Core ML artifact")
    arr = arr[:count]
    return arr.astype(np.bool_) if dtype == "bool" else arr.astype(_NP[dtype])


class _Blobs:
    """Reads blobs from the MIL weight files of one package (``@model_path/...``)."""

    def __init__(self, model_dir: Optional[Path]):
        self.model_dir = model_dir
        self._files: dict[str, Any] = {}

    def _open(self, name: str):
        if name not in self._files:
            rel = name.split("@model_path/", 1)[-1]
            if self.model_dir is None:
                raise MilFormatError(f"weights {name} referenced, but the model is a bare .mlmodel",
                                     "Give the .mlpackage folder")
            p = self.model_dir / rel
            if not p.is_file():
                raise MilFormatError(f"weight file {p} is missing", "Re-export the Core ML artifact")
            self._files[name] = open(p, "rb")
        return self._files[name]

    def read(self, name: str, offset: int, t: MilType) -> np.ndarray:
        f = self._open(name)
        f.seek(offset)
        meta = f.read(64)
        if len(meta) < 24:
            raise MilFormatError(f"weight file {name} ends before blob at offset {offset}",
                                 "Re-export the Core ML artifact")
        sentinel, bdt, size, data_off = struct.unpack_from("<IIQQ", meta)
        if sentinel != 0xDEADBEEF:
            raise MilFormatError(f"weight file {name} is corrupt: no blob header at offset {offset}",
                                 "Re-export the Core ML artifact")
        bname = _BLOB_DTYPES.get(bdt, f"blob{bdt}")
        dtype = t.dtype or bname
        if bname != dtype and not (dtype == "bool" and bname == "uint8"):
            raise MilFormatError(f"weight blob at offset {offset} holds {bname}, program declares {dtype}",
                                 "Re-export the Core ML artifact")
        shape = t.shape or ()
        if any(d < 0 for d in shape):
            raise MilFormatError("weight with an unknown shape", "Re-export the Core ML artifact")
        f.seek(data_off)
        raw = f.read(size)
        if len(raw) < size:
            raise MilFormatError(f"weight file {name} is truncated", "Re-export the Core ML artifact")
        return _decode_raw(raw, dtype, int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()


def _tensor_value(buf, t: MilType):
    tv = _msg(buf)
    dtype = t.dtype or "fp32"
    shape = t.shape if t.shape is not None else None
    count = int(np.prod(shape, dtype=np.int64)) if shape is not None else None
    if 4 in tv:  # strings
        vals = [_s(v) for v in _msg(_one(tv, 4)).get(1, [])]
        if shape == () or (shape is None and len(vals) == 1):
            return vals[0] if vals else ""
        return np.array(vals, dtype=object).reshape(shape if shape is not None else (-1,))
    if 7 in tv:  # raw bytes
        raw = b"".join(bytes(v) for v in _msg(_one(tv, 7)).get(1, []))
        arr = _decode_raw(raw, dtype, count if count is not None else len(raw))
    elif 1 in tv:
        arr = _packed_fixed(_msg(_one(tv, 1)).get(1, []), "<f4")
    elif 6 in tv:
        arr = _packed_fixed(_msg(_one(tv, 6)).get(1, []), "<f8")
    elif 2 in tv or 5 in tv or 3 in tv:
        f = 2 if 2 in tv else (5 if 5 in tv else 3)
        arr = np.array([_signed(v) for v in _packed_varints(_msg(_one(tv, f)).get(1, []))],
                       dtype=np.int64)
    else:
        arr = np.zeros(count or 0)
    if count is not None and arr.size == 0 and count > 0:
        arr = np.zeros(count)
    npdt = _NP.get(dtype, np.float32)
    arr = arr.astype(npdt)
    if shape is not None:
        arr = arr.reshape(shape)
    return arr


@dataclass
class _BlobRef:
    """A weight in the blob file, read when the program is compiled (not when only described)."""

    file: str
    offset: int
    type: MilType


def _value(buf, blobs: _Blobs):
    m = _msg(buf)
    t = _parse_type(_one(m, 2, b""))
    if 5 in m:
        bf = _msg(_one(m, 5))
        return _BlobRef(_s(_one(bf, 1, b"")), _one(bf, 2, 0), t)
    if 3 in m:
        iv = _msg(_one(m, 3))
        if 1 in iv:
            if t.kind == "tensor":
                return _tensor_value(_one(iv, 1), t)
            return _tensor_value(_one(iv, 1), MilType("tensor", "fp32", None))
        for f in (3, 2):  # list, tuple
            if f in iv:
                return [_value(v, blobs) for v in _msg(_one(iv, f)).get(1, [])]
        if 4 in iv:
            out = {}
            for kv in _msg(_one(iv, 4)).get(1, []):
                kvm = _msg(kv)
                k = _value(_one(kvm, 1, b""), blobs)
                out[k.item() if isinstance(k, np.ndarray) else k] = _value(_one(kvm, 2, b""), blobs)
            return out
    return None


# --------------------------------------------------------------------------------------
# program structure
# --------------------------------------------------------------------------------------

@dataclass
class MilOp:
    type: str
    name: str
    inputs: dict  # param -> list of ("name", var) | ("value", value)
    outputs: list  # [(var name, MilType)]
    attrs: dict
    has_blocks: bool = False


def _parse_op(buf, blobs: _Blobs) -> MilOp:
    m = _msg(buf)
    inputs = {}
    for entry in m.get(2, []):
        e = _msg(entry)
        key = _s(_one(e, 1, b""))
        binds = []
        for b in _msg(_one(e, 2, b"")).get(1, []):
            bm = _msg(b)
            if 1 in bm:
                binds.append(("name", _s(_one(bm, 1))))
            else:
                binds.append(("value", _value(_one(bm, 2, b""), blobs)))
        inputs[key] = binds
    outputs = []
    for o in m.get(3, []):
        om = _msg(o)
        outputs.append((_s(_one(om, 1, b"")), _parse_type(_one(om, 2, b""))))
    attrs = _map(m, 5, lambda v: _value(v, blobs))
    name = attrs.get("name") or (outputs[0][0] if outputs else "")
    return MilOp(_s(_one(m, 1, b"")), str(name), inputs, outputs, attrs, bool(m.get(4)))


@dataclass
class IOSpec:
    """One model input or output as callers see it."""

    name: str
    kind: str  # image | tensor | label | probabilities
    shape: list  # caller-facing shape (NHWC for images); -1 where flexible
    dtype: str  # caller-facing numpy dtype name
    color_space: Optional[str] = None  # RGB | BGR | GRAYSCALE | GRAYSCALE_FLOAT16 (images)
    program_shape: Optional[tuple] = None  # the MIL function input's shape (NCHW for images)
    program_dtype: Optional[str] = None  # MIL dtype of the function input
    var: Optional[str] = None  # the program variable an output reads


_COLOR = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}
_ARRAY_DT = {65568: "float32", 65600: "float64", 131104: "int32", 131080: "int8", 65552: "float16"}


def _feature(buf) -> dict:
    m = _msg(buf)
    ft = _msg(_one(m, 3, b""))
    d = {"name": _s(_one(m, 1, b"")), "kind": "other"}
    if 4 in ft:
        im = _msg(_one(ft, 4))
        d.update(kind="image", width=_one(im, 1, 0), height=_one(im, 2, 0),
                 color=_COLOR.get(_one(im, 3, 0), "INVALID"),
                 flexible=bool(im.get(21) or im.get(31)))
    elif 5 in ft:
        am = _msg(_one(ft, 5))
        d.update(kind="tensor", shape=[_signed(v) for v in _packed_varints(am.get(1, []))],
                 dtype=_ARRAY_DT.get(_one(am, 2, 0), "float32"))
    elif 6 in ft:
        d["kind"] = "dict"
    elif 3 in ft:
        d["kind"] = "string"
    elif 1 in ft:
        d["kind"] = "int64"
    elif 2 in ft:
        d["kind"] = "double"
    return d


# --------------------------------------------------------------------------------------
# op implementations
# --------------------------------------------------------------------------------------

_OPS: dict[str, Callable] = {}
_CONSTEXPR: dict[str, Callable] = {}


def _op(*names):
    def deco(fn):
        for n in names:
            _OPS[n] = fn
        return fn
    return deco


def _constexpr(*names):
    def deco(fn):
        for n in names:
            _CONSTEXPR[n] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    """The MIL op types the interpreter runs (``const`` and ``constexpr_*`` included)."""
    return sorted(set(_OPS) | set(_CONSTEXPR) | {"const"})


class _Args:
    __slots__ = ("op", "env")

    def __init__(self, op: MilOp, env: dict):
        self.op = op
        self.env = env

    def _res(self, b):
        kind, v = b
        if kind == "name":
            try:
                return self.env[v]
            except KeyError:
                raise MilExecutionError(f"op {self.op.name} reads {v}, which is not defined yet",
                                        "The program is malformed; re-export it") from None
        return v

    # Parameters are op inputs; the iOS16 constexpr ops keep theirs as attributes.
    def __getitem__(self, k):
        b = self.op.inputs.get(k)
        if b:
            return self._res(b[0])
        if k in self.op.attrs:
            return self.op.attrs[k]
        raise MilExecutionError(f"{self.op.type} op {self.op.name} lacks input '{k}'",
                                "The program is malformed; re-export it")

    def get(self, k, default=None):
        b = self.op.inputs.get(k)
        if b:
            return self._res(b[0])
        return self.op.attrs.get(k, default)

    def has(self, k) -> bool:
        return bool(self.op.inputs.get(k)) or k in self.op.attrs

    def list(self, k) -> list:
        return [self._res(b) for b in self.op.inputs.get(k, [])]

    def ints(self, k, default=None):
        v = self.get(k)
        if v is None:
            return default
        return [int(i) for i in np.asarray(v).reshape(-1)]

    def int(self, k, default=None):
        v = self.get(k)
        return default if v is None else int(np.asarray(v).reshape(-1)[0])

    def float(self, k, default=None):
        v = self.get(k)
        return default if v is None else float(np.asarray(v, np.float64).reshape(-1)[0])

    def bool(self, k, default=False):
        v = self.get(k)
        return default if v is None else bool(np.asarray(v).reshape(-1)[0])

    def str(self, k, default=None):
        v = self.get(k)
        if v is None:
            return default
        return v if isinstance(v, str) else str(np.asarray(v).reshape(-1)[0])

    def f(self, k):
        return _f32(self[k])

    def unsupported(self, detail: str):
        return UnsupportedMilOp(self.op.type, detail)


def _f32(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axis(a, rank):
    return a + rank if a < 0 else a


# -- elementwise ------------------------------------------------------------------------

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _make_binary(fn):
    def run(a):
        return fn(a.f("x"), a.f("y"))
    return run


for _n, _fn in _BINARY.items():
    _OPS[_n] = _make_binary(_fn)


@_op("floor_div")
def _floor_div(a):
    x, y = a.f("x"), a.f("y")
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.floor_divide(x, y)
    return np.floor(x / y)


@_op("mod")
def _mod(a):
    x, y = a.f("x"), a.f("y")
    return x - np.floor(x / y) * y if x.dtype.kind == "f" else np.mod(x, y)


def _erf(x):
    try:
        from scipy.special import erf  # noqa: PLC0415

        return erf(x).astype(x.dtype)
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn
        return np.vectorize(math.erf, otypes=[x.dtype])(x)


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2,
    "floor": np.floor, "sign": np.sign, "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt,
    "square": np.square, "tan": np.tan, "tanh": np.tanh, "logical_not": np.logical_not,
    "erf": _erf, "round": np.round, "identity": lambda x: x,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(0, x),
}


def _make_unary(fn):
    def run(a):
        x = a.f("x")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(x)
    return run


for _n, _fn in _UNARY.items():
    _OPS[_n] = _make_unary(_fn)


# exact in any precision (no rounding): run on the stored dtype, skipping the fp32 round trip
@_op("relu")
def _relu(a):
    x = np.asarray(a["x"])
    return np.maximum(x, x.dtype.type(0))


@_op("relu6")
def _relu6(a):
    x = np.asarray(a["x"])
    return np.clip(x, x.dtype.type(0), x.dtype.type(6))


@_op("inverse")
def _inverse(a):
    return 1 / (a.f("x") + np.float32(a.float("epsilon", 1e-4)))


@_op("log")
def _log(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(a.f("x") + np.float32(a.float("epsilon", 1e-45)))


@_op("rsqrt")
def _rsqrt(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / np.sqrt(a.f("x") + np.float32(a.float("epsilon", 1e-12)))


@_op("clip")
def _clip(a):
    return np.minimum(np.maximum(a.f("x"), a.f("alpha")), a.f("beta"))


@_op("threshold")
def _threshold(a):
    return np.maximum(a.f("x"), a.f("alpha"))


@_op("cast")
def _cast(a):
    dt = _CAST_NAMES.get(a.str("dtype"))
    if dt is None:
        raise a.unsupported(f"dtype {a.str('dtype')}")
    x = np.asarray(a["x"])
    if dt.startswith("int") and x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(_NP[dt])


@_op("select")
def _select(a):
    return np.where(np.asarray(a["cond"]).astype(bool), a.f("a"), a.f("b"))


# -- activations ---------------------------------------------------------------------------

@_op("leaky_relu")
def _leaky_relu(a):
    x = a.f("x")
    return np.where(x >= 0, x, x * a.f("alpha"))


@_op("elu")
def _elu(a):
    x = a.f("x")
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, a.f("alpha") * np.expm1(np.minimum(x, 0)))


@_op("prelu")
def _prelu(a):
    x, al = a.f("x"), a.f("alpha")
    al = al.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, x * al)


@_op("sigmoid_hard")
def _sigmoid_hard(a):
    return np.clip(a.f("alpha") * a.f("x") + a.f("beta"), 0, 1)


@_op("scaled_tanh")
def _scaled_tanh(a):
    return a.f("alpha") * np.tanh(a.f("beta") * a.f("x"))


@_op("linear_activation")
def _linear_activation(a):
    return a.f("alpha") * a.f("x") + a.f("beta")


@_op("clamped_relu")
def _clamped_relu(a):
    x, al, be = a.f("x"), a.f("alpha"), a.f("beta")
    return np.minimum(be, np.where(x >= 0, x, al * x))


@_op("thresholded_relu")
def _thresholded_relu(a):
    x = a.f("x")
    return np.where(x >= a.f("alpha"), x, 0).astype(x.dtype)


@_op("softplus_parametric")
def _softplus_parametric(a):
    x = a.f("x")
    shp = (1, -1) + (1,) * (x.ndim - 2)
    return a.f("alpha").reshape(shp) * np.logaddexp(0, a.f("beta").reshape(shp) * x)


@_op("gelu")
def _gelu(a):
    x = a.f("x")
    mode = a.str("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / np.float32(math.sqrt(2))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    raise a.unsupported(f"mode {mode}")


@_op("softmax")
def _softmax(a):
    x = a.f("x")
    ax = a.int("axis", -1)
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    return e / np.sum(e, axis=ax, keepdims=True)


# -- reductions -------------------------------------------------------------------------

def _reduce_axes(a, x):
    axes = a.ints("axes")
    return None if axes is None else tuple(_axis(i, x.ndim) for i in axes)


def _make_reduce(fn):
    def run(a):
        x = a.f("x")
        return fn(x, axis=_reduce_axes(a, x), keepdims=a.bool("keep_dims", False))
    return run


_REDUCE = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _logsumexp(x, axis, keepdims),
}


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    r = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axis=axis)


for _n, _fn in _REDUCE.items():
    _OPS[_n] = _make_reduce(_fn)


@_op("reduce_argmax", "reduce_argmin")
def _reduce_arg(a):
    x = a.f("x")
    ax = _axis(a.int("axis", -1), x.ndim)
    fn = np.argmax if a.op.type == "reduce_argmax" else np.argmin
    r = fn(x, axis=ax)
    return np.expand_dims(r, ax) if a.bool("keep_dims", False) else r


# -- linear algebra ------------------------------------------------------------------------

@_op("matmul")
def _matmul(a):
    x, y = a.f("x"), a.f("y")
    if a.bool("transpose_x") and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if a.bool("transpose_y") and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_op("linear")
def _linear(a):
    x, w = a.f("x"), a.f("weight")
    y = np.matmul(x, w.T)
    b = a.get("bias")
    return y + _f32(b) if b is not None else y


@_op("einsum")
def _einsum(a):
    vals = [_f32(v) for v in a.list("values")]
    return np.einsum(a.str("equation"), *vals)


# -- normalization ---------------------------------------------------------------------------

def _chan(v, ndim):
    return _f32(v).reshape((1, -1) + (1,) * (ndim - 2))


@_op("batch_norm")
def _batch_norm(a):
    x = a.f("x")
    eps = np.float32(a.float("epsilon", 1e-5))
    y = (x - _chan(a["mean"], x.ndim)) / np.sqrt(_chan(a["variance"], x.ndim) + eps)
    if a.has("gamma"):
        y = y * _chan(a["gamma"], x.ndim)
    if a.has("beta"):
        y = y + _chan(a["beta"], x.ndim)
    return y


@_op("instance_norm")
def _instance_norm(a):
    x = a.f("x")
    axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.float("epsilon", 1e-5)))
    if a.has("gamma"):
        y = y * _chan(a["gamma"], x.ndim)
    if a.has("beta"):
        y = y + _chan(a["beta"], x.ndim)
    return y


@_op("layer_norm")
def _layer_norm(a):
    x = a.f("x")
    axes = _reduce_axes(a, x)
    axes = tuple(range(x.ndim)) if axes is None else axes
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.float("epsilon", 1e-5)))
    # gamma/beta have shape x.shape[axes]; axes are the trailing ones in practice
    if a.has("gamma"):
        y = y * _bcast_axes(_f32(a["gamma"]), x.ndim, axes)
    if a.has("beta"):
        y = y + _bcast_axes(_f32(a["beta"]), x.ndim, axes)
    return y


def _bcast_axes(v, ndim, axes):
    shape = [1] * ndim
    for ax, n in zip(sorted(axes), v.shape):
        shape[ax] = n
    return v.reshape(shape)


@_op("l2_norm")
def _l2_norm(a):
    x = a.f("x")
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    n = np.sqrt(np.sum(x * x, axis=axes, keepdims=True) + np.float32(a.float("epsilon", 1e-6)))
    return x / n


@_op("local_response_norm")
def _lrn(a):
    x = a.f("x")
    size = a.int("size")
    alpha, beta, k = a.float("alpha", 1e-4), a.float("beta", 0.75), a.float("k", 1.0)
    sq = x * x
    lo, hi = (size - 1) // 2, size // 2
    padded = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    acc = sum(padded[:, i:i + x.shape[1]] for i in range(size))
    return x / (k + alpha / size * acc) ** beta


# -- shape ops ----------------------------------------------------------------------------

@_op("reshape")
def _reshape(a):
    x = np.asarray(a["x"])
    shape = a.ints("shape")
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@_op("transpose")
def _transpose(a):
    return np.transpose(a["x"], a.ints("perm"))


@_op("squeeze")
def _squeeze(a):
    x = np.asarray(a["x"])
    axes = a.ints("axes")
    if axes is None:
        return np.squeeze(x)
    axes = tuple(_axis(i, x.ndim) for i in axes if x.shape[i] == 1)
    return np.squeeze(x, axis=axes) if axes else x


@_op("expand_dims")
def _expand_dims(a):
    x = np.asarray(a["x"])
    out_rank = x.ndim + len(a.ints("axes"))
    axes = sorted(i + out_rank if i < 0 else i for i in a.ints("axes"))
    for ax in axes:
        x = np.expand_dims(x, ax)
    return x


@_op("flatten2d")
def _flatten2d(a):
    x = np.asarray(a["x"])
    ax = _axis(a.int("axis", 1), x.ndim)
    return x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)


@_op("concat")
def _concat(a):
    vals = [np.asarray(v) for v in a.list("values")]
    ax = a.int("axis")
    if a.bool("interleave"):
        st = np.stack(vals, axis=_axis(ax, vals[0].ndim) + 1)
        shape = list(vals[0].shape)
        shape[_axis(ax, vals[0].ndim)] *= len(vals)
        return st.reshape(shape)
    return np.concatenate(vals, axis=ax)


@_op("stack")
def _stack(a):
    return np.stack([np.asarray(v) for v in a.list("values")], axis=a.int("axis"))


@_op("split")
def _split(a):
    x = np.asarray(a["x"])
    ax = _axis(a.int("axis"), x.ndim)
    sizes = a.ints("split_sizes")
    if sizes is None:
        n = a.int("num_splits")
        return tuple(np.split(x, n, axis=ax))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=ax))


@_op("slice_by_index")
def _slice_by_index(a):
    x = np.asarray(a["x"])
    r = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * r)
    bm = [bool(v) for v in np.asarray(a.get("begin_mask", [False] * r)).reshape(-1)]
    em = [bool(v) for v in np.asarray(a.get("end_mask", [False] * r)).reshape(-1)]
    sm = [bool(v) for v in np.asarray(a.get("squeeze_mask", [False] * r)).reshape(-1)]
    idx = []
    for i in range(r):
        if sm[i]:
            idx.append(begin[i])
            continue
        b = None if bm[i] else begin[i]
        e = None if em[i] else end[i]
        idx.append(slice(b, e, stride[i]))
    return x[tuple(idx)]


@_op("slice_by_size")
def _slice_by_size(a):
    x = np.asarray(a["x"])
    begin, size = a.ints("begin"), a.ints("size")
    idx = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = _axis(b, x.shape[i])
        idx.append(slice(b, None if s == -1 else b + s))
    return x[tuple(idx)]


@_op("pad")
def _pad(a):
    x = np.asarray(a["x"])  # padding copies values: no rounding, keep the stored dtype
    p = a.ints("pad")
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    mode = a.str("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=a.float("constant_val", 0.0))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise a.unsupported(f"pad mode {mode}")


@_op("tile")
def _tile(a):
    return np.tile(a["x"], a.ints("reps"))


@_op("gather")
def _gather(a):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    ax = _axis(a.int("axis", 0), x.ndim)
    if a.int("batch_dims", 0):
        raise a.unsupported("batch_dims > 0")
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take(x, idx, axis=ax)


@_op("gather_along_axis")
def _gather_along_axis(a):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    ax = _axis(a.int("axis", 0), x.ndim)
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take_along_axis(x, idx, axis=ax)


@_op("reverse")
def _reverse(a):
    x = np.asarray(a["x"])
    axes = a.ints("axes")
    return np.flip(x, axis=None if axes is None else tuple(axes))


@_op("shape")
def _shape(a):
    return np.array(np.shape(a["x"]), dtype=np.int32)


@_op("fill")
def _fill(a):
    return np.full(a.ints("shape"), a.get("value", 0.0))


@_op("range_1d")
def _range_1d(a):
    return np.arange(np.asarray(a["start"]).item(), np.asarray(a["end"]).item(),
                     np.asarray(a["step"]).item())


@_op("cumsum")
def _cumsum(a):
    x = a.f("x")
    ax = a.int("axis", 0)
    if a.bool("reverse"):
        x = np.flip(x, ax)
    y = np.cumsum(x, axis=ax)
    if a.bool("exclusive"):
        y = y - x
    return np.flip(y, ax) if a.bool("reverse") else y


@_op("depth_to_space")
def _depth_to_space(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@_op("pixel_shuffle")
def _pixel_shuffle(a):
    x = np.asarray(a["x"])
    f = a.int("upscale_factor")
    n, c, h, w = x.shape
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (f * f), h * f, w * f)


@_op("space_to_depth")
def _space_to_depth(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@_op("upsample_nearest_neighbor")
def _upsample_nn(a):
    x = np.asarray(a["x"])
    sh, sw = a.float("scale_factor_height", 1), a.float("scale_factor_width", 1)
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    ih = np.minimum((np.arange(oh) / sh).astype(np.int64), h - 1)
    iw = np.minimum((np.arange(ow) / sw).astype(np.int64), w - 1)
    return x[..., ih[:, None], iw[None, :]]


# -- convolution and pooling -------------------------------------------------------------

def _pads(pad_type, pad, in_sp, k, s, d) -> list[tuple[int, int]]:
    n = len(in_sp)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = list(pad) if pad is not None else [0] * (2 * n)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        out = []
        for i in range(n):
            eff = (k[i] - 1) * d[i] + 1
            total = max(0, (math.ceil(in_sp[i] / s[i]) - 1) * s[i] + eff - in_sp[i])
            small, big = total // 2, total - total // 2
            out.append((small, big) if pad_type == "same" else (big, small))
        return out
    raise UnsupportedMilOp("conv/pool", f"pad_type {pad_type}")


def _windows(x, k, s, d, out_sp):
    """Yield (kernel offset tuple, strided view of x for that offset)."""
    nd = len(k)
    for off in np.ndindex(*k):
        idx = [slice(None), slice(None)]
        for i in range(nd):
            start = off[i] * d[i]
            idx.append(slice(start, start + (out_sp[i] - 1) * s[i] + 1, s[i]))
        yield off, x[tuple(idx)]


def _conv_nd(x, w, b, strides, pads, dil, groups):
    """x (N, C, *sp) float32, w (O, C/groups, *k); returns (N, O, *out) float32."""
    nd = x.ndim - 2
    if any(p != (0, 0) for p in pads):
        x = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    n, c = x.shape[:2]
    o = w.shape[0]
    k = w.shape[2:]
    out_sp = [(x.shape[2 + i] - ((k[i] - 1) * dil[i] + 1)) // strides[i] + 1 for i in range(nd)]
    if any(v <= 0 for v in out_sp):
        raise MilExecutionError(f"conv output would be empty ({out_sp})", "Check the model's input size")
    L = int(np.prod(out_sp))
    cg, og = c // groups, o // groups
    if groups == c and w.shape[1] == 1 and o == c:  # depthwise
        y = np.zeros((n, c, *out_sp), np.float32)
        tmp = np.empty_like(y)
        for off, view in _windows(x, k, strides, dil, out_sp):
            np.multiply(view, w[(slice(None), 0) + off].reshape((1, c) + (1,) * nd), out=tmp)
            y += tmp
    elif all(v == 1 for v in k) and groups == 1:  # pointwise
        xs = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
        xs = xs[(slice(None), slice(None)) + tuple(slice(0, v) for v in out_sp)]
        y = np.matmul(w.reshape(o, c), xs.reshape(n, c, L)).reshape(n, o, *out_sp)
    else:  # im2col: one copy per kernel offset, no loop over pixels
        K = int(np.prod(k))
        cols = np.empty((n, c, K, *out_sp), np.float32)
        for j, (_, view) in enumerate(_windows(x, k, strides, dil, out_sp)):
            cols[:, :, j] = view
        cols = cols.reshape(n, groups, cg * K, L)
        wg = w.reshape(groups, og, cg * K)
        y = np.matmul(wg[None], cols).reshape(n, o, *out_sp)
    if b is not None:
        y += _f32(b).reshape((1, o) + (1,) * nd)
    return y


@_op("conv")
def _conv(a):
    x, w = a.f("x"), a.f("weight")
    nd = x.ndim - 2
    strides = a.ints("strides", [1] * nd)
    dil = a.ints("dilations", [1] * nd)
    k = list(w.shape[2:])
    pads = _pads(a.str("pad_type", "valid"), a.ints("pad"), x.shape[2:], k, strides, dil)
    groups = a.int("groups", 1)
    if x.shape[1] != w.shape[1] * groups:
        raise MilExecutionError(f"conv {a.op.name}: {x.shape[1]} input channels, weight expects "
                                f"{w.shape[1]} x {groups} groups", "The program is malformed")
    return _conv_nd(x.astype(np.float32, copy=False), w.astype(np.float32, copy=False),
                    a.get("bias"), strides, pads, dil, groups)


@_op("conv_transpose")
def _conv_transpose(a):
    x, w = a.f("x").astype(np.float32, copy=False), a.f("weight").astype(np.float32, copy=False)
    nd = x.ndim - 2
    strides = a.ints("strides", [1] * nd)
    dil = a.ints("dilations", [1] * nd)
    groups = a.int("groups", 1)
    k = list(w.shape[2:])
    pad_type = a.str("pad_type", "valid")
    out_shape = a.ints("output_shape")
    n, cin = x.shape[:2]
    cout_g = w.shape[1]
    # full transposed conv: scatter every input pixel through the kernel
    full = [(x.shape[2 + i] - 1) * strides[i] + (k[i] - 1) * dil[i] + 1 for i in range(nd)]
    xg = x.reshape(n, groups, cin // groups, -1)
    wg = w.reshape(groups, cin // groups, cout_g, int(np.prod(k)))
    contrib = np.einsum("ngcl,gcok->ngokl", xg, wg).reshape(n, groups * cout_g, *k, *x.shape[2:])
    y = np.zeros((n, groups * cout_g, *full), np.float32)
    for j, off in enumerate(np.ndindex(*k)):
        idx = [slice(None), slice(None)]
        for i in range(nd):
            st = off[i] * dil[i]
            idx.append(slice(st, st + (x.shape[2 + i] - 1) * strides[i] + 1, strides[i]))
        y[tuple(idx)] += contrib[(slice(None), slice(None)) + off]
    if pad_type == "custom":
        p = a.ints("pad", [0] * (2 * nd))
        crops = [(p[2 * i], p[2 * i + 1]) for i in range(nd)]
    elif pad_type == "valid":
        crops = [(0, 0)] * nd
    elif pad_type == "same":
        crops = []
        for i in range(nd):
            target = x.shape[2 + i] * strides[i]
            total = max(full[i] - target, 0)
            crops.append((total // 2, total - total // 2))
    else:
        raise a.unsupported(f"pad_type {pad_type}")
    if out_shape is not None and len(out_shape) == nd + 2 and pad_type != "custom":
        crops = []
        for i in range(nd):
            total = max(full[i] - out_shape[2 + i], 0)
            crops.append((total // 2, total - total // 2))
    idx = [slice(None), slice(None)] + [slice(b, full[i] - e) for i, (b, e) in enumerate(crops)]
    y = y[tuple(idx)]
    b = a.get("bias")
    if b is not None:
        y = y + _f32(b).reshape((1, -1) + (1,) * nd)
    return y


def _pool_geometry(a, x):
    nd = x.ndim - 2
    k = a.ints("kernel_sizes")
    s = a.ints("strides", [1] * nd)
    pad_type = a.str("pad_type", "valid")
    pads = _pads(pad_type, a.ints("pad"), x.shape[2:], k, s, [1] * nd)
    extra = [0] * nd
    if a.bool("ceil_mode") and pad_type in ("valid", "custom"):
        for i in range(nd):
            size = x.shape[2 + i] + pads[i][0] + pads[i][1]
            out = (size - k[i] + s[i] - 1) // s[i] + 1
            if (out - 1) * s[i] >= x.shape[2 + i] + pads[i][0] and (pads[i][0] or pads[i][1]):
                out -= 1
            extra[i] = max(0, (out - 1) * s[i] + k[i] - size)
    return k, s, pads, extra


def _pool(a, kind):
    # max is exact in fp16; sums (avg, l2) accumulate in float32
    x = np.asarray(a["x"]) if kind == "max" else a.f("x").astype(np.float32, copy=False)
    nd = x.ndim - 2
    k, s, pads, extra = _pool_geometry(a, x)
    widths = [(0, 0), (0, 0)] + [(p[0], p[1] + e) for p, e in zip(pads, extra)]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, widths, constant_values=fill) if any(w != (0, 0) for w in widths) else x
    out_sp = [(xp.shape[2 + i] - k[i]) // s[i] + 1 for i in range(nd)]
    acc = None
    src = xp * xp if kind == "l2" else xp
    for _, view in _windows(src, k, s, [1] * nd, out_sp):
        if acc is None:
            acc = view.copy()
        elif kind == "max":
            np.maximum(acc, view, out=acc)
        else:
            acc += view
    if kind == "max":
        return acc
    if kind == "l2":
        return np.sqrt(acc)
    # average: the divisor counts real pixels (+ explicit padding unless excluded);
    # the extra cells that ceil_mode adds never count.
    exclude = a.bool("exclude_padding_from_average", False)
    mask = np.ones((1, 1) + x.shape[2:], np.float32)
    if exclude:
        mask = np.pad(mask, widths)
    else:
        mask = np.pad(mask, [(0, 0), (0, 0)] + [(p[0], p[1]) for p in pads], constant_values=1)
        mask = np.pad(mask, [(0, 0), (0, 0)] + [(0, e) for e in extra])
    cnt = None
    for _, view in _windows(mask, k, s, [1] * nd, out_sp):
        cnt = view.copy() if cnt is None else cnt + view
    return acc / np.maximum(cnt, 1)


@_op("max_pool")
def _max_pool(a):
    return _pool(a, "max")


@_op("avg_pool")
def _avg_pool(a):
    return _pool(a, "avg")


@_op("l2_pool")
def _l2_pool(a):
    return _pool(a, "l2")


# -- activation quantization (iOS17) ----------------------------------------------------------

def _along(v, axis, ndim):
    v = _f32(np.asarray(v))
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[_axis(axis, ndim)] = -1
    return v.reshape(shape)


@_op("quantize")
def _quantize(a):
    x = a.f("input")
    ax = a.int("axis")
    scale = _along(a["scale"], ax, x.ndim)
    zp = _along(a.get("zero_point", 0), ax, x.ndim).astype(np.float32)
    dt = {"int8": np.int8, "uint8": np.uint8}[a.str("output_dtype")]
    info = np.iinfo(dt)
    return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dt)


@_op("dequantize")
def _dequantize(a):
    x = np.asarray(a["input"]).astype(np.float32)
    ax = a.int("axis")
    zp = _along(a.get("zero_point", 0), ax, x.ndim).astype(np.float32)
    return (x - zp) * _along(a["scale"], ax, x.ndim)


# -- classifier ------------------------------------------------------------------------------

@_op("classify")
def _classify(a):
    probs = _f32(a["probabilities"]).astype(np.float32)
    classes = a["classes"]
    flat = [c.item() if isinstance(c, np.ndarray) else c for c in (classes or [])]
    vec = probs.reshape(-1)
    label = flat[int(np.argmax(vec))] if flat else int(np.argmax(vec))
    return np.array(label, dtype=object if isinstance(label, str) else np.int64), probs


# -- constexpr (evaluated once at load) ------------------------------------------------------

def _out_dtype(op: MilOp, i=0):
    return op.outputs[i][1].np_dtype if i < len(op.outputs) else None


@_constexpr("constexpr_affine_dequantize")
def _ce_affine(a):
    q = np.asarray(a["quantized_data"]).astype(np.float32)
    ax = a.int("axis", 0)
    zp = _along(a["zero_point"], ax, q.ndim).astype(np.float32)
    scale = _along(a["scale"], ax, q.ndim).astype(np.float32)
    return (q - zp) * scale


@_constexpr("constexpr_cast")
def _ce_cast(a):
    dt = _CAST_NAMES.get(a.str("output_dtype"), "fp32")
    return np.asarray(a["source_val"]).astype(_NP[dt])


def _repeat_blocks(v, shape):
    for ax, (n, m) in enumerate(zip(shape, v.shape)):
        if m != n:
            v = np.repeat(v, n // m, axis=ax)
    return v


def _blockwise(data, scale, offset):
    d = np.asarray(data).astype(np.float32)
    s = _repeat_blocks(_f32(np.asarray(scale)).astype(np.float32), d.shape)
    if offset is not None:
        d = d - _repeat_blocks(np.asarray(offset).astype(np.float32), d.shape)
    return d * s


@_constexpr("constexpr_blockwise_shift_scale")
def _ce_blockwise(a):
    return _blockwise(a["data"], a["scale"], a.get("offset"))


def _lut_dense(indices, lut, vector_axis):
    indices = np.asarray(indices).astype(np.int64)
    r = indices.ndim
    pal, vec = lut.shape[-2:]
    gshape = lut.shape[:r]
    gid = np.zeros(indices.shape, np.int64)
    stride = 1
    for ax in reversed(range(r)):
        blk = indices.shape[ax] // gshape[ax]
        g = (np.arange(indices.shape[ax]) // blk) * stride
        gid += g.reshape([-1 if i == ax else 1 for i in range(r)])
        stride *= gshape[ax]
    vals = lut.reshape(-1, pal, vec)[gid, indices]  # (*indices.shape, vec)
    if vec == 1:
        return vals[..., 0]
    ax = _axis(int(vector_axis), r)
    shape = list(indices.shape)
    shape[ax] *= vec
    return np.moveaxis(vals, -1, ax + 1).reshape(shape)


@_constexpr("constexpr_lut_to_dense")
def _ce_lut(a):
    lut = np.asarray(a["lut"])
    if a.has("shape"):  # iOS16: packed uint8 indices, flat LUT, explicit shape
        shape = a.ints("shape")
        nbits = int(round(math.log2(lut.size)))
        count = int(np.prod(shape, dtype=np.int64))
        packed = np.asarray(a["indices"]).astype(np.uint8).reshape(-1).tobytes()
        idx = _unpack_bits(packed, nbits, count, False).astype(np.int64)
        return lut.reshape(-1)[idx].reshape(shape)
    return _lut_dense(a["indices"], lut, a.int("vector_axis"))


def _sparse_dense(nonzero, mask):
    out = np.zeros(mask.shape, dtype=np.asarray(nonzero).dtype)
    out[mask != 0] = np.asarray(nonzero).reshape(-1)
    return out


@_constexpr("constexpr_sparse_to_dense")
def _ce_sparse(a):
    nz = np.asarray(a["nonzero_data"])
    if a.has("shape"):  # iOS16: bit mask packed into uint8 bytes
        shape = a.ints("shape")
        count = int(np.prod(shape, dtype=np.int64))
        packed = np.asarray(a["mask"]).astype(np.uint8).reshape(-1).tobytes()
        mask = _unpack_bits(packed, 1, count, False).reshape(shape)
        return _sparse_dense(nz, mask)
    return _sparse_dense(nz, np.asarray(a["mask"]))


@_constexpr("constexpr_lut_to_sparse")
def _ce_lut_sparse(a):
    mask = np.asarray(a["indices_mask"])
    lut = np.asarray(a["lut"])
    va = a.int("vector_axis")
    dense = _lut_dense(_sparse_dense(a["indices_nonzero_data"], mask), lut, va)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=va)
    return mask, dense[mask != 0].reshape(-1)


@_constexpr("constexpr_sparse_blockwise_shift_scale")
def _ce_sparse_blockwise(a):
    mask = np.asarray(a["data_mask"])
    dense = _blockwise(_sparse_dense(a["nonzero_data"], mask), a["scale"], a.get("offset"))
    return mask, dense[mask != 0].reshape(-1)


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------

def _package_paths(path: Path) -> tuple[Path, Optional[Path]]:
    """(model.mlmodel spec file, folder weights are relative to)."""
    if path.is_dir():
        manifest = path / "Manifest.json"
        if not manifest.is_file():
            raise MilFormatError(f"{path} is not an .mlpackage (no Manifest.json)",
                                 "Give the .mlpackage folder the Core ML export wrote")
        try:
            man = json.loads(manifest.read_text())
            root = man["rootModelIdentifier"]
            rel = man["itemInfoEntries"][root]["path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MilFormatError(f"{manifest} is unreadable ({e})", "Re-export the Core ML artifact") from None
        spec = path / "Data" / rel
        if not spec.is_file():
            raise MilFormatError(f"{path} lacks its model spec {rel}", "Re-export the Core ML artifact")
        return spec, spec.parent
    if path.is_file():
        return path, path.parent
    raise UserError(f"no Core ML model at {path}", "Give the path of an .mlpackage")


class MilModel:
    """A loaded ML program, ready to ``predict``. Build it with :func:`load_program`."""

    def __init__(self, path: Path, compile: bool = True):
        self.path = path
        spec_path, model_dir = _package_paths(path)
        top = _msg(memoryview(spec_path.read_bytes()))
        self.spec_version = _one(top, 1, 0)
        if 502 not in top:
            kinds = {200: "pipelineClassifier", 201: "pipelineRegressor", 202: "pipeline",
                     500: "neuralNetwork", 403: "neuralNetworkClassifier", 404: "neuralNetworkRegressor"}
            kind = next((v for k, v in kinds.items() if k in top), "a non-ML-program model")
            raise MilFormatError(f"{path.name} is {kind}, not an ML program",
                                 "Convert with convert_to='mlprogram' to verify it with the reference interpreter")
        desc = _msg(_one(top, 2, b""))
        self.description_inputs = [_feature(b) for b in desc.get(1, [])]
        self.description_outputs = [_feature(b) for b in desc.get(10, [])]
        self.predicted_feature = _s(_one(desc, 11)) or None
        self.predicted_probabilities = _s(_one(desc, 12)) or None
        self.metadata = {}
        if 100 in desc:
            self.metadata = _map(_msg(_one(desc, 100)), 100, _s)

        blobs = _Blobs(model_dir)
        try:
            prog = _msg(_one(top, 502))
            funcs = _map(prog, 2, lambda b: b)
            if "main" not in funcs:
                raise MilFormatError(f"{path.name} has no 'main' function", "Re-export the Core ML artifact")
            fn = _msg(funcs["main"])
            self.func_inputs = [(_s(_one(_msg(b), 1, b"")), _parse_type(_one(_msg(b), 2, b"")))
                                for b in fn.get(1, [])]
            self.opset = _s(_one(fn, 2, b""))
            blocks = _map(fn, 3, lambda b: b)
            block_buf = blocks.get(self.opset) or next(iter(blocks.values()), None)
            if block_buf is None:
                raise MilFormatError(f"{path.name}: main has no block", "Re-export the Core ML artifact")
            block = _msg(block_buf)
            self.block_outputs = [_s(v) for v in block.get(2, [])]
            self.ops = [_parse_op(b, blobs) for b in block.get(3, [])]
            self._scan_classify()
            self.unsupported = sorted({op.type for op in self.ops if op.type != "const" and op.type not in _OPS
                                       and op.type not in _CONSTEXPR})
            self.consts: dict[str, Any] = {}
            self.steps: list[tuple[MilOp, Callable, list]] = []
            self.compiled = compile
            if compile:
                self._read_weights(blobs)
                self._compile()
        finally:
            blobs.close()
        self._io()

    # -- load-time work ------------------------------------------------------------------
    def _scan_classify(self):
        self.classes: Optional[list] = None
        self._classify_vars: dict[str, str] = {}
        for op in self.ops:
            if op.type == "classify" and len(op.outputs) == 2:
                cl = op.inputs.get("classes", [])
                if cl and cl[0][0] == "value" and isinstance(cl[0][1], list):
                    self.classes = [c.item() if isinstance(c, np.ndarray) else c for c in cl[0][1]]
                self._classify_vars = {op.outputs[0][0]: "label", op.outputs[1][0]: "probabilities"}

    def _read_weights(self, blobs: _Blobs):
        def res(v):
            return blobs.read(v.file, v.offset, v.type) if isinstance(v, _BlobRef) else v

        for op in self.ops:
            for binds in op.inputs.values():
                binds[:] = [(k, res(v)) for k, v in binds]
            for k, v in op.attrs.items():
                op.attrs[k] = res(v)

    def unsupported_error(self) -> Optional[UnsupportedMilOp]:
        if not self.unsupported:
            return None
        first, rest = self.unsupported[0], self.unsupported[1:]
        return UnsupportedMilOp(first, f"also: {', '.join(rest)}" if rest else None)

    def _compile(self):
        err = self.unsupported_error()
        if err:
            raise err
        for op in self.ops:
            if op.has_blocks:
                raise UnsupportedMilOp(op.type, "ops with nested blocks (control flow)")
            if op.type == "const":
                val = op.attrs.get("val")
                self.consts[op.outputs[0][0]] = self._cast_to(val, op.outputs[0][1])
                continue
            if op.type in _CONSTEXPR:
                res = _CONSTEXPR[op.type](_Args(op, self.consts))
                res = res if isinstance(res, tuple) else (res,)
                for (name, t), v in zip(op.outputs, res):
                    self.consts[name] = self._cast_to(v, t)
                continue
            if op.type == "classify" and self.classes is None:
                cl = op.inputs.get("classes", [])
                v = self.consts.get(cl[0][1]) if cl and cl[0][0] == "name" else None
                if isinstance(v, (list, np.ndarray)):
                    self.classes = [c.item() if isinstance(c, np.ndarray) else c for c in v]
            casts = [(t.np_dtype, t.known_shape) for _, t in op.outputs]
            self.steps.append((op, _OPS[op.type], casts))

    @staticmethod
    def _cast_to(v, t: MilType):
        if isinstance(v, np.ndarray) and t.np_dtype is not None and t.np_dtype is not np.object_ \
                and v.dtype != t.np_dtype:
            return v.astype(t.np_dtype)
        return v

    def _io(self):
        finputs = dict(self.func_inputs)
        self.inputs: list[IOSpec] = []
        for d in self.description_inputs:
            t = finputs.get(d["name"])
            if t is None:
                raise MilFormatError(f"input {d['name']} is not an input of main", "Re-export the Core ML artifact")
            pshape = t.shape or ()
            if d["kind"] == "image":
                nch = 1 if d["color"].startswith("GRAYSCALE") else 3
                if len(pshape) != 4:
                    raise MilFormatError(f"image input {d['name']} has program shape {pshape}",
                                         "Re-export the Core ML artifact")
                shape = [pshape[0], pshape[2], pshape[3], nch]
                dtype = "float16" if d["color"] == "GRAYSCALE_FLOAT16" else "float32"
                self.inputs.append(IOSpec(d["name"], "image", shape, dtype, d["color"], tuple(pshape), t.dtype))
            else:
                dt = np.dtype(_NP.get(t.dtype, np.float32)).name
                self.inputs.append(IOSpec(d["name"], "tensor", list(pshape), dt, None, tuple(pshape), t.dtype))
        self.outputs: list[IOSpec] = []
        var_types = {name: t for op in self.ops for name, t in op.outputs}
        for i, d in enumerate(self.description_outputs):
            var = d["name"] if d["name"] in var_types or d["name"] in finputs else (
                self.block_outputs[i] if i < len(self.block_outputs) else d["name"])
            role = self._classify_vars.get(var)
            if role == "probabilities":
                probs_t = self._classify_probs_type()
                self.outputs.append(IOSpec(d["name"], "probabilities", list(probs_t.shape or [-1]), "float32", var=var))
            elif role == "label" or d["kind"] in ("string", "int64"):
                self.outputs.append(IOSpec(d["name"], "label", [], "object", var=var))
            else:
                t = var_types.get(var) or finputs.get(var)
                shape = d.get("shape") or list((t.shape if t else None) or [])
                dt = np.dtype(_NP.get(t.dtype, np.float32)).name if t else "float32"
                self.outputs.append(IOSpec(d["name"], "tensor", list(shape), dt, var=var))

    def _classify_probs_type(self) -> MilType:
        for op in self.ops:
            if op.type == "classify":
                kind, v = op.inputs["probabilities"][0]
                if kind == "name":
                    for o in self.ops:
                        for name, t in o.outputs:
                            if name == v:
                                return t
                    for name, t in self.func_inputs:
                        if name == v:
                            return t
        return MilType("tensor", "fp32", None)

    @property
    def compute_precision(self) -> str:
        """``fp16`` when any op computes in fp16 (an fp16 program keeps fp32 only at its edges)."""
        kinds = {t.dtype for op in self.steps for _, t in op[0].outputs if t.dtype in ("fp16", "fp32")}
        return "fp16" if "fp16" in kinds else ("fp32" if kinds else "none")

    # -- run ---------------------------------------------------------------------------------
    def _feed(self, spec: IOSpec, x) -> np.ndarray:
        x = np.asarray(x)
        if spec.kind == "image":
            if x.ndim == 3:
                x = x[None]
            nch = spec.shape[3]
            if x.ndim != 4 or x.shape[3] != nch:
                raise UserError(f"image input {spec.name} takes NHWC pixels with {nch} channel(s), got shape "
                                f"{tuple(x.shape)}", f"Pass raw 0-255 pixels shaped {tuple(spec.shape)}")
            if spec.color_space == "GRAYSCALE_FLOAT16":
                x = x.astype(np.float32)
            else:
                x = x.astype(np.float32)
                if x.size and (np.nanmin(x) < -0.5 or np.nanmax(x) > 255.5):
                    raise UserError(f"image input {spec.name} got values in [{np.nanmin(x):.3g}, "
                                    f"{np.nanmax(x):.3g}]; Core ML images hold raw 8-bit pixels",
                                    "Pass raw 0-255 pixels; the model applies its own scale and bias")
                x = np.clip(np.rint(x), 0, 255)
            if spec.color_space == "BGR":
                x = x[..., ::-1]
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        want = spec.program_shape or ()
        if len(want) != x.ndim or any(w >= 0 and w != s for w, s in zip(want, x.shape)):
            raise UserError(f"input {spec.name} has shape {tuple(x.shape)}, the model expects {tuple(spec.shape)}",
                            "Resize the input to the model's input shape")
        return x.astype(_NP.get(spec.program_dtype, np.float32), copy=False)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the program. ``inputs`` maps input names to arrays (see the module docstring)."""
        if not self.compiled:
            raise EdgepipeError("this model was only described, not loaded", "Use load_program() to run it")
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise UserError(f"missing input(s) {', '.join(missing)}",
                            f"The model takes {', '.join(s.name for s in self.inputs)}")
        arrays = {s.name: np.asarray(inputs[s.name]) for s in self.inputs}
        # A batch bigger than the program's fixed batch of 1 runs one sample at a time.
        batch = None
        for s in self.inputs:
            a = arrays[s.name]
            lead = a.shape[0] if a.ndim == len(s.shape) else 1
            if s.shape and s.shape[0] == 1 and a.ndim == len(s.shape) and lead > 1:
                batch = lead if batch is None else batch
                if lead != batch:
                    raise UserError("inputs have different batch sizes", "Give every input the same batch size")
        if batch is None:
            return self._predict_one(arrays)
        outs = [self._predict_one({k: v[i:i + 1] for k, v in arrays.items()}) for i in range(batch)]
        return {k: np.concatenate([o[k] if o[k].ndim else o[k][None] for o in outs], axis=0) for k in outs[0]}

    def _predict_one(self, arrays: dict) -> dict:
        env = dict(self.consts)
        for s in self.inputs:
            env[s.name] = self._feed(s, arrays[s.name])
        for op, fn, casts in self.steps:
            try:
                res = fn(_Args(op, env))
            except EdgepipeError:
                raise
            except (ValueError, IndexError, TypeError, KeyError) as e:
                raise MilExecutionError(f"{op.type} op {op.name} failed: {e}",
                                        "The program may use a mode the interpreter lacks; verify on macOS") from e
            res = res if isinstance(res, tuple) else (res,)
            for (name, _), (dt, shape), v in zip(op.outputs, casts, res):
                if isinstance(v, np.ndarray) or np.isscalar(v):
                    v = np.asarray(v)
                    if dt is not None and dt is not np.object_ and v.dtype != dt:
                        v = v.astype(dt)
                    if shape is not None and v.shape != shape:
                        raise MilExecutionError(
                            f"{op.type} op {op.name} produced shape {v.shape}, the program declares {shape}",
                            "This is an interpreter bug or a malformed program")
                env[name] = v
        out = {}
        for spec in self.outputs:
            v = env.get(spec.var or spec.name)
            if v is None:
                raise MilExecutionError(f"output {spec.name} was never computed", "Re-export the Core ML artifact")
            if spec.kind in ("tensor", "probabilities") and np.asarray(v).dtype.kind == "f":
                v = np.asarray(v, np.float32)
            out[spec.name] = np.asarray(v)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return counts


def load_program(path) -> MilModel:
    """Parse an .mlpackage (or bare .mlmodel) and prepare it for :meth:`MilModel.predict`.

    Raises ``UnsupportedMilOp`` at load time when an op is not implemented, ``MilFormatError``
    (an ``UnsupportedArtifact``) when the package is not a readable ML program.
    """
    return MilModel(Path(path))


def describe(path) -> MilModel:
    """Parse the spec only (inputs, outputs, ops, classes) without reading weights; cannot predict.

    ``.unsupported`` lists the op types the interpreter lacks (empty when it can run the model).
    """
    return MilModel(Path(path), compile=False)


def run_mlpackage(path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load and run once: ``{input name: array}`` -> ``{output name: array}``."""
    return load_program(path).predict(inputs)


# --------------------------------------------------------------------------------------
# runtimes (devices/base.py seam)
# --------------------------------------------------------------------------------------

def _session_io(model: MilModel):
    ins = [TensorInfo(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in model.inputs]
    outs = [TensorInfo(name=s.name, shape=list(s.shape), dtype="float32")
            for s in model.outputs if s.kind in ("tensor", "probabilities")]
    kind = "image" if any(s.kind == "image" for s in model.inputs) else "tensor"
    return ins, outs, kind


class CoreMLReferenceSession(Session):
    """Runs an ML program with the numpy interpreter.

    ``input_kind == "image"``: ``run`` takes raw 0-255 RGB pixels, NHWC (the model's
    ImageType applies its own scale/bias); ``"tensor"``: arrays of the declared shape.
    Outputs are the numeric outputs (a classifier's probabilities, not its label), float32.
    """

    def __init__(self, path: Path, options: RunOptions):
        self.model = load_program(path)
        self.inputs, self.outputs, self.input_kind = _session_io(self.model)
        self.facts = {"runtime": "edgepipe coreml reference interpreter (numpy)",
                      "compute_precision": self.model.compute_precision,
                      "opset": self.model.opset, "spec_version": self.model.spec_version,
                      "input_kind": self.input_kind, "threads": options.threads}

    def run_native(self, inputs):
        feed = {t.name: x for t, x in zip(self.inputs, inputs)}
        threads = self.facts.get("threads")
        if threads:
            try:  # BLAS threads (matmul/conv); threadpoolctl ships with scikit-learn
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover
                threadpool_limits = None
            if threadpool_limits is not None:
                with threadpool_limits(limits=int(threads)):
                    res = self.model.predict(feed)
                return [res[t.name] for t in self.outputs]
        res = self.model.predict(feed)
        return [res[t.name] for t in self.outputs]


class CoreMLReference(Runtime):
    """The numpy interpreter: runs Core ML ML programs on any OS (no Apple runtime needed)."""

    name = "coreml-reference"
    target = "reference"
    formats = ("coreml",)

    def available(self) -> Optional[str]:
        return None  # numpy only

    def check(self, path, fmt) -> Optional[str]:
        why = super().check(path, fmt)
        if why:
            return why
        try:
            err = describe(path).unsupported_error()
        except EdgepipeError as e:
            return e.message
        return err.message if err else None

    def load(self, path, options=None):
        return CoreMLReferenceSession(Path(path), options or RunOptions())

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"numpy": np.__version__, "coremltools": pkg_version("coremltools")}


class CoreMLNativeSession(Session):
    """Apple's Core ML runtime through coremltools (macOS only)."""

    def __init__(self, path: Path, options: RunOptions, compute_units: str):
        import coremltools as ct  # imports TensorFlow when installed (~6 s); macOS only path

        self.desc = describe(path)  # I/O, image color spaces and class order, without weights
        self.ml = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.inputs, self.outputs, self.input_kind = _session_io(self.desc)
        self._specs = {s.name: s for s in self.desc.inputs}
        self.facts = {"runtime": "coreml", "compute_units": compute_units, "input_kind": self.input_kind,
                      "threads": options.threads}

    def _feed_one(self, i: int, inputs) -> dict:
        from PIL import Image

        feed = {}
        for t, x in zip(self.inputs, inputs):
            s = self._specs[t.name]
            x = np.asarray(x)
            if s.kind == "image":
                img = x[i] if x.ndim == 4 else x
                if s.color_space == "GRAYSCALE_FLOAT16":
                    feed[t.name] = Image.fromarray(img[..., 0].astype(np.float32), mode="F")
                else:
                    px = np.clip(np.rint(img.astype(np.float32)), 0, 255).astype(np.uint8)
                    # PIL images are RGB (or L); Core ML converts to BGR itself when declared
                    feed[t.name] = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
            else:
                feed[t.name] = (x[i:i + 1] if x.ndim == len(s.shape) and s.shape and s.shape[0] == 1 else x) \
                    .astype(_NP.get(s.program_dtype, np.float32))
        return feed

    def run_native(self, inputs):
        first = np.asarray(inputs[0])
        spec0 = self._specs[self.inputs[0].name]
        n = first.shape[0] if first.ndim == len(spec0.shape) and spec0.shape and spec0.shape[0] == 1 else 1
        per_out: list[list[np.ndarray]] = [[] for _ in self.outputs]
        classes = self.desc.classes or []
        for i in range(n):
            res = self.ml.predict(self._feed_one(i, inputs))
            for j, t in enumerate(self.outputs):
                v = res[t.name]
                if isinstance(v, dict):  # classifier probabilities, in the program's class order
                    v = np.array([v[c] for c in classes], np.float32).reshape(t.shape or [-1])
                v = np.asarray(v, np.float32)
                per_out[j].append(v if n == 1 else v.reshape((1,) + v.shape[1:]) if v.ndim else v[None])
        return [p[0] if n == 1 else np.concatenate(p, axis=0) for p in per_out]


class CoreMLNative(Runtime):
    """Apple's Core ML runtime on the CPU (macOS)."""

    name = "coreml"
    target = "cpu"
    formats = ("coreml",)
    compute_units = "CPU_ONLY"

    def available(self) -> Optional[str]:
        if sys.platform != "darwin":
            return "Core ML runtime needs macOS"
        import importlib.util

        if importlib.util.find_spec("coremltools") is None:
            return "coremltools is not installed: pip install coremltools"
        return None

    def load(self, path, options=None):
        return CoreMLNativeSession(Path(path), options or RunOptions(), self.compute_units)

    def versions(self):
        from edgepipe.pipeline.base.util import pkg_version

        return {"coremltools": pkg_version("coremltools")}


class CoreMLNativeGPU(CoreMLNative):
    """Apple's Core ML runtime with the GPU allowed (CPU_AND_GPU, macOS)."""

    target = "gpu"
    compute_units = "CPU_AND_GPU"
