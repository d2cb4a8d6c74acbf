"""Error figures between a quantized tensor and its float reference, accumulated image by image.

Streaming (sums, not stored tensors), so a report over many images and many layers stays
small: per tensor a handful of sums, per-channel minima/maxima and energies.

Figures:
    sqnr_db    10·log10(Σ ref² / Σ (q − ref)²): signal-to-quantization-noise ratio, whole tensor
    channel_sqnr_db  the median over channels of the per-channel SQNR: a tensor dominated by
               one loud channel can have a good whole-tensor SQNR while every other channel is
               crushed; this one sees it
    rel_error  ‖q − ref‖ / ‖ref‖
    cosine     ⟨q, ref⟩ / (‖q‖‖ref‖)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

SQNR_CAP_DB = 120.0  # an exact match reports this instead of infinity (JSON has no inf)
_TINY = 1e-30


@dataclass
class ErrorFigures:
    sqnr_db: float
    rel_error: float
    cosine: float
    channel_sqnr_db: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> Optional["ErrorFigures"]:
        return None if d is None else cls(**d)


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= _TINY:
        return SQNR_CAP_DB
    if signal <= _TINY:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, max(-SQNR_CAP_DB, 10.0 * math.log10(signal / noise))))


def channel_axis(shape: tuple, layout: str) -> Optional[int]:
    """The channel axis of an activation (batch first): NHWC -> last, NCHW -> 1; None for scalars."""
    if len(shape) < 2:
        return None
    return len(shape) - 1 if layout == "NHWC" else 1


class Accumulator:
    """Sums for one tensor pair over many images."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.q_energy = 0.0
        self.ch_signal: Optional[np.ndarray] = None
        self.ch_noise: Optional[np.ndarray] = None
        self.ch_min: Optional[np.ndarray] = None
        self.ch_max: Optional[np.ndarray] = None
        self.p999: list[float] = []
        self.saturated = 0
        self.count = 0
        self.images = 0

    def update(self, ref: np.ndarray, q: np.ndarray, layout: str = "NHWC",
               qrange: Optional[tuple[float, float]] = None) -> None:
        ref = np.asarray(ref, np.float64)
        q = np.asarray(q, np.float64).reshape(ref.shape)
        d = q - ref
        self.signal += float(np.sum(ref * ref))
        self.noise += float(np.sum(d * d))
        self.dot += float(np.sum(ref * q))
        self.q_energy += float(np.sum(q * q))
        self.count += ref.size
        self.images += 1
        if ref.size:
            self.p999.append(float(np.quantile(np.abs(ref), 0.999)))
        if qrange is not None and ref.size:  # beyond one int8 step outside the range: clipped
            step = (qrange[1] - qrange[0]) / 255.0
            self.saturated += int(np.sum((ref < qrange[0] - step) | (ref > qrange[1] + step)))
        ax = channel_axis(ref.shape, layout)
        if ax is None:
            return
        r = np.moveaxis(ref, ax, -1).reshape(-1, ref.shape[ax])
        dd = np.moveaxis(d, ax, -1).reshape(-1, ref.shape[ax])
        s, n = np.sum(r * r, axis=0), np.sum(dd * dd, axis=0)
        lo, hi = r.min(axis=0), r.max(axis=0)
        if self.ch_signal is None or self.ch_signal.shape != s.shape:
            self.ch_signal, self.ch_noise, self.ch_min, self.ch_max = s, n, lo, hi
        else:
            self.ch_signal += s
            self.ch_noise += n
            self.ch_min = np.minimum(self.ch_min, lo)
            self.ch_max = np.maximum(self.ch_max, hi)

    def figures(self) -> ErrorFigures:
        rel = math.sqrt(self.noise / self.signal) if self.signal > _TINY else (0.0 if self.noise <= _TINY else math.inf)
        den = math.sqrt(self.signal * self.q_energy)
        cos = self.dot / den if den > _TINY else (1.0 if self.signal <= _TINY and self.q_energy <= _TINY else 0.0)
        ch = None
        if self.ch_signal is not None and self.ch_signal.size > 1:
            live = self.ch_signal > 1e-12 * max(float(self.ch_signal.max()), _TINY)
            if live.any():
                vals = [sqnr_db(float(s), float(n)) for s, n in zip(self.ch_signal[live], self.ch_noise[live])]
                ch = float(np.median(vals))
        return ErrorFigures(sqnr_db(self.signal, self.noise), float(min(rel, 1e6)), float(cos), ch)

    def facts(self) -> dict:
        """Range facts of the float reference, for the reasons."""
        out: dict = {}
        if self.p999:
            out["ref_abs_p999"] = float(np.mean(self.p999))
        if self.count:
            out["saturated_fraction"] = self.saturated / self.count
        if self.ch_min is not None and self.ch_min.size > 1:
            spans = self.ch_max - self.ch_min
            out["ref_min"], out["ref_max"] = float(self.ch_min.min()), float(self.ch_max.max())
            live = spans > 1e-6 * max(float(spans.max()), _TINY)
            if live.sum() >= 2:
                med = float(np.median(spans[live]))
                out["channel_span_ratio"] = float(spans[live].max() / med) if med > 0 else None
                out["channels"] = int(spans.size)
                out["loudest_channel"] = int(np.argmax(spans))
        return out


def figures(ref: np.ndarray, q: np.ndarray, layout: str = "NHWC") -> ErrorFigures:
    """One-shot figures for a pair of arrays (batch first)."""
    acc = Accumulator()
    acc.update(ref, q, layout)
    return acc.figures()
