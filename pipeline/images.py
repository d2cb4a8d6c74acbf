"""Finding and decoding image files (calibration folders, labelled sets). numpy + Pillow only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden files and folders are skipped."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_image(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """(H, W, C) float32 pixels 0-255, resized bilinearly, gray (C=1) or RGB (C=3)."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        im = im.resize((width, height), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    return a
