"""`edgepipe select --device NAME --max-drop 1.0`: which artifact to ship on a device.

Candidates are the newest successful bench row of every (artifact sha256, target, runtime) measured
on the device. Each is matched with the newest successful eval row of the *same sha256* (preferring
one measured on the same device and target, then the same target anywhere, then any). The choice
is the fastest candidate (median latency) whose accuracy drop is within the budget; the ids of
the bench row and the eval row that prove it are part of the answer.
"""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from typing import Optional

from sqlalchemy import select as sql_select

from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.ledger import schema
from edgepipe.pipeline.ledger.conditions import now_iso
from edgepipe.pipeline.ledger.store import Ledger

METRICS = {"top1": "drop_top1", "top5": "drop_top5", "agreement": "drop_agreement"}


@dataclass
class Candidate:
    model: Optional[str]
    artifact: str
    format: Optional[str]
    precision: Optional[str]
    sha256: str
    target: str
    runtime: str
    device: str
    p50_ms: Optional[float]
    bench_row: int
    bench_run: int
    drop: Optional[float] = None
    accuracy: Optional[float] = None
    eval_row: Optional[int] = None
    eval_run: Optional[int] = None
    eval_match: Optional[str] = None  # same device and target | same target | other target
    qualifies: bool = False


@dataclass
class Selection:
    device: str
    model: Optional[str]
    metric: str
    max_drop: float
    ledger: str
    choice: Optional[Candidate] = None
    candidates: list[Candidate] = field(default_factory=list)
    closest: Optional[str] = None
    created: str = field(default_factory=now_iso)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "edgepipe-deployment"
        d["schema_version"] = 1
        return d


def _bench_candidates(conn, device: str, model: Optional[str], target: Optional[str]) -> list[Candidate]:
    t = schema.bench_rows
    q = sql_select(t).where(t.c.device == device, t.c.status == "ok", t.c.sha256.is_not(None), t.c.p50.is_not(None))
    if device == "local":  # "local" rows of a shared ledger come from many hosts: this host's only
        q = q.where(t.c.device_id == f"local:{platform.node()}")
    if model:
        q = q.where(t.c.model == model)
    if target:
        q = q.where(t.c.target == target)
    newest: dict[tuple, Candidate] = {}
    for m in conn.execute(q.order_by(t.c.id)).mappings():
        newest[(m["sha256"], m["target"], m["runtime"])] = Candidate(
            m["model"], m["artifact"], m["format"], m["precision"], m["sha256"], m["target"], m["runtime"],
            m["device"], m["p50"], m["id"], m["run_id"])
    return list(newest.values())


def _attach_eval(conn, c: Candidate, metric: str, max_drop: float) -> None:
    e = schema.eval_rows
    rows = conn.execute(sql_select(e).where(e.c.sha256 == c.sha256, e.c.status == "ok")
                        .order_by(e.c.id.desc())).mappings().all()
    ranked = sorted(rows, key=lambda m: (0 if (m["device"], m["target"]) == (c.device, c.target)
                                         else 1 if m["target"] == c.target else 2, -m["id"]))
    if not ranked:
        return
    m = ranked[0]
    c.eval_row, c.eval_run = m["id"], m["run_id"]
    c.drop, c.accuracy = m[METRICS[metric]], m[metric]
    c.eval_match = ("same device and target" if (m["device"], m["target"]) == (c.device, c.target)
                    else "same target" if m["target"] == c.target else f"other target ({m['target']})")
    c.qualifies = c.drop is not None and c.drop <= max_drop + 1e-9


def _closest(cands: list[Candidate], device: str, max_drop: float, metric: str) -> str:
    if not cands:
        return f"no successful bench row on device '{device}' with an artifact sha256"
    evaluated = [c for c in cands if c.drop is not None]
    if not evaluated:
        names = ", ".join(sorted({c.artifact for c in cands}))
        return f"none of the {len(cands)} artifacts benchmarked on {device} ({names}) has an eval row"
    best = min(evaluated, key=lambda c: (c.drop, c.p50_ms))
    return (f"closest: {best.artifact} on {best.target} ({best.p50_ms:.4g} ms) loses {best.drop:.2f} points of "
            f"{metric}, over the {max_drop:g}-point budget")


def select_artifact(led: Ledger, device: str, max_drop: float = 1.0, metric: str = "top1",
                    model: Optional[str] = None, target: Optional[str] = None) -> Selection:
    """The fastest artifact on ``device`` within the accuracy budget (``choice`` None when none qualifies)."""
    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'", f"Use one of: {', '.join(METRICS)}")
    if max_drop < 0:
        raise UserError(f"--max-drop must be 0 or more (got {max_drop:g})", "Give percentage points, e.g. 1.0")
    with led.read() as conn:
        cands = _bench_candidates(conn, device, model, target)
        models = sorted({c.model or "?" for c in cands})
        if len(models) > 1:
            raise UserError(f"the ledger has bench rows of {len(models)} models on '{device}' ({', '.join(models)})",
                            "Pick one with --model NAME")
        for c in cands:
            _attach_eval(conn, c, metric, max_drop)
    cands.sort(key=lambda c: (not c.qualifies, c.p50_ms))
    sel = Selection(device, model or (models[0] if models else None), metric, max_drop, led.location.shown,
                    candidates=cands)
    ok = [c for c in cands if c.qualifies]
    if ok:
        sel.choice = ok[0]
    else:
        sel.closest = _closest(cands, device, max_drop, metric)
    return sel


def enforce(sel: Selection) -> None:
    """GateFailure (exit 1) when nothing qualifies, saying what was closest."""
    if sel.choice is None:
        raise GateFailure(f"no artifact on {sel.device} is within {sel.max_drop:g} points of {sel.metric}: "
                          f"{sel.closest}", "Loosen --max-drop, or evaluate / benchmark more artifacts")
