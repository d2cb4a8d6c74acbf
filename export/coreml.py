"""Core ML: mlprogram fp32/fp16, int8 linear weight quantization, palettized weights.

The program is converted once (fp16) and int8/palettized variants are derived from it.
The input is a Core ML ImageType carrying the model's preprocessing (scale, per-channel
bias, RGB/BGR/grayscale) so an app feeds raw pixels, whenever ImageType can express it
exactly (a scalar scale). Otherwise the input stays a tensor of preprocessed values.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from edgepipe.export.base import ExportOptions, ExportResult, Format

from edgepipe.pipeline.base.manifest import TensorInfo


def _quiet():
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TQDM_DISABLE", "1")


def _convert(traced, precision: str):
    import coremltools as ct

    key = f"coreml_{precision}"
    if key in traced.shared:
        return traced.shared[key]
    src, pp = traced.source, traced.preprocessing
    c = src.input_shape[-1]
    shape = tuple(src.input_shape)
    if pp.is_affine_per_tensor_scale():
        scale, bias = pp.coreml_scale_bias(c)
        layout = ct.colorlayout.GRAYSCALE if c == 1 else (
            ct.colorlayout.BGR if pp.channel_order == "BGR" else ct.colorlayout.RGB)
        inp = ct.ImageType(name=src.input_name, shape=shape, scale=scale,
                           bias=bias[0] if c == 1 else bias, color_layout=layout)
        kind = "image"
    else:
        inp = ct.TensorType(name=src.input_name, shape=shape)
        kind = "tensor"
    kw = {}
    if src.labels and src.num_classes and len(src.labels) == src.num_classes:
        kw["classifier_config"] = ct.ClassifierConfig(list(src.labels))
    mlmodel = ct.convert(
        [traced.concrete], source="tensorflow", inputs=[inp], convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=ct.target.iOS16, **kw)
    traced.shared[key] = (mlmodel, kind)
    return mlmodel, kind


class CoreMLFormat(Format):
    name = "coreml"
    suffix = ".mlpackage"
    precisions = ("fp32", "fp16", "int8", "palettized")
    default_precision = "fp16"

    def export(self, traced, precision, calibration, dest: Path, options: ExportOptions) -> ExportResult:
        _quiet()
        import coremltools.optimize.coreml as cto

        used: dict = {"converter": "coremltools.convert(mlprogram)", "deployment_target": "iOS16"}
        if precision == "fp32":
            mlmodel, kind = _convert(traced, "fp32")
        else:
            mlmodel, kind = _convert(traced, "fp16")
            used["compute_precision"] = "fp16"
        if precision == "int8":
            cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel"))
            mlmodel = cto.linear_quantize_weights(mlmodel, config=cfg)
            used.update(weights="int8 linear symmetric per-channel", activations="fp16")
        elif precision == "palettized":
            cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
                mode="kmeans", nbits=options.palette_bits, granularity="per_tensor"))
            mlmodel = cto.palettize_weights(mlmodel, config=cfg)
            used.update(weights=f"{options.palette_bits}-bit k-means palette", activations="fp16")
        src = traced.source
        mlmodel.short_description = f"{src.name} exported by edgepipe ({precision})"
        md = mlmodel.user_defined_metadata
        md["edgepipe.model"] = src.name
        md["edgepipe.precision"] = precision
        md["edgepipe.preprocessing"] = json.dumps(traced.preprocessing.to_dict())
        md["edgepipe.input"] = kind
        mlmodel.save(str(dest))
        spec = mlmodel.get_spec()
        _, h, w, c = src.input_shape
        ins = [TensorInfo(d.name, [1, h, w, c] if kind == "image" else list(src.input_shape),
                          "uint8" if kind == "image" else "float32") for d in spec.description.input]
        outs = []
        for d in spec.description.output:
            if d.type.WhichOneof("Type") == "multiArrayType":
                outs.append(TensorInfo(d.name, list(d.type.multiArrayType.shape), "float32"))
            else:
                outs.append(TensorInfo(d.name, [], d.type.WhichOneof("Type") or "unknown"))
        used["input"] = kind
        return ExportResult(dest, ins, outs, used, None, input_kind=kind)
