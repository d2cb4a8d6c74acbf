"""A Keras functional model as a graph of layer names, and BatchNormalization folding.

``Graph(model)`` reads the functional config: each layer's parents and children by name (a layer
called more than once, or a nested model, is marked ``shared`` and left alone by the rewrites).
``fold_batchnorm(model)`` returns a new model in which every BatchNormalization that directly
follows a Conv2D, DepthwiseConv2D, SeparableConv2D or Dense (linear activation, no other
consumer) is folded into that layer's weights and bias and removed: the same function, and the
weights the converters would have produced by folding it themselves; on these the later
rewrites (equalization, bias correction) act.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgepipe.pipeline.base import lazy

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


@dataclass
class Node:
    name: str
    cls: str
    config: dict
    parents: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    shared: bool = False


def _history(obj: Any, out: list[str]) -> None:
    if isinstance(obj, dict):
        hist = (obj.get("config") or {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
        if hist:
            out.append(hist[0])
            return
        for v in obj.values():
            _history(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _history(v, out)


class Graph:
    """Layer-name graph of a functional model's config."""

    def __init__(self, model):
        self.config = model.get_config()
        if "layers" not in self.config:
            raise ValueError("only functional Keras models can be rewritten")
        self.nodes: dict[str, Node] = {}
        for lc in self.config["layers"]:
            parents: list[str] = []
            _history(lc.get("inbound_nodes", []), parents)
            n = Node(lc["name"], lc["class_name"], lc.get("config") or {}, list(dict.fromkeys(parents)),
                     shared=len(lc.get("inbound_nodes", [])) > 1 or "layers" in (lc.get("config") or {}))
            self.nodes[n.name] = n
        for n in self.nodes.values():
            for p in n.parents:
                if p in self.nodes:
                    self.nodes[p].children.append(n.name)
        self.outputs = {o[0] for o in _pairs(self.config.get("output_layers"))}

    def only_child(self, name: str) -> Optional[Node]:
        n = self.nodes[name]
        if len(n.children) != 1 or name in self.outputs:
            return None
        return self.nodes[n.children[0]]


def _pairs(v) -> list:
    if not v:
        return []
    return [v] if isinstance(v[0], str) else list(v)


def _bn_params(bn) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) with bn(x) = x * scale + shift."""
    c = bn.moving_mean.shape[0]
    gamma = np.asarray(bn.gamma.numpy()) if bn.gamma is not None else np.ones(c, np.float32)
    beta = np.asarray(bn.beta.numpy()) if bn.beta is not None else np.zeros(c, np.float32)
    scale = gamma / np.sqrt(np.asarray(bn.moving_variance.numpy()) + bn.epsilon)
    return scale.astype(np.float64), (beta - np.asarray(bn.moving_mean.numpy()) * scale).astype(np.float64)


def layer_kernels(layer) -> dict[str, np.ndarray]:
    """The weights of a Conv2D/DepthwiseConv2D/SeparableConv2D/Dense by role (float64 copies)."""
    cls = type(layer).__name__
    w = [np.asarray(a, np.float64) for a in layer.get_weights()]
    if cls == "SeparableConv2D":
        d = {"depthwise": w[0], "kernel": w[1]}
        d["bias"] = w[2] if len(w) > 2 else np.zeros(w[1].shape[-1])
    else:
        d = {"kernel": w[0]}
        n_out = w[0].shape[-2] * w[0].shape[-1] if cls == "DepthwiseConv2D" else w[0].shape[-1]
        d["bias"] = w[1] if len(w) > 1 else np.zeros(n_out)
    return d


def set_kernels(layer, k: dict[str, np.ndarray]) -> None:
    """Write weights back in the layer's own order (the layer must have a bias)."""
    cls = type(layer).__name__
    order = ["depthwise", "kernel", "bias"] if cls == "SeparableConv2D" else ["kernel", "bias"]
    dt = layer.get_weights()[0].dtype
    layer.set_weights([k[r].astype(dt) for r in order])


