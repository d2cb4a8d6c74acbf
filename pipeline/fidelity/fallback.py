"""Recovery that uses the per-layer report: keep the worst layers in float until the budget holds.

    rec = float_fallback(probe, report, measure, budget=0.5, workdir=tmp)

``measure(path) -> DropResult`` judges one candidate artifact (stats.paired_drop against the
source on labelled images, or on held-out unlabelled ones: holdout.py). The artifact as it is
is measured first; while it misses the budget, the ``k`` worst layers of the report (k = 1, 2,
4, 8, ...) are kept in float: a layer's *output tensor* stays float, so its producer and every
consumer run in float (an int8 consumer would re-quantize the tensor with the same range).
TFLite re-quantizes through its QuantizationDebugger (``denylisted_nodes``), ONNX through
``quantize_static(nodes_to_exclude=...)``, both from one calibration.

A candidate meets the budget when its verdict is ``pass`` (the interval's upper bound is under
the budget), or ``inconclusive`` with the point estimate under it (the set is too small to show
more; the verdict is recorded). The first candidate that meets it, i.e. the one with the fewest
float layers, is chosen. At most MAX_FLOAT_SHARE of the report's ranked layers are kept in float:
beyond that the artifact is no longer an int8 model, and the recovery stops and says so. Every
attempt records the layers kept in float, the nodes that run in float, its size and CPU latency
against the original's, its drop with the interval, and why those layers were chosen (the
report's reasons).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from edgepipe.pipeline.base.records import Calibration
from edgepipe.pipeline.fidelity.layers import LayerProbe, LayerReport
from edgepipe.pipeline.fidelity.runs import latency_ms
from edgepipe.pipeline.fidelity.stats import DropResult

STEPS = (1, 2, 4, 8, 16)
# at most this share of the ranked layers kept in float: beyond it the artifact is no longer an int8 model
MAX_FLOAT_SHARE = 0.5


@dataclass
class Attempt:
    name: str
    float_layers: list[str] = field(default_factory=list)  # display names
    float_tensors: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    path: Optional[str] = None
    size_bytes: Optional[int] = None
    latency_ms: Optional[float] = None
    drop: Optional[dict] = None  # DropResult.to_dict()
    meets: bool = False
    why: str = ""
    error: Optional[str] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["drop"]:
            d["drop"] = {k: v for k, v in d["drop"].items() if k != "per_class"}
        return d


@dataclass
class Recovery:
    format: str
    budget: float
    metric: str
    baseline: Attempt
    attempts: list[Attempt] = field(default_factory=list)
    chosen: Optional[Attempt] = None
    cost: dict = field(default_factory=dict)  # size/latency of the chosen one against the baseline
    options: dict = field(default_factory=dict)  # how the candidates were written (the probe's)
    note: Optional[str] = None  # why it stopped short of the steps

    @property
    def meets(self) -> bool:
        return self.baseline.meets or self.chosen is not None

    def to_dict(self) -> dict:
        return {"format": self.format, "budget": self.budget, "metric": self.metric, "meets": self.meets,
                "baseline": self.baseline.to_dict(), "attempts": [a.to_dict() for a in self.attempts],
                "chosen": self.chosen.name if self.chosen else None, "cost": self.cost, "note": self.note}


def meets(res: DropResult) -> bool:
    return res.verdict == "pass" or (res.verdict == "inconclusive" and res.drop <= (res.budget or 0.0) + 1e-9)


def _judge(att: Attempt, path: Path, fmt: str, measure: Callable[[Path], DropResult],
           images: Optional[Calibration]) -> Attempt:
    res = measure(path)
    att.drop, att.meets = res.to_dict(), meets(res)
    att.size_bytes = path.stat().st_size
    if images is not None:
        att.latency_ms = round(latency_ms(path, fmt, images), 4)
    return att


def float_fallback(probe: LayerProbe, report: LayerReport, measure: Callable[[Path], DropResult], budget: float,
                   workdir: Path, *, images: Optional[Calibration] = None, steps: tuple = STEPS) -> Recovery:
    """Try float fallbacks of the report's worst layers; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    fmt = probe.format
    base = _judge(Attempt("as exported", path=str(probe.artifact)), Path(probe.artifact), fmt, measure, images)
    rec = Recovery(fmt, budget, (base.drop or {}).get("metric", "top1"), base, options=probe.fallback_options())
    if base.meets:
        return rec
    worst = [r for r in report.worst if r.op != "INPUT"]
    cap = max(1, int(len(worst) * MAX_FLOAT_SHARE))
    tried: set[int] = set()
    for k in steps:
        k = min(k, len(worst))
        if k == 0 or k in tried:
            continue
        if k > cap:
            rec.note = (f"stopped before {k} layers: more than {cap} of the {len(worst)} quantized layers in float "
                        "would no longer be an int8 model")
            break
        tried.add(k)
        rows = worst[:k]
        att = Attempt(f"{k} worst layer(s) in float", [r.layer for r in rows], [r.tensor for r in rows],
                      why="; ".join(f"{r.layer}: {r.reason}" for r in rows))
        dest = workdir / f"fallback-{k}{Path(probe.artifact).suffix}"
        try:
            att.float_nodes = probe.float_nodes(att.float_tensors)
            probe.fallback(att.float_tensors, dest)
            att.path = str(dest)
            _judge(att, dest, fmt, measure, images)
        except Exception as e:  # one failing candidate never stops the others
            att.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        rec.attempts.append(att)
        if att.meets:
            rec.chosen = att
            break
    if rec.chosen is not None:
        rec.cost = _cost(base, rec.chosen)
    return rec


def _cost(base: Attempt, chosen: Attempt) -> dict:
    out: dict = {"size_bytes": chosen.size_bytes, "baseline_size_bytes": base.size_bytes}
    if base.size_bytes and chosen.size_bytes:
        out["size_ratio"] = round(chosen.size_bytes / base.size_bytes, 3)
    if base.latency_ms and chosen.latency_ms:
        out.update(latency_ms=chosen.latency_ms, baseline_latency_ms=base.latency_ms,
                   latency_ratio=round(chosen.latency_ms / base.latency_ms, 3))
    return out


def adopt(rec: Recovery, dest: Path) -> Optional[Path]:
    """Copy the chosen candidate to ``dest`` (the caller renames it into place); None if none was chosen."""
    if rec.chosen is None or rec.chosen.path is None:
        return None
    shutil.copyfile(rec.chosen.path, dest)
    return dest
