"""Readable layer names from the tensor/op names converters keep.

The three converters keep the Keras layer names in their own spelling:

    TFLite   "digits_1/pw0_relu_1/Relu6;digits_1/pw0_bn_1/batchnorm/add_1;digits_1/pw0_1/convolution"
             (a fused op lists every TF op it absorbed, the last one first)
    ONNX     "digits_1/pw0_relu_1/Relu6:0", node "Conv__62", weight "digits_1/pw0_1/convolution/..."
    Core ML  "digits_1_pw0_bn_1_batchnorm_add_1_cast_fp16" ('/' became '_')

Keras 3 suffixes each name with its call index ("pw0_1"). With the model's layer names
(``known``) the mapping is exact; without them the suffix is stripped by pattern.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

_SUFFIX = re.compile(r"_\d+$")


def _strip(component: str, known: Optional[set]) -> Optional[str]:
    if known is not None:
        if component in known:
            return component
        s = _SUFFIX.sub("", component)
        return s if s in known else None
    return _SUFFIX.sub("", component)


def layers_in(name: str, known: Optional[Iterable[str]] = None) -> list[str]:
    """Keras layer names mentioned in a TFLite/ONNX tensor or node name, first mention first."""
    kn = set(known) if known is not None else None
    out: list[str] = []
    for part in name.split(";"):
        comps = part.split(":")[0].split("/")
        if len(comps) < 3 and kn is None:
            continue  # "Conv__55", "StatefulPartitionedCall:0": no layer in it
        for c in comps[1:-1] if kn is None else comps:
            layer = _strip(c, kn)
            if layer and layer not in out:
                out.append(layer)
                break
    return out


def layers_in_flat(var: str, known: Iterable[str]) -> list[str]:
    """Keras layer names in a Core ML variable name ('/' flattened to '_'): longest match wins."""
    found = []
    for layer in sorted(set(known), key=len, reverse=True):
        for form in (f"_{layer}_1_", f"_{layer}_"):
            i = var.find(form)
            if i >= 0 and not any(a <= i < b for _, a, b in found):
                found.append((layer, i, i + len(form)))
                break
    return [f[0] for f in sorted(found, key=lambda f: f[1])]


def display(candidates: Iterable[str], fallback: str) -> str:
    names = [c for c in candidates if c]
    return names[0] if names else fallback
