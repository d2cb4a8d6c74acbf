"""Model sources: built-in Keras applications by name, or a user's .keras / .h5 / SavedModel.

`resolve()` validates a request without importing TensorFlow (milliseconds);
`load()` builds or loads the model (imports TensorFlow lazily).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.manifest import SourceModel
from edgepipe.pipeline.base.preprocessing import Preprocessing
from edgepipe.pipeline.base.records import LoadedModel
from edgepipe.pipeline.base.util import sha256_file

DEFAULT_SEED = 0


@dataclass(frozen=True)
class Builtin:
    name: str
    keras_name: str  # attribute of keras.applications
    default_size: int
    min_size: int
    preprocess: str  # the Keras preprocess_input mode
    alphas: tuple = ()
    extra_kwargs: tuple = ()


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("vgg16", "VGG16", 224, 32, "caffe"),
        Builtin("vgg19", "VGG19", 224, 32, "caffe"),
        Builtin("resnet50", "ResNet50", 224, 32, "caffe"),
        Builtin("inception_v3", "InceptionV3", 299, 75, "tf"),
        Builtin("xception", "Xception", 299, 71, "tf"),
        Builtin("mobilenet", "MobileNet", 224, 32, "tf", (0.25, 0.5, 0.75, 1.0)),
        Builtin("mobilenet_v2", "MobileNetV2", 224, 32, "tf", (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
        # MobileNetV3 carries its preprocessing as layers: it takes raw 0-255 pixels.
        Builtin("mobilenet_v3_small", "MobileNetV3Small", 224, 32, "none", (0.75, 1.0),
                (("include_preprocessing", True),)),
        Builtin("mobilenet_v3_large", "MobileNetV3Large", 224, 32, "none", (0.75, 1.0),
                (("include_preprocessing", True),)),
    ]
}
SEED_MODELS = ("vgg16", "vgg19", "resnet50", "inception_v3", "xception", "mobilenet")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class ModelRequest:
    """What the user asked for, validated. Cheap to build; no TensorFlow."""

    source: str  # built-in name or path
    kind: str  # builtin | keras | h5 | savedmodel
    weights: str = "imagenet"  # imagenet | none | PATH (built-ins)
    input_size: Optional[tuple[int, int]] = None
    alpha: Optional[float] = None
    classes: Optional[int] = None
    seed: int = DEFAULT_SEED
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    labels: Optional[list[str]] = None
    path: Optional[Path] = None
    trust: bool = False  # allow Keras to deserialize Python lambdas (runs code from the file)

    @property
    def name(self) -> str:
        if self.kind == "builtin":
            return self.source
        p = Path(self.source)
        stem = p.name if p.is_dir() else p.stem
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "model"

    def identity(self) -> dict:
        """What determines the model's weights: used for the cache key and the manifest."""
        d = {"kind": self.kind, "source": self.source, "weights": self.weights, "seed": self.seed,
             "input_size": self.input_size, "alpha": self.alpha, "classes": self.classes,
             "preprocessing": self.preprocessing.to_dict(), "labels": self.labels}
        if self.path is not None:
            d["sha256"] = sha256_file(self.path)
            d["source"] = str(self.path.name)
        if self.kind == "builtin" and self.weights not in ("imagenet", "none"):
            d["weights_sha256"] = sha256_file(self.weights)
        return d


