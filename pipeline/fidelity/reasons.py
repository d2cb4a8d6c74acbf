"""The likely reason a layer quantizes badly, from facts the probes and the accumulated pass
collected. Each rule returns (severity, text) or None; a row's reason is its two strongest.

Facts used (all optional):
    qrange                (lo, hi) the int8 activation range the converter calibrated
    weights               "per-channel" | "per-tensor" (how the layer's weights were quantized)
    weight_channel_ratio  largest / median per-output-channel weight range
    depthwise             the layer is a depthwise convolution
    concat_scale_ratio    largest / smallest input scale of a concatenation (add: add_scale_ratio)
    ref_abs_p999          the 99.9th percentile of |float activation| (mean over images)
    channel_span_ratio    largest / median per-channel range of the float activation
    saturated_fraction    share of float values outside qrange
    weight_only           activations stay float (Core ML int8): only the weights are rounded
"""
from __future__ import annotations

from typing import Optional

from edgepipe.pipeline.fidelity.layer_rows import LayerRow

SPREAD = 8.0  # per-channel activation spread that one int8 scale serves badly
WEIGHT_SPREAD = 4.0
SCALE_MISMATCH = 4.0
OUTLIER = 6.0
SATURATION = 1e-3
UPSTREAM_DB = 10.0

Finding = Optional[tuple[float, str]]


def _concat(f: dict) -> Finding:
    for key, what in (("concat_scale_ratio", "concatenation"), ("add_scale_ratio", "addition")):
        r = f.get(key)
        if r and r >= SCALE_MISMATCH:
            return (r, f"{what} of inputs whose int8 scales are {r:.0f}x apart: the output shares one scale, "
                       "so the narrow-range input loses its resolution")
    return None


def _per_tensor_weights(f: dict) -> Finding:
    r = f.get("weight_channel_ratio")
    if f.get("weights") == "per-tensor" and r and r >= WEIGHT_SPREAD:
        return (r, f"per-tensor weights: output-channel weight ranges differ {r:.0f}x under one scale "
                   "(per-channel quantization or cross-layer equalization)")
    return None


def _channel_spread(f: dict) -> Finding:
    r = f.get("channel_span_ratio")
    if f.get("weight_only") or not f.get("qrange") or not r or r < SPREAD:
        return None
    loud = f.get("loudest_channel")
    which = f" (channel {loud} is the widest)" if loud is not None else ""
    if f.get("depthwise"):
        wr = f.get("weight_channel_ratio")
        wtxt = f", weight ranges {wr:.0f}x apart" if wr else ""
        return (r, f"depthwise layer with a wide weight range{wtxt}: its output channels span ranges {r:.0f}x "
                   f"apart{which} under one int8 activation scale (cross-layer equalization evens them out)")
    return (r, f"output channels span ranges {r:.0f}x apart{which} under one int8 activation scale "
               "(cross-layer equalization evens them out)")


def _outliers(f: dict) -> Finding:
    q, p = f.get("qrange"), f.get("ref_abs_p999")
    if not q or not p or p <= 0:
        return None
    lo, hi = q
    span = hi - lo
    typical = (2 * p) if lo < -1e-6 else p
    r = span / typical if typical > 0 else 0.0
    if r < OUTLIER:
        return None
    return (r, f"activation range [{lo:.3g}, {hi:.3g}] is set by rare outliers (99.9% of values within "
               f"+/-{p:.3g}): int8 steps are {r:.0f}x coarser than the bulk needs "
               "(percentile/entropy calibration, or keep this layer in float)")


def _saturation(f: dict) -> Finding:
    s = f.get("saturated_fraction")
    if not s or s < SATURATION or not f.get("qrange"):
        return None
    lo, hi = f["qrange"]
    return (100 * s, f"{100 * s:.2f}% of values fall outside the calibrated range [{lo:.3g}, {hi:.3g}] "
                     "and saturate (calibrate on more representative images)")


def _weights_only(f: dict) -> Finding:
    r = f.get("weight_channel_ratio")
    if f.get("weight_only"):
        extra = f" (input-channel weights span {r:.0f}x within a channel)" if r and r >= WEIGHT_SPREAD else ""
        return (1.0, f"8-bit weight rounding{extra}; activations stay float")
    return None


RULES = (_concat, _per_tensor_weights, _channel_spread, _outliers, _saturation, _weights_only)


def explain(row: LayerRow) -> str:
    f = row.facts or {}
    found = [x for x in (rule(f) for rule in RULES) if x]
    found.sort(key=lambda x: -x[0])
    texts = [t for _, t in found[:2]]
    if row.isolated is not None and row.accumulated is not None:
        if row.isolated.sqnr_db - row.accumulated.sqnr_db > UPSTREAM_DB and not texts:
            texts.append("error carried in from upstream layers: quantizing this layer alone costs little")
    if not texts:
        texts.append("ordinary 8-bit rounding noise: no range or scale problem found")
    return "; ".join(texts)
