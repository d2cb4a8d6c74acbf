"""Where the ledger lives: a SQLite file (default) or a PostgreSQL URL. Standard library only.

    resolve(None)                          -> $EDGEPIPE_LEDGER, else $XDG_DATA_HOME/edgepipe/ledger.sqlite
                                              (~/.local/share/edgepipe/ledger.sqlite without XDG_DATA_HOME)
    resolve("results.sqlite")              -> that SQLite file (a folder: FOLDER/ledger.sqlite)
    resolve("postgresql://u@db/edgepipe")  -> that PostgreSQL database (driver: psycopg 3)
    resolve(None, disabled=True)           -> None (``--no-ledger``; also EDGEPIPE_LEDGER=off)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from edgepipe.pipeline.base.errors import UserError

ENV = "EDGEPIPE_LEDGER"
FILE_NAME = "ledger.sqlite"
OFF_WORDS = ("off", "none", "no", "0", "false")
_PG_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


@dataclass(frozen=True)
class Location:
    """A resolved ledger: ``url`` is what SQLAlchemy opens, ``shown`` is safe to print (no password)."""

    kind: str  # sqlite | postgresql
    url: str
    shown: str
    path: Optional[Path] = None  # the SQLite file

    def __str__(self) -> str:
        return self.shown


def data_dir() -> Path:
    """$XDG_DATA_HOME/edgepipe, else ~/.local/share/edgepipe."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "edgepipe"


def default_path() -> Path:
    return data_dir() / FILE_NAME


def redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def _postgres(spec: str) -> Location:
    rest = spec.split("://", 1)[1]
    if not rest or rest.startswith("?") and "host=" not in rest:
        raise UserError(f"ledger URL '{redact(spec)}' names no server or database",
                        "Write postgresql://USER@HOST/DATABASE (or postgresql:///DB?host=/socket/dir)")
    return Location("postgresql", "postgresql+psycopg://" + rest, redact("postgresql://" + rest))


def _sqlite_file(spec: str) -> Location:
    raw = spec[len("sqlite:///"):] if spec.startswith("sqlite:///") else spec
    if not raw or raw == ":memory:":
        raise UserError(f"ledger '{spec}' is not a file", "Give a file path, e.g. --ledger results.sqlite")
    p = Path(raw).expanduser()
    if p.is_dir():
        p = p / FILE_NAME
    p = p.absolute()
    return Location("sqlite", f"sqlite:///{p}", str(p), p)


def resolve(spec: Union[str, os.PathLike, None] = None, disabled: bool = False) -> Optional[Location]:
    """The ledger a command writes to and reads from; None when recording is turned off."""
    if disabled:
        return None
    if spec is None:
        env = os.environ.get(ENV, "").strip()
        if env.lower() in OFF_WORDS:
            return None
        spec = env or None
    if spec is None:
        return _sqlite_file(str(default_path()))
    s = str(spec).strip()
    if s.lower().startswith(_PG_SCHEMES):
        return _postgres(s)
    if "://" in s and not s.startswith("sqlite:///"):
        scheme = s.split("://", 1)[0]
        raise UserError(f"ledger URL scheme '{scheme}' is not supported",
                        "Use a file path (SQLite) or postgresql://USER@HOST/DATABASE")
    return _sqlite_file(s)
