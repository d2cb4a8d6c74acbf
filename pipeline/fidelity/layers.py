"""The per-layer report: where an int8 artifact departs from its float reference, and why.

For every quantization point of an artifact (a layer's output activation; for Core ML int8,
whose activations stay fp16, every layer with quantized weights) on the same images:

* **accumulated**: the artifact as it is against the float reference (error carried in from
  every layer upstream plus this one's);
* **isolated**: a model where *only this layer* is quantized, against the reference: the
  layer's own output and the model's output. In TFLite and ONNX an int8 layer also quantizes
  its input, so a layer fed by a badly quantized tensor looks as bad as that tensor's producer;
  ``own_db`` removes the inputs' share (the model-output noise of the isolated producers of its
  inputs is subtracted, noise powers adding). The worst layers are ranked by ``own_db``: what
  quantizing that layer costs the answer by itself, which is what a float fallback of it
  (and of the consumers of its output, see fallback.py) buys back.
* **delta_db**: how much the accumulated SQNR falls at this layer below its inputs' (per-channel
  SQNR where there are channels: a tensor whose range one loud channel sets keeps a fine
  whole-tensor SQNR while every other channel is crushed).

The isolated pass costs one model variant per layer, so it is capped: ``isolated_cap``
(default 32) layers, those whose accumulated SQNR falls most from their inputs' ("delta_db"),
run it on ``isolated_images`` (default 16) images; the others keep their accumulated figures
and are ranked after, by delta_db. Reference tensors for the isolated pass are kept in memory
up to ``MEMORY_BUDGET`` bytes; a layer beyond it gets only its model-output figures.

The format-specific work (running with intermediates, building the single-layer variants,
writing a fallback artifact) lives in one probe per format (probe_tflite, probe_onnx,
probe_coreml); this module only drives them and ranks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from edgepipe.export import FormatOptions
from edgepipe.pipeline.base.records import Calibration, Traced
from edgepipe.pipeline.base.util import write_json_atomic, write_text_atomic
from edgepipe.pipeline.fidelity.layer_rows import LayerReport, LayerRow
from edgepipe.pipeline.fidelity.reasons import explain
from edgepipe.pipeline.fidelity.render import render_html
from edgepipe.pipeline.fidelity.tensors import Accumulator, ErrorFigures, SQNR_CAP_DB

DEFAULT_SAMPLES = 32
DEFAULT_ISOLATED_CAP = 32
DEFAULT_ISOLATED_IMAGES = 16
MEMORY_BUDGET = 256 << 20
MODEL_INPUT = "<input>"
# An output activation like softmax adds the int8 output step to the answer and nothing a float
# fallback could buy back: measured and shown, never ranked among the worst layers.
UNRANKED_OPS = frozenset({"INPUT", "SOFTMAX", "LOGISTIC", "Softmax", "Sigmoid", "softmax", "sigmoid"})


@dataclass
class LayerInfo:
    """A quantization point of an artifact, as its probe describes it."""

    tensor: str  # the artifact's tensor (or program variable) name: the row's key
    op: str
    layer: str  # readable name (the Keras layer the converters kept)
    inputs: list[str] = field(default_factory=list)  # upstream quantization points (or MODEL_INPUT)
    layout: str = "NHWC"
    facts: dict = field(default_factory=dict)  # static: activation range, weight granularity, ...
    isolable: bool = True


# one image (raw pixels, preprocessed data) -> (the layer's tensor or None, the model output)
ImageRunner = Callable[[np.ndarray, np.ndarray], tuple[Optional[np.ndarray], np.ndarray]]


class LayerProbe:
    """What the report needs from a format. Subclasses: probe_tflite / probe_onnx / probe_coreml."""

    format: str = ""
    reference: str = ""
    #: an int8 layer quantizes its input too (TFLite, ONNX); weight-only schemes do not
    inherits_inputs: bool = True
    #: it can write the artifact with chosen layers kept in float (``fallback``)
    supports_fallback: bool = False

    @classmethod
    def open(cls, artifact: Path, reference: Path, *, traced: Optional[Traced] = None,
             calibration: Optional[Calibration] = None, options: Optional[FormatOptions] = None,
             known_layers: Optional[set[str]] = None) -> "LayerProbe":
        """The probe of ``artifact`` against its float ``reference``; ``traced``, ``calibration`` and the
        artifact's export ``options`` serve the formats that re-quantize for the isolated pass."""
        return cls(artifact, reference, known_layers=known_layers)  # type: ignore[call-arg]

    def layers(self) -> list[LayerInfo]:
        raise NotImplementedError

    def run(self, raw: np.ndarray, data: np.ndarray) -> tuple[dict, dict, np.ndarray, np.ndarray]:
        """One image: (reference tensors, artifact tensors dequantized, reference output, artifact output)."""
        raise NotImplementedError

    def reference_tensors(self, raw: np.ndarray, data: np.ndarray, names: set[str]) -> dict:
        ref, _, _, _ = self.run(raw, data)
        return {k: ref[k] for k in names if k in ref}

    def isolation(self) -> Optional[str]:
        """None when single-layer variants can be built, else why not."""
        return "not offered for this format"

    def isolated(self, info: LayerInfo) -> ImageRunner:
        """A runner for the model with only ``info`` quantized: image -> (its tensor, model output)."""
        raise NotImplementedError

    def float_nodes(self, tensors: list[str]) -> list[str]:
        """The ops/nodes that run in float when these tensors are kept float."""
        raise NotImplementedError(f"no float fallback for {self.format} artifacts")

    def fallback(self, tensors: list[str], dest: Path) -> Path:
        """Write the artifact with these tensors kept float (see fallback.py)."""
        raise NotImplementedError(f"no float fallback for {self.format} artifacts")

    def fallback_options(self) -> dict:
        """What the manifest records of how a fallback artifact was written."""
        return {}

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the engine
def _images(images: Calibration, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for i in range(min(n, images.n)):
        yield images.raw[i:i + 1], images.data[i:i + 1]


def _agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> Optional[float]:
    r = np.concatenate([x.reshape(1, -1) for x in ref])
    g = np.concatenate([x.reshape(1, -1) for x in got])
    if r.shape[1] < 2:
        return None
    return 100.0 * float(np.mean(r.argmax(1) == g.argmax(1)))


def accumulated_pass(probe: LayerProbe, infos: list[LayerInfo], images: Calibration,
                     samples: int) -> tuple[dict, Accumulator, list, list]:
    """Artifact vs reference on every image: per-layer accumulators, output accumulator, outputs."""
    accs = {i.tensor: Accumulator() for i in infos}
    out_acc = Accumulator()
    refs, gots = [], []
    for raw, data in _images(images, samples):
        ref, got, ref_out, got_out = probe.run(raw, data)
        for info in infos:
            if info.tensor in ref and info.tensor in got:
                accs[info.tensor].update(ref[info.tensor], got[info.tensor], info.layout, info.facts.get("qrange"))
        out_acc.update(ref_out, got_out, "NHWC")
        refs.append(ref_out)
        gots.append(got_out)
    return accs, out_acc, refs, gots


def _level(f: ErrorFigures) -> float:
    return f.channel_sqnr_db if f.channel_sqnr_db is not None else f.sqnr_db


def _delta(info: LayerInfo, sq: dict[str, float]) -> Optional[float]:
    """SQNR lost at this layer below its inputs'; a layer fed only by the model input starts from exact."""
    if info.tensor not in sq:
        return None
    ups = [sq[t] for t in info.inputs if t in sq]
    if info.inputs and not ups:
        return None  # its inputs are not quantization points we measured
    base = min(ups) if ups else SQNR_CAP_DB
    return max(0.0, base - sq[info.tensor])


def isolated_pass(probe: LayerProbe, chosen: list[LayerInfo], images: Calibration, n: int,
                  ref_outputs: list[np.ndarray], progress: Optional[Callable[[str], None]] = None) -> dict:
    """Only-this-layer-quantized figures for each chosen layer: {tensor: (own, output)}."""
    keep = _reference_cache(probe, chosen, images, n)
    out = {}
    for k, info in enumerate(chosen):
        if progress:
            progress(f"isolated {k + 1}/{len(chosen)}: {info.layer}")
        try:
            runner = probe.isolated(info)
        except Exception as e:  # one layer's variant failing never stops the others
            out[info.tensor] = (None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        own, model = Accumulator(), Accumulator()
        for j, (raw, data) in enumerate(_images(images, n)):
            t, y = runner(raw, data)
            model.update(ref_outputs[j], y, "NHWC")
            cached = keep.get(info.tensor)
            if t is not None and cached is not None:
                own.update(cached[j], t, info.layout)
        out[info.tensor] = (own.figures() if own.images else None, model.figures(), None)
    return out


def _reference_cache(probe: LayerProbe, chosen: list[LayerInfo], images: Calibration, n: int) -> dict:
    """Reference tensors of the chosen layers, per image, as far as MEMORY_BUDGET allows."""
    names = {i.tensor for i in chosen}
    per_image = []
    for raw, data in _images(images, n):
        per_image.append(probe.reference_tensors(raw, data, names))
    if not per_image:
        return {}
    keep, used = {}, 0
    for info in chosen:
        if info.tensor not in per_image[0]:
            continue
        size = sum(np.asarray(p[info.tensor]).nbytes for p in per_image)
        if used + size > MEMORY_BUDGET:
            continue
        used += size
        keep[info.tensor] = [np.asarray(p[info.tensor], np.float32) for p in per_image]
    return keep


def build_report(probe: LayerProbe, images: Calibration, *, samples: int = DEFAULT_SAMPLES,
                 isolated_cap: int = DEFAULT_ISOLATED_CAP, isolated_images: int = DEFAULT_ISOLATED_IMAGES,
                 data: str = "calibration", progress: Optional[Callable[[str], None]] = None) -> LayerReport:
    """Run both passes and rank. ``images``: raw pixels and preprocessed data of the same images."""
    t0 = time.perf_counter()
    infos = probe.layers()
    accs, out_acc, refs, gots = accumulated_pass(probe, infos, images, samples)
    figs = {t: a.figures() for t, a in accs.items() if a.images}
    sq = {t: _level(f) for t, f in figs.items()}
    sq[MODEL_INPUT] = SQNR_CAP_DB
    rows = []
    for k, info in enumerate(infos):
        if info.tensor not in figs:
            continue
        facts = {**info.facts, **accs[info.tensor].facts()}
        rows.append(LayerRow(k, info.tensor, info.layer, info.op, figs[info.tensor], _delta(info, sq), facts=facts))
    why_not = probe.isolation()
    iso_meta: dict = {"cap": isolated_cap, "images": min(isolated_images, images.n), "layers": 0}
    results: dict = {}
    if why_not:
        iso_meta["skipped"] = why_not
    elif isolated_cap > 0:
        by_tensor = {i.tensor: i for i in infos}
        cands = sorted((r for r in rows if by_tensor[r.tensor].isolable and r.op not in UNRANKED_OPS),
                       key=lambda r: -(r.delta_db or 0.0))
        chosen = [by_tensor[r.tensor] for r in cands[:isolated_cap]]
        results = isolated_pass(probe, chosen, images, isolated_images, refs, progress)
        iso_meta["layers"] = len(chosen)
        if len(cands) > isolated_cap:
            iso_meta["capped"] = f"{len(cands) - isolated_cap} more layer(s) ranked by delta_db only"
        errors = {t: e for t, (_, _, e) in results.items() if e}
        if errors:
            iso_meta["errors"] = errors
    for r in rows:
        if r.tensor in results:
            r.isolated, r.isolated_output = results[r.tensor][0], results[r.tensor][1]
    _own(rows, {i.tensor: i.inputs for i in infos}, probe.inherits_inputs)
    _rank(rows)
    for r in rows:
        r.reason = explain(r)
    return LayerReport(str(getattr(probe, "artifact", "")), probe.format, probe.reference,
                       min(samples, images.n), data, out_acc.figures(), _agreement(refs, gots), rows,
                       iso_meta, time.perf_counter() - t0)


def _noise(db: float) -> float:
    return 10.0 ** (-db / 10.0)


def _own(rows: list[LayerRow], inputs: dict[str, list[str]], inherits: bool) -> None:
    """own_db: the isolated model-output SQNR less the share of the layer's quantized inputs."""
    noise = {r.tensor: _noise(r.isolated_output.sqnr_db) for r in rows if r.isolated_output is not None}
    for r in rows:
        if r.tensor not in noise:
            continue
        inherited = sum(noise.get(t, 0.0) for t in inputs.get(r.tensor, [])) if inherits else 0.0
        own = noise[r.tensor] - inherited
        r.own_db = min(SQNR_CAP_DB, -10.0 * math.log10(own)) if own > 0 else SQNR_CAP_DB


def _rank(rows: list[LayerRow]) -> None:
    """Worst first: layers with an isolated figure by own_db (lowest SQNR), then by delta_db."""
    ranked = [r for r in rows if r.op not in UNRANKED_OPS]
    iso = sorted((r for r in ranked if r.own_db is not None),
                 key=lambda r: (r.own_db, -(r.delta_db or 0.0)))
    rest = sorted((r for r in ranked if r.own_db is None), key=lambda r: -(r.delta_db or 0.0))
    for k, r in enumerate(iso + rest):
        r.rank = k


def write_report(report: LayerReport, dest: Path) -> Path:
    """layers.json beside layers.html (see render.py) under ``dest`` (a folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dest / "layers.json", report.to_dict())
    write_text_atomic(dest / "layers.html", render_html(report))
    return dest
