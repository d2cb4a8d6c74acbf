"""Where a result was recorded in the results ledger: the run's id and its rows' ids.

``bench``, ``evaluate`` and ``check`` set it on what they return (``report.ledger``,
``result.ledger``; None when recording is off); ``--json`` prints it under "ledger". The files the
commands write (bench.json, eval.json) never carry it: they are written before recording. Standard
library only (the ledger itself lives in ``edgepipe.pipeline.ledger``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Recorded:
    """What one recording wrote: ``rows`` maps a table (bench_rows, eval_rows, check_rows) to row ids."""

    location: str
    kind: str
    run_id: int
    rows: dict[str, list[int]] = field(default_factory=dict)
    children: list["Recorded"] = field(default_factory=list)  # a sweep's child runs

    def summary(self) -> str:
        n = sum(len(v) for v in self.rows.values()) + sum(sum(len(v) for v in c.rows.values())
                                                          for c in self.children)
        kids = f", {len(self.children)} child runs" if self.children else ""
        return f"recorded {self.kind} run {self.run_id} ({n} rows{kids}) in the ledger {self.location}"

    def to_dict(self) -> dict[str, Any]:
        return {"location": self.location, "kind": self.kind, "run_id": self.run_id, "rows": self.rows,
                "children": [c.to_dict() for c in self.children]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recorded":
        return cls(str(d["location"]), str(d["kind"]), int(d["run_id"]), dict(d.get("rows") or {}),
                   [cls.from_dict(c) for c in d.get("children") or []])
