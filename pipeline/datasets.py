"""Labelled image sets for `edgepipe eval`: an ImageFolder directory, or the built-in `digits` set.

Both give raw pixels (N, H, W, C) float32 0-255 at the model's input size and channel count,
plus one model class index per image. Preprocessing is applied later by the model's own
``Preprocessing`` (the same one the export recorded), so every artifact sees exactly what the
source model saw. numpy + Pillow (+ scikit-learn for digits): no TensorFlow.

ImageFolder
    ``DIR/<class>/<image>`` (images searched recursively inside each class folder). Class
    folders map to model class indices in this order of preference:
      1. ``--labels-map FILE``: JSON ``{"folder": index}`` or text lines ``folder index``
         (separators: space, tab, ``,``, ``:`` or ``=``; ``#`` starts a comment);
      2. the model's labels (``--labels`` at export), when every folder name is one of them;
      3. sorted folder names -> 0..K-1, which needs exactly as many folders as the model has
         outputs.
    Files that fail to decode are skipped and counted; if none decode it is an error.

digits
    scikit-learn's 1,797 real 8x8 handwritten digits (0-16 intensities), scaled to 0-255,
    upscaled with Pillow's bilinear filter to the model's input size, converted to its channel
    count (gray repeated for RGB). Split: ``train_test_split(test_size=0.25, random_state=0,
    stratify=target)`` -> 1,347 train / 450 test images. Eval uses the test split; the test
    model in ``tests/digits_model.py`` trains on the train split.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgepipe.pipeline.images import list_images, load_image
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.preprocessing import Preprocessing, to_channels

DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0
DIGITS_CLASSES = [str(i) for i in range(10)]
DEFAULT_MIN_SAMPLES = 100
BUILTIN_SETS = ("digits",)


@dataclass
class LabelledSet:
    raw: np.ndarray  # (N, H, W, C) float32 pixels 0-255
    labels: np.ndarray  # (N,) int64 model class indices
    source: str  # digits | folder
    location: Optional[str] = None
    split: Optional[str] = None
    class_names: list[str] = field(default_factory=list)  # data class names, in data order
    class_index: dict[str, int] = field(default_factory=dict)  # data class name -> model index
    mapping: str = "sorted"  # sorted | labels-map | model-labels
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    available: int = 0  # images in the set before --limit

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def data(self, pp: Preprocessing) -> np.ndarray:
        return pp.apply(self.raw).astype(np.float32)

    @cached_property
    def hash(self) -> str:
        """Content hash of the images (at the model's input size) and their labels."""
        h = hashlib.sha256()
        h.update(json.dumps({"shape": list(self.raw.shape), "labels": int(self.labels.shape[0])}).encode())
        h.update(np.ascontiguousarray(self.raw, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "location": self.location, "split": self.split, "samples": self.n,
                "available": self.available, "skipped": self.skipped, "skipped_files": self.skipped_files[:10],
                "classes": len(self.class_names), "mapping": self.mapping, "hash": self.hash}


# --------------------------------------------------------------------------- digits
def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices) into sklearn's load_digits(), fixed and stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y)
    return tr, te


def digit_pixels(images: np.ndarray) -> np.ndarray:
    """sklearn's 0-16 digit images -> uint8 0-255 (as the calibration `digits` reader does)."""
    return (np.asarray(images) * (255.0 / 16.0)).astype(np.uint8)


def digits_arrays(split: str, height: int, width: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (N, H, W, C) float32 0-255 and labels of a digits split (train | test | all)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise UserError(f"unknown digits split '{split}'", "Use train, test or all")
    d = load_digits()
    tr, te = digits_split()
    idx = {"train": tr, "test": te, "all": np.arange(len(d.target))}[split]
    px = digit_pixels(d.images[idx])
    out = np.empty((len(idx), height, width, 1), np.float32)
    for i, img in enumerate(px):
        im = Image.fromarray(img, "L").resize((width, height), Image.BILINEAR)
        out[i, ..., 0] = np.asarray(im, np.float32)
    return to_channels(out, channels), d.target[idx].astype(np.int64)


def write_digits_folder(dest: str | Path, split: str = "test") -> Path:
    """Write a digits split as an ImageFolder of 8x8 grayscale PNGs (DEST/<digit>/<index>.png).

    Loading it with the folder reader gives exactly the pixels of the built-in `digits` set.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    dest = Path(dest)
    d = load_digits()
    tr, te = digits_split()
    idx = {"train": tr, "test": te, "all": np.arange(len(d.target))}[split]
    px = digit_pixels(d.images[idx])
    for k in range(10):
        (dest / str(k)).mkdir(parents=True, exist_ok=True)
    for i, img in zip(idx, px):
        Image.fromarray(img, "L").save(dest / str(int(d.target[i])) / f"{int(i):04d}.png")
    return dest


# --------------------------------------------------------------------------- class mapping
def read_labels_map(path: str | Path) -> dict[str, int]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"labels map {p} not found", "Give --labels-map a JSON or text file mapping folder names to class indices")
    text = p.read_text()
    bad = UserError(f"cannot read labels map {p}",
                    'Write JSON {"cat": 281, ...} or one "folder index" pair per line')
    out: dict[str, int] = {}
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
            out = {str(k): int(v) for k, v in d.items()}
        except (ValueError, TypeError, AttributeError):
            raise bad from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"^(.*?)\s*[\s,:=]\s*(-?\d+)$", line)
            if not m or not m.group(1):
                raise UserError(f"labels map {p} line {n}: '{line}' is not 'folder index'",
                                'Write one "folder index" pair per line (or a JSON object)')
            out[m.group(1).strip().strip('"')] = int(m.group(2))
    if not out:
        raise UserError(f"labels map {p} is empty", 'Write one "folder index" pair per line')
    return out


def map_classes(class_names: Sequence[str], num_classes: int, labels_map: Optional[dict[str, int]] = None,
                model_labels: Optional[Sequence[str]] = None, what: str = "the data") -> tuple[dict[str, int], str]:
    """Data class name -> model class index, and how it was decided."""
    names = list(class_names)
    if labels_map is not None:
        missing = [c for c in names if c not in labels_map]
        if missing:
            raise UserError(f"the labels map has no entry for {len(missing)} class(es) of {what}: {', '.join(missing[:5])}",
                            "Add a 'folder index' line for each class folder")
        bad = {c: labels_map[c] for c in names if not 0 <= labels_map[c] < num_classes}
        if bad:
            c, v = next(iter(bad.items()))
            raise UserError(f"the labels map sends '{c}' to class {v}, but the model has {num_classes} outputs (0-{num_classes - 1})",
                            "Fix the index in the labels map")
        return {c: int(labels_map[c]) for c in names}, "labels-map"
    if model_labels and all(c in model_labels for c in names):
        labels = list(model_labels)
        if len(labels) == num_classes:
            return {c: labels.index(c) for c in names}, "model-labels"
    if len(names) != num_classes:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"{what} has {len(names)} classes ({shown}) but the model outputs {num_classes} classes",
                        "Give --labels-map FILE mapping each class folder to the model's class index")
    return {c: i for i, c in enumerate(names)}, "sorted"


# --------------------------------------------------------------------------- loading
def check_spec(spec: str) -> None:
    """Cheap validation of --data before any expensive work."""
    if not spec:
        raise UserError("no eval data given", "Give --data DIR (one subfolder per class) or --data digits")
    if spec in BUILTIN_SETS:
        return
    p = Path(spec)
    if not p.exists():
        raise UserError(f"eval data {p} not found", "Give --data an ImageFolder directory (DIR/<class>/<image>) or 'digits'")
    if not p.is_dir():
        raise UserError(f"eval data {p} is not a folder", "Give --data an ImageFolder directory (DIR/<class>/<image>) or 'digits'")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def load_labelled(spec: str, input_shape: Sequence[int], num_classes: Optional[int], *,
                  labels_map: Optional[str | Path] = None, model_labels: Optional[Sequence[str]] = None,
                  limit: Optional[int] = None, min_samples: int = DEFAULT_MIN_SAMPLES,
                  seed: int = 0) -> LabelledSet:
    """Load a labelled set at the model's input size. ``spec`` is a folder or 'digits'."""
    check_spec(spec)
    if limit is not None and limit < 1:
        raise UserError(f"bad --limit {limit}", "Give a positive number of images")
    if min_samples < 1:
        raise UserError(f"bad --min-samples {min_samples}", "Give a positive number")
    if limit is not None and limit < min_samples:
        raise UserError(f"--limit {limit} is below the minimum eval set size ({min_samples})",
                        f"Raise --limit, or lower --min-samples to {limit} if a noisier figure is acceptable")
    if not num_classes or num_classes < 2:
        raise UserError("the model is not a classifier (its output is not a (1, K) class vector)",
                        "edgepipe eval measures top-1/top-5 accuracy of image classifiers")
    _, h, w, c = [int(x) for x in input_shape]
    lmap = read_labels_map(labels_map) if labels_map else None

    if spec in BUILTIN_SETS:
        index, mode = map_classes(DIGITS_CLASSES, num_classes, lmap, model_labels, what="the digits set")
        raw, y = digits_arrays("test", h, w, c)
        labels = np.array([index[str(int(v))] for v in y], np.int64)
        available = len(labels)
        if limit is not None and limit < available:
            raw, labels = raw[:limit], labels[:limit]  # the split is already shuffled and stratified
        ds = LabelledSet(raw, labels, "digits", None, "test", DIGITS_CLASSES, index, mode, 0, [], available)
        _check_size(ds, min_samples)
        return ds

    root = Path(spec)
    dirs = _class_dirs(root)
    if not dirs:
        loose = list_images(root)
        if loose:
            raise UserError(f"{root} holds {len(loose)} images but no class subfolders",
                            f"Arrange them as {root}/<class>/<image> (one subfolder per class)")
        raise UserError(f"no images in {root}", f"Put images in {root}/<class>/ folders (one per class)")
    names = [d.name for d in dirs]
    index, mode = map_classes(names, num_classes, lmap, model_labels, what=str(root))
    files: list[tuple[Path, int]] = []
    for d in dirs:
        files.extend((f, index[d.name]) for f in list_images(d))
    if not files:
        raise UserError(f"no images in the {len(dirs)} class folders of {root}",
                        "Put .jpg/.png/... images in each class folder")
    available = len(files)
    if available < min_samples:
        raise UserError(f"{root} has {available} images, fewer than the minimum eval set size ({min_samples})",
                        _small_hint(available))
    if limit is not None and limit < available:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(available, size=limit, replace=False))]
    raw, labels, skipped = [], [], []
    for f, k in files:
        try:
            raw.append(load_image(f, h, w, c))
            labels.append(k)
        except Exception:
            skipped.append(str(f.relative_to(root)))
    if not raw:
        raise UserError(f"none of the {len(files)} images in {root} could be decoded",
                        f"Check the files are valid images (first: {skipped[0]})")
    ds = LabelledSet(np.stack(raw).astype(np.float32), np.asarray(labels, np.int64), "folder",
                     str(root.resolve()), None, names, index, mode, len(skipped), skipped, available)
    _check_size(ds, min_samples)
    return ds


def _small_hint(n: int) -> str:
    if n < 1:
        return "Add labelled images"
    return (f"Add images, or lower --min-samples (one image of {n} moves accuracy by "
            f"{100.0 / n:.2g} points, so small sets make drops noisy)")


def _check_size(ds: LabelledSet, min_samples: int) -> None:
    if ds.n < min_samples:
        extra = f" after skipping {ds.skipped} that failed to decode" if ds.skipped else ""
        raise UserError(f"the eval set has {ds.n} images{extra}, fewer than the minimum ({min_samples})",
                        _small_hint(ds.n))
