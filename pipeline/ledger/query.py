"""Reading bench results back: one shape (``BenchEntry``) for ledger rows and bench.json rows alike.

A run reference (``resolve_run``) is one of
    ``12`` / ``#12``     a ledger run id (a bench run, or a sweep: its bench rows)
    ``latest``           the newest bench run (``latest~1`` the one before), optionally of one model
    ``PATH``             a bench.json, or the folder holding it (no ledger needed)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sqlalchemy import desc, select

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.ledger import schema
from edgepipe.pipeline.ledger.record import bench_row_values, manifest_facts
from edgepipe.pipeline.ledger.store import Ledger

_RUN_ID = re.compile(r"^(?:#|run:)?(\d+)$")
_LATEST = re.compile(r"^latest(?:~(\d+))?$")


@dataclass
class BenchEntry:
    model: Optional[str]
    artifact: str
    target: str
    runtime: str
    device: str
    status: str
    format: Optional[str] = None
    precision: Optional[str] = None
    device_id: Optional[str] = None
    cpu: Optional[str] = None
    threads: Optional[int] = None
    runtime_version: Optional[str] = None
    sha256: Optional[str] = None
    reason: Optional[str] = None
    p50: Optional[float] = None
    n: Optional[int] = None
    samples: list = field(default_factory=list)
    row_id: Optional[int] = None
    run_id: Optional[int] = None

    @property
    def key(self) -> tuple:
        return (self.model, self.device, self.artifact, self.target, self.runtime)

    @property
    def name(self) -> str:
        where = f" @ {self.device}" if self.device != "local" else ""
        return f"{self.artifact} on {self.target}{where}"

    def conditions(self) -> dict:
        """What must match for two figures to be comparable."""
        return {"device": self.device_id, "cpu": self.cpu, "threads": self.threads,
                "runtime": f"{self.runtime} {self.runtime_version or '?'}"}

    @classmethod
    def from_values(cls, v: dict, row_id: Optional[int] = None, run_id: Optional[int] = None) -> "BenchEntry":
        return cls(model=v.get("model"), artifact=v.get("artifact"), target=v.get("target"),
                   runtime=v.get("runtime"), device=v.get("device") or "local", status=v.get("status"),
                   format=v.get("format"), precision=v.get("precision"), device_id=v.get("device_id"),
                   cpu=v.get("cpu"), threads=v.get("threads"), runtime_version=v.get("runtime_version"),
                   sha256=v.get("sha256"), reason=v.get("reason"), p50=v.get("p50"), n=v.get("n"),
                   samples=schema.unpack_samples(v.get("samples")), row_id=row_id, run_id=run_id)


@dataclass
class RunData:
    label: str  # "run 12" or the bench.json path
    entries: list[BenchEntry]
    run_id: Optional[int] = None
    created: Optional[str] = None
    model: Optional[str] = None
    git_commit: Optional[str] = None
    load: Optional[float] = None  # the highest 1-minute load average seen around the run
    cores: Optional[int] = None  # usable cores of the host that ran it

    def load_note(self) -> Optional[str]:
        """A warning when the run shared its CPUs: its figures include that contention."""
        if self.load is None or not self.cores or self.load <= 0.75 * self.cores:
            return None
        return (f"{self.label} ran under load (load average {self.load:.1f} on {self.cores} usable cores): its "
                f"latencies include that contention")


def _load(conds: Optional[dict], rows: list[dict]) -> tuple[Optional[float], Optional[int]]:
    conds = conds or {}
    host = conds.get("host") or {}
    seen = [x[0] for x in (conds.get("loadavg_before"), conds.get("loadavg_after"), host.get("loadavg"),
                           *[(r.get("extra") or r).get("loadavg") for r in rows]) if isinstance(x, list) and x]
    return (max(seen) if seen else None), (host.get("cpu") or {}).get("usable_cores")


def diff_conditions(a: BenchEntry, b: BenchEntry) -> list[str]:
    """['cpu: X vs Y', ...] for the material conditions that differ."""
    ca, cb = a.conditions(), b.conditions()
    return [f"{k}: {ca[k]} vs {cb[k]}" for k in ca if ca[k] != cb[k]]


# --------------------------------------------------------------------------------------------- files
def load_bench_file(path: Path) -> RunData:
    p = path / "bench.json" if path.is_dir() else path
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read bench report {p}: {e}", "Give the bench.json that `edgepipe bench` wrote") from e
    if not isinstance(d, dict) or d.get("kind") != "edgepipe-bench" or not isinstance(d.get("rows"), list):
        raise UserError(f"{p} is not an edgepipe bench report", "Give the bench.json that `edgepipe bench` wrote")
    shas, _, folder = manifest_facts(d.get("manifest"))
    entries = [BenchEntry.from_values(v) for v in bench_row_values(d, shas, folder)]
    load, cores = _load({"host": d.get("host")}, d["rows"])
    return RunData(str(p), entries, None, d.get("created"), (d.get("model") or {}).get("name"), None, load, cores)


# --------------------------------------------------------------------------------------------- ledger
def _bench_run_ids(conn, run_id: int) -> list[int]:
    r = conn.execute(select(schema.runs.c.kind).where(schema.runs.c.id == run_id)).scalar()
    if r is None:
        raise UserError(f"the ledger has no run {run_id}", "List runs with `edgepipe history` or `edgepipe ledger runs`")
    if r == "bench":
        return [run_id]
    if r == "sweep":
        kids = conn.execute(select(schema.runs.c.id).where(schema.runs.c.parent_id == run_id,
                                                          schema.runs.c.kind == "bench")).scalars().all()
        if kids:
            return list(kids)
    raise UserError(f"ledger run {run_id} is a {r} run with no bench rows", "Give the id of a bench (or sweep) run")


def load_run(led: Ledger, run_id: int) -> RunData:
    t, r = schema.bench_rows, schema.runs
    with led.read() as conn:
        ids = _bench_run_ids(conn, run_id)
        head = conn.execute(select(r.c.created, r.c.model, r.c.git_commit).where(r.c.id == run_id)).first()
        rows = conn.execute(select(t).where(t.c.run_id.in_(ids)).order_by(t.c.id)).mappings().all()
        conds = conn.execute(select(r.c.conditions).where(r.c.id.in_(ids))).scalars().all()
    entries = [BenchEntry.from_values(dict(v), v["id"], v["run_id"]) for v in rows]
    loads = [_load(c, [dict(v) for v in rows]) for c in conds]
    load = max((x for x, _ in loads if x is not None), default=None)
    cores = next((c for _, c in loads if c), None)
    return RunData(f"run {run_id}", entries, run_id, head.created, head.model, head.git_commit, load, cores)


def latest_run_id(led: Ledger, back: int = 0, model: Optional[str] = None) -> int:
    r = schema.runs
    q = select(r.c.id).where(r.c.kind == "bench")
    if model:
        q = q.where(r.c.model == model)
    with led.read() as conn:
        ids = conn.execute(q.order_by(desc(r.c.id)).offset(back).limit(1)).scalars().all()
    if not ids:
        which = f" of model {model}" if model else ""
        raise UserError(f"the ledger {led} has no{' earlier' if back else ''} bench run{which}",
                        "Record one with `edgepipe bench` (or `edgepipe ledger record bench.json`)")
    return int(ids[0])


def is_ledger_ref(ref: str) -> bool:
    return bool(_RUN_ID.match(ref.strip()) or _LATEST.match(ref.strip()))


def resolve_run(ref: str, led: Optional[Ledger], model: Optional[str] = None) -> RunData:
    """A run reference (see the module docstring) -> its bench entries."""
    s = str(ref).strip()
    m_id, m_latest = _RUN_ID.match(s), _LATEST.match(s)
    if m_id or m_latest:
        if led is None:
            raise UserError(f"'{s}' names a ledger run but the ledger is turned off", "Drop --no-ledger")
        rid = int(m_id.group(1)) if m_id else latest_run_id(led, int(m_latest.group(1) or 0), model)
        return load_run(led, rid)
    p = Path(s)
    if p.exists():
        return load_bench_file(p)
    raise UserError(f"'{s}' is not a ledger run id, 'latest[~N]', or a bench.json",
                    "Give a run id from `edgepipe history`, 'latest', or the path of a bench.json")


