"""Real trained models of the fragile families for the int8 fidelity tests and benchmark.

``digits_xception``: a small Xception-style network on scikit-learn's digits, 3-channel 32 px,
preprocessing ``tf`` (x / 127.5 - 1): a separable-conv entry block with a strided 1x1 shortcut,
a middle block with an identity residual add (ReLU, as in Xception), a separable exit conv,
then average- and max-pooled features concatenated (a concat of two very different ranges)
into a softmax over 10 classes. Trained to >= 95% top-1 on the digits test split in ~30-40 s on
2 cores.

Every test session trains its models afresh into a temporary folder (``train_into``): nothing
depends on what an earlier run left in a cache.

``break_channel``: scale one channel of a BatchNormalization layer (its gamma and beta, i.e. the
folded weights and bias of the conv before it) by ``factor`` and divide the matching input
channel of every consumer after the ReLU by it, so the float model computes the same function
(ReLU is positively homogeneous) while that layer's int8 activation range is set by one loud
channel.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from digits_model import shift_images  # tests/ is on sys.path (pytest, benchmarks/bench_int8.py)

INPUT_SIZE = 32
CHANNELS = 3
SEED = 0
EPOCHS = 14
MIN_ACCURACY = 0.95
PREPROCESS = "tf"


def build_xception(keras):
    L = keras.layers
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, CHANNELS), name="image")
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    short = L.Conv2D(48, 1, strides=2, use_bias=False, name="entry_short")(x)
    short = L.BatchNormalization(name="entry_short_bn")(short)
    y = L.SeparableConv2D(32, 3, padding="same", use_bias=False, name="entry_sep1")(x)
    y = L.BatchNormalization(name="entry_sep1_bn")(y)
    y = L.ReLU(name="entry_sep1_relu")(y)
    y = L.SeparableConv2D(48, 3, padding="same", use_bias=False, name="entry_sep2")(y)
    y = L.BatchNormalization(name="entry_sep2_bn")(y)
    y = L.MaxPooling2D(3, strides=2, padding="same", name="entry_pool")(y)
    x = L.Add(name="entry_add")([y, short])
    y = L.ReLU(name="mid_relu1")(x)
    y = L.SeparableConv2D(48, 3, padding="same", use_bias=False, name="mid_sep1")(y)
    y = L.BatchNormalization(name="mid_sep1_bn")(y)
    y = L.ReLU(name="mid_relu2")(y)
    y = L.SeparableConv2D(48, 3, padding="same", use_bias=False, name="mid_sep2")(y)
    y = L.BatchNormalization(name="mid_sep2_bn")(y)
    x = L.Add(name="mid_add")([x, y])
    x = L.SeparableConv2D(96, 3, strides=2, padding="same", use_bias=False, name="exit_sep")(x)
    x = L.BatchNormalization(name="exit_bn")(x)
    x = L.ReLU(name="exit_relu")(x)
    avg = L.GlobalAveragePooling2D(name="gap")(x)
    mx = L.GlobalMaxPooling2D(name="gmp")(x)
    x = L.Concatenate(name="pool_concat")([avg, mx])
    x = L.Dropout(0.2, name="dropout")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name="digits_xception")


def train_xception(dest: Path) -> dict:
    """Train the Xception-style model and save it as ``dest`` (.keras); returns facts."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from edgepipe.pipeline.datasets import digits_arrays

    t0 = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    xtr, ytr = digits_arrays("train", INPUT_SIZE, INPUT_SIZE, CHANNELS)
    xte, yte = digits_arrays("test", INPUT_SIZE, INPUT_SIZE, CHANNELS)
    xtr, xte = xtr / 127.5 - 1.0, xte / 127.5 - 1.0  # --preprocess tf
    model = build_xception(keras)
    steps = EPOCHS * int(np.ceil(len(xtr) / 32))
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(SEED)
    for _ in range(EPOCHS):
        model.fit(shift_images(xtr, rng), ytr, batch_size=32, epochs=1, shuffle=True, verbose=0)
    acc = float(np.mean(model.predict(xte, batch_size=128, verbose=0).argmax(1) == yte))
    if acc < MIN_ACCURACY:
        raise RuntimeError(f"digits_xception reached only {acc:.3f} test accuracy (< {MIN_ACCURACY})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    model.save(dest)
    info = {"test_accuracy": acc, "train_seconds": round(time.perf_counter() - t0, 1),
            "params": int(model.count_params())}
    dest.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


def _consumers(model, layer_name: str) -> list:
    """Layers that take ``layer_name``'s output as input (functional models)."""
    out = []
    for layer in model.layers:
        for node in getattr(layer, "_inbound_nodes", []):
            parents = [t._keras_history[0].name for t in node.input_tensors]
            if layer_name in parents:
                out.append(layer)
    return out


def break_channel(model, bn_name: str, channel: int, factor: float = 50.0):
    """Scale one channel of ``bn_name`` (followed by a ReLU) and compensate in its consumers."""
    import keras

    bn = model.get_layer(bn_name)
    gamma, beta, mean, var = [w.copy() for w in bn.get_weights()]
    gamma[channel] *= factor
    beta[channel] *= factor
    bn.set_weights([gamma, beta, mean, var])
    relus = [c for c in _consumers(model, bn_name) if isinstance(c, keras.layers.ReLU)]
    if len(relus) != 1 or relus[0].max_value is not None:
        raise ValueError(f"{bn_name} must feed exactly one plain ReLU")
    for c in _consumers(model, relus[0].name):
        w = [a.copy() for a in c.get_weights()]
        if isinstance(c, keras.layers.SeparableConv2D):
            w[0][:, :, channel, :] /= factor
        elif isinstance(c, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            w[0][:, :, channel, :] /= factor
        elif isinstance(c, keras.layers.Dense):
            w[0][channel, :] /= factor
        else:
            raise ValueError(f"cannot compensate in {type(c).__name__} {c.name}")
        c.set_weights(w)
    return model


def train_into(folder: Path) -> dict[str, Path]:
    """Both fidelity models trained into ``folder``: {"digits_cnn": path, "digits_xception": path}."""
    from digits_model import train as train_digits_cnn

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"digits_cnn": folder / "digits_cnn.keras", "digits_xception": folder / "digits_xception.keras"}
    if not paths["digits_cnn"].is_file():
        train_digits_cnn(paths["digits_cnn"])
    if not paths["digits_xception"].is_file():
        train_xception(paths["digits_xception"])
    return paths


if __name__ == "__main__":
    import sys
    import tempfile

    d = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    t = time.perf_counter()
    p = d / "digits_xception.keras"
    print(train_xception(p), p, f"{time.perf_counter() - t:.1f} s")
