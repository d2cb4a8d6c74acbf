"""The ledger's tables and its versioned migrations (SQLAlchemy Core; SQLite and PostgreSQL).

Versioning: the table ``ledger_schema`` holds one row per applied migration (version, description,
when, by which edgepipe). ``MIGRATIONS`` lists every step in order; opening a ledger applies the
missing ones in one transaction under a writer lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL
``pg_advisory_xact_lock``), so two processes opening an old ledger at once migrate it once. A new
ledger is built by the same steps, so the upgrade path is the path every ledger takes.
docs/ledger.md says why this is a migration table and not Alembic.

``build(metadata, version)`` declares the tables as they are at ``version``. A later version only
ever *adds* under ``if version >= N`` (never edits an earlier line): the step-1 tables are frozen.

    1  runs; bench_rows (raw samples, artifact sha256, per-row conditions); eval_rows; check_rows

Raw samples are stored as float64 little-endian bytes (``pack_samples``; read them with
``numpy.frombuffer(blob, "<f8")``): a bench row of a fast model has tens of thousands of samples,
and JSON-encoding them cost ten times more than packing them (47 ms vs 4.5 ms for 200,000).
    2  runs.parent_id (a sweep's child runs), bench_rows.node, the history index
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable, Iterable, Optional

from sqlalchemy import (JSON, Boolean, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String, Table,
                        Text, text)
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex

SCHEMA_VERSION = 2
Json = JSON()  # TEXT on SQLite, json on PostgreSQL (not jsonb: nothing queries inside it, and the
#               PostgreSQL dialect's import would cost every SQLite ledger 18 ms)


def _key_columns() -> list[Column]:
    """What identifies a result row: model, artifact and where it ran."""
    return [Column("model", String), Column("artifact", String), Column("format", String),
            Column("precision", String), Column("target", String), Column("runtime", String),
            Column("device", String), Column("status", String), Column("reason", Text),
            Column("sha256", String(64))]


def build(md: MetaData, version: int = SCHEMA_VERSION) -> dict[str, Table]:
    """The tables at ``version`` (see the module docstring: later versions only add)."""
    runs = Table(
        "runs", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("kind", String(16), nullable=False),  # bench | eval | check | sweep
        Column("created", String(40), nullable=False),  # when the run happened (ISO 8601, UTC)
        Column("recorded", String(40), nullable=False),  # when it was written here
        Column("model", String), Column("host", String), Column("git_commit", String(64)),
        Column("git_dirty", Boolean), Column("edgepipe_version", String(40)), Column("source", Text),
        Column("wall_s", Float), Column("conditions", Json), Column("meta", Json),
        sqlite_autoincrement=True)  # ids are evidence (select cites them): never reused
    bench = Table(
        "bench_rows", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        *_key_columns(),
        Column("device_id", String),  # the device's identity: local:HOSTNAME, ssh:user@host, adb:SERIAL
        Column("cpu", String), Column("threads", Integer), Column("runtime_version", String),
        Column("n", Integer), Column("p50", Float), Column("p90", Float), Column("p99", Float),
        Column("mean", Float), Column("std", Float), Column("min", Float), Column("max", Float),
        Column("samples", LargeBinary),  # the raw latency samples (ms, measurement order): see pack_samples
        Column("latency", Json), Column("extra", Json),
        sqlite_autoincrement=True)
    evals = Table(
        "eval_rows", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        *_key_columns(),
        Column("top1", Float), Column("top5", Float), Column("agreement", Float),
        Column("drop_top1", Float), Column("drop_top5", Float), Column("drop_agreement", Float),
        Column("samples", Integer), Column("dataset_hash", String), Column("extra", Json),
        sqlite_autoincrement=True)
    checks = Table(
        "check_rows", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        *_key_columns(),
        Column("check_name", String), Column("source_value", Float), Column("value", Float),
        Column("drop_value", Float), Column("budget", Float), Column("extra", Json),
        sqlite_autoincrement=True)
    Index("ix_runs_kind_model", runs.c.kind, runs.c.model)
    Index("ix_bench_run", bench.c.run_id)
    Index("ix_bench_sha", bench.c.sha256)
    Index("ix_eval_run", evals.c.run_id)
    Index("ix_eval_sha", evals.c.sha256)
    Index("ix_check_run", checks.c.run_id)
    if version >= 2:
        runs.append_column(Column("parent_id", Integer, ForeignKey("runs.id", ondelete="CASCADE")))
        bench.append_column(Column("node", String))
        Index("ix_runs_parent", runs.c.parent_id)
        Index("ix_bench_series", bench.c.model, bench.c.artifact, bench.c.target, bench.c.device, bench.c.run_id)
    return {"runs": runs, "bench_rows": bench, "eval_rows": evals, "check_rows": checks}


metadata = MetaData()
TABLES = build(metadata)
runs, bench_rows, eval_rows, check_rows = (TABLES[k] for k in ("runs", "bench_rows", "eval_rows", "check_rows"))
ledger_schema = Table(
    "ledger_schema", metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text), Column("applied", String(40)), Column("edgepipe_version", String(40)))


def pack_samples(samples: Iterable[float]) -> bytes:
    """Latency samples -> float64 little-endian bytes (exact, 8 bytes each)."""
    a = array("d", samples)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack_samples(blob: Optional[bytes]) -> list[float]:
    if not blob:
        return []
    a = array("d")
    a.frombytes(bytes(blob))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


# --------------------------------------------------------------------------------------------- migrations
def _m1_initial(conn: Connection) -> None:
    md = MetaData()
    tables = build(md, 1)
    md.create_all(conn, tables=list(tables.values()))


def _add_column(conn: Connection, table: str, column: Column) -> None:
    ddl_type = column.type.compile(dialect=conn.dialect)
    ref = ""
    for fk in column.foreign_keys:
        ref = f" REFERENCES {fk.target_fullname.split('.')[0]}(id) ON DELETE CASCADE"
    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column.name} {ddl_type}{ref}"))


def _m2_sweeps_nodes_history_index(conn: Connection) -> None:
    _add_column(conn, "runs", runs.c.parent_id)
    _add_column(conn, "bench_rows", bench_rows.c.node)
    for ix in (*runs.indexes, *bench_rows.indexes):
        if ix.name in ("ix_runs_parent", "ix_bench_series"):
            conn.execute(CreateIndex(ix))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "runs, bench/eval/check rows with raw samples and conditions", _m1_initial),
    (2, "sweep grouping (runs.parent_id), bench_rows.node, history index", _m2_sweeps_nodes_history_index),
]
assert [v for v, _, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
