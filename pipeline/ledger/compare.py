"""`edgepipe compare A B`: per row, the ratio of medians with a bootstrap 95% CI from the raw samples.

Rows are matched by (model, device, artifact, target, runtime). Two rows whose material conditions
differ (the device's identity, CPU model, threads, runtime version) are not compared: the whole
comparison is refused, naming what differs, unless ``force`` (then each such row carries a note).

Verdicts: "slower" / "faster" when the change is significant (the interval excludes 1) AND the median
moved by at least ``min_change`` percent (default 5, the latency gate's default budget); "within
threshold" when it is significant but smaller; "no significant change" otherwise. Real runs differ by
more than their samples' noise (load, clocks, thermal state), so bare significance calls nearly every
row of two runs of the same code "changed" (docs/ledger.md, "How often it cries wolf");
``min_change=0`` gives bare significance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.ledger.query import BenchEntry, RunData, diff_conditions
from edgepipe.pipeline.ledger.stats import RatioCI, median_ratio

MIN_CHANGE_PCT = 5.0
VERDICTS = ("slower", "faster", "within threshold", "no significant change", "not compared")


@dataclass
class RowComparison:
    key: tuple  # (model, device, artifact, target, runtime)
    a: Optional[BenchEntry]
    b: Optional[BenchEntry]
    ci: Optional[RatioCI] = None
    differs: list = field(default_factory=list)
    note: Optional[str] = None
    min_change: float = MIN_CHANGE_PCT  # percent: smaller significant changes are "within threshold"

    @property
    def name(self) -> str:
        return (self.b or self.a).name

    @property
    def verdict(self) -> str:
        if self.ci is None or self.ci.ratio is None:
            return "not compared"
        if not self.ci.significant:
            return "no significant change"
        if abs(self.ci.ratio - 1.0) * 100.0 < self.min_change:
            return "within threshold"
        return "slower" if self.ci.ratio > 1 else "faster"

    def to_dict(self) -> dict:
        e = self.b or self.a
        return {"model": e.model, "device": e.device, "artifact": e.artifact, "target": e.target,
                "runtime": e.runtime, "a_p50": self.a.p50 if self.a else None, "b_p50": self.b.p50 if self.b else None,
                "a_row": self.a.row_id if self.a else None, "b_row": self.b.row_id if self.b else None,
                "a_sha256": self.a.sha256 if self.a else None, "b_sha256": self.b.sha256 if self.b else None,
                **({"ratio": self.ci.ratio, "ci95": [self.ci.low, self.ci.high], "significant": self.ci.significant,
                    "change_pct": self.ci.change_pct, "n": [self.ci.n_baseline, self.ci.n_current]}
                   if self.ci else {"ratio": None, "ci95": None, "significant": False}),
                "verdict": self.verdict, "conditions_differ": self.differs, "note": self.note}


@dataclass
class Comparison:
    a: RunData
    b: RunData
    rows: list[RowComparison]
    forced: bool = False
    min_change: float = MIN_CHANGE_PCT

    @property
    def notes(self) -> list[str]:
        return [n for n in (self.a.load_note(), self.b.load_note()) if n]

    @property
    def compared(self) -> list[RowComparison]:
        return [r for r in self.rows if r.ci is not None and r.ci.ratio is not None]

    def to_dict(self) -> dict:
        return {"a": {"label": self.a.label, "run_id": self.a.run_id, "created": self.a.created},
                "b": {"label": self.b.label, "run_id": self.b.run_id, "created": self.b.created},
                "forced": self.forced, "min_change_pct": self.min_change, "notes": self.notes,
                **{k.replace(" ", "_"): sum(r.verdict == k for r in self.rows) for k in VERDICTS},
                "rows": [r.to_dict() for r in self.rows]}


def _pair(a: Optional[BenchEntry], b: Optional[BenchEntry], key: tuple, min_change: float) -> RowComparison:
    rc = RowComparison(key, a, b, min_change=min_change)
    if a is None or b is None:
        rc.note = f"only in {'B' if a is None else 'A'}"
    elif a.status != "ok" or b.status != "ok":
        bad = [f"{s}: {e.status}" + (f" ({e.reason})" if e.reason else "") for s, e in (("A", a), ("B", b))
               if e.status != "ok"]
        rc.note = "not measured in " + "; ".join(bad)
    else:
        rc.differs = diff_conditions(a, b)
        rc.ci = median_ratio(a.samples, b.samples)
        rc.note = rc.ci.note
    return rc


def refuse_if_conditions_differ(rows: list[RowComparison], a_label: str, b_label: str, force: bool) -> None:
    bad = [r for r in rows if r.differs]
    if not bad or force:
        for r in bad:
            r.note = "; ".join(filter(None, [r.note, "conditions differ (forced): " + ", ".join(r.differs)]))
        return
    what = sorted({d for r in bad for d in r.differs})
    raise UserError(f"cannot compare {a_label} with {b_label}: conditions differ for {len(bad)} row(s) "
                    f"({'; '.join(what[:4])}{'; ...' if len(what) > 4 else ''})",
                    "Compare runs measured under the same conditions, or pass --force to compare anyway")


def check_min_change(min_change: float) -> float:
    if isinstance(min_change, bool) or not isinstance(min_change, (int, float)) or math.isnan(min_change) \
            or min_change < 0:
        raise UserError(f"bad --min-change {min_change!r}", "Give a non-negative percentage, e.g. 5 (0: any significant "
                                                           "change)")
    return float(min_change)


def compare_runs(a: RunData, b: RunData, force: bool = False, min_change: float = MIN_CHANGE_PCT) -> Comparison:
    """Match the rows of two runs and compare every pair measured in both."""
    min_change = check_min_change(min_change)
    ka = {e.key: e for e in a.entries}
    kb = {e.key: e for e in b.entries}
    keys = list(dict.fromkeys([*ka, *kb]))
    rows = [_pair(ka.get(k), kb.get(k), k, min_change) for k in keys]
    if not any(r.a is not None and r.b is not None for r in rows):
        raise UserError(f"{a.label} and {b.label} have no rows in common (model, device, artifact, target, runtime)",
                        "Compare two bench runs of the same export")
    refuse_if_conditions_differ(rows, a.label, b.label, force)
    return Comparison(a, b, rows, force, min_change)
