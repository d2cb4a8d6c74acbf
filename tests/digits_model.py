"""A real trained model for the accuracy tests: a small MobileNet-style CNN on sklearn's digits.

Architecture: 3x3 stride-2 conv stem, four depthwise-separable blocks (depthwise 3x3 + BN + ReLU6,
pointwise 1x1 + BN + ReLU6), global average pooling, dropout, softmax over 10 classes. Input
32x32x1 grayscale; preprocessing `unit` (x / 255), i.e. export with `--preprocess unit`.

Trained on the digits *train* split of ``edgepipe.pipeline.images`` (the same upscaling eval
uses), with a fixed seed. It reaches ~98% top-1 on the test split in ~15-30 s on 2 cores and is
cached as a .keras file in ``$EDGEPIPE_CACHE_DIR/test-models`` (else ``~/.cache/edgepipe/test-models``)
under a name that hashes this file and the TensorFlow/Keras versions. Under pytest, conftest.py points
$EDGEPIPE_CACHE_DIR at the session's temp dir, so it is trained once per test session and no test
depends on what an earlier run left behind.

    from digits_model import digits_model_path   # tests/ is on sys.path under pytest
    path = digits_model_path()                   # trains on the first call only

Run directly (``python tests/digits_model.py``) to train (if needed) and print the accuracy.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

INPUT_SIZE = 32
CHANNELS = 1
SEED = 0
EPOCHS = 30
MIN_ACCURACY = 0.95


def cache_dir() -> Path:
    env = os.environ.get("EDGEPIPE_CACHE_DIR")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe"
    return root / "test-models"


def code_hash() -> str:
    from importlib import metadata

    h = hashlib.sha256(Path(__file__).read_bytes())
    for dist in ("keras", "tensorflow-cpu", "tensorflow"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()[:16]


def build(keras):
    L = keras.layers
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, CHANNELS), name="image")
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    for i, (filters, stride) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2)]):
        x = L.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"dw{i}")(x)
        x = L.BatchNormalization(name=f"dw{i}_bn")(x)
        x = L.ReLU(6.0, name=f"dw{i}_relu")(x)
        x = L.Conv2D(filters, 1, use_bias=False, name=f"pw{i}")(x)
        x = L.BatchNormalization(name=f"pw{i}_bn")(x)
        x = L.ReLU(6.0, name=f"pw{i}_relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="digits_mobilenet")


def shift_images(x, rng, max_shift=2):
    """Random translations by up to max_shift pixels (zero fill): cheap augmentation."""
    import numpy as np

    out = np.zeros_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        src = x[i, max(0, -dy):x.shape[1] - max(0, dy), max(0, -dx):x.shape[2] - max(0, dx)]
        out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def train(dest: Path) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from edgepipe.pipeline.images import digits_arrays

    t0 = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    xtr, ytr = digits_arrays("train", INPUT_SIZE, INPUT_SIZE, CHANNELS)
    xte, yte = digits_arrays("test", INPUT_SIZE, INPUT_SIZE, CHANNELS)
    xtr, xte = xtr / 255.0, xte / 255.0  # --preprocess unit
    model = build(keras)
    steps = EPOCHS * int(np.ceil(len(xtr) / 32))
    sched = keras.optimizers.schedules.CosineDecay(3e-3, steps)
    model.compile(optimizer=keras.optimizers.Adam(sched), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    rng = np.random.default_rng(SEED)
    for _ in range(EPOCHS):
        model.fit(shift_images(xtr, rng), ytr, batch_size=32, epochs=1, shuffle=True, verbose=0)
    acc = float(np.mean(model.predict(xte, batch_size=128, verbose=0).argmax(1) == yte))
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"digits model reached only {acc:.3f} test accuracy (< {MIN_ACCURACY})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{os.getpid()}-{dest.name}")
    model.save(tmp)
    os.replace(tmp, dest)
    info = {"test_accuracy": acc, "train_seconds": round(time.perf_counter() - t0, 1),
            "params": int(model.count_params())}
    dest.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


def digits_model_path() -> Path:
    """The cached .keras file, trained first if it is not there yet."""
    dest = cache_dir() / f"digits_mobilenet-{code_hash()}.keras"
    if not dest.is_file():
        train(dest)
    return dest


if __name__ == "__main__":
    t = time.perf_counter()
    p = digits_model_path()
    info = json.loads(p.with_suffix(".json").read_text()) if p.with_suffix(".json").is_file() else {}
    print(p, info, f"{time.perf_counter() - t:.1f} s")
