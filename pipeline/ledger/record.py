"""Writing results to the ledger: ``record_bench``, ``record_eval``, ``record_check``, ``record_sweep``.

Each takes the object a command already produced (a BenchReport, the eval.json dict / EvalResult,
a CheckResult, a LatencyGateResult) or its dict, and writes one run and its rows in ONE
transaction. Call them *after* writing the command's own report: a ledger failure raises
``LedgerError`` (exit 2, one line) and the report on disk is all that was measured.

    before = conditions.capture()                 # at the start of the run (load, clocks, thermal)
    report = run_bench(...); write_reports(report, out)
    rec = record_bench(report, ledger=None, source=out / "bench.json", before=before)
    print(rec.summary())                          # "recorded bench run 12 (5 rows) in ~/.local/share/..."

``ledger`` is a path, a postgresql:// URL, an open ``Ledger``, or None (the default file).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.recorded import Recorded
from edgepipe.pipeline.base.util import sha256_file
from edgepipe.pipeline.ledger import conditions, schema
from edgepipe.pipeline.ledger.location import Location
from edgepipe.pipeline.ledger.store import Ledger

LedgerSpec = Union[str, os.PathLike, Location, Ledger, None]
_LATENCY_COLS = ("n", "p50", "p90", "p99", "mean", "std", "min", "max")
_BENCH_PROMOTED = {"artifact", "format", "precision", "target", "runtime", "device", "status", "reason", "sha256",
                   "threads", "runtime_version", "samples_ms", "latency_ms", "node"}
_EVAL_PROMOTED = {"artifact", "format", "precision", "target", "runtime", "device", "status", "reason", "sha256",
                  "top1", "top5", "agreement", "drop", "samples"}
_CHECK_PROMOTED = {"artifact", "format", "precision", "target", "runtime", "status", "reason", "check",
                   "source_value", "artifact_value", "drop", "budget"}


# --------------------------------------------------------------------------------------------- inputs
def _shallow(obj: Any) -> Any:
    """A dataclass instance -> a dict of its fields, without copying the values (``asdict`` deep-copies
    every one of a row's tens of thousands of samples: 0.5 s for a fast model's bench report)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return obj


def as_dict(obj: Any, what: str) -> dict:
    """A report object (dataclass / to_dict()) or its dict -> a plain dict (read only: values are shared)."""
    if isinstance(obj, dict):
        return obj
    if getattr(obj, "kind", None) == "edgepipe-bench" and dataclasses.is_dataclass(obj):
        d = _shallow(obj)
        d["rows"] = [_shallow(r) for r in d.get("rows") or []]
        return d
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise UserError(f"cannot record {type(obj).__name__} as {what}", f"Pass the {what} object or its dict")


def _read_json(path: Optional[Path]) -> Optional[dict]:
    try:
        d = json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def manifest_facts(manifest_path: Optional[Union[str, os.PathLike]]) -> tuple[dict, dict, Optional[Path]]:
    """(artifact id -> sha256, converter versions, the folder) from a manifest.json, best effort."""
    p = Path(manifest_path) if manifest_path else None
    if p is not None and p.is_dir():
        p = p / "manifest.json"
    d = _read_json(p)
    if not d:
        return {}, {}, p.parent if p else None
    shas = {a.get("id"): a.get("sha256") for a in d.get("artifacts") or [] if isinstance(a, dict)}
    return {k: v for k, v in shas.items() if k and v}, d.get("versions") or {}, p.parent


def _artifact_sha(row: dict, shas: dict, folder: Optional[Path]) -> Optional[str]:
    if row.get("sha256"):
        return row["sha256"]
    if row.get("artifact") in shas:
        return shas[row["artifact"]]
    if folder is not None and row.get("path") and (folder / row["path"]).exists():
        return sha256_file(folder / row["path"])
    return None


# --------------------------------------------------------------------------------------------- bench
def device_identity(name: str, dev: dict, facts: dict) -> str:
    """local:HOSTNAME, ssh:user@host:port, adb:SERIAL — what makes two 'cpu' rows the same machine."""
    kind = dev.get("kind") or ("local" if name == "local" else "device")
    if kind == "local":
        return f"local:{dev.get('hostname') or facts.get('hostname') or '?'}"
    return f"{kind}:{dev.get('address') or dev.get('url') or name}"


