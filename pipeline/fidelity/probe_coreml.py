"""Core ML int8 artifacts (8-bit weights, fp16 activations), layer by layer, on edgepipe's
reference interpreter for ML programs (devices/runtimes/coreml_ref), which runs on Linux.

Rows are the ops that read a decompressed (``constexpr_*``) weight: the layers whose weights
were quantized. Their outputs are read by adding the program variables as extra outputs of
the interpreter's model. The reference is a float program of the same conversion (fp32, or the
fp16 program the int8 one was derived from); names match once the ``_cast_fp16``/``_to_fp16``
suffixes the fp16 pass adds are dropped.

Isolated: the reference program with only this layer's weights swapped for the artifact's
dequantized int8 weights, which is exactly "only this layer quantized" for a weight-only
scheme, with no converter involved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from edgepipe.devices.runtimes.coreml_ref import IOSpec, MilModel, load_program
from edgepipe.pipeline.fidelity.layers import LayerInfo, LayerProbe, ImageRunner
from edgepipe.pipeline.fidelity.names import display, layers_in_flat

SUFFIXES = ("_quantized", "_cast_fp16", "_to_fp16")


def norm(name: str) -> str:
    """A variable's name without the suffixes the fp16 and weight-quantization passes add."""
    changed = True
    while changed:
        changed = False
        for s in SUFFIXES:
            if name.endswith(s):
                name, changed = name[: -len(s)], True
    return name


def _bind_names(op) -> list[str]:
    return [v for binds in op.inputs.values() for kind, v in binds if kind == "name" and isinstance(v, str)]


def _expose(model: MilModel, names: Iterable[str]) -> None:
    have = {s.name for s in model.outputs}
    for n in names:
        if n not in have:
            model.outputs.append(IOSpec(n, "tensor", [], "float32", var=n))


def _within_channel_ratio(w: np.ndarray) -> Optional[float]:
    """Largest over output channels of (max / median) input-channel weight range: a channel whose
    weights are dominated by a few inputs rounds the others away."""
    if w.ndim < 2 or w.shape[1] < 2:
        return None
    a = np.abs(w.astype(np.float64)).reshape(w.shape[0], w.shape[1], -1).max(axis=2)
    med = np.median(a, axis=1)
    ok = med > 0
    return float((a.max(axis=1)[ok] / med[ok]).max()) if ok.any() else None


class CoreMLProbe(LayerProbe):
    format = "coreml"
    inherits_inputs = False  # weight-only: a layer's input is never quantized

    def __init__(self, artifact: Path, reference: Path, *, known_layers: Optional[Iterable[str]] = None,
                 reference_name: str = "a float Core ML program of the same conversion"):
        self.artifact, self.reference_path = Path(artifact), Path(reference)
        self.art, self.ref = load_program(self.artifact), load_program(self.reference_path)
        self.iso = load_program(self.reference_path)
        self.known = set(known_layers) if known_layers is not None else None
        self.reference = reference_name
        self.image = any(s.kind == "image" for s in self.art.inputs)
        self.ref_vars = {norm(n): n for op in self.ref.ops for n, _ in op.outputs}
        self.ref_consts = {norm(n): n for n in self.ref.consts}
        self._swapped: dict[str, np.ndarray] = {}
        self._infos = self._scan()
        _expose(self.art, (i.tensor for i in self._infos))
        _expose(self.ref, (self.ref_vars[norm(i.tensor)] for i in self._infos))
        _expose(self.iso, (self.ref_vars[norm(i.tensor)] for i in self._infos))

    def _scan(self) -> list[LayerInfo]:
        quantized = {n for op in self.art.ops if op.type.startswith("constexpr_") for n, _ in op.outputs}
        rows: set[str] = set()
        reach: dict[str, set] = {}
        infos = []
        for op, _, _ in self.art.steps:
            ins = _bind_names(op)
            up = set().union(*[{v} if v in rows else reach.get(v, set()) for v in ins]) if ins else set()
            out = op.outputs[0][0]
            weights = [v for v in ins if v in quantized]
            if weights and norm(out) in self.ref_vars:
                w = self.art.consts.get(weights[0])
                facts = {"weight_only": True, "weights": "per-channel", "depthwise": self._depthwise(op, w)}
                if w is not None:
                    facts["weight_channel_ratio"] = _within_channel_ratio(np.asarray(w))
                layer = display(self._layer_names(out), norm(out))
                infos.append(LayerInfo(out, op.type, layer, sorted(up), "NCHW",
                                       {k: v for k, v in facts.items() if v is not None}))
                infos[-1].facts["quantized_weights"] = weights
                rows.add(out)
            for n, _ in op.outputs:
                reach[n] = up
        return infos

    def _layer_names(self, var: str) -> list[str]:
        """Keras layers named in the variable, else in its consumers' outputs (a renamed fused op)."""
        if not self.known:
            return []
        found = layers_in_flat(var, self.known)
        if found:
            return found
        for op in self.art.ops:
            if var in _bind_names(op):
                found = layers_in_flat(op.outputs[0][0], self.known)
                if found:
                    return found
        return []

    @staticmethod
    def _depthwise(op, w) -> bool:
        g = op.inputs.get("groups")
        return op.type == "conv" and w is not None and np.ndim(w) == 4 and np.shape(w)[1] == 1 and bool(g)

    def layers(self) -> list[LayerInfo]:
        return self._infos

    def _feed(self, model: MilModel, raw, data) -> dict:
        return {model.inputs[0].name: raw if self.image else data}

    def _predict(self, model: MilModel, raw, data) -> dict:
        return model.predict(self._feed(model, raw, data))

    def _first_output(self, model: MilModel, res: dict) -> np.ndarray:
        spec = next(s for s in model.outputs if s.kind in ("tensor", "probabilities"))
        return np.asarray(res[spec.name], np.float32)

    def run(self, raw: np.ndarray, data: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
        a, r = self._predict(self.art, raw, data), self._predict(self.ref, raw, data)
        got = {i.tensor: np.asarray(a[i.tensor], np.float32) for i in self._infos}
        ref = {i.tensor: np.asarray(r[self.ref_vars[norm(i.tensor)]], np.float32) for i in self._infos}
        return ref, got, self._first_output(self.ref, r), self._first_output(self.art, a)

    def reference_tensors(self, raw: np.ndarray, data: np.ndarray, names: set[str]) -> dict:
        r = self._predict(self.ref, raw, data)
        return {n: np.asarray(r[self.ref_vars[norm(n)]], np.float32) for n in names}

    def isolation(self) -> Optional[str]:
        return None

    def _swap(self, weights: list[str]) -> None:
        for name, old in self._swapped.items():
            self.iso.consts[name] = old
        self._swapped = {}
        for w in weights:
            target = self.ref_consts.get(norm(w))
            if target is None:
                raise KeyError(f"no reference weight for {w}")
            old = self.iso.consts[target]
            self._swapped[target] = old
            self.iso.consts[target] = np.asarray(self.art.consts[w]).astype(np.asarray(old).dtype)

    def isolated(self, info: LayerInfo) -> ImageRunner:
        self._swap(info.facts.get("quantized_weights", []))
        var = self.ref_vars[norm(info.tensor)]

        def run(raw: np.ndarray, data: np.ndarray) -> tuple[Optional[np.ndarray], np.ndarray]:
            r = self._predict(self.iso, raw, data)
            return np.asarray(r[var], np.float32), self._first_output(self.iso, r)

        return run

    def close(self) -> None:
        self._swap([])
