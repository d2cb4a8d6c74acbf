"""MIL ops of the Core ML reference interpreter, part two: convolution and pooling (``pad_type``
valid/same/same_lower/custom, where ``same`` splits an odd total padding with the extra row/column at
the end, like TensorFlow, and ``same_lower`` at the start; strides, dilations, groups; avg_pool
``exclude_padding_from_average``, pool ``ceil_mode``), activation quantization, the classifier, and the
``constexpr_*`` decompression ops (affine dequantize, LUT/palettized, sparse, blockwise shift-scale,
cast), which the model evaluates once at load time.
"""
from __future__ import annotations

import math

import numpy as np

from edgepipe.devices.runtimes.coreml_ref.ops import as_f32, constexpr_kernel, kernel, norm_axis
from edgepipe.devices.runtimes.coreml_ref.reader import (CAST_NAMES, NP_DTYPES, MilExecutionError, MilOp,
                                                         UnsupportedMilOp, unpack_bits)

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
        y += as_f32(b).reshape((1, o) + (1,) * nd)
    return y


@kernel("conv")
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


@kernel("conv_transpose")
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
        y = y + as_f32(b).reshape((1, -1) + (1,) * nd)
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


@kernel("max_pool")
def _max_pool(a):
    return _pool(a, "max")


@kernel("avg_pool")
def _avg_pool(a):
    return _pool(a, "avg")


@kernel("l2_pool")
def _l2_pool(a):
    return _pool(a, "l2")


# -- activation quantization (iOS17) ----------------------------------------------------------

def _along(v, axis, ndim):
    v = as_f32(np.asarray(v))
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[norm_axis(axis, ndim)] = -1
    return v.reshape(shape)


@kernel("quantize")
def _quantize(a):
    x = a.f("input")
    ax = a.int("axis")
    scale = _along(a["scale"], ax, x.ndim)
    zp = _along(a.get("zero_point", 0), ax, x.ndim).astype(np.float32)
    dt = {"int8": np.int8, "uint8": np.uint8}[a.str("output_dtype")]
    info = np.iinfo(dt)
    return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dt)


@kernel("dequantize")
def _dequantize(a):
    x = np.asarray(a["input"]).astype(np.float32)
    ax = a.int("axis")
    zp = _along(a.get("zero_point", 0), ax, x.ndim).astype(np.float32)
    return (x - zp) * _along(a["scale"], ax, x.ndim)


# -- classifier ------------------------------------------------------------------------------

@kernel("classify")
def _classify(a):
    probs = as_f32(a["probabilities"]).astype(np.float32)
    classes = a["classes"]
    flat = [c.item() if isinstance(c, np.ndarray) else c for c in (classes or [])]
    vec = probs.reshape(-1)
    label = flat[int(np.argmax(vec))] if flat else int(np.argmax(vec))
    return np.array(label, dtype=object if isinstance(label, str) else np.int64), probs


# -- constexpr (evaluated once at load) ------------------------------------------------------

def _out_dtype(op: MilOp, i=0):
    return op.outputs[i][1].np_dtype if i < len(op.outputs) else None


@constexpr_kernel("constexpr_affine_dequantize")
def _ce_affine(a):
    q = np.asarray(a["quantized_data"]).astype(np.float32)
    ax = a.int("axis", 0)
    zp = _along(a["zero_point"], ax, q.ndim).astype(np.float32)
    scale = _along(a["scale"], ax, q.ndim).astype(np.float32)
    return (q - zp) * scale


@constexpr_kernel("constexpr_cast")
def _ce_cast(a):
    dt = CAST_NAMES.get(a.str("output_dtype"), "fp32")
    return np.asarray(a["source_val"]).astype(NP_DTYPES[dt])


def _repeat_blocks(v, shape):
    for ax, (n, m) in enumerate(zip(shape, v.shape)):
        if m != n:
            v = np.repeat(v, n // m, axis=ax)
    return v


def _blockwise(data, scale, offset):
    d = np.asarray(data).astype(np.float32)
    s = _repeat_blocks(as_f32(np.asarray(scale)).astype(np.float32), d.shape)
    if offset is not None:
        d = d - _repeat_blocks(np.asarray(offset).astype(np.float32), d.shape)
    return d * s


@constexpr_kernel("constexpr_blockwise_shift_scale")
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
    ax = norm_axis(int(vector_axis), r)
    shape = list(indices.shape)
    shape[ax] *= vec
    return np.moveaxis(vals, -1, ax + 1).reshape(shape)


@constexpr_kernel("constexpr_lut_to_dense")
def _ce_lut(a):
    lut = np.asarray(a["lut"])
    if a.has("shape"):  # iOS16: packed uint8 indices, flat LUT, explicit shape
        shape = a.ints("shape")
        nbits = int(round(math.log2(lut.size)))
        count = int(np.prod(shape, dtype=np.int64))
        packed = np.asarray(a["indices"]).astype(np.uint8).reshape(-1).tobytes()
        idx = unpack_bits(packed, nbits, count, False).astype(np.int64)
        return lut.reshape(-1)[idx].reshape(shape)
    return _lut_dense(a["indices"], lut, a.int("vector_axis"))


def _sparse_dense(nonzero, mask):
    out = np.zeros(mask.shape, dtype=np.asarray(nonzero).dtype)
    out[mask != 0] = np.asarray(nonzero).reshape(-1)
    return out


@constexpr_kernel("constexpr_sparse_to_dense")
def _ce_sparse(a):
    nz = np.asarray(a["nonzero_data"])
    if a.has("shape"):  # iOS16: bit mask packed into uint8 bytes
        shape = a.ints("shape")
        count = int(np.prod(shape, dtype=np.int64))
        packed = np.asarray(a["mask"]).astype(np.uint8).reshape(-1).tobytes()
        mask = unpack_bits(packed, 1, count, False).reshape(shape)
        return _sparse_dense(nz, mask)
    return _sparse_dense(nz, np.asarray(a["mask"]))


@constexpr_kernel("constexpr_lut_to_sparse")
def _ce_lut_sparse(a):
    mask = np.asarray(a["indices_mask"])
    lut = np.asarray(a["lut"])
    va = a.int("vector_axis")
    dense = _lut_dense(_sparse_dense(a["indices_nonzero_data"], mask), lut, va)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=va)
    return mask, dense[mask != 0].reshape(-1)


@constexpr_kernel("constexpr_sparse_blockwise_shift_scale")
def _ce_sparse_blockwise(a):
    mask = np.asarray(a["data_mask"])
    dense = _blockwise(_sparse_dense(a["nonzero_data"], mask), a["scale"], a.get("offset"))
    return mask, dense[mask != 0].reshape(-1)


