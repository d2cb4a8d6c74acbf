"""Core ML: mlprogram fp32/fp16, int8 linear weight quantization, palettized weights.

The program is converted once per export (fp16) and int8/palettized variants are derived from it.
The input is a Core ML ImageType carrying the model's preprocessing (scale, per-channel
bias, RGB/BGR/grayscale) so an app feeds raw pixels, whenever ImageType can express it
exactly (a scalar scale). Otherwise the input stays a tensor of preprocessed values.
Verified by Core ML itself on macOS, by edgepipe's reference interpreter elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgepipe.export.base import ExportResult, Format, FormatOptions, option
from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.manifest import TensorInfo
from edgepipe.pipeline.base.records import Calibration, Traced

PALETTE_BITS = (1, 2, 3, 4, 6, 8)
# int8 here quantizes weights only: nothing is calibrated
WEIGHT_ONLY = {"method": "none: weight-only int8 (activations stay fp16)", "samples": 0, "source": None}


@dataclass(frozen=True)
class CoreMLOptions(FormatOptions):
    palette_bits: int = option(6, flag="--palette-bits", choices=PALETTE_BITS,
                               help="bits per weight of the palettized variant")


def _quiet() -> None:
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def _input(ct: Any, traced: Traced) -> tuple[Any, str]:
    """The Core ML input description: an ImageType when the preprocessing allows, and its kind."""
    src, pp = traced.source, traced.preprocessing
    c = src.input_shape[-1]
    shape = tuple(src.input_shape)
    if not pp.is_affine_per_tensor_scale():
        return ct.TensorType(name=src.input_name, shape=shape), "tensor"
    scale, bias = pp.coreml_scale_bias(c)
    layout = ct.colorlayout.GRAYSCALE if c == 1 else (
        ct.colorlayout.BGR if pp.channel_order == "BGR" else ct.colorlayout.RGB)
    return ct.ImageType(name=src.input_name, shape=shape, scale=scale, bias=bias[0] if c == 1 else bias,
                        color_layout=layout), "image"


def _io(mlmodel: Any, traced: Traced, kind: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
    spec = mlmodel.get_spec()
    src = traced.source
    _, h, w, c = src.input_shape
    ins = [TensorInfo(d.name, [1, h, w, c] if kind == "image" else list(src.input_shape),
                      "uint8" if kind == "image" else "float32") for d in spec.description.input]
    outs = []
    for d in spec.description.output:
        if d.type.WhichOneof("Type") == "multiArrayType":
            outs.append(TensorInfo(d.name, list(d.type.multiArrayType.shape), "float32"))
        else:
            outs.append(TensorInfo(d.name, [], d.type.WhichOneof("Type") or "unknown"))
    return ins, outs


class CoreMLFormat(Format):
    name = "coreml"
    suffix = ".mlpackage"
    precisions = ("fp32", "fp16", "int8", "palettized")
    default_precision = "fp16"
    Options = CoreMLOptions
    packages = ("tensorflow", "coremltools")
    verifier = ("coreml-reference", "reference")

    def __init__(self) -> None:
        self._programs: dict[str, tuple[Any, str]] = {}  # compute precision -> (MLModel, input kind)

    def verifier_for_host(self) -> tuple[str, str]:
        return ("coreml", "cpu") if platform.system() == "Darwin" else self.verifier

    def _convert(self, traced: Traced, precision: str) -> tuple[Any, str]:
        if precision not in self._programs:
            ct = lazy.coremltools()
            inp, kind = _input(ct, traced)
            src = traced.source
            kw = {}
            if src.labels and src.num_classes and len(src.labels) == src.num_classes:
                kw["classifier_config"] = ct.ClassifierConfig(list(src.labels))
            mlmodel = ct.convert(
                [traced.concrete], source="tensorflow", inputs=[inp], convert_to="mlprogram",
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                minimum_deployment_target=ct.target.iOS16, **kw)
            self._programs[precision] = (mlmodel, kind)
        return self._programs[precision]

    def int8_weight_levels(self, options: FormatOptions) -> Optional[int]:
        return 127  # int8 linear symmetric per-channel weights

    def _optimize(self, mlmodel: Any, precision: str, options: CoreMLOptions, used: dict) -> Any:
        cto = lazy.coreml_optimize()
        if precision == "int8":
            cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel"))
            used.update(weights="int8 linear symmetric per-channel", activations="fp16")
            return cto.linear_quantize_weights(mlmodel, config=cfg)
        if precision == "palettized":
            cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
                mode="kmeans", nbits=options.palette_bits, granularity="per_tensor"))
            used.update(weights=f"{options.palette_bits}-bit k-means palette", activations="fp16")
            return cto.palettize_weights(mlmodel, config=cfg)
        return mlmodel

    def export(self, traced: Traced, precision: str, calibration: Optional[Calibration], dest: Path,
               options: FormatOptions) -> ExportResult:
        assert isinstance(options, CoreMLOptions)
        _quiet()
        used: dict = {"converter": "coremltools.convert(mlprogram)", "deployment_target": "iOS16"}
        if precision == "fp32":
            mlmodel, kind = self._convert(traced, "fp32")
        else:
            mlmodel, kind = self._convert(traced, "fp16")
            used["compute_precision"] = "fp16"
        mlmodel = self._optimize(mlmodel, precision, options, used)
        src = traced.source
        mlmodel.short_description = f"{src.name} exported by edgepipe ({precision})"
        md = mlmodel.user_defined_metadata
        md["edgepipe.model"] = src.name
        md["edgepipe.precision"] = precision
        md["edgepipe.preprocessing"] = json.dumps(traced.preprocessing.to_dict())
        md["edgepipe.input"] = kind
        mlmodel.save(str(dest))
        ins, outs = _io(mlmodel, traced, kind)
        used["input"] = kind
        return ExportResult(dest, ins, outs, used, dict(WEIGHT_ONLY) if precision == "int8" else None,
                            input_kind=kind)

    def close(self) -> None:
        self._programs.clear()
