"""The ledger on SQLite and on a real PostgreSQL server: recording, reading back, history, compare,
the latency gate, select, concurrent writers, migrations from an older schema, and one-line errors."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.ledger import (Ledger, LedgerError, compare_runs, history, latency_gate, record_bench,
                                      record_check, record_eval, record_sweep, resolve_run, select_artifact)
from edgepipe.pipeline.ledger import schema
from edgepipe.pipeline.ledger.query import load_run
from edgepipe.pipeline.ledger.schema import pack_samples, unpack_samples

from conftest import REPO, run_cli
from ledger_helpers import bench_report, bench_row, eval_result, ledger_url, pg_server  # noqa: F401

SHA = {"tflite-fp32": "a" * 64, "tflite-int8": "b" * 64, "onnx-fp32": "c" * 64}


def _report(median: dict, seed: int = 0, **kw) -> dict:
    rows = [bench_row(a, median_ms=m, seed=seed + i, sha256=SHA[a], **kw) for i, (a, m) in enumerate(median.items())]
    return bench_report(rows)


def _rows(led: Ledger, table: str) -> list[dict]:
    t = schema.TABLES[table]
    with led.read() as c:
        return [dict(m) for m in c.execute(select(t).order_by(t.c.id)).mappings()]


# --------------------------------------------------------------------------------------------- recording
def test_record_bench_keeps_samples_sha_and_conditions(ledger_url):
    rep = _report({"tflite-fp32": 2.0, "onnx-fp32": 3.0})
    rep["rows"].append(bench_row("tflite-int8", status="failed", sha256=SHA["tflite-int8"]))
    rec = record_bench(rep, ledger_url, source="somewhere/bench.json", before={"loadavg": [1.0, 1.0, 1.0]})
    assert len(rec.rows["bench_rows"]) == 3
    with Ledger.open(ledger_url) as led:
        assert led.version() == schema.SCHEMA_VERSION
        run = _rows(led, "runs")[0]
        rows = _rows(led, "bench_rows")
        got = load_run(led, rec.run_id)
    # raw samples come back exactly, in measurement order, with the artifact's sha256
    assert unpack_samples(rows[0]["samples"]) == rep["rows"][0]["samples_ms"] and len(rows[0]["samples"]) == 200 * 8
    assert np.array_equal(np.frombuffer(rows[0]["samples"], "<f8"), rep["rows"][0]["samples_ms"])  # as documented
    assert [r["sha256"] for r in rows] == [SHA["tflite-fp32"], SHA["onnx-fp32"], SHA["tflite-int8"]]
    assert rows[0]["p50"] == pytest.approx(rep["rows"][0]["latency_ms"]["p50"])
    assert rows[2]["status"] == "failed" and unpack_samples(rows[2]["samples"]) == [] and rows[2]["p50"] is None
    assert (rows[0]["cpu"], rows[0]["threads"], rows[0]["runtime_version"], rows[0]["device_id"]) == \
        ("Test CPU @ 2.0GHz", 2, "2.3.0", "local:bench-host")
    c = run["conditions"]
    assert c["host"]["cpu"]["model"] == "Test CPU @ 2.0GHz" and c["host"]["versions"]["onnxruntime"] == "1.32.0"
    assert c["loadavg_before"] == [1.0, 1.0, 1.0] and len(c["loadavg_after"]) == 3
    assert c["threads"] == 2 and c["node"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert run["git_commit"] == head and c["git"]["commit"] == head
    assert run["edgepipe_version"] == "0.1.0" and run["source"].endswith("somewhere/bench.json")
    assert [e.samples for e in got.entries][0] == rep["rows"][0]["samples_ms"]


def test_record_eval_check_and_sweep(ledger_url):
    from edgepipe.pipeline.gate import CheckResult, CheckRow, GateConfig

    ev = eval_result([("tflite-fp32", SHA["tflite-fp32"], 98.5), ("tflite-int8", SHA["tflite-int8"], 97.0)])
    record_eval(ev, ledger_url)
    chk = CheckResult("tiny", "/nowhere", {"source": "digits"}, GateConfig(), [
        CheckRow("tflite-int8", "tflite", "int8", "top1", "cpu", "litert", 99.0, 97.0, 2.0, 1.0, "default", "fail",
                 "top-1 drop 2.00 > budget 1.0 points")])
    record_check(chk, ledger_url)
    sw = record_sweep({"plan": "plan.toml", "cells": [{"model": "tiny"}, {"model": "tiny2"}]}, ledger_url,
                      benches=[_report({"tflite-fp32": 2.0}), _report({"onnx-fp32": 3.0})], evals=[ev])
    assert sw.kind == "sweep" and len(sw.children) == 3
    with Ledger.open(ledger_url) as led:
        evals, checks, runs = _rows(led, "eval_rows"), _rows(led, "check_rows"), _rows(led, "runs")
        sweep_bench = resolve_run(str(sw.run_id), led)
    assert [(r["artifact"], r["drop_top1"]) for r in evals[:2]] == [("tflite-fp32", 0.5), ("tflite-int8", 2.0)]
    assert checks[0]["check_name"] == "top1" and checks[0]["status"] == "fail" and checks[0]["drop_value"] == 2.0
    kids = [r for r in runs if r["parent_id"] == sw.run_id]
    assert sorted(r["kind"] for r in kids) == ["bench", "bench", "eval"]
    assert runs[-4]["meta"]["cells"] == 2 and runs[-4]["kind"] == "sweep"
    assert sorted(e.artifact for e in sweep_bench.entries) == ["onnx-fp32", "tflite-fp32"]


def test_history_filters_and_newest_points(ledger_url):
    ids = [record_bench(_report({"tflite-fp32": m, "onnx-fp32": 3.0 + i}, seed=i), ledger_url).run_id
           for i, m in enumerate((2.0, 2.1, 2.2))]
    with Ledger.open(ledger_url) as led:
        everything = history(led)
        fp32 = history(led, model="tiny", artifact="tflite-fp32", target="cpu", device="local", last=2)
        both = history(led, artifact="tflite-fp32,onnx-fp32", last=1)
        none = history(led, model="other")
    assert len(everything) == 2 and all([p.run_id for p in s.points] == ids for s in everything)
    assert len(fp32) == 1 and [p.run_id for p in fp32[0].points] == ids[1:]  # the newest two, oldest first
    assert [p.p50 for p in fp32[0].points] == pytest.approx([2.1, 2.2], rel=0.02)
    assert [len(s.points) for s in both] == [1, 1] and none == []


# --------------------------------------------------------------------------------------------- compare / gate
def test_compare_significance_and_conditions(ledger_url, tmp_path):
    a = record_bench(_report({"tflite-fp32": 2.0, "onnx-fp32": 3.0}, seed=0), ledger_url).run_id
    b = record_bench(_report({"tflite-fp32": 2.2, "onnx-fp32": 3.0}, seed=10), ledger_url).run_id
    c = record_bench(_report({"tflite-fp32": 2.0, "onnx-fp32": 3.0}, seed=20, threads=4), ledger_url).run_id
    with Ledger.open(ledger_url) as led:
        cmp = compare_runs(resolve_run(str(a), led), resolve_run(str(b), led))
        by = {r.key[2]: r for r in cmp.rows}
        assert by["tflite-fp32"].verdict == "slower" and by["tflite-fp32"].ci.low > 1.05
        assert by["onnx-fp32"].verdict == "no significant change"
        with pytest.raises(UserError, match=r"conditions differ for 2 row\(s\) \(threads: 2 vs 4\)"):
            compare_runs(resolve_run(str(a), led), resolve_run(str(c), led))
        forced = compare_runs(resolve_run(str(a), led), resolve_run(str(c), led), force=True)
        assert all("threads: 2 vs 4" in r.note for r in forced.rows)
        # a bench.json on disk compares with a ledger run (CI: compare against a file)
        f = tmp_path / "bench.json"
        f.write_text(json.dumps(_report({"tflite-fp32": 2.0, "onnx-fp32": 3.0}, seed=30)))
        vs_file = compare_runs(resolve_run(str(f), led), resolve_run("latest~1", led))
        assert {r.verdict for r in vs_file.rows} == {"slower", "no significant change"}
        with pytest.raises(UserError, match="no run 999"):
            resolve_run("999", led)


def test_latency_gate_fails_real_slowdowns_and_passes_noise(ledger_url, tmp_path):
    base = record_bench(_report({"tflite-fp32": 2.0, "onnx-fp32": 3.0, "tflite-int8": 1.0}, seed=0), ledger_url).run_id
    cur = _report({"tflite-fp32": 2.2, "onnx-fp32": 3.09, "tflite-int8": 1.0}, seed=100)  # +10%, +3%, noise
    cur["rows"].append(bench_row("tflite-int8", target="gpu", status="failed", sha256=SHA["tflite-int8"]))
    cur_id = record_bench(cur, ledger_url).run_id
    with Ledger.open(ledger_url) as led:
        res = latency_gate(str(base), str(cur_id), 5.0, ledger=led)
    st = {(r.artifact, r.target): r for r in res.rows}
    assert st[("tflite-fp32", "cpu")].status == "fail" and "over the 5% budget" in st[("tflite-fp32", "cpu")].reason
    assert st[("onnx-fp32", "cpu")].status == "pass" and st[("onnx-fp32", "cpu")].change_pct == pytest.approx(3, abs=1)
    assert st[("tflite-int8", "cpu")].status == "pass"
    assert st[("tflite-int8", "gpu")].status == "fail"  # measured now and crashed
    assert not res.passed and len(res.failed) == 2
    from edgepipe.pipeline.ledger.latency import enforce, render_junit, render_markdown

    junit, md = render_junit(res), render_markdown(res)
    assert 'failures="2"' in junit and "edgepipe.latency" in junit
    assert "❌ FAIL" in md and "| tflite-fp32 | cpu | local |" in md
    with pytest.raises(Exception, match="2 of 4 latency checks failed"):
        enforce(res)
    rec = record_check(None, ledger_url, latency=res)
    with Ledger.open(ledger_url) as led:
        rows = [r for r in _rows(led, "check_rows") if r["run_id"] == rec.run_id]
    assert {r["check_name"] for r in rows} == {"latency"} and sum(r["status"] == "fail" for r in rows) == 2


def test_select_fastest_within_budget_with_proof(ledger_url, tmp_path):
    host = dict(bench_report([])["host"], hostname=platform.node())
    rows = [bench_row("tflite-fp32", median_ms=2.0, sha256=SHA["tflite-fp32"], device="pi4"),
            bench_row("tflite-int8", median_ms=1.0, sha256=SHA["tflite-int8"], device="pi4"),
            bench_row("onnx-fp32", median_ms=3.0, sha256=SHA["onnx-fp32"], device="pi4")]
    rep = bench_report(rows, host=host)
    rep["devices"] = {"pi4": {"kind": "ssh", "address": "pi@127.0.0.1", "host": host}}
    brec = record_bench(rep, ledger_url)
    erec = record_eval(eval_result([("tflite-fp32", SHA["tflite-fp32"], 99.0), ("tflite-int8", SHA["tflite-int8"], 97.5),
                                    ("onnx-fp32", SHA["onnx-fp32"], 99.0)], source_top1=99.0), ledger_url)
    with Ledger.open(ledger_url) as led:
        strict = select_artifact(led, "pi4", max_drop=1.0)
        loose = select_artifact(led, "pi4", max_drop=2.0)
        tight = select_artifact(led, "pi4", max_drop=0.0)
        nothing = select_artifact(led, "pixel", max_drop=1.0)
    assert strict.choice.artifact == "tflite-fp32" and strict.choice.sha256 == SHA["tflite-fp32"]
    assert strict.choice.bench_row == brec.rows["bench_rows"][0] and strict.choice.eval_row == erec.rows["eval_rows"][0]
    assert loose.choice.artifact == "tflite-int8" and loose.choice.drop == pytest.approx(1.5)
    assert tight.choice.artifact == "tflite-fp32"  # a drop of exactly 0 is within a 0 budget
    assert nothing.choice is None and "no successful bench row on device 'pixel'" in nothing.closest
    out = tmp_path / "deploy.json"
    r = run_cli("select", "--device", "pi4", "--max-drop", "0.5", "--out", str(out), "--ledger", ledger_url)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["choice"]["artifact"] == "tflite-fp32" and d["choice"]["bench_row"] == strict.choice.bench_row
    bad = tmp_path / "none.json"
    r = run_cli("select", "--device", "pi4", "--max-drop", "0.5", "--metric", "top1", "--target", "gpu",
                "--out", str(bad), "--ledger", ledger_url)
    assert r.returncode == 1 and not bad.exists()
    assert "no artifact on pi4 is within 0.5 points" in r.stderr and r.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------- concurrency
_WRITER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from ledger_helpers import bench_report, bench_row
    from edgepipe.pipeline.ledger import Ledger, record_bench
    url, who, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:
        time.sleep(0.005)
    ids = []
    for i in range(n):
        rep = bench_report([bench_row(a, median_ms=1 + j, seed=i * 10 + j) for j, a in
                            enumerate(("tflite-fp32", "tflite-int8", "onnx-fp32"))], model=f"m-{{who}}")
        ids.append(record_bench(rep, url).run_id)
    print(json.dumps(ids))
""")


