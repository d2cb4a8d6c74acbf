"""Reading Core ML ML programs without coremltools: the protobuf spec, the MIL program, the weight blobs.

An ``.mlpackage`` folder (or a bare ``.mlmodel`` file whose weights are all inline) holding an ML
program (``Model.mlProgram``; the older neuralnetwork type is refused). The protobuf spec and the MIL
weight blob file are decoded here, with no coremltools or TensorFlow import: loading a MobileNet takes
milliseconds, and bench/eval processes stay free of TensorFlow (``import coremltools`` imports
TensorFlow when it is installed, ~6 s here). Field numbers follow Apple's public ``Model.proto``/
``MIL.proto``/``FeatureTypes.proto``; the weight file follows the public MILBlob storage format (64-byte
header, 64-byte ``blob_metadata`` with sentinel 0xDEADBEEF before each blob, sub-byte types packed LSB
first).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base.errors import EdgepipeError, UnsupportedArtifact

_HINT_OP = ("Verify this artifact with Core ML on macOS, or add the op to "
            "devices/runtimes/coreml_ref/ops.py (or nn_ops.py)")


class UnsupportedMilOp(UnsupportedArtifact):
    """The program uses an op (or an op mode) the reference interpreter does not implement."""

    def __init__(self, op_type: str, detail: str | None = None):
        message = f"unsupported MIL op {op_type}" + (f" ({detail})" if detail else "")
        super().__init__(message, _HINT_OP)
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


def msg(buf) -> dict[int, list]:
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


def one(m: dict, f: int, default=None):
    v = m.get(f)
    return v[-1] if v else default


def text(v) -> str:
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


def mapping(m: dict, f: int, value_fn) -> dict:
    out = {}
    for entry in m.get(f, []):
        e = msg(entry)
        out[text(one(e, 1, b""))] = value_fn(one(e, 2, b""))
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
NP_DTYPES = {
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
CAST_NAMES = {"fp16": "fp16", "fp32": "fp32", "fp64": "fp64", "float16": "fp16",
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
        return NP_DTYPES.get(self.dtype) if self.kind == "tensor" and self.dtype else None

    @property
    def known_shape(self) -> Optional[tuple]:
        if self.kind != "tensor" or self.shape is None or any(d < 0 for d in self.shape):
            return None
        return self.shape


def parse_type(buf) -> MilType:
    m = msg(buf or b"")
    if 1 in m:
        t = msg(one(m, 1))
        dtype = _MIL_DTYPES.get(one(t, 1, 0), f"dtype{one(t, 1, 0)}")
        rank = _signed(one(t, 2, 0))
        dims = []
        for d in t.get(3, []):
            dm = msg(d)
            if 1 in dm:
                dims.append(_signed(one(msg(one(dm, 1)), 1, 0)))
            else:
                dims.append(-1)
        shape = tuple(dims) if rank >= 0 and len(dims) == rank else (None if rank < 0 else tuple(dims))
        return MilType("tensor", dtype, shape)
    if 2 in m:
        lt = msg(one(m, 2))
        return MilType("list", elem=parse_type(one(lt, 1, b"")))
    if 3 in m:
        return MilType("tuple")
    if 4 in m:
        return MilType("dict")
    if 5 in m:
        inner = parse_type(one(msg(one(m, 5)), 1, b""))
        return MilType("state", inner.dtype, inner.shape)
    return MilType("tensor", None, None)


def unpack_bits(raw: bytes, nbits: int, count: int, signed: bool) -> np.ndarray:
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
        return unpack_bits(raw, nbits, count, signed)
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
    return arr.astype(np.bool_) if dtype == "bool" else arr.astype(NP_DTYPES[dtype])


class Blobs:
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
    tv = msg(buf)
    dtype = t.dtype or "fp32"
    shape = t.shape if t.shape is not None else None
    count = int(np.prod(shape, dtype=np.int64)) if shape is not None else None
    if 4 in tv:  # strings
        vals = [text(v) for v in msg(one(tv, 4)).get(1, [])]
        if shape == () or (shape is None and len(vals) == 1):
            return vals[0] if vals else ""
        return np.array(vals, dtype=object).reshape(shape if shape is not None else (-1,))
    if 7 in tv:  # raw bytes
        raw = b"".join(bytes(v) for v in msg(one(tv, 7)).get(1, []))
        arr = _decode_raw(raw, dtype, count if count is not None else len(raw))
    elif 1 in tv:
        arr = _packed_fixed(msg(one(tv, 1)).get(1, []), "<f4")
    elif 6 in tv:
        arr = _packed_fixed(msg(one(tv, 6)).get(1, []), "<f8")
    elif 2 in tv or 5 in tv or 3 in tv:
        f = 2 if 2 in tv else (5 if 5 in tv else 3)
        arr = np.array([_signed(v) for v in _packed_varints(msg(one(tv, f)).get(1, []))],
                       dtype=np.int64)
    else:
        arr = np.zeros(count or 0)
    if count is not None and arr.size == 0 and count > 0:
        arr = np.zeros(count)
    npdt = NP_DTYPES.get(dtype, np.float32)
    arr = arr.astype(npdt)
    if shape is not None:
        arr = arr.reshape(shape)
    return arr


@dataclass
class BlobRef:
    """A weight in the blob file, read when the program is compiled (not when only described)."""

    file: str
    offset: int
    type: MilType


def _value(buf, blobs: Blobs):
    m = msg(buf)
    t = parse_type(one(m, 2, b""))
    if 5 in m:
        bf = msg(one(m, 5))
        return BlobRef(text(one(bf, 1, b"")), one(bf, 2, 0), t)
    if 3 in m:
        iv = msg(one(m, 3))
        if 1 in iv:
            if t.kind == "tensor":
                return _tensor_value(one(iv, 1), t)
            return _tensor_value(one(iv, 1), MilType("tensor", "fp32", None))
        for f in (3, 2):  # list, tuple
            if f in iv:
                return [_value(v, blobs) for v in msg(one(iv, f)).get(1, [])]
        if 4 in iv:
            out = {}
            for kv in msg(one(iv, 4)).get(1, []):
                kvm = msg(kv)
                k = _value(one(kvm, 1, b""), blobs)
                out[k.item() if isinstance(k, np.ndarray) else k] = _value(one(kvm, 2, b""), blobs)
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


def parse_op(buf, blobs: Blobs) -> MilOp:
    m = msg(buf)
    inputs = {}
    for entry in m.get(2, []):
        e = msg(entry)
        key = text(one(e, 1, b""))
        binds = []
        for b in msg(one(e, 2, b"")).get(1, []):
            bm = msg(b)
            if 1 in bm:
                binds.append(("name", text(one(bm, 1))))
            else:
                binds.append(("value", _value(one(bm, 2, b""), blobs)))
        inputs[key] = binds
    outputs = []
    for o in m.get(3, []):
        om = msg(o)
        outputs.append((text(one(om, 1, b"")), parse_type(one(om, 2, b""))))
    attrs = mapping(m, 5, lambda v: _value(v, blobs))
    name = attrs.get("name") or (outputs[0][0] if outputs else "")
    return MilOp(text(one(m, 1, b"")), str(name), inputs, outputs, attrs, bool(m.get(4)))


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


def feature(buf) -> dict:
    m = msg(buf)
    ft = msg(one(m, 3, b""))
    d = {"name": text(one(m, 1, b"")), "kind": "other"}
    if 4 in ft:
        im = msg(one(ft, 4))
        d.update(kind="image", width=one(im, 1, 0), height=one(im, 2, 0),
                 color=_COLOR.get(one(im, 3, 0), "INVALID"),
                 flexible=bool(im.get(21) or im.get(31)))
    elif 5 in ft:
        am = msg(one(ft, 5))
        d.update(kind="tensor", shape=[_signed(v) for v in _packed_varints(am.get(1, []))],
                 dtype=_ARRAY_DT.get(one(am, 2, 0), "float32"))
    elif 6 in ft:
        d["kind"] = "dict"
    elif 3 in ft:
        d["kind"] = "string"
    elif 1 in ft:
        d["kind"] = "int64"
    elif 2 in ft:
        d["kind"] = "double"
    return d


