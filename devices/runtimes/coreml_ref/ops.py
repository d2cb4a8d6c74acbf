"""The MIL op table of the Core ML reference interpreter: elementwise, activations, reductions, linear
algebra, normalization and shape ops (nn_ops.py adds convolution, pooling, quantization and the
``constexpr_*`` decompression ops). ``kernel(*names)`` registers an implementation in ``OPS``.

Operations follow the MIL op definitions (coremltools op reference): NCHW layout, negative axes,
``keep_dims``. Precision: every value is stored in the dtype the program declares for it, so an fp16
program keeps fp16 activations. Each op reads fp16 operands as float32, computes in float32 and rounds
its result to fp16 (for one elementwise op this is the correctly rounded fp16 result; convolutions and
matmuls therefore accumulate in float32 and round once at the end, as Core ML's CPU kernels do to
within fp16 rounding). This approximates an fp16 Core ML run; it is not bit-exact with any Apple device.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from edgepipe.devices.runtimes.coreml_ref.reader import (CAST_NAMES, NP_DTYPES, MilExecutionError, MilOp,
                                                         UnsupportedMilOp)

# --------------------------------------------------------------------------------------
# op implementations
# --------------------------------------------------------------------------------------

OPS: dict[str, Callable] = {}
CONSTEXPR: dict[str, Callable] = {}


def kernel(*names):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def constexpr_kernel(*names):
    def deco(fn):
        for n in names:
            CONSTEXPR[n] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    """The MIL op types the interpreter runs (``const`` and ``constexpr_*`` included)."""
    return sorted(set(OPS) | set(CONSTEXPR) | {"const"})


class Args:
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
        return as_f32(self[k])

    def unsupported(self, detail: str):
        return UnsupportedMilOp(self.op.type, detail)


def as_f32(x):
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def norm_axis(a, rank):
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
    OPS[_n] = _make_binary(_fn)


@kernel("floor_div")
def _floor_div(a):
    x, y = a.f("x"), a.f("y")
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.floor_divide(x, y)
    return np.floor(x / y)


@kernel("mod")
def _mod(a):
    x, y = a.f("x"), a.f("y")
    return x - np.floor(x / y) * y if x.dtype.kind == "f" else np.mod(x, y)


def _erf(x):
    try:
        from scipy.special import erf  # lazy: scipy.special costs ~0.5 s to import, and only erf needs it

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
    OPS[_n] = _make_unary(_fn)


# exact in any precision (no rounding): run on the stored dtype, skipping the fp32 round trip
@kernel("relu")
def _relu(a):
    x = np.asarray(a["x"])
    return np.maximum(x, x.dtype.type(0))


@kernel("relu6")
def _relu6(a):
    x = np.asarray(a["x"])
    return np.clip(x, x.dtype.type(0), x.dtype.type(6))


@kernel("inverse")
def _inverse(a):
    return 1 / (a.f("x") + np.float32(a.float("epsilon", 1e-4)))


@kernel("log")
def _log(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(a.f("x") + np.float32(a.float("epsilon", 1e-45)))


@kernel("rsqrt")
def _rsqrt(a):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1 / np.sqrt(a.f("x") + np.float32(a.float("epsilon", 1e-12)))


@kernel("clip")
def _clip(a):
    return np.minimum(np.maximum(a.f("x"), a.f("alpha")), a.f("beta"))


@kernel("threshold")
def _threshold(a):
    return np.maximum(a.f("x"), a.f("alpha"))


@kernel("cast")
def _cast(a):
    dt = CAST_NAMES.get(a.str("dtype"))
    if dt is None:
        raise a.unsupported(f"dtype {a.str('dtype')}")
    x = np.asarray(a["x"])
    if dt.startswith("int") and x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(NP_DTYPES[dt])


@kernel("select")
def _select(a):
    return np.where(np.asarray(a["cond"]).astype(bool), a.f("a"), a.f("b"))


# -- activations ---------------------------------------------------------------------------

@kernel("leaky_relu")
def _leaky_relu(a):
    x = a.f("x")
    return np.where(x >= 0, x, x * a.f("alpha"))


@kernel("elu")
def _elu(a):
    x = a.f("x")
    with np.errstate(over="ignore"):
        return np.where(x > 0, x, a.f("alpha") * np.expm1(np.minimum(x, 0)))


@kernel("prelu")
def _prelu(a):
    x, al = a.f("x"), a.f("alpha")
    al = al.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, x * al)


@kernel("sigmoid_hard")
def _sigmoid_hard(a):
    return np.clip(a.f("alpha") * a.f("x") + a.f("beta"), 0, 1)


@kernel("scaled_tanh")
def _scaled_tanh(a):
    return a.f("alpha") * np.tanh(a.f("beta") * a.f("x"))


@kernel("linear_activation")
def _linear_activation(a):
    return a.f("alpha") * a.f("x") + a.f("beta")


@kernel("clamped_relu")
def _clamped_relu(a):
    x, al, be = a.f("x"), a.f("alpha"), a.f("beta")
    return np.minimum(be, np.where(x >= 0, x, al * x))


@kernel("thresholded_relu")
def _thresholded_relu(a):
    x = a.f("x")
    return np.where(x >= a.f("alpha"), x, 0).astype(x.dtype)


@kernel("softplus_parametric")
def _softplus_parametric(a):
    x = a.f("x")
    shp = (1, -1) + (1,) * (x.ndim - 2)
    return a.f("alpha").reshape(shp) * np.logaddexp(0, a.f("beta").reshape(shp) * x)


@kernel("gelu")
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


@kernel("softmax")
def _softmax(a):
    x = a.f("x")
    ax = a.int("axis", -1)
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    return e / np.sum(e, axis=ax, keepdims=True)


# -- reductions -------------------------------------------------------------------------

def _reduce_axes(a, x):
    axes = a.ints("axes")
    return None if axes is None else tuple(norm_axis(i, x.ndim) for i in axes)


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
    OPS[_n] = _make_reduce(_fn)


@kernel("reduce_argmax", "reduce_argmin")
def _reduce_arg(a):
    x = a.f("x")
    ax = norm_axis(a.int("axis", -1), x.ndim)
    fn = np.argmax if a.op.type == "reduce_argmax" else np.argmin
    r = fn(x, axis=ax)
    return np.expand_dims(r, ax) if a.bool("keep_dims", False) else r


# -- linear algebra ------------------------------------------------------------------------

@kernel("matmul")
def _matmul(a):
    x, y = a.f("x"), a.f("y")
    if a.bool("transpose_x") and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if a.bool("transpose_y") and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("linear")
def _linear(a):
    x, w = a.f("x"), a.f("weight")
    y = np.matmul(x, w.T)
    b = a.get("bias")
    return y + as_f32(b) if b is not None else y


@kernel("einsum")
def _einsum(a):
    vals = [as_f32(v) for v in a.list("values")]
    return np.einsum(a.str("equation"), *vals)


# -- normalization ---------------------------------------------------------------------------

def _chan(v, ndim):
    return as_f32(v).reshape((1, -1) + (1,) * (ndim - 2))


def _affine(a, y, shape):
    """y * gamma + beta, each when the op has it, broadcast by ``shape``."""
    if a.has("gamma"):
        y = y * shape(a["gamma"])
    if a.has("beta"):
        y = y + shape(a["beta"])
    return y


@kernel("batch_norm")
def _batch_norm(a):
    x = a.f("x")
    eps = np.float32(a.float("epsilon", 1e-5))
    y = (x - _chan(a["mean"], x.ndim)) / np.sqrt(_chan(a["variance"], x.ndim) + eps)
    return _affine(a, y, lambda v: _chan(v, x.ndim))


@kernel("instance_norm")
def _instance_norm(a):
    x = a.f("x")
    axes = tuple(range(2, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.float("epsilon", 1e-5)))
    return _affine(a, y, lambda v: _chan(v, x.ndim))


@kernel("layer_norm")
def _layer_norm(a):
    x = a.f("x")
    axes = _reduce_axes(a, x)
    axes = tuple(range(x.ndim)) if axes is None else axes
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + np.float32(a.float("epsilon", 1e-5)))
    # gamma/beta have shape x.shape[axes]; axes are the trailing ones in practice
    return _affine(a, y, lambda v: _bcast_axes(as_f32(v), x.ndim, axes))


def _bcast_axes(v, ndim, axes):
    shape = [1] * ndim
    for ax, n in zip(sorted(axes), v.shape):
        shape[ax] = n
    return v.reshape(shape)


@kernel("l2_norm")
def _l2_norm(a):
    x = a.f("x")
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    n = np.sqrt(np.sum(x * x, axis=axes, keepdims=True) + np.float32(a.float("epsilon", 1e-6)))
    return x / n


@kernel("local_response_norm")
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

@kernel("reshape")
def _reshape(a):
    x = np.asarray(a["x"])
    shape = a.ints("shape")
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _transpose(a):
    return np.transpose(a["x"], a.ints("perm"))


@kernel("squeeze")
def _squeeze(a):
    x = np.asarray(a["x"])
    axes = a.ints("axes")
    if axes is None:
        return np.squeeze(x)
    axes = tuple(norm_axis(i, x.ndim) for i in axes if x.shape[i] == 1)
    return np.squeeze(x, axis=axes) if axes else x


@kernel("expand_dims")
def _expand_dims(a):
    x = np.asarray(a["x"])
    out_rank = x.ndim + len(a.ints("axes"))
    axes = sorted(i + out_rank if i < 0 else i for i in a.ints("axes"))
    for ax in axes:
        x = np.expand_dims(x, ax)
    return x


@kernel("flatten2d")
def _flatten2d(a):
    x = np.asarray(a["x"])
    ax = norm_axis(a.int("axis", 1), x.ndim)
    return x.reshape(int(np.prod(x.shape[:ax], dtype=np.int64)), -1)


@kernel("concat")
def _concat(a):
    vals = [np.asarray(v) for v in a.list("values")]
    ax = a.int("axis")
    if a.bool("interleave"):
        st = np.stack(vals, axis=norm_axis(ax, vals[0].ndim) + 1)
        shape = list(vals[0].shape)
        shape[norm_axis(ax, vals[0].ndim)] *= len(vals)
        return st.reshape(shape)
    return np.concatenate(vals, axis=ax)


@kernel("stack")
def _stack(a):
    return np.stack([np.asarray(v) for v in a.list("values")], axis=a.int("axis"))


@kernel("split")
def _split(a):
    x = np.asarray(a["x"])
    ax = norm_axis(a.int("axis"), x.ndim)
    sizes = a.ints("split_sizes")
    if sizes is None:
        n = a.int("num_splits")
        return tuple(np.split(x, n, axis=ax))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=ax))


@kernel("slice_by_index")
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


@kernel("slice_by_size")
def _slice_by_size(a):
    x = np.asarray(a["x"])
    begin, size = a.ints("begin"), a.ints("size")
    idx = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = norm_axis(b, x.shape[i])
        idx.append(slice(b, None if s == -1 else b + s))
    return x[tuple(idx)]


@kernel("pad")
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


@kernel("tile")
def _tile(a):
    return np.tile(a["x"], a.ints("reps"))


@kernel("gather")
def _gather(a):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    ax = norm_axis(a.int("axis", 0), x.ndim)
    if a.int("batch_dims", 0):
        raise a.unsupported("batch_dims > 0")
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take(x, idx, axis=ax)


@kernel("gather_along_axis")
def _gather_along_axis(a):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    ax = norm_axis(a.int("axis", 0), x.ndim)
    idx = np.where(idx < 0, idx + x.shape[ax], idx)
    return np.take_along_axis(x, idx, axis=ax)


@kernel("reverse")
def _reverse(a):
    x = np.asarray(a["x"])
    axes = a.ints("axes")
    return np.flip(x, axis=None if axes is None else tuple(axes))


@kernel("shape")
def _shape(a):
    return np.array(np.shape(a["x"]), dtype=np.int32)


@kernel("fill")
def _fill(a):
    return np.full(a.ints("shape"), a.get("value", 0.0))


@kernel("range_1d")
def _range_1d(a):
    return np.arange(np.asarray(a["start"]).item(), np.asarray(a["end"]).item(),
                     np.asarray(a["step"]).item())


@kernel("cumsum")
def _cumsum(a):
    x = a.f("x")
    ax = a.int("axis", 0)
    if a.bool("reverse"):
        x = np.flip(x, ax)
    y = np.cumsum(x, axis=ax)
    if a.bool("exclusive"):
        y = y - x
    return np.flip(y, ax) if a.bool("reverse") else y


@kernel("depth_to_space")
def _depth_to_space(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@kernel("pixel_shuffle")
def _pixel_shuffle(a):
    x = np.asarray(a["x"])
    f = a.int("upscale_factor")
    n, c, h, w = x.shape
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (f * f), h * f, w * f)


@kernel("space_to_depth")
def _space_to_depth(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@kernel("upsample_nearest_neighbor")
def _upsample_nn(a):
    x = np.asarray(a["x"])
    sh, sw = a.float("scale_factor_height", 1), a.float("scale_factor_width", 1)
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    ih = np.minimum((np.arange(oh) / sh).astype(np.int64), h - 1)
    iw = np.minimum((np.arange(ow) / sw).astype(np.int64), w - 1)
    return x[..., ih[:, None], iw[None, :]]