def _parse_size(input_size: Optional[str | int]) -> Optional[tuple[int, int]]:
    if input_size in (None, ""):
        return None
    s = str(input_size).lower().replace("x", ",")
    try:
        parts = [int(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"bad --input-size '{input_size}'", "Give one number (224) or HxW (224x160)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UserError(f"bad --input-size '{input_size}'", "Give one number (224) or HxW (224x160)")
    return (parts[0], parts[1])


def resolve(
    source: str,
    weights: str = "imagenet",
    input_size: Optional[str | int] = None,
    alpha: Optional[float] = None,
    classes: Optional[int] = None,
    preprocess: Optional[str] = None,
    mean: Optional[list[float]] = None,
    std: Optional[list[float]] = None,
    scale: Optional[float] = None,
    seed: int = DEFAULT_SEED,
    labels_file: Optional[str] = None,
    trust: bool = False,
) -> ModelRequest:
    size = _parse_size(input_size)
    labels = _read_labels(labels_file) if labels_file else None
    key = source.lower().replace("-", "_")
    if key in BUILTINS:
        b = BUILTINS[key]
        w = _check_builtin(b, weights, size, alpha, classes)
        pp = Preprocessing.from_mode(preprocess or b.preprocess, mean, std, scale)
        return ModelRequest(b.name, "builtin", w, size, alpha, classes, seed, pp, labels)
    kind = _file_kind(source)
    if classes is not None:
        raise UserError("--classes applies to built-in models only", "Drop --classes for a model file")
    if alpha is not None:
        raise UserError("--alpha applies to built-in models only", "Drop --alpha for a model file")
    p = Path(source)
    pp = Preprocessing.from_mode(preprocess or "none", mean, std, scale)
    return ModelRequest(str(p), kind, "file", size, None, None, seed, pp, labels, path=p.resolve(), trust=trust)


def _check_builtin(b: Builtin, weights: Optional[str], size: Optional[tuple[int, int]], alpha: Optional[float],
                   classes: Optional[int]) -> str:
    """The validated --weights of a built-in (imagenet | none | a weights file)."""
    w = (weights or "imagenet")
    if w.lower() in ("imagenet", "none"):
        w = w.lower()
    elif not Path(w).is_file():
        raise UserError(f"weights file {w} not found", "Give --weights imagenet, none, or an existing .h5/.weights.h5 file")
    if classes is not None and w == "imagenet":
        raise UserError("--classes only applies with --weights none or a weights file",
                        "ImageNet weights have 1000 classes; add --weights none to change it")
    if classes is not None and classes < 1:
        raise UserError(f"bad --classes {classes}", "Give a positive number of classes")
    if alpha is not None and not b.alphas:
        raise UserError(f"{b.name} has no --alpha", "Drop --alpha (it applies to the MobileNet family)")
    if alpha is not None and alpha not in b.alphas:
        raise UserError(f"{b.name} has no alpha {alpha}", f"Use one of: {', '.join(map(str, b.alphas))}")
    if size is not None and min(size) < b.min_size:
        raise UserError(f"{b.name} needs an input of at least {b.min_size}px, got {size[0]}x{size[1]}",
                        f"Use --input-size {b.min_size} or larger")
    return w


def _file_kind(source: str) -> str:
    """keras | h5 | savedmodel for a model path, or a UserError naming what is wrong."""
    p = Path(source)
    if not p.exists():
        if os.sep in source or p.suffix.lower() in (".keras", ".h5", ".hdf5"):
            raise UserError(f"unknown model '{source}': no such file", "Check the path, or give a built-in name "
                                                               f"({', '.join(BUILTINS)})")
        near = difflib.get_close_matches(source.lower(), list(BUILTINS), n=1, cutoff=0.75)
        guess = f"Did you mean '{near[0]}'? " if near else ""
        raise UserError(
            f"unknown model '{source}': not a built-in name and no such file",
            f"{guess}Use one of: {', '.join(BUILTINS)}, or a .keras/.h5 file or SavedModel folder",
        )
    if p.is_dir():
        if not (p / "saved_model.pb").exists():
            raise UserError(f"{p} is a folder but not a SavedModel (no saved_model.pb)",
                            "Give a SavedModel folder, a .keras or .h5 file, or a built-in name")
        kind = "savedmodel"
    elif p.suffix.lower() == ".keras":
        kind = "keras"
    elif p.suffix.lower() in (".h5", ".hdf5"):
        kind = "h5"
    else:
        raise UserError(f"{p.name}: unsupported model file type '{p.suffix}'",
                        "Give a .keras or .h5 file, or a SavedModel folder")
    return kind


def _read_labels(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"labels file {p} not found", "Give a text file with one class name per line")
    labels = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if not labels:
        raise UserError(f"labels file {p} is empty", "Give a text file with one class name per line")
    return labels


# --------------------------------------------------------------------------- loading
def _missing_weights_error(e: Exception, b: Builtin) -> UserError:
    msg = str(e)
    m = re.search(r"([A-Za-z0-9_.\-]+\.h5)", msg)
    fname = m.group(1) if m else f"{b.keras_name} ImageNet weights"
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    return UserError(
        f"cannot get ImageNet weights for {b.name} ({fname}): download failed and it is not in {cache}",
        f"Put {fname} in {cache}, or use --weights none (random init) or --weights PATH",
    )


def load(req: ModelRequest) -> LoadedModel:
    keras = lazy.keras()
    if req.kind == "builtin":
        model = _build_builtin(keras, req)
        src = SourceModel(name=req.name, kind="builtin", weights=req.weights, seed=req.seed,
                          trained=req.weights != "none",
                          options={"alpha": req.alpha, "classes": req.classes,
                                   "input_size": list(req.input_size) if req.input_size else None})
        if req.weights not in ("imagenet", "none"):
            src.path = str(Path(req.weights).resolve())
            src.sha256 = sha256_file(req.weights)
        if req.weights == "imagenet" and req.labels is None:
            req.labels = imagenet_labels()
        return _finish(LoadedModel(src, model, req.preprocessing), req)
    if req.kind == "savedmodel":
        return _finish(_load_savedmodel(req), req)
    _check_container(req)
    try:
        model = keras.models.load_model(str(req.path), compile=False, safe_mode=not req.trust)
    except Exception as e:
        if "safe_mode" in str(e) and not req.trust:
            raise UserError(f"{req.path.name} contains a Python lambda layer, which Keras will not load by default",
                            "If you trust the file, pass --trust-model (loading it runs code from the file)") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "Check the file; models with custom layers need them importable"
        if req.kind == "h5" and "model_config" in str(e):
            hint = "This .h5 holds weights only: use a built-in name with --weights PATH"
        raise UserError(f"cannot load model {req.path.name}: {first[:300]}", hint) from e
    src = SourceModel(name=req.name, kind=req.kind, path=str(req.path), sha256=sha256_file(req.path),
                      weights="file", seed=req.seed)
    return _finish(LoadedModel(src, model, req.preprocessing), req)


def imagenet_labels() -> Optional[list[str]]:
    """The 1000 ImageNet class names from Keras' cached index, if it is on disk (no download)."""
    p = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / "imagenet_class_index.json"
    try:
        idx = json.loads(p.read_text())
        return [idx[str(i)][1] for i in range(1000)]
    except (OSError, ValueError, KeyError):
        return None


def _check_container(req: ModelRequest) -> None:
    """Name the problem precisely when a model file is not even the right kind of file."""
    p = req.path
    if req.kind == "keras" and not zipfile.is_zipfile(p):
        raise UserError(f"{p.name} is not a valid .keras file (not a zip archive)",
                        "Re-save the model with model.save('model.keras'), or give the right file")
    if req.kind == "h5":
        with open(p, "rb") as fh:
            head = fh.read(8)
        if head != b"\x89HDF\r\n\x1a\n":
            raise UserError(f"{p.name} is not an HDF5 file", "Give a Keras .h5 model file, a .keras file or a SavedModel folder")


def _build_builtin(keras: Any, req: ModelRequest) -> Any:
    b = BUILTINS[req.source]
    keras.utils.set_random_seed(req.seed)
    size = req.input_size or (b.default_size, b.default_size)
    kw = dict(b.extra_kwargs)
    kw["input_shape"] = (size[0], size[1], 3)
    kw["weights"] = None if req.weights == "none" else req.weights
    if req.classes is not None:
        kw["classes"] = req.classes
    if req.alpha is not None:
        kw["alpha"] = req.alpha
    ctor = getattr(keras.applications, b.keras_name)
    try:
        model = ctor(**kw)
        if req.weights == "none":
            settle_batchnorm(model, req.preprocessing, req.seed)
            temper_logits(model, req.preprocessing, req.seed)
        return model
    except ValueError as e:
        raise UserError(f"{b.name}: {str(e).splitlines()[0]}",
                        "ImageNet weights fix the input size and classes; use --weights none to change them") from e
    except Exception as e:
        if req.weights == "imagenet" and ("fetch" in str(e).lower() or "url" in str(e).lower()
                                          or isinstance(e, (OSError, ConnectionError))):
            raise _missing_weights_error(e, b) from e
        raise


def _load_savedmodel(req: ModelRequest) -> LoadedModel:
    tf = lazy.tensorflow()
    try:
        obj = tf.saved_model.load(str(req.path))
    except Exception as e:
        raise UserError(f"cannot load SavedModel {req.path}: {str(e).splitlines()[0][:300]}",
                        "Check the folder is a complete SavedModel") from e
    sigs = getattr(obj, "signatures", {})
    if "serving_default" not in sigs:
        raise UserError(f"SavedModel {req.path} has no serving_default signature",
                        "Export it with a serving signature (model.export(path) in Keras 3)")
    src = SourceModel(name=req.name, kind="savedmodel", path=str(req.path), sha256=sha256_file(req.path),
                      weights="file", seed=req.seed)
    return LoadedModel(src, obj, req.preprocessing, is_keras=False, saved_model_dir=req.path)


def _finish(lm: LoadedModel, req: ModelRequest) -> LoadedModel:
    """Fill the input/output description of the source model."""
    src = lm.source
    if lm.is_keras:
        m = lm.model
        if len(m.inputs) != 1:
            raise UserError(f"model has {len(m.inputs)} inputs", "edgepipe exports single-input image models")
        shape = list(m.inputs[0].shape)
        src.input_name = _clean_name(getattr(m.inputs[0], "name", None) or "input")
        src.input_dtype = str(getattr(m.inputs[0], "dtype", "float32")).replace("<dtype: '", "").strip("'>")
        src.parameters = int(m.count_params())
    else:
        sig = lm.model.signatures["serving_default"]
        specs = list(sig.structured_input_signature[1].values())
        if len(specs) != 1:
            raise UserError(f"SavedModel signature has {len(specs)} inputs", "edgepipe exports single-input image models")
        shape = [None] + list(specs[0].shape)[1:]
        src.input_name = _clean_name(specs[0].name or "input")
        src.input_dtype = specs[0].dtype.name
    if len(shape) != 4:
        raise UserError(f"model input has shape {shape}, not (batch, height, width, channels)",
                        "edgepipe exports image models with NHWC input")
    h, w, c = shape[1], shape[2], shape[3]
    if req.input_size is not None and lm.source.kind != "builtin":
        if (h is not None and h != req.input_size[0]) or (w is not None and w != req.input_size[1]):
            raise UserError(f"--input-size {req.input_size[0]}x{req.input_size[1]} does not match the model's fixed input {h}x{w}",
                            "Drop --input-size")
        h, w = req.input_size
    if h is None or w is None:
        raise UserError("the model's input height/width are not fixed", "Give --input-size HxW")
    if c not in (1, 3):
        raise UserError(f"model input has {c} channels", "edgepipe handles 1-channel (gray) and 3-channel images")
    src.input_shape = [1, int(h), int(w), int(c)]
    src.preprocessing = lm.preprocessing.to_dict()
    src.labels = req.labels
    return lm


def _clean_name(name: str) -> str:
    name = name.split(":")[0]
    return re.sub(r"[^A-Za-z0-9_]+", "_", name) or "input"


def settle_batchnorm(model: Any, pp: Preprocessing, seed: int, n: int = 8, residual_gain: float = 0.1) -> int:
    """Re-estimate batch-norm statistics of a randomly initialised model.

    Keras' random init keeps BN moving statistics at (0, 1), so activations shrink
    layer after layer (MobileNet at 64px: ~1e-17 at the last block) and the output is
    an exactly uniform softmax: every artifact would "verify" trivially. One forward
    pass in training mode with momentum 0 sets each BN layer's statistics to those of
    a fixed, seeded batch of random images, giving a deterministic model whose outputs
    actually depend on its input. Returns the number of BN layers updated.
    """
    keras = lazy.keras()
    bns = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not bns:
        return 0
    # Residual branches start near identity (as in "zero-init residual" training
    # recipes): a random deep residual net at unit-variance branches is chaotic, i.e.
    # a 0.1% weight change flips its top-1, which no real trained model does.
    for bn in _residual_branch_ends(model, keras):
        if bn.gamma is not None:
            bn.gamma.assign(bn.gamma * residual_gain)
    _, h, w, c = [d if d is not None else 1 for d in model.inputs[0].shape]
    rng = np.random.default_rng(seed)
    x = pp.apply(rng.uniform(0, 255, size=(n, h, w, c)).astype(np.float32))
    saved = [(l, l.momentum) for l in bns]
    try:
        for l, _ in saved:
            l.momentum = 0.0
        model(x, training=True)
    finally:
        for l, m in saved:
            l.momentum = m
    # A channel that barely varies over the settling batch would get a huge gain
    # (1/sigma) and amplify any rounding downstream; floor each variance at the
    # layer's median so no channel is amplified more than a typical one.
    for l in bns:
        v = np.asarray(l.moving_variance)
        l.moving_variance.assign(np.maximum(v, np.median(v)).astype(v.dtype))
    return len(bns)


def _all_layers(model: Any) -> Iterator[Any]:
    for l in model.layers:
        yield l
        if hasattr(l, "layers"):
            yield from _all_layers(l)


def _residual_branch_ends(model: Any, keras: Any) -> list[Any]:
    """BatchNormalization layers whose output feeds an Add, other than through a shortcut conv."""
    out = []
    for layer in _all_layers(model):
        if not isinstance(layer, keras.layers.Add):
            continue
        for node in layer._inbound_nodes:
            for t in node.input_tensors:
                prod = t._keras_history.operation
                if isinstance(prod, keras.layers.BatchNormalization) and "shortcut" not in prod.name \
                        and not prod.name.endswith("_0_bn"):
                    out.append(prod)
    return list(dict.fromkeys(out))


def temper_logits(model: Any, pp: Preprocessing, seed: int, n: int = 8, target_std: float = 2.0) -> float:
    """Scale a random model's last weighted layer so its logits have a standard deviation
    of ``target_std`` across classes.

    A randomly initialised deep classifier often emits logits hundreds of units apart:
    its softmax is one-hot and any rounding flips it, which says nothing about the
    converter. Real trained models sit at a few units. Returns the factor applied.
    """
    last = None
    for l in reversed(list(_all_layers(model))):
        if getattr(l, "kernel", None) is not None and hasattr(l, "bias"):
            last = l
            break
    if last is None:
        return 1.0
    _, h, w, c = [d if d is not None else 1 for d in model.inputs[0].shape]
    rng = np.random.default_rng(seed + 7)
    x = pp.apply(rng.uniform(0, 255, size=(n, h, w, c)).astype(np.float32))
    y = np.asarray(model(x, training=False), np.float64).reshape(n, -1)
    if y.shape[1] < 2:
        return 1.0
    probs = bool((y >= 0).all()) and np.allclose(y.sum(1), 1.0, atol=1e-3)
    z = np.log(np.maximum(y, 1e-30)) if probs else y
    std = float(np.mean(np.std(z - z.mean(1, keepdims=True), axis=1)))
    if not np.isfinite(std) or std <= 0:
        return 1.0
    factor = target_std / std
    last.kernel.assign(last.kernel * factor)
    if last.bias is not None:
        last.bias.assign(last.bias * factor)
    return factor
