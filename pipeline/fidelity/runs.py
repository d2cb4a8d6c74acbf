"""Run an artifact over images in the runtime that verifies its format here (its Format's verifier:
LiteRT or onnxruntime on the CPU, edgepipe's Core ML reference interpreter off macOS): class scores
for the budget checks, and a per-image latency for the cost of a recovery.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from edgepipe.devices.runtimes.base import Runtime, quantize, runtimes_for
from edgepipe.pipeline.base.errors import UnsupportedArtifact
from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.fidelity.sources import FormatLike, format_of


def cpu_runtime(fmt: FormatLike) -> Runtime:
    """The runtime that verifies ``fmt``'s artifacts on this host (UnsupportedArtifact when it is missing)."""
    f = format_of(fmt)
    name, target = f.verifier_for_host()
    rt = next((r for r in runtimes_for(f.runs_as(), target) if r.name == name), None)
    why = f"no {name} runtime installed" if rt is None else rt.available()
    if why or rt is None:
        raise UnsupportedArtifact(why or f"no {name} runtime")
    return rt


def _pick(outs: list[np.ndarray]) -> int:
    """The class-score output: the widest 2-D one."""
    best = 0
    for i, o in enumerate(outs):
        if np.asarray(o).ndim == 2 and np.asarray(o).shape[-1] > np.asarray(outs[best]).reshape(1, -1).shape[-1]:
            best = i
    return best


def predict(path: Path, fmt: FormatLike, images: Calibration, runtime: Optional[Runtime] = None) -> np.ndarray:
    """(N, K) float outputs of the artifact on every image, batch of one."""
    rt = runtime or cpu_runtime(fmt)
    outs = []
    with rt.load(path) as s:
        image = getattr(s, "input_kind", "tensor") == "image"
        j = None
        for i in range(images.n):
            ys = s.run([images.raw[i:i + 1] if image else images.data[i:i + 1]])
            j = _pick(ys) if j is None else j
            outs.append(np.asarray(ys[j], np.float32).reshape(1, -1))
    return np.concatenate(outs)


def latency_ms(path: Path, fmt: FormatLike, images: Calibration, runs: int = 30, warmup: int = 3,
               runtime: Optional[Runtime] = None) -> float:
    """Median wall time of one inference (ms) on the first image, in the CPU runtime."""
    rt = runtime or cpu_runtime(fmt)
    with rt.load(path) as s:
        if getattr(s, "input_kind", "tensor") == "image":
            feed = [images.raw[:1]]
            call = s.run
        else:
            feed = [quantize(images.data[:1], s.inputs[0])]
            call = s.run_native
        for _ in range(warmup):
            call(feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call(feed)
            times.append(time.perf_counter() - t0)
    return 1000.0 * float(np.median(times))

