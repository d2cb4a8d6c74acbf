"""Opening a ledger: the engine, the writer lock, migrations, and one-line errors.

    with Ledger.open("results.sqlite") as led:      # or a postgresql:// URL, or None (the default file)
        with led.write() as conn:                    # one transaction; SQLite: BEGIN IMMEDIATE
            run_id = led.insert_run(conn, {...})

Every database failure leaves here as ``LedgerError`` (a UserError: exit 2, one line): a locked
or corrupt SQLite file, an unreachable PostgreSQL server, a ledger newer than this edgepipe, a
missing driver. A write is one transaction, so a failed write leaves nothing half-written.

SQLite runs in WAL mode (readers never wait for a writer) with a busy timeout
(``$EDGEPIPE_LEDGER_TIMEOUT`` seconds, default 30): concurrent writers queue instead of failing.
Write transactions start with ``BEGIN IMMEDIATE`` so a writer takes the lock before it reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from datetime import datetime, timezone
from typing import Iterator, Optional, Union

from sqlalchemy import Table, create_engine, event, func, insert, inspect, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import pkg_version
from edgepipe.pipeline.ledger import schema
from edgepipe.pipeline.ledger.location import Location, resolve

TIMEOUT_ENV = "EDGEPIPE_LEDGER_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
PG_LOCK_KEY = 0x6564676570697065  # "edgepipe": the advisory lock that serialises migrations


class LedgerError(UserError):
    """The ledger cannot be opened, read or written (exit 2)."""


def _timeout() -> float:
    try:
        return max(0.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    lines = [ln.strip() for ln in str(orig).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(orig).__name__


def translate(e: BaseException, loc: Location, timeout: float) -> LedgerError:
    """A database exception -> one line naming the problem and the fix."""
    msg = _first_line(e)
    low = msg.lower()
    if loc.kind == "sqlite":
        if "locked" in low or "busy" in low:
            return LedgerError(f"the ledger {loc.shown} is locked by another process (waited {timeout:g} s)",
                               f"Retry when it finishes, raise ${TIMEOUT_ENV}, pass --ledger OTHER.sqlite, "
                               f"or --no-ledger to skip recording")
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return LedgerError(f"the ledger {loc.shown} is corrupt or not a SQLite database ({msg})",
                               "Move the file aside (a new ledger is created in its place) or pass --ledger OTHER")
        if "unable to open" in low or "readonly" in low or "read-only" in low:
            return LedgerError(f"cannot write the ledger {loc.shown} ({msg})",
                               "Check the folder is writable, pass --ledger OTHER, or --no-ledger to skip recording")
        return LedgerError(f"the ledger {loc.shown} failed: {msg}",
                           "Pass --ledger OTHER, or --no-ledger to skip recording")
    if isinstance(e, DBAPIError) and e.connection_invalidated or "connect" in low or "connection" in low \
            or "could not translate host" in low or "timeout" in low:
        return LedgerError(f"cannot reach the PostgreSQL ledger {loc.shown} ({msg})",
                           "Check the URL, the server and the network, or pass --no-ledger to skip recording")
    return LedgerError(f"the PostgreSQL ledger {loc.shown} failed: {msg}",
                       "Check the URL and the database's permissions, or pass --no-ledger to skip recording")


def _json_default(o):
    """JSON for what reports may hold besides plain data: dataclasses, paths, sets."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _dumps(obj) -> str:
    return json.dumps(obj, default=_json_default)


def _sqlite_engine(loc: Location, timeout: float) -> Engine:
    try:
        loc.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LedgerError(f"cannot create the ledger's folder {loc.path.parent} ({e.strerror})",
                          "Pass --ledger PATH in a writable folder, or --no-ledger") from e
    eng = create_engine(loc.url, connect_args={"timeout": timeout}, json_serializer=_dumps)

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn, _record):  # SQLAlchemy's documented recipe: we emit BEGIN ourselves
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("edgepipe_write") else "BEGIN")

    return eng


def _pg_engine(loc: Location, timeout: float) -> Engine:
    try:
        import psycopg  # noqa: F401 - only to turn a missing driver into one line
    except ImportError as e:
        raise LedgerError("a PostgreSQL ledger needs the psycopg driver",
                          "pip install 'edgepipe[postgres]' (or psycopg[binary]), or use a SQLite file") from e
    try:
        return create_engine(loc.url, connect_args={"connect_timeout": max(1, int(min(timeout, 30)))},
                             json_serializer=_dumps)
    except (ArgumentError, NoSuchModuleError) as e:
        raise LedgerError(f"cannot use the ledger URL {loc.shown} ({_first_line(e)})",
                          "Write postgresql://USER@HOST/DATABASE") from e


