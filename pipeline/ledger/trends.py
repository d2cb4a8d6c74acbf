"""`edgepipe history`: the bench figures of the ledger as series (model, artifact, target, device, runtime).

One query, served by the ``ix_bench_series`` index when filtered by model (and artifact, target,
device); the newest ``last`` points of each series are kept with a window function, so the cost
does not grow with the number of old runs a series has. Raw samples are not read here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from sqlalchemy import func, select

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.ledger import schema
from edgepipe.pipeline.ledger.store import Ledger

DEFAULT_LAST = 20
SERIES_KEY = ("model", "artifact", "target", "device", "runtime")


@dataclass
class Point:
    run_id: int
    row_id: int
    created: str
    status: str
    p50: Optional[float]
    p90: Optional[float]
    n: Optional[int]
    sha256: Optional[str]
    threads: Optional[int]
    cpu: Optional[str]
    runtime_version: Optional[str]
    git_commit: Optional[str]
    node: Optional[str]


@dataclass
class Series:
    model: Optional[str]
    artifact: str
    target: str
    device: str
    runtime: str
    points: list[Point] = field(default_factory=list)  # oldest first

    @property
    def title(self) -> str:
        where = f" @ {self.device}" if self.device != "local" else ""
        return f"{self.model} · {self.artifact} on {self.target}{where} ({self.runtime})"

    def ok_points(self) -> list[Point]:
        return [p for p in self.points if p.status == "ok" and p.p50 is not None]

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in SERIES_KEY}, "title": self.title,
                "points": [asdict(p) for p in self.points]}


def _split(v: Optional[Sequence[str] | str]) -> list[str]:
    if v is None:
        return []
    items = v.split(",") if isinstance(v, str) else list(v)
    return [s.strip() for s in items if s and s.strip()]


def history(led: Ledger, model=None, artifact=None, target=None, device=None, last: int = DEFAULT_LAST,
            status: Optional[str] = None) -> list[Series]:
    """The newest ``last`` bench points of every series matching the filters (comma lists allowed)."""
    if last < 1:
        raise UserError(f"--last must be at least 1 (got {last})", "Use e.g. --last 20")
    t, r = schema.bench_rows, schema.runs
    rn = func.row_number().over(partition_by=[t.c[k] for k in SERIES_KEY], order_by=t.c.run_id.desc()).label("rn")
    inner = select(*[t.c[k] for k in SERIES_KEY], t.c.id.label("row_id"), t.c.run_id, t.c.status, t.c.p50, t.c.p90,
                   t.c.n, t.c.sha256, t.c.threads, t.c.cpu, t.c.runtime_version, t.c.node, rn)
    for col, val in (("model", model), ("artifact", artifact), ("target", target), ("device", device),
                     ("status", status)):
        vals = _split(val)
        if vals:
            inner = inner.where(t.c[col].in_(vals))
    sub = inner.subquery()
    q = (select(sub, r.c.created, r.c.git_commit).join(r, r.c.id == sub.c.run_id).where(sub.c.rn <= last)
         .order_by(*[sub.c[k] for k in SERIES_KEY], sub.c.run_id))
    with led.read() as conn:
        rows = conn.execute(q).mappings().all()
    out: dict[tuple, Series] = {}
    for m in rows:
        key = tuple(m[k] for k in SERIES_KEY)
        s = out.get(key) or out.setdefault(key, Series(*key))
        s.points.append(Point(m["run_id"], m["row_id"], m["created"], m["status"], m["p50"], m["p90"], m["n"],
                              m["sha256"], m["threads"], m["cpu"], m["runtime_version"], m["git_commit"], m["node"]))
    return list(out.values())


def runs(led: Ledger, kind: Optional[str] = None, model: Optional[str] = None, limit: int = 20) -> list[dict]:
    """The newest runs (any kind), with their row counts."""
    r = schema.runs
    q = select(r.c.id, r.c.kind, r.c.created, r.c.model, r.c.host, r.c.git_commit, r.c.parent_id, r.c.source)
    if kind:
        q = q.where(r.c.kind.in_(_split(kind)))
    if model:
        q = q.where(r.c.model.in_(_split(model)))
    with led.read() as conn:
        out = [dict(m) for m in conn.execute(q.order_by(r.c.id.desc()).limit(limit)).mappings()]
        for table in ("bench_rows", "eval_rows", "check_rows"):
            t = schema.TABLES[table]
            ids = [d["id"] for d in out]
            counts = dict(conn.execute(select(t.c.run_id, func.count()).where(t.c.run_id.in_(ids))
                                       .group_by(t.c.run_id)).all()) if ids else {}
            for d in out:
                d.setdefault("rows", 0)
                d["rows"] += counts.get(d["id"], 0)
    return out


def info(led: Ledger) -> dict:
    """Where the ledger is, its schema version, and how much it holds."""
    with led.read() as conn:
        counts = {name: conn.execute(select(func.count()).select_from(t)).scalar()
                  for name, t in schema.TABLES.items()}
        applied = [dict(m) for m in conn.execute(select(schema.ledger_schema)
                                                 .order_by(schema.ledger_schema.c.version)).mappings()]
    return {"location": led.location.shown, "kind": led.location.kind, "schema_version": led.version(),
            "migrations": applied, "counts": counts}
