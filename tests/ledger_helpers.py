"""Shared helpers for the ledger tests: synthetic bench/eval/check records shaped exactly like the
JSON edgepipe writes (BenchReport.to_dict(), eval.json, CheckResult.to_dict()), with raw samples
drawn from a known distribution, and a PostgreSQL server started on a unix socket."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

def _pg_bin() -> Path:
    """Debian's newest installed PostgreSQL server binaries (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()

HOST = {"hostname": "bench-host", "os": "Linux 6.1", "platform": "Linux-6.1-x86_64", "python": "3.11.2",
        "cpu": {"model": "Test CPU @ 2.0GHz", "arch": "x86_64", "logical_cores": 2, "usable_cores": 2,
                "isa": ["avx2", "fma"]},
        "memory_bytes": 24 * 2**30, "loadavg": [0.5, 0.4, 0.3],
        "versions": {"ai-edge-litert": "2.3.0", "onnxruntime": "1.32.0", "edgepipe": "0.1.0"}}
RUNTIME_VERSIONS = {"litert": "2.3.0", "onnxruntime": "1.32.0"}


def samples(median_ms: float, n: int = 200, cv: float = 0.05, seed: int = 0) -> list[float]:
    """Latency-like samples: lognormal around ``median_ms`` (right tail), rounded like the agent's."""
    rng = np.random.default_rng(seed)
    return [round(float(x), 5) for x in median_ms * rng.lognormal(0.0, cv, size=n)]


def bench_row(artifact: str, target: str = "cpu", median_ms: float = 2.0, *, n: int = 200, cv: float = 0.05,
              seed: int = 0, device: str = "local", threads: int = 2, status: str = "ok",
              runtime: Optional[str] = None, runtime_version: Optional[str] = None, sha256: Optional[str] = None) -> dict:
    fmt, precision = artifact.split("-", 1)
    runtime = runtime or ("litert" if fmt == "tflite" else "onnxruntime")
    s = samples(median_ms, n, cv, seed) if status == "ok" else []
    srt = sorted(s)
    lat = {"n": len(s), "p50": float(np.median(s)), "p90": srt[int(0.9 * len(s))], "p99": srt[int(0.99 * len(s))],
           "mean": float(np.mean(s)), "std": float(np.std(s)), "min": srt[0], "max": srt[-1]} if s else {}
    row = {"artifact": artifact, "format": fmt, "precision": precision, "target": target, "runtime": runtime,
           "status": status, "reason": None if status == "ok" else "the runtime crashed with SIGSEGV",
           "path": f"{artifact}.{fmt}", "size_bytes": 12345, "runner": "agent",
           "runtime_version": runtime_version or RUNTIME_VERSIONS.get(runtime, "1.0"), "threads": threads,
           "load_ms": 3.0, "first_ms": 5.0, "warmup_ms": [2.0], "latency_ms": lat, "samples_ms": s,
           "memory": {"peak_rss_kb": 50000}, "placement": {}, "device": device, "notes": []}
    if sha256:
        row["sha256"] = sha256
    return row


def bench_report(rows: list[dict], model: str = "tiny", host: Optional[dict] = None, created: Optional[str] = None,
                 threads: int = 2, manifest: Optional[str] = None) -> dict:
    h = dict(host or HOST)
    return {"rows": rows, "model": {"name": model, "input_shape": [1, 32, 32, 3], "num_classes": 10},
            "manifest": manifest, "host": h, "targets": {"cpu": {}},
            "settings": {"targets": ["cpu"], "threads": threads, "runs": 50, "min_seconds": 1.0, "warmup": 5},
            "method": {"isolation": "one fresh process per (artifact, target)"},
            "created": created or "2025-01-01T00:00:00+00:00", "wall_s": 10.0, "edgepipe_version": "0.1.0",
            "devices": {"local": {"kind": "local", "hostname": h["hostname"]}},
            "schema_version": 1, "kind": "edgepipe-bench"}


def eval_result(rows: list[tuple[str, str, float]], model: str = "tiny", source_top1: float = 99.0) -> dict:
    """rows: (artifact, sha256, top1)."""
    res = []
    for art, sha, top1 in rows:
        fmt, precision = art.split("-", 1)
        res.append({"artifact": art, "format": fmt, "precision": precision, "sha256": sha, "verification": "passed",
                    "target": "cpu", "runtime": "litert" if fmt == "tflite" else "onnxruntime", "status": "ok",
                    "top1": top1, "top5": 100.0, "agreement": 100.0 - (source_top1 - top1),
                    "drop": {"top1": source_top1 - top1, "top5": 0.0, "agreement": source_top1 - top1},
                    "lost": 1, "gained": 0, "samples": 450, "images_per_s": 1000.0, "device": "local"})
    return {"schema_version": 1, "kind": "edgepipe-eval", "created": "2025-01-01T00:00:00+00:00",
            "edgepipe_version": "0.1.0", "model": model, "manifest": "manifest.json", "targets": ["cpu"],
            "device": "local", "unit": "percent",
            "dataset": {"source": "digits", "split": "test", "samples": 450, "hash": "abc123"},
            "source": {"top1": source_top1, "top5": 100.0, "correct": 445, "samples": 450},
            "results": res, "seconds": 1.5, "tensorflow_imported": False}


# --------------------------------------------------------------------------------------------- PostgreSQL
class PostgresServer:
    """A throwaway PostgreSQL 15 cluster serving on a unix socket only (no TCP listener)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="edgepipe-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "pg.log"
        self.pid: Optional[int] = None

    def _as_postgres(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run([*self._as_postgres(), str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust",
                        "-U", "postgres", "--no-sync"], check=True, capture_output=True, timeout=120)
        subprocess.run([*self._as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60",
                        "-o", f"-k {self.dir} -c listen_addresses='' -c fsync=off", "-l", str(self.log), "start"],
                       check=True, capture_output=True, timeout=120)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        return self

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.dir}"

    def createdb(self, name: str) -> str:
        subprocess.run([*self._as_postgres(), str(PG_BIN / "createdb"), "-h", str(self.dir),
                        "-U", "postgres", name], check=True, capture_output=True, timeout=60)
        return self.url(name)

    def stop(self) -> None:
        if self.pid is not None:
            subprocess.run([*self._as_postgres(), str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                            "stop"], capture_output=True, timeout=60)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --------------------------------------------------------------------------------------------- fixtures
import itertools  # noqa: E402

import pytest  # noqa: E402

_db_names = itertools.count()


def postgres_available() -> Optional[str]:
    """None when a throwaway server can be started here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL is not installed (/usr/lib/postgresql/*/bin); sudo bash .ci/service-deps.sh installs it"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser (PostgreSQL refuses to run as root)"
    return None


@pytest.fixture(scope="session")
def pg_server():
    why = postgres_available()
    if why:
        pytest.skip(why)
    srv = PostgresServer().start()
    yield srv
    srv.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    """The same ledger tests on an embedded SQLite file and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite")
    srv = request.getfixturevalue("pg_server")
    return srv.createdb(f"ledger_{os.getpid()}_{next(_db_names)}")