class Ledger:
    """An open ledger (engine + location). Use ``Ledger.open(spec)``; close it (or use ``with``)."""

    def __init__(self, loc: Location, engine: Engine, timeout: float):
        self.location = loc
        self.engine = engine
        self.timeout = timeout

    @classmethod
    def open(cls, spec: Union[str, os.PathLike, Location, None] = None, migrate: bool = True) -> "Ledger":
        loc = spec if isinstance(spec, Location) else resolve(spec)
        if loc is None:
            raise LedgerError("the ledger is turned off ($EDGEPIPE_LEDGER=off)", "Pass --ledger PATH or URL")
        timeout = _timeout()
        eng = _sqlite_engine(loc, timeout) if loc.kind == "sqlite" else _pg_engine(loc, timeout)
        led = cls(loc, eng, timeout)
        if migrate:
            try:
                led.migrate()
            except BaseException:
                eng.dispose()
                raise
        return led

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def __str__(self) -> str:
        return self.location.shown

    # ----------------------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (committed on success, rolled back on any error)."""
        try:
            with self.engine.connect().execution_options(edgepipe_write=True) as conn, conn.begin():
                yield conn
        except SQLAlchemyError as e:
            raise translate(e, self.location, self.timeout) from e

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as e:
            raise translate(e, self.location, self.timeout) from e

    # ----------------------------------------------------------------------------- schema
    def version(self) -> Optional[int]:
        """The schema version applied (None: an empty database)."""
        with self.read() as conn:
            return _version(conn)

    def migrate(self) -> int:
        """Apply the missing migrations (all of them on a new ledger); return the version."""
        v = self.version()
        if v == schema.SCHEMA_VERSION:
            return v
        _refuse_newer(v, self.location)
        with self.write() as conn:
            if self.location.kind == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(PG_LOCK_KEY)))
            schema.ledger_schema.create(conn, checkfirst=True)
            v = _version(conn) or 0
            _refuse_newer(v, self.location)
            for version, description, step in schema.MIGRATIONS:
                if version > v:
                    step(conn)
                    conn.execute(insert(schema.ledger_schema).values(
                        version=version, description=description, edgepipe_version=pkg_version("edgepipe"),
                        applied=datetime.now(timezone.utc).isoformat(timespec="seconds")))
        return schema.SCHEMA_VERSION

    # ----------------------------------------------------------------------------- inserts
    @staticmethod
    def insert_run(conn: Connection, values: dict) -> int:
        return int(conn.execute(insert(schema.runs).values(**values).returning(schema.runs.c.id)).scalar_one())

    @staticmethod
    def insert_rows(conn: Connection, table: Table, rows: list[dict]) -> list[int]:
        if not rows:
            return []
        res = conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
        return [int(r[0]) for r in res]


def open_for_reading(spec: Union[str, os.PathLike, Location, None] = None) -> Ledger:
    """Open an existing ledger to read it: a default (or named) SQLite file that does not exist yet is an
    error naming how to fill it, not a new empty ledger; so is a ledger turned off with $EDGEPIPE_LEDGER=off."""
    loc = spec if isinstance(spec, Location) else resolve(spec)
    if loc is None:
        raise UserError("the ledger is turned off ($EDGEPIPE_LEDGER=off)", "Pass --ledger PATH or URL")
    if loc.kind == "sqlite" and loc.path is not None and not loc.path.exists():
        raise UserError(f"there is no ledger at {loc.shown} yet",
                        "Record runs first (`edgepipe bench`, or `edgepipe ledger record OUT/<model>`), "
                        "or pass --ledger PATH|URL")
    return Ledger.open(loc)


def _version(conn: Connection) -> Optional[int]:
    if not inspect(conn).has_table("ledger_schema"):
        return None
    v = conn.execute(select(func.max(schema.ledger_schema.c.version))).scalar()
    return int(v) if v is not None else None


def _refuse_newer(v: Optional[int], loc: Location) -> None:
    if v is not None and v > schema.SCHEMA_VERSION:
        raise LedgerError(f"the ledger {loc.shown} has schema version {v}, newer than this edgepipe understands "
                          f"({schema.SCHEMA_VERSION})", "Upgrade edgepipe (pip install -U edgepipe)")


def probe(conn: Connection) -> None:
    """A cheap round trip (raises the database's error if the connection is unusable)."""
    conn.execute(text("SELECT 1"))