def _writers(url: str, tmp_path: Path, procs: int, each: int) -> list[list[int]]:
    import time

    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(REPO / "tests")))
    start = time.time() + 2.0  # every writer imports first, then all start writing at once
    ps = [subprocess.Popen([sys.executable, str(script), url, str(w), str(each), str(start)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for w in range(procs)]
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (o, e) in zip(ps, outs):
        assert p.returncode == 0, e
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


@pytest.mark.parametrize("procs,each", [(2, 15), (4, 8)], ids=["two-bench-writers", "sweep-like-writers"])
def test_concurrent_writers_lose_no_row(ledger_url, tmp_path, procs, each):
    Ledger.open(ledger_url).close()  # an existing ledger; the new-ledger race is the next test
    ids = _writers(ledger_url, tmp_path, procs, each)
    flat = [i for x in ids for i in x]
    assert len(flat) == len(set(flat)) == procs * each
    with Ledger.open(ledger_url) as led:
        runs, rows = _rows(led, "runs"), _rows(led, "bench_rows")
    assert len(runs) == procs * each and len(rows) == 3 * procs * each
    for w in range(procs):  # each writer's rows are all there, attached to its own runs
        mine = {r["id"] for r in runs if r["model"] == f"m-{w}"}
        assert mine == set(ids[w]) and sum(r["run_id"] in mine for r in rows) == 3 * each


def test_concurrent_writers_create_a_new_ledger_once(ledger_url, tmp_path):
    ids = _writers(ledger_url, tmp_path, 3, 2)
    with Ledger.open(ledger_url) as led:
        with led.read() as c:
            versions = c.execute(select(schema.ledger_schema.c.version)).scalars().all()
        assert sorted(versions) == list(range(1, schema.SCHEMA_VERSION + 1))
        assert len(_rows(led, "runs")) == 6 == len({i for x in ids for i in x})


# --------------------------------------------------------------------------------------------- migrations
V1_SQLITE = """
CREATE TABLE ledger_schema (version INTEGER NOT NULL PRIMARY KEY, description TEXT, applied VARCHAR(40),
    edgepipe_version VARCHAR(40));
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind VARCHAR(16) NOT NULL, created VARCHAR(40) NOT NULL,
    recorded VARCHAR(40) NOT NULL, model VARCHAR, host VARCHAR, git_commit VARCHAR(64), git_dirty BOOLEAN,
    edgepipe_version VARCHAR(40), source TEXT, wall_s FLOAT, conditions JSON, meta JSON);
CREATE TABLE bench_rows (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs (id)
    ON DELETE CASCADE, model VARCHAR, artifact VARCHAR, format VARCHAR, precision VARCHAR, target VARCHAR,
    runtime VARCHAR, device VARCHAR, status VARCHAR, reason TEXT, sha256 VARCHAR(64), device_id VARCHAR, cpu VARCHAR,
    threads INTEGER, runtime_version VARCHAR, n INTEGER, p50 FLOAT, p90 FLOAT, p99 FLOAT, mean FLOAT, std FLOAT,
    min FLOAT, max FLOAT, samples BLOB, latency JSON, extra JSON);
CREATE TABLE eval_rows (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs (id)
    ON DELETE CASCADE, model VARCHAR, artifact VARCHAR, format VARCHAR, precision VARCHAR, target VARCHAR,
    runtime VARCHAR, device VARCHAR, status VARCHAR, reason TEXT, sha256 VARCHAR(64), top1 FLOAT, top5 FLOAT,
    agreement FLOAT, drop_top1 FLOAT, drop_top5 FLOAT, drop_agreement FLOAT, samples INTEGER, dataset_hash VARCHAR,
    extra JSON);
CREATE TABLE check_rows (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id INTEGER NOT NULL REFERENCES runs (id)
    ON DELETE CASCADE, model VARCHAR, artifact VARCHAR, format VARCHAR, precision VARCHAR, target VARCHAR,
    runtime VARCHAR, device VARCHAR, status VARCHAR, reason TEXT, sha256 VARCHAR(64), check_name VARCHAR,
    source_value FLOAT, value FLOAT, drop_value FLOAT, budget FLOAT, extra JSON);
CREATE INDEX ix_runs_kind_model ON runs (kind, model);
CREATE INDEX ix_bench_run ON bench_rows (run_id);
CREATE INDEX ix_bench_sha ON bench_rows (sha256);
CREATE INDEX ix_eval_run ON eval_rows (run_id);
CREATE INDEX ix_eval_sha ON eval_rows (sha256);
CREATE INDEX ix_check_run ON check_rows (run_id);
INSERT INTO ledger_schema VALUES (1, 'runs, bench/eval/check rows', '2025-01-01T00:00:00+00:00', '0.1.0');
INSERT INTO runs (kind, created, recorded, model, host, conditions, meta)
    VALUES ('bench', '2025-01-01T00:00:00+00:00', '2025-01-01T00:00:01+00:00', 'tiny', 'old-host', '{}', '{}');
INSERT INTO bench_rows (run_id, model, artifact, format, precision, target, runtime, device, status, sha256,
    device_id, cpu, threads, runtime_version, n, p50, samples, latency, extra)
    VALUES (1, 'tiny', 'tflite-fp32', 'tflite', 'fp32', 'cpu', 'litert', 'local', 'ok', 'SHA', 'local:bench-host',
    'Test CPU @ 2.0GHz', 2, '2.3.0', 5, 2.0, SAMPLES, '{"p50": 2.0}', '{}');
"""


OLD_SAMPLES = [2.0, 2.1, 1.9, 2.0, 2.05]


def _v1(kind: str) -> str:
    hexed = pack_samples(OLD_SAMPLES).hex()
    if kind == "sqlite":
        return V1_SQLITE.replace("SAMPLES", f"X'{hexed}'")
    s = V1_SQLITE.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "SERIAL PRIMARY KEY").replace(" JSON", " JSONB")
    s = s.replace("FLOAT", "DOUBLE PRECISION").replace("BLOB", "BYTEA")
    return s.replace("SAMPLES", f"decode('{hexed}', 'hex')")


def test_older_schema_is_migrated(ledger_url):
    from sqlalchemy import create_engine, text

    from edgepipe.pipeline.ledger.location import resolve

    loc = resolve(ledger_url)
    eng = create_engine(loc.url)
    with eng.begin() as c:
        ddl = _v1(loc.kind)
        for stmt in filter(str.strip, ddl.split(";")):
            c.execute(text(stmt))
    eng.dispose()
    with Ledger.open(ledger_url) as led:  # opening migrates
        assert led.version() == schema.SCHEMA_VERSION
        insp = sa_inspect(led.engine)
        assert "parent_id" in {c["name"] for c in insp.get_columns("runs")}
        assert "node" in {c["name"] for c in insp.get_columns("bench_rows")}
        assert "ix_bench_series" in {i["name"] for i in insp.get_indexes("bench_rows")}
        old = load_run(led, 1)  # the old row reads back
        assert old.entries[0].samples == OLD_SAMPLES and old.entries[0].sha256 == "SHA"
        new = record_bench(bench_report([bench_row("tflite-fp32", median_ms=2.0, n=5, sha256="SHA")]), led)
        cmp = compare_runs(old, load_run(led, new.run_id))
        assert cmp.rows[0].ci is not None
        with led.read() as c:
            assert [r.version for r in c.execute(select(schema.ledger_schema))] == [1, 2]
    with Ledger.open(ledger_url) as led:
        with led.write() as c:
            c.execute(schema.ledger_schema.insert().values(version=99, description="from the future"))
    with pytest.raises(LedgerError, match="schema version 99, newer than this edgepipe"):
        Ledger.open(ledger_url)
