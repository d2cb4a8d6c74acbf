"""Input preprocessing: how raw 0-255 pixels become the model's input tensor.

One dataclass describes it; it travels with every artifact (ONNX metadata_props,
a JSON sidecar for TFLite, Core ML ImageType scale/bias) so a phone app can feed
raw pixels. numpy only: no TensorFlow import.

    y[..., c] = (x[..., order[c]] * scale - mean[c]) / std[c]
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from edgepipe.pipeline.base.errors import UserError

MODES = ("none", "unit", "tf", "caffe", "torch")

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@dataclass
class Preprocessing:
    mode: str = "none"
    scale: float = 1.0
    mean: list[float] = field(default_factory=lambda: [0.0])
    std: list[float] = field(default_factory=lambda: [1.0])
    channel_order: str = "RGB"  # order the model expects; raw pixels are RGB

    @classmethod
    def from_mode(
        cls,
        mode: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float | None = None,
    ) -> "Preprocessing":
        if mode not in MODES:
            raise UserError(f"unknown preprocessing '{mode}'", f"Use one of: {', '.join(MODES)}")
        if mode == "none":
            p = cls("none", 1.0, [0.0], [1.0], "RGB")
        elif mode == "unit":
            p = cls("unit", 1.0 / 255.0, [0.0], [1.0], "RGB")
        elif mode == "tf":
            p = cls("tf", 1.0 / 127.5, [1.0], [1.0], "RGB")
        elif mode == "caffe":
            p = cls("caffe", 1.0, list(CAFFE_MEAN_BGR), [1.0], "BGR")
        else:  # torch
            p = cls("torch", 1.0 / 255.0, list(IMAGENET_MEAN_RGB), list(IMAGENET_STD_RGB), "RGB")
        if mean is not None:
            p.mean = [float(v) for v in mean]
        if std is not None:
            if any(float(v) == 0 for v in std):
                raise UserError("--std contains zero", "Give non-zero standard deviations")
            p.std = [float(v) for v in std]
        if scale is not None:
            p.scale = float(scale)
        return p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: d[k] for k in ("mode", "scale", "mean", "std", "channel_order") if k in d})

    def _vec(self, values: Sequence[float], channels: int) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32)
        if v.size == 1:
            return np.full((channels,), float(v[0]), np.float32)
        if v.size != channels:
            raise UserError(
                f"preprocessing has {v.size} per-channel values but the model has {channels} channels",
                "Give --mean/--std with one value or one per channel",
            )
        return v

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """raw: float or uint8 pixels 0-255, channels last (RGB or grayscale)."""
        x = np.asarray(raw, dtype=np.float32)
        c = x.shape[-1]
        if self.channel_order == "BGR" and c == 3:
            x = x[..., ::-1]
        return (x * np.float32(self.scale) - self._vec(self.mean, c)) / self._vec(self.std, c)

    def is_affine_per_tensor_scale(self) -> bool:
        """True when Core ML's ImageType (scalar scale, per-channel bias) expresses it exactly."""
        return len(set(float(s) for s in self.std)) <= 1

    def coreml_scale_bias(self, channels: int) -> tuple[float, list[float]]:
        """Scale and per-channel bias for ct.ImageType: y = scale * x + bias."""
        std = float(self._vec(self.std, channels)[0])
        mean = self._vec(self.mean, channels)
        scale = float(self.scale) / std
        bias = [float(-m / std) for m in mean]
        return scale, bias

    def describe(self) -> str:
        return (f"{self.mode}: ({self.channel_order} x * {self.scale:g} - {self.mean}) / {self.std}")


def to_channels(raw: np.ndarray, channels: int) -> np.ndarray:
    """Convert raw HWC pixel arrays (1 or 3 or 4 channels) to ``channels`` channels."""
    x = np.asarray(raw, dtype=np.float32)
    have = x.shape[-1]
    if have == channels:
        return x
    if have == 4:
        x, have = x[..., :3], 3
        if channels == 3:
            return x
    if have == 3 and channels == 1:
        w = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2 luma, as PIL's "L"
        return (x @ w)[..., None]
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    raise UserError(f"cannot convert {have}-channel images to {channels} channels",
                    "Give images with 1 or 3 channels")
