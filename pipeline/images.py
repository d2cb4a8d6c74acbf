"""Reading images from disk, and scikit-learn's digits as images: shared by calibration and eval.

Everything returns raw pixels as float32 0-255, (H, W, C) per image, at the size asked for;
preprocessing is applied later by the model's own ``Preprocessing``. numpy + Pillow
(+ scikit-learn for the digits): no TensorFlow.

digits: scikit-learn's 1,797 real 8x8 handwritten digits (0-16 intensities), scaled to 0-255 and
upscaled with Pillow's bilinear filter. One fixed, stratified split
(``train_test_split(test_size=0.25, random_state=0, stratify=target)``): calibration draws from
the 1,347 train images, ``edgepipe eval --data digits`` uses the 450 test images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.preprocessing import to_channels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "test", "all")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders left out), sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_image(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file -> (H, W, C) float32 0-255 (gray for 1 channel, else RGB)."""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        im = im.resize((width, height), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[..., None]
    return a


# --------------------------------------------------------------------------- digits
def load_digits() -> Any:
    """scikit-learn's digits bunch (scikit-learn is a deferred heavy import: see base/lazy.py)."""
    return lazy.sklearn_datasets().load_digits()


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) into sklearn's load_digits(), fixed and stratified."""
    train_test_split = lazy.sklearn_model_selection().train_test_split
    y = load_digits().target
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y)
    return tr, te


def digits_indices(split: str) -> np.ndarray:
    """Indices into load_digits() of a split: train | test | all."""
    if split not in DIGITS_SPLITS:
        raise UserError(f"unknown digits split '{split}'", "Use train, test or all")
    if split == "all":
        return np.arange(len(load_digits().target))
    tr, te = digits_split()
    return tr if split == "train" else te


def digit_pixels(images: np.ndarray) -> np.ndarray:
    """sklearn's 0-16 digit images -> uint8 0-255."""
    return (np.asarray(images) * (255.0 / 16.0)).astype(np.uint8)


def digits_images(idx: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """The digits at ``idx`` upscaled to (N, H, W, C) float32 0-255 (gray repeated for RGB)."""
    out = np.empty((len(idx), height, width, 1), np.float32)
    for i, img in enumerate(digit_pixels(load_digits().images[idx])):
        im = Image.fromarray(img, "L").resize((width, height), Image.Resampling.BILINEAR)
        out[i, ..., 0] = np.asarray(im, np.float32)
    return to_channels(out, channels)


def digits_arrays(split: str, height: int, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (N, H, W, C) float32 0-255 and labels of a digits split (train | test | all)."""
    idx = digits_indices(split)
    return digits_images(idx, height, width, channels), load_digits().target[idx].astype(np.int64)


def write_digits_folder(dest: str | Path, split: str = "test") -> Path:
    """Write a digits split as an ImageFolder of 8x8 grayscale PNGs (DEST/<digit>/<index>.png).

    Loading it with the folder reader gives exactly the pixels of the built-in `digits` set.
    """
    dest = Path(dest)
    d = load_digits()
    idx = digits_indices(split)
    for k in range(10):
        (dest / str(k)).mkdir(parents=True, exist_ok=True)
    for i, img in zip(idx, digit_pixels(d.images[idx])):
        Image.fromarray(img, "L").save(dest / str(int(d.target[i])) / f"{int(i):04d}.png")
    return dest
