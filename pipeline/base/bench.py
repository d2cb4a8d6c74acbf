"""Benchmark records: one BenchRow per (device, artifact, target, runtime), the BenchReport holding them.

The typed contract between the devices package (which fills them) and everything that reads
``bench.json`` (reports, comparisons, the CLI). JSON keys are stable; a report written before still
loads. Imports nothing of the project but the base layer.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.outputs import STATUS_WRONG
from edgepipe.pipeline.base.recorded import Recorded
from edgepipe.pipeline.base.util import write_json_atomic

SCHEMA_VERSION = 1
REPORT_KIND = "edgepipe-bench"
#: ok: measured; wrong-output: measured, but its outputs disagree with the CPU run of the same artifact (or
#: the source model) beyond its precision's bounds (pipeline/base/outputs.py), so its figures are no speed
#: figure; failed: the runtime crashed, timed out or raised; skipped: this artifact cannot run on this
#: target (fp32 on an Edge TPU, Core ML off macOS, a failed export, a dynamic batch on the GPU);
#: unavailable: the target's runtime, driver or device is not there. Every row not ok has a reason.
WRONG_OUTPUT = STATUS_WRONG
STATUSES = ("ok", WRONG_OUTPUT, "failed", "skipped", "unavailable")


@dataclass
class BenchRow:
    artifact: str
    format: str
    precision: str
    target: str
    runtime: str
    status: str  # one of STATUSES
    reason: Optional[str] = None
    path: Optional[str] = None
    size_bytes: Optional[int] = None
    runner: Optional[str] = None  # agent | worker | ssh:agent | adb:agent | adb:benchmark_model
    runtime_version: Optional[str] = None
    runtime_api: Optional[str] = None
    threads: Optional[int] = None
    load_ms: Optional[float] = None
    first_ms: Optional[float] = None
    warmup_ms: list = field(default_factory=list)
    latency_ms: dict = field(default_factory=dict)  # n p50 p90 p99 mean std min max cv ci95_p50 ci_coverage
    samples_ms: list = field(default_factory=list)
    throughput_ips: Optional[float] = None
    measured_s: Optional[float] = None
    truncated: bool = False
    memory: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)
    profile: Optional[dict] = None
    agreement: Optional[dict] = None
    input_source: Optional[str] = None
    inputs: list = field(default_factory=list)
    signal: Optional[str] = None
    stderr_tail: Optional[str] = None
    wall_s: Optional[float] = None
    loadavg: Optional[list] = None
    notes: list = field(default_factory=list)
    device: str = "local"  # where it ran: "local", or a registered device's name

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.device, self.artifact, self.target, self.runtime)

    def stat(self, name: str) -> Optional[float]:
        v = (self.latency_ms or {}).get(name)
        return float(v) if isinstance(v, (int, float)) else None


@dataclass
class BenchReport:
    rows: list[BenchRow] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    manifest: Optional[str] = None
    host: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)  # probe answers per target
    settings: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    created: Optional[str] = None
    wall_s: Optional[float] = None
    edgepipe_version: Optional[str] = None
    devices: dict = field(default_factory=dict)  # device name -> its identity and facts (one per runner)
    schema_version: int = SCHEMA_VERSION
    kind: str = REPORT_KIND
    ledger: Optional[Recorded] = None  # where it was recorded (set after bench.json is written; never in it)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.ledger is None:
            del d["ledger"]
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "bench report") -> "BenchReport":
        if not isinstance(d, dict) or d.get("kind") != REPORT_KIND:
            raise UserError(f"{source} is not an edgepipe bench report",
                            "Give the bench.json that `edgepipe bench` wrote")
        v = d.get("schema_version")
        if not isinstance(v, int):
            raise UserError(f"{source} has no schema_version", "Re-run `edgepipe bench`")
        if v > SCHEMA_VERSION:
            raise UserError(f"{source} uses bench schema {v}, newer than this edgepipe understands ({SCHEMA_VERSION})",
                            "Upgrade edgepipe (pip install -U edgepipe)")
        names = {f.name for f in fields(BenchRow)}
        try:
            rows = [BenchRow(**{k: v for k, v in r.items() if k in names}) for r in d.get("rows", [])]
        except TypeError as e:
            raise UserError(f"{source} has malformed rows ({e})", "Re-run `edgepipe bench`") from e
        top = {f.name for f in fields(cls)} - {"rows", "ledger"}
        rec = d.get("ledger")
        return cls(rows=rows, **{k: v for k, v in d.items() if k in top},
                   ledger=Recorded.from_dict(rec) if isinstance(rec, dict) and "run_id" in rec else None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BenchReport":
        p = Path(path)
        if p.is_dir():
            p = p / "bench.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"no bench report at {p}", "Give the bench.json that `edgepipe bench` wrote") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read bench report {p}: {e}", "Re-run `edgepipe bench` to write it again") from e
        return cls.from_dict(d, source=str(p))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    def row(self, artifact: str, target: str) -> Optional[BenchRow]:
        for r in self.rows:
            if r.artifact == artifact and r.target == target:
                return r
        return None

    def counts(self) -> dict:
        c = {s: 0 for s in STATUSES}
        for r in self.rows:
            c[r.status] = c.get(r.status, 0) + 1
        return c

    def failed_rows(self) -> list[BenchRow]:
        return [r for r in self.rows if r.status == "failed"]

    def wrong_output_rows(self) -> list[BenchRow]:
        return [r for r in self.rows if r.status == WRONG_OUTPUT]
