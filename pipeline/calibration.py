"""Calibration data readers behind one interface (image folder, digits set, random).

Each reader yields raw pixels (N, H, W, C) float32 0-255 at the model's input size and
channel count; preprocessing is applied once, by the model's own Preprocessing.
numpy + Pillow (+ scikit-learn for digits).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.preprocessing import Preprocessing, to_channels
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.images import IMAGE_SUFFIXES, digits_images, digits_split, list_images, load_image


class Reader:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # what it reads, for hints
    registry: ClassVar[dict[str, type["Reader"]]] = {}

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            if cls.name in Reader.registry:
                raise RuntimeError(f"calibration reader '{cls.name}' registered twice")
            Reader.registry[cls.name] = cls

    def __init__(self, location: Optional[str] = None, seed: int = 0):
        self.location = location
        self.seed = seed
        self.skipped = 0

    def validate(self) -> None:
        """Cheap checks before any expensive work."""

    def identity(self) -> dict:
        return {"reader": self.name, "location": self.location, "seed": self.seed}

    def read(self, n: int, height: int, width: int, channels: int) -> np.ndarray:
        raise NotImplementedError


class FolderReader(Reader):
    """Images found recursively under a folder (any common format)."""

    name = "folder"
    summary = "your images"

    def validate(self) -> None:
        p = Path(self.location or "")
        if not p.is_dir():
            raise UserError(f"calibration folder {p} not found", "Give --data a folder of images")
        self.files = list_images(p)
        if not self.files:
            raise UserError(f"no images in {p}",
                            f"Put {', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES[:5])}... files there (searched recursively)")

    def identity(self) -> dict:
        self.validate()
        root = Path(self.location or "")
        listing = [(str(f.relative_to(root)), f.stat().st_size, int(f.stat().st_mtime)) for f in self.files]
        return {"reader": self.name, "location": str(root.resolve()), "seed": self.seed,
                "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}

    def read(self, n: int, height: int, width: int, channels: int) -> np.ndarray:
        self.validate()
        files = list(self.files)
        if len(files) > n:  # a deterministic sample spread over the whole folder
            rng = np.random.default_rng(self.seed)
            files = [files[i] for i in sorted(rng.choice(len(files), size=n, replace=False))]
        out = []
        for f in files:
            try:
                out.append(load_image(f, height, width, channels))
            except Exception:
                self.skipped += 1
        if not out:
            raise UserError(f"none of the {len(files)} images in {self.location} could be decoded",
                            "Check the files are valid images")
        return np.stack(out)


class DigitsReader(Reader):
    """scikit-learn's real 8x8 handwritten digits, upscaled to the model's input.

    Calibration draws from the fixed train split only, so that `edgepipe eval --data digits`
    (the test split) never sees an image the int8 ranges were calibrated on.
    """

    name = "digits"
    summary = "scikit-learn's handwritten digits"

    def read(self, n: int, height: int, width: int, channels: int) -> np.ndarray:
        train, _ = digits_split()
        rng = np.random.default_rng(self.seed)
        return digits_images(rng.permutation(train)[:n], height, width, channels)


class RandomReader(Reader):
    """Uniform random pixels. Only on request: int8 calibrated on noise is usually poor."""

    name = "random"
    summary = "noise"

    def read(self, n: int, height: int, width: int, channels: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, 256, size=(n, height, width, channels)).astype(np.float32)  # whole pixel values, like decoded images


def calib_sources() -> list[str]:
    """The calibration sources ``--calib NAME`` offers (every reader but the folder one)."""
    return [k for k in Reader.registry if k != FolderReader.name]


def calib_hint() -> str:
    """How to give calibration data, naming every source."""
    offline = " or ".join(f"--calib {k} ({Reader.registry[k].summary})" for k in calib_sources())
    return f"Give --data DIR (images like the ones the model will see), or {offline}"


def make_reader(data: Optional[str], calib: Optional[str], seed: int = 0) -> Optional[Reader]:
    """--data DIR -> folder reader; --calib NAME -> that reader; neither -> None."""
    names = "|".join(calib_sources())
    if data and calib and calib != "folder":
        raise UserError(f"--data and --calib {calib} both given", f"Use one: --data DIR or --calib {names}")
    if data:
        r: Reader = FolderReader(data, seed)
    elif calib:
        if calib not in Reader.registry or calib == "folder":
            raise UserError(f"unknown calibration source '{calib}'", f"Use --data DIR or --calib {names}")
        r = Reader.registry[calib](None, seed)
    else:
        return None
    r.validate()
    return r


def calibrate(reader: Reader, n: int, input_shape: Sequence[int], pp: Preprocessing) -> Calibration:
    _, h, w, c = input_shape
    raw = reader.read(n, h, w, c).astype(np.float32)
    raw = to_channels(raw, c)
    return Calibration(raw=raw, data=pp.apply(raw).astype(np.float32), source=reader.name,
                       location=reader.location, skipped=reader.skipped)