def bench_row_values(rep: dict, shas: Optional[dict] = None, folder: Optional[Path] = None,
                     node: Optional[str] = None) -> list[dict]:
    """A bench report's rows -> bench_rows values (no run_id yet)."""
    out = []
    model = (rep.get("model") or {}).get("name")
    for r in rep.get("rows") or []:
        dev = (rep.get("devices") or {}).get(r.get("device") or "local") or {}
        facts = dev.get("host") or rep.get("host") or {}
        lat = dict(r.get("latency_ms") or {})
        samples = r.get("samples_ms") or []
        if samples and lat.get("p50") is None:
            srt = sorted(samples)
            lat.setdefault("n", len(srt))
            lat["p50"] = srt[len(srt) // 2] if len(srt) % 2 else (srt[len(srt) // 2 - 1] + srt[len(srt) // 2]) / 2
        v = {k: r.get(k) for k in ("artifact", "format", "precision", "target", "runtime", "status", "reason",
                                   "threads", "runtime_version")}
        v.update(model=model, device=r.get("device") or "local", sha256=_artifact_sha(r, shas or {}, folder),
                 device_id=device_identity(r.get("device") or "local", dev, facts),
                 node=r.get("node") or rep.get("node") or node, cpu=(facts.get("cpu") or {}).get("model"),
                 samples=schema.pack_samples(samples), latency=lat,
                 extra={k: val for k, val in r.items() if k not in _BENCH_PROMOTED})
        for c in _LATENCY_COLS:
            x = lat.get(c)
            v[c] = (int(x) if c == "n" else float(x)) if isinstance(x, (int, float)) else None
        out.append(v)
    return out


def _run_values(kind: str, created: Optional[str], model: Optional[str], conds: dict, meta: dict,
                source: Optional[Union[str, os.PathLike]], edgepipe_version: Optional[str],
                wall_s: Optional[float], parent_id: Optional[int]) -> dict:
    git = conds.get("git") or {}
    return {"kind": kind, "created": created or conditions.now_iso(), "recorded": conditions.now_iso(),
            "model": model, "host": platform.node(), "git_commit": git.get("commit"), "git_dirty": git.get("dirty"),
            "edgepipe_version": edgepipe_version, "source": str(Path(source).absolute()) if source else None,
            "wall_s": wall_s, "conditions": conds, "meta": meta, "parent_id": parent_id}


def bench_run(report: Any, source=None, before: Optional[dict] = None, node: Optional[str] = None,
              parent_id: Optional[int] = None, after: Optional[dict] = None) -> tuple[dict, list[dict]]:
    """(runs values, bench_rows values) for a bench report; nothing written."""
    rep = as_dict(report, "a bench report")
    if rep.get("kind") not in (None, "edgepipe-bench") or not isinstance(rep.get("rows"), list):
        raise UserError("the report to record is not an edgepipe bench report", "Pass what run_bench returned")
    shas, versions, folder = manifest_facts(rep.get("manifest"))
    conds = conditions.run_conditions(rep.get("host"), before, after or conditions.capture(), {
        "threads": (rep.get("settings") or {}).get("threads"), "converter_versions": versions,
        "runtime_versions": (rep.get("host") or {}).get("versions"),
        "devices": {k: {kk: vv for kk, vv in (v or {}).items() if kk != "targets_probe"}
                    for k, v in (rep.get("devices") or {}).items()}})
    meta = {k: rep.get(k) for k in ("model", "manifest", "settings", "method", "targets", "schema_version")}
    run = _run_values("bench", rep.get("created"), (rep.get("model") or {}).get("name"), conds, meta, source,
                      rep.get("edgepipe_version"), rep.get("wall_s"), parent_id)
    return run, bench_row_values(rep, shas, folder, node or conds.get("node"))


# --------------------------------------------------------------------------------------------- eval, check
def eval_run(result: Any, source=None, before: Optional[dict] = None, parent_id: Optional[int] = None,
             after: Optional[dict] = None) -> tuple[dict, list[dict]]:
    res = as_dict(result, "an eval result")
    if res.get("kind") not in (None, "edgepipe-eval") or not isinstance(res.get("results"), list):
        raise UserError("the result to record is not an edgepipe eval result", "Pass what evaluate returned")
    folder = Path(source).parent if source else None
    _, versions, _ = manifest_facts(folder / (res.get("manifest") or "manifest.json") if folder else None)
    conds = conditions.run_conditions(None, before, after or conditions.capture(), {"converter_versions": versions})
    ds = res.get("dataset") or {}
    meta = {k: res.get(k) for k in ("dataset", "source", "targets", "device", "unit", "manifest", "schema_version")}
    run = _run_values("eval", res.get("created"), res.get("model"), conds, meta, source,
                      res.get("edgepipe_version"), res.get("seconds"), parent_id)
    rows = []
    for r in res["results"]:
        v = {k: r.get(k) for k in ("artifact", "format", "precision", "target", "runtime", "status", "reason",
                                   "sha256", "top1", "top5", "agreement", "samples")}
        drop = r.get("drop") or {}
        v.update(model=res.get("model"), device=r.get("device") or res.get("device") or "local",
                 drop_top1=drop.get("top1"), drop_top5=drop.get("top5"), drop_agreement=drop.get("agreement"),
                 dataset_hash=ds.get("hash"), extra={k: val for k, val in r.items() if k not in _EVAL_PROMOTED})
        rows.append(v)
    return run, rows


def _check_rows(res: dict, shas: dict) -> list[dict]:
    rows = []
    for r in res.get("rows") or []:
        v = {k: r.get(k) for k in ("artifact", "format", "precision", "target", "runtime", "status", "reason",
                                   "source_value", "budget")}
        v.update(model=res.get("model"), device=r.get("device") or "local", sha256=r.get("sha256") or
                 shas.get(r.get("artifact")), check_name=r.get("check"), value=r.get("artifact_value"),
                 drop_value=r.get("drop"), extra={k: val for k, val in r.items() if k not in _CHECK_PROMOTED})
        rows.append(v)
    return rows


def check_run(result: Any, latency: Any = None, source=None, before: Optional[dict] = None,
              parent_id: Optional[int] = None, after: Optional[dict] = None) -> tuple[dict, list[dict]]:
    """The accuracy gate's result and/or the latency gate's, as one check run. A check result that carries
    its latency gate (``CheckResult.latency``, or the "latency" key of ``check --json``) records both."""
    acc = as_dict(result, "a check result") if result is not None else None
    if acc is not None and ("latency" in acc or "ledger" in acc):
        latency = latency if latency is not None else acc.get("latency")
        acc = {k: v for k, v in acc.items() if k not in ("latency", "ledger")} | {"passed": not acc.get("failed")}
    parts = [x for x in (acc, as_dict(latency, "a latency gate result") if latency is not None else None) if x]
    if not parts:
        raise UserError("nothing to record: no check result given", "Pass the CheckResult")
    shas, versions, _ = manifest_facts(parts[0].get("folder"))
    conds = conditions.run_conditions(None, before, after or conditions.capture(), {"converter_versions": versions})
    meta = {"passed": all(p.get("passed", True) for p in parts),
            "gates": [{k: v for k, v in p.items() if k != "rows"} for p in parts]}
    model = next((p.get("model") for p in parts if p.get("model")), None)
    run = _run_values("check", None, model, conds, meta, source, None, None, parent_id)
    return run, [row for p in parts for row in _check_rows(p, shas)]


# --------------------------------------------------------------------------------------------- writing
def _open(ledger: LedgerSpec) -> tuple[Ledger, bool]:
    if isinstance(ledger, Ledger):
        return ledger, False
    return Ledger.open(ledger), True


def write_runs(ledger: LedgerSpec, parts: list[tuple[dict, str, list[dict]]], parent: Optional[dict] = None) -> Recorded:
    """Runs (with their rows) in one transaction; ``parent`` (a sweep run) first, the others its children."""
    led, owned = _open(ledger)
    try:
        with led.write() as conn:
            top = None
            if parent is not None:
                top = Recorded(led.location.shown, parent["kind"], led.insert_run(conn, parent))
            done = []
            for run, table, rows in parts:
                if top is not None:
                    run = {**run, "parent_id": top.run_id}
                rid = led.insert_run(conn, run)
                ids = led.insert_rows(conn, schema.TABLES[table], [{**r, "run_id": rid} for r in rows])
                done.append(Recorded(led.location.shown, run["kind"], rid, {table: ids}))
        if top is not None:
            top.children = done
            return top
        return done[0]
    finally:
        if owned:
            led.close()


def record_bench(report: Any, ledger: LedgerSpec = None, *, source=None, before: Optional[dict] = None,
                 node: Optional[str] = None) -> Recorded:
    """Write a bench report (its rows with raw samples, sha256 and conditions) as one ledger run."""
    run, rows = bench_run(report, source, before, node)
    return write_runs(ledger, [(run, "bench_rows", rows)])


def record_eval(result: Any, ledger: LedgerSpec = None, *, source=None, before: Optional[dict] = None) -> Recorded:
    """Write an eval result (eval.json's content) as one ledger run."""
    run, rows = eval_run(result, source, before)
    return write_runs(ledger, [(run, "eval_rows", rows)])


def record_check(result: Any, ledger: LedgerSpec = None, *, latency: Any = None, source=None,
                 before: Optional[dict] = None) -> Recorded:
    """Write a check result (accuracy gate, and the latency gate when given) as one ledger run."""
    run, rows = check_run(result, latency, source, before)
    return write_runs(ledger, [(run, "check_rows", rows)])


def record_sweep(sweep: Any = None, ledger: LedgerSpec = None, *, benches: Iterable[Any] = (),
                 evals: Iterable[Any] = (), checks: Iterable[Any] = (), source=None,
                 before: Optional[dict] = None) -> Recorded:
    """A sweep: one parent run (its plan/summary in ``meta``) and every cell's bench, eval and check
    results as child runs, all in one transaction. Bench rows keep the ``node`` each row carries."""
    meta = as_dict(sweep, "a sweep report") if sweep is not None else {}
    after = conditions.capture()
    conds = conditions.run_conditions(None, before, after)
    parent = _run_values("sweep", meta.get("created"), meta.get("model"), conds,
                         {k: v for k, v in meta.items() if k not in ("rows", "cells")} | {
                             "cells": len(meta.get("cells") or meta.get("rows") or [])},
                         source, meta.get("edgepipe_version"), meta.get("wall_s"), None)
    parts = [(run, "bench_rows", rows) for run, rows in (bench_run(b, before=before, after=after) for b in benches)]
    parts += [(run, "eval_rows", rows) for run, rows in (eval_run(e, before=before, after=after) for e in evals)]
    parts += [(run, "check_rows", rows) for run, rows in (check_run(c, before=before, after=after) for c in checks)]
    return write_runs(ledger, parts, parent)


# --------------------------------------------------------------------------------------------- files
REPORT_NAMES = ("bench.json", "eval.json")


def report_files(paths: Iterable[Union[str, os.PathLike]]) -> list[Path]:
    """Files to record: each file as given; a folder's bench.json and eval.json."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [p / n for n in REPORT_NAMES if (p / n).is_file()]
            if not found:
                raise UserError(f"{p} holds no bench.json or eval.json", "Run `edgepipe bench` / `edgepipe eval` first")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"no such file or folder: {p}", "Give bench.json, eval.json, check JSON or a model folder")
    return out


def record_file(path: Union[str, os.PathLike], ledger: LedgerSpec = None) -> Recorded:
    """Record one report file, by what it is: a bench report, an eval result or a check result."""
    p = Path(path)
    d = _read_json(p)
    if d is None:
        raise UserError(f"cannot read {p} as JSON", "Give a bench.json, eval.json or `edgepipe check --json` output")
    if d.get("kind") == "edgepipe-bench":
        return record_bench(d, ledger, source=p)
    if d.get("kind") == "edgepipe-eval":
        return record_eval(d, ledger, source=p)
    if isinstance(d.get("rows"), list) and "passed" in d:
        return record_check(d, ledger, source=p)
    raise UserError(f"{p} is not a bench report, an eval result or a check result",
                    "Give a bench.json, eval.json or `edgepipe check --json` output")
