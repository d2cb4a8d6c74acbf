"""The per-layer report's records: one LayerRow per quantization point, the LayerReport holding
them (layers.json round-trips through ``to_dict``/``from_dict``). layers.py builds them; reasons.py
and render.py read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from edgepipe.pipeline.fidelity.tensors import ErrorFigures

REPORT_SCHEMA = 1


@dataclass
class LayerRow:
    index: int
    tensor: str
    layer: str
    op: str
    accumulated: ErrorFigures
    delta_db: Optional[float] = None
    isolated: Optional[ErrorFigures] = None  # the layer's own output, only it quantized
    isolated_output: Optional[ErrorFigures] = None  # the model's output, only it quantized
    own_db: Optional[float] = None  # isolated output SQNR with the inputs' share removed
    facts: dict = field(default_factory=dict)
    reason: Optional[str] = None
    rank: Optional[int] = None

    def to_dict(self) -> dict:
        return {"index": self.index, "tensor": self.tensor, "layer": self.layer, "op": self.op,
                "accumulated": self.accumulated.to_dict(), "delta_db": _r(self.delta_db),
                "isolated": self.isolated.to_dict() if self.isolated else None,
                "isolated_output": self.isolated_output.to_dict() if self.isolated_output else None,
                "own_db": _r(self.own_db), "facts": _clean(self.facts), "reason": self.reason, "rank": self.rank}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRow":
        return cls(d["index"], d["tensor"], d["layer"], d["op"], ErrorFigures.from_dict(d["accumulated"]),
                   d.get("delta_db"), ErrorFigures.from_dict(d.get("isolated")),
                   ErrorFigures.from_dict(d.get("isolated_output")), d.get("own_db"), d.get("facts") or {},
                   d.get("reason"), d.get("rank"))


@dataclass
class LayerReport:
    artifact: str
    format: str
    reference: str  # what the artifact was compared with
    images: int
    data: str  # where the images came from
    output: ErrorFigures  # the artifact's model output against the reference's
    output_agreement: Optional[float]  # top-1 agreement (%) of the outputs, when they are class scores
    rows: list[LayerRow]
    isolated: dict = field(default_factory=dict)  # cap, images, layers run, why not
    seconds: float = 0.0

    @property
    def worst(self) -> list[LayerRow]:
        return sorted((r for r in self.rows if r.rank is not None), key=lambda r: r.rank)

    def to_dict(self) -> dict:
        return {"schema": REPORT_SCHEMA, "artifact": self.artifact, "format": self.format,
                "reference": self.reference, "images": self.images, "data": self.data,
                "output": self.output.to_dict(), "output_agreement": _r(self.output_agreement),
                "isolated": self.isolated, "seconds": round(self.seconds, 2),
                "worst": [r.tensor for r in self.worst], "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerReport":
        return cls(d["artifact"], d["format"], d["reference"], d["images"], d["data"],
                   ErrorFigures.from_dict(d["output"]), d.get("output_agreement"),
                   [LayerRow.from_dict(r) for r in d["rows"]], d.get("isolated") or {}, d.get("seconds", 0.0))


def _r(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(float(v), 4)


def _clean(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (float, np.floating)):
            out[k] = round(float(v), 6)
        elif isinstance(v, (np.integer,)):
            out[k] = int(v)
        elif isinstance(v, (list, tuple)):
            out[k] = [round(float(x), 6) if isinstance(x, (float, np.floating)) else x for x in v]
        else:
            out[k] = v
    return out
