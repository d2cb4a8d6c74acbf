"""Stronger post-training quantization on the Keras weights, before conversion.

Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): for consecutive layers
``L1 -> act -> L2`` where the activation is positively homogeneous (none, ReLU; pooling and
dropout pass through), output channel c of L1 is divided by ``s_c`` and input channel c of L2
multiplied by it, with ``s_c = sqrt(r1_c / r2_c)`` (r: the channel's weight range), so both
layers' channel ranges meet at ``sqrt(r1_c r2_c)``; the float function is unchanged. Inside a
SeparableConv2D the depthwise and pointwise kernels are such a pair with nothing between them.
BatchNormalization is folded first (keras_graph.fold_batchnorm), which is where unbalanced
channels come from. Sweeps repeat until the scales settle.

ReLU6 clips at 6, so ``relu6(x / s) != relu6(x) / s`` in general. A channel is rescaled only if
its pre-activation never comes near the clip on the calibration images (max * margin < 6): then
``s_c`` is bounded below by ``max_c * margin / 6`` so it never reaches it afterwards; a channel
that clips keeps ``s_c = 1``. With no calibration data, ReLU6 pairs are left alone.

Bias correction (Nagel et al. 2019, section 4.2, the empirical form): rounding the weights to
int8 shifts each output channel's mean by ``(W_q - W) E[x]``; with ``E[x]`` per input channel
from the float model on calibration images, that shift is subtracted from the bias. ``levels``
is the int8 grid the converter uses: 127 (TFLite, symmetric per channel) or 63 (ONNX
u8s8-reduce-range, 7-bit weights).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.fidelity.keras_graph import (Graph, Node, fold_batchnorm, layer_kernels, scale_inputs,
                                                    scale_outputs, set_kernels)

PASSTHROUGH = ("MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D", "ZeroPadding2D",
               "Dropout")
RELU6_MARGIN = 1.5
SWEEPS = 8
WEIGHTED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


def _act(n: Node) -> Optional[str]:
    """'linear' | 'relu' | 'relu6' for an activation that can sit between a pair, else None."""
    if n.cls == "ReLU":
        c = n.config
        if (c.get("negative_slope") or 0) != 0 or (c.get("threshold") or 0) != 0:
            return None
        mv = c.get("max_value")
        return "relu" if mv is None else ("relu6" if float(mv) == 6.0 else None)
    if n.cls == "Activation":
        a = n.config.get("activation")
        return a if a in ("relu", "relu6", "linear") else None
    return None


def find_pairs(g: Graph) -> list[tuple[str, str, str, Optional[str]]]:
    """(L1, L2, kind, act layer) for every equalizable pair; kind is 'linear' | 'relu' | 'relu6'."""
    pairs = []
    for n in g.nodes.values():
        if n.cls not in WEIGHTED or n.shared:
            continue
        if n.cls == "SeparableConv2D":  # depthwise -> pointwise, nothing between them
            pairs.append((n.name, n.name, "separable", None))
        kind = n.config.get("activation") or "linear"
        if kind not in ("linear", "relu", "relu6"):
            continue
        act_layer, cur = None, g.only_child(n.name)
        while cur is not None and not cur.shared:
            a = _act(cur)
            if a is not None and act_layer is None and kind == "linear":
                kind, act_layer = a, cur.name
            elif cur.cls not in PASSTHROUGH:
                break
            cur = g.only_child(cur.name)
        if cur is not None and cur.cls in WEIGHTED and not cur.shared:
            if cur.cls == "Dense" and n.cls != "Dense" and not _pooled(g, n.name, cur.name):
                continue
            pairs.append((n.name, cur.name, kind, act_layer))
    return pairs


def _pooled(g: Graph, a: str, b: str) -> bool:
    """A conv feeding a Dense only through a global pooling keeps channels aligned."""
    cur = g.only_child(a)
    while cur is not None and cur.name != b:
        if cur.cls in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
            return True
        cur = g.only_child(cur.name)
    return False


def _out_ranges(cls: str, k: dict) -> np.ndarray:
    w = k["kernel"]
    if cls == "DepthwiseConv2D":
        return np.abs(w).reshape(-1, w.shape[2] * w.shape[3]).max(axis=0)
    return np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)


def _in_ranges(cls: str, k: dict) -> np.ndarray:
    if cls == "SeparableConv2D":
        w = k["depthwise"]
        return np.abs(w).transpose(2, 0, 1, 3).reshape(w.shape[2], -1).max(axis=1)
    w = k["kernel"]
    if cls == "Dense":
        return np.abs(w).max(axis=1)
    return np.abs(w).transpose(2, 0, 1, 3).reshape(w.shape[2], -1).max(axis=1)


def _pair_scales(r1: np.ndarray, r2: np.ndarray, lo: Optional[np.ndarray]) -> np.ndarray:
    s = np.ones_like(r1)
    ok = (r1 > 0) & (r2 > 0)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    if lo is not None:  # ReLU6: never push a channel into the clip; channels that clip stay put
        s = np.where(np.isfinite(lo), np.maximum(s, lo), 1.0)
    return s


def _equalize_pair(model, l1: str, l2: str, kind: str, lo: Optional[np.ndarray]) -> float:
    """One pass over one pair; returns the largest |log s| (0 when settled)."""
    a = model.get_layer(l1)
    cls1 = type(a).__name__
    k1 = layer_kernels(a)
    if kind == "separable":
        r1 = np.abs(k1["depthwise"]).reshape(-1, k1["depthwise"].shape[2] * k1["depthwise"].shape[3]).max(axis=0)
        r2 = np.abs(k1["kernel"]).transpose(2, 0, 1, 3).reshape(k1["kernel"].shape[2], -1).max(axis=1)
        s = _pair_scales(r1, r2, None)
        k1["depthwise"] = k1["depthwise"] / s.reshape(k1["depthwise"].shape[2], k1["depthwise"].shape[3])
        k1["kernel"] = k1["kernel"] * s.reshape(1, 1, -1, 1)
        set_kernels(a, k1)
        return float(np.abs(np.log(s)).max())
    b = model.get_layer(l2)
    cls2 = type(b).__name__
    k2 = layer_kernels(b)
    r1, r2 = _out_ranges(cls1, k1), _in_ranges(cls2, k2)
    if r1.shape != r2.shape:
        return 0.0
    s = _pair_scales(r1, r2, lo)
    scale_outputs(cls1, k1, 1.0 / s)
    scale_inputs(cls2, k2, s)
    set_kernels(a, k1)
    set_kernels(b, k2)
    return float(np.abs(np.log(s)).max())


def _relu6_bounds(model, pairs, data: Optional[np.ndarray], margin: float) -> dict[str, np.ndarray]:
    """Per ReLU6 pair: the smallest allowed s per channel (inf: the channel clips, keep s = 1)."""
    keras = lazy.keras()
    names = [l1 for l1, _, kind, _ in pairs if kind == "relu6"]
    if not names or data is None:
        return {}
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outs = probe.predict(data, batch_size=32, verbose=0)
    outs = outs if isinstance(outs, list) else [outs]
    bounds = {}
    for n, o in zip(names, outs):
        m = np.asarray(o, np.float64).reshape(-1, o.shape[-1]).max(axis=0) * margin
        bounds[n] = np.where(m < 6.0, np.maximum(m, 0.0) / 6.0, np.inf)
    return bounds


def equalize(model, data: Optional[np.ndarray] = None, *, sweeps: int = SWEEPS,
             relu6_margin: float = RELU6_MARGIN) -> tuple[Any, dict]:
    """Fold BatchNormalization, then equalize every pair; returns (new model, what was done).

    ``data``: preprocessed calibration images, used only for ReLU6 pairs (see module docstring).
    The returned model computes the same function as ``model`` (to float rounding).
    """
    folded, info = fold_batchnorm(model)
    g = Graph(folded)
    pairs = find_pairs(g)
    pairs = [p for p in pairs if p[2] != "relu6" or data is not None]
    info["pairs"] = [f"{a} -> {b} ({kind})" for a, b, kind, _ in pairs]
    moved = []
    for _ in range(max(1, sweeps)):
        bounds = _relu6_bounds(folded, pairs, data, relu6_margin)
        step = max([_equalize_pair(folded, a, b, kind, bounds.get(a) if kind == "relu6" else None)
                    for a, b, kind, _ in pairs] or [0.0])
        moved.append(round(step, 4))
        if step < 1e-3:
            break
    info["sweeps"] = moved
    return folded, info


# --------------------------------------------------------------------------- bias correction
def _quantized(w: np.ndarray, axis_size: int, levels: int) -> np.ndarray:
    """Symmetric per-output-channel rounding (output channels on the last axis of ``w`` reshaped)."""
    flat = w.reshape(-1, axis_size)
    scale = np.abs(flat).max(axis=0) / levels
    scale[scale == 0] = 1.0
    return (np.round(flat / scale) * scale).reshape(w.shape)


def _channel_mean_shift(cls: str, k: dict, mean_in: np.ndarray, levels: int) -> np.ndarray:
    """E[out_q] - E[out] for a layer fed inputs with per-channel mean ``mean_in`` (padding ignored)."""
    if cls == "Dense":
        w = k["kernel"]
        return mean_in @ (_quantized(w, w.shape[1], levels) - w)
    if cls == "DepthwiseConv2D":
        w = k["kernel"]
        kh, kw, cin, mult = w.shape
        dq = _quantized(w, cin * mult, levels) - w
        return (dq.sum(axis=(0, 1)) * mean_in[:, None]).reshape(-1)
    if cls == "SeparableConv2D":
        dw, pw = k["depthwise"], k["kernel"]
        kh, kw, cin, mult = dw.shape
        m = (dw.sum(axis=(0, 1)) * mean_in[:, None]).reshape(-1)
        mq = (_quantized(dw, cin * mult, levels).sum(axis=(0, 1)) * mean_in[:, None]).reshape(-1)
        pq = _quantized(pw, pw.shape[-1], levels)
        return mq @ pq.reshape(-1, pw.shape[-1]) - m @ pw.reshape(-1, pw.shape[-1])
    w = k["kernel"]
    return mean_in @ (_quantized(w, w.shape[-1], levels) - w).sum(axis=(0, 1))


def correct_bias(model, data: np.ndarray, *, levels: int = 127) -> tuple[Any, dict]:
    """Fold BN, then subtract each layer's expected int8 weight-rounding shift from its bias."""
    keras = lazy.keras()
    folded, info = fold_batchnorm(model)
    layers = [l for l in folded.layers if type(l).__name__ in WEIGHTED]
    layers = [l for l in layers if _has_bias(l)]
    if not layers:
        info["corrected"] = []
        return folded, info
    probe = keras.Model(folded.inputs, [l.input for l in layers])
    ins = probe.predict(data, batch_size=32, verbose=0)
    ins = ins if isinstance(ins, list) else [ins]
    shifts = {}
    for layer, x in zip(layers, ins):
        x = np.asarray(x, np.float64)
        mean_in = x.reshape(-1, x.shape[-1]).mean(axis=0)
        k = layer_kernels(layer)
        shift = _channel_mean_shift(type(layer).__name__, k, mean_in, levels)
        k["bias"] = k["bias"] - shift
        set_kernels(layer, k)
        shifts[layer.name] = float(np.abs(shift).max())
    info["corrected"] = sorted(shifts)
    info["max_shift"] = shifts
    return folded, info


def _has_bias(layer) -> bool:
    return bool(getattr(layer, "use_bias", False))
