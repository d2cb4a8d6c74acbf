"""The sweep's output folder: what each job wrote, and whether a job's work is already there.

    OUT/<model>/                    the export, exactly as `edgepipe export` lays it out
    OUT/<model>/eval.json           + source_predictions-*.npz, eval.log
    OUT/<model>/bench/<device>/     bench.json, bench.md, bench.html, bench.log (one device)
    OUT/<model>/bench.json          every device of the model merged (`edgepipe bench --device` shape)
    OUT/<model>/sweep-jobs.json     per job: its key, status, node, host, times
    OUT/sweep.json|md|html          the merged report; the gate (JUnit/Markdown) where asked

Only the machine running the sweep writes here, and only complete files: an export replaces the
model folder by renaming a finished staging folder into place. A job whose key (a hash of what
it depends on) is recorded with status ok and whose files are intact is finished: a re-run of the
same plan reuses it instead of running it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from edgepipe.pipeline.base.manifest import MANIFEST_NAME, Manifest, artifact_problem
from edgepipe.pipeline.base.util import write_json_atomic

JOBS_FILE = "sweep-jobs.json"
STAGING = ".sweep-tmp-"
OLD = ".sweep-old-"


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class OutputFolder:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def prepare(self) -> None:
        """Create the folder; remove staging folders a killed run left behind."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in list(self.root.glob(f"{STAGING}*")) + list(self.root.glob(f"{OLD}*")):
            shutil.rmtree(stale, ignore_errors=True)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def bench_dir(self, name: str, device: str) -> Path:
        return self.model_dir(name) / "bench" / device

    # -- job records ---------------------------------------------------------------------------
    def records(self, name: str) -> dict:
        p = self.model_dir(name) / JOBS_FILE
        try:
            d = json.loads(p.read_text())
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def record(self, name: str, result: dict) -> None:
        """Remember a finished job (its key, status, where and when; never its files)."""
        recs = self.records(name)
        rec = {k: result.get(k) for k in ("key", "status", "reason", "started", "ended", "where", "attempts")}
        if result["kind"] == "bench":
            recs.setdefault("bench", {})[result["device"]] = rec
        else:
            recs[result["kind"]] = rec
        write_json_atomic(self.model_dir(name) / JOBS_FILE, recs)

    def finished(self, name: str, kind: str, key: str, device: Optional[str] = None) -> Optional[dict]:
        """The record of a job already done with this key (and its outputs intact), else None."""
        recs = self.records(name)
        rec = recs.get("bench", {}).get(device) if kind == "bench" else recs.get(kind)
        if not isinstance(rec, dict) or rec.get("key") != key or rec.get("status") != "ok":
            return None
        intact = {"export": self._export_intact, "eval": self._eval_intact, "bench": self._bench_intact}[kind]
        return rec if intact(name, device) else None

    def _export_intact(self, name: str, device: Optional[str] = None) -> bool:
        m = self.manifest(name)
        return m is not None and bool(m.artifacts) and all(
            artifact_problem(a, self.model_dir(name)) is None for a in m.artifacts)

    def _eval_intact(self, name: str, device: Optional[str] = None) -> bool:
        m, ev = self.manifest(name), self.json(self.model_dir(name) / "eval.json")
        if m is None or ev is None:
            return False
        shas = {r.get("artifact"): r.get("sha256") for r in ev.get("results", [])}
        return all(shas.get(a.id) == a.sha256 for a in m.artifacts if a.path)

    def _bench_intact(self, name: str, device: Optional[str]) -> bool:
        return self.json(self.bench_dir(name, device) / "bench.json") is not None

    # -- reading -----------------------------------------------------------------------------------
    def manifest(self, name: str) -> Optional[Manifest]:
        d = self.json(self.model_dir(name) / MANIFEST_NAME)
        try:
            return Manifest.from_dict(d) if d else None
        except Exception:  # noqa: BLE001 - an unreadable manifest means: export again
            return None

    @staticmethod
    def json(path: Path) -> Optional[dict]:
        try:
            d = json.loads(path.read_text())
            return d if isinstance(d, dict) else None
        except (OSError, ValueError):
            return None

    # -- writing -----------------------------------------------------------------------------------
    def write_export(self, name: str, files: dict[str, bytes]) -> None:
        """Replace OUT/<name>/ with the export's files (staged, then renamed into place)."""
        stage = self.root / f"{STAGING}{name}-{os.getpid()}"
        old = self.root / f"{OLD}{name}-{os.getpid()}"
        try:
            write_files(stage, files)
            dest = self.model_dir(name)
            if dest.exists():
                os.replace(dest, old)
            os.replace(stage, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def write_eval(self, name: str, result: dict) -> None:
        folder = self.model_dir(name)
        for rel, data in (result.get("files") or {}).items():
            write_bytes_atomic(folder / rel, data)
        write_json_atomic(folder / "eval.json", result["eval"])

    def write_bench(self, name: str, device: str, result: dict, write_reports: Callable[[dict, Path], object]) -> None:
        d = self.bench_dir(name, device)
        write_reports(result["report"], d)
        for rel, data in (result.get("files") or {}).items():
            write_bytes_atomic(d / rel, data)


def write_files(dest: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"refusing to write {rel!r} outside {dest}")
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def write_bytes_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