def scale_outputs(cls: str, k: dict, s: np.ndarray) -> None:
    """Multiply output channel c of a layer (weights and bias) by s[c], in place."""
    if cls == "DepthwiseConv2D":
        kh, kw, cin, mult = k["kernel"].shape
        k["kernel"] = k["kernel"] * s.reshape(cin, mult)
    else:
        k["kernel"] = k["kernel"] * s
    k["bias"] = k["bias"] * s


def scale_inputs(cls: str, k: dict, s: np.ndarray) -> None:
    """Multiply input channel c of a layer's weights by s[c], in place."""
    if cls == "SeparableConv2D":
        k["depthwise"] = k["depthwise"] * s.reshape(1, 1, -1, 1)
    elif cls == "Dense":
        k["kernel"] = k["kernel"] * s.reshape(-1, 1)
    else:
        k["kernel"] = k["kernel"] * s.reshape(1, 1, -1, 1)


def _foldable(g: Graph, bn: Node) -> Optional[Node]:
    if bn.cls != "BatchNormalization" or bn.shared or len(bn.parents) != 1:
        return None
    axis = bn.config.get("axis", -1)
    if axis not in (-1, 3, [3], [-1]) and not (isinstance(axis, list) and len(axis) == 1):
        return None
    p = g.nodes.get(bn.parents[0])
    if p is None or p.cls not in WEIGHTED or p.shared or p.children != [bn.name]:
        return None
    if (p.config.get("activation") or "linear") != "linear" or p.name in g.outputs:
        return None
    return p


def copy_model(model) -> Any:
    """A new model with the same config and weights (rewrites never touch the model they are given)."""
    new = type(model).from_config(copy.deepcopy(model.get_config()))
    new.set_weights(model.get_weights())
    return new


def fold_batchnorm(model) -> tuple[Any, dict]:
    """A new model with BatchNormalization folded into the layer before it (see module docstring)."""
    keras = lazy.keras()
    g = Graph(model)
    folds = {bn.name: p.name for bn in g.nodes.values() if (p := _foldable(g, bn)) is not None}
    if not folds:
        return copy_model(model), {"folded": []}
    cfg = copy.deepcopy(g.config)
    _rewire(cfg, folds)
    new = keras.Model.from_config(cfg)
    for layer in new.layers:
        src = model.get_layer(layer.name)
        if layer.name in folds.values():
            bn = model.get_layer(next(b for b, p in folds.items() if p == layer.name))
            k = layer_kernels(src)
            scale, shift = _bn_params(bn)
            scale_outputs(type(src).__name__, k, scale)
            k["bias"] = k["bias"] + shift
            set_kernels(layer, k)
        elif layer.get_weights():
            layer.set_weights(src.get_weights())
    return new, {"folded": [f"{b} -> {p}" for b, p in folds.items()]}


def _rewire(cfg: dict, folds: dict[str, str]) -> None:
    """Drop the folded BN layers from a functional config; their consumers read the conv instead."""
    cfg["layers"] = [lc for lc in cfg["layers"] if lc["name"] not in folds]
    for lc in cfg["layers"]:
        if lc["name"] in folds.values():
            lc["config"]["use_bias"] = True
        _rename(lc.get("inbound_nodes", []), folds)
    for key in ("output_layers", "input_layers"):
        for pair in _pairs(cfg.get(key)):
            if pair[0] in folds:
                pair[0] = folds[pair[0]]


def _rename(obj: Any, folds: dict[str, str]) -> None:
    if isinstance(obj, dict):
        hist = (obj.get("config") or {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
        if hist and hist[0] in folds:
            hist[0] = folds[hist[0]]
        for v in obj.values():
            _rename(v, folds)
    elif isinstance(obj, (list, tuple)):  # node args are tuples of dicts: the dicts are mutable
        for v in obj:
            _rename(v, folds)
