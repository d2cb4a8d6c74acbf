"""bench, eval and check write to the results ledger as a user runs them (on SQLite and on a real
PostgreSQL server), and check's latency gate: an unchanged re-run passes, a run slower than the
budget fails, and both gates are judged before check exits.

The end-to-end tests use the trained digits model (tests/digits_model.py) exported to fp32 TFLite
and ONNX; the gate's edge cases use small folders written here (manifest, eval.json, bench.json).
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sqlalchemy import select

import digits_model
from conftest import run_cli
from ledger_helpers import bench_report, bench_row, ledger_url, pg_server  # noqa: F401
from test_ledger_cli import _LOCKER

from edgepipe.pipeline.base.evaluation import EVAL_NAME, drops
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel, Verification
from edgepipe.pipeline.cli.main import main
from edgepipe.pipeline.ledger import Ledger, resolve_run, runs, schema

QUICK = ("--targets", "cpu", "--runs", "20", "--min-seconds", "0.2", "--warmup", "2", "--threads", "1")


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2 with one error line (after the progress lines a run prints in a CI log), no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("edgepipe: error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def _ok_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def digits_fp32(tmp_path_factory) -> Path:
    """The trained digits model exported to fp32 TFLite and ONNX (no calibration needed)."""
    d = tmp_path_factory.mktemp("ledger_wiring")
    model = d / "digits.keras"
    model.write_bytes(digits_model.digits_model_path().read_bytes())
    r = run_cli("export", str(model), "--preprocess", "unit", "--formats", "tflite,onnx", "--precisions", "fp32",
                "--out", str(d / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "out" / "digits"


@pytest.fixture()
def export(digits_fp32, tmp_path) -> Path:
    """A private copy: bench.json and eval.json are written beside the manifest."""
    return Path(shutil.copytree(digits_fp32, tmp_path / "digits"))


def _slowed(report: dict, factor: float) -> dict:
    """A bench report whose every latency is ``factor`` times what was measured (a faster baseline)."""
    d = json.loads(json.dumps(report))
    for r in d["rows"]:
        r["samples_ms"] = [x * factor for x in r["samples_ms"]]
        r["latency_ms"] = {k: (v * factor if k not in ("n",) and isinstance(v, float) else v)
                           for k, v in r["latency_ms"].items()}
    return {k: v for k, v in d.items() if k not in ("ledger", "written")}


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_bench_eval_check_are_recorded_and_the_latency_gate_judges(export, tmp_path, ledger_url):
    led = ("--ledger", ledger_url)
    b1 = _ok_json(run_cli("bench", str(export), *QUICK, *led, "--json"))
    b2 = _ok_json(run_cli("bench", str(export), *QUICK, *led, "--json"))
    assert b1["ledger"]["kind"] == b2["ledger"]["kind"] == "bench"
    assert b2["ledger"]["run_id"] > b1["ledger"]["run_id"]
    assert len(b1["ledger"]["rows"]["bench_rows"]) == len(b1["rows"]) == 2
    assert "ledger" not in json.loads((export / "bench.json").read_text())  # the file is written before recording
    manifest = json.loads((export / "manifest.json").read_text())
    shas = {a["id"]: a["sha256"] for a in manifest["artifacts"]}
    with Ledger.open(ledger_url) as ledger:
        for b in (b1, b2):  # raw samples in measurement order, the artifact's sha256, the conditions
            run = resolve_run(str(b["ledger"]["run_id"]), ledger)
            got = {e.artifact: e for e in run.entries}
            for row in b["rows"]:
                e = got[row["artifact"]]
                assert e.samples == row["samples_ms"] and len(e.samples) >= 20
                assert e.sha256 == shas[row["artifact"]] and e.threads == 1 and e.cpu
        assert {r["id"] for r in runs(ledger, "bench", None, 10)} == {b1["ledger"]["run_id"], b2["ledger"]["run_id"]}
        with ledger.read() as conn:
            head = conn.execute(select(schema.runs.c.conditions, schema.runs.c.source)
                                .where(schema.runs.c.id == b2["ledger"]["run_id"])).one()
    conds = head.conditions
    assert conds["threads"] == 1 and conds["host"]["cpu"]["model"] and conds["runtime_versions"]
    assert len(conds["loadavg_before"]) == 3 and len(conds["loadavg_after"]) == 3 and conds["node"]
    assert head.source == str(export / "bench.json")

    ev = _ok_json(run_cli("eval", str(export), "--data", "digits", "--targets", "cpu", "--limit", "150", *led, "--json"))
    assert ev["ledger"]["kind"] == "eval" and len(ev["ledger"]["rows"]["eval_rows"]) == len(ev["results"])

    # the same export benched twice: the re-run passes a budget no run-to-run variation here reaches
    # (latency: 100%; the model runs in microseconds on 2 shared cores)
    # (accuracy: 3 points, which 150 images of identical predictions show with 95% confidence)
    junit = tmp_path / "gate.xml"
    r = run_cli("check", str(export), "--max-drop", "3.0", "--baseline", str(b1["ledger"]["run_id"]),
                "--max-slowdown", "100", "--junit", str(junit), *led, "--json")
    c = _ok_json(r)
    assert c["passed"] and c["latency"]["passed"] and c["latency"]["baseline"] == f"run {b1['ledger']['run_id']}"
    assert {x["status"] for x in c["latency"]["rows"]} == {"pass"} and len(c["latency"]["rows"]) == 2
    assert c["ledger"]["kind"] == "check" and len(c["ledger"]["rows"]["check_rows"]) == len(c["rows"]) + 2
    suites = ET.parse(junit).getroot().findall("testsuite")
    assert [s.get("name").split(":")[0] for s in suites] == ["edgepipe check", "edgepipe latency check"]

    # a baseline 40% faster than what was measured: the current run is ~67% slower, over a 25% budget
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(_slowed(b1, 0.6)))
    md = tmp_path / "gate.md"
    r = run_cli("check", str(export), "--max-drop", "3.0", "--baseline", str(base), "--max-slowdown", "25",
                "--junit", str(junit), "--markdown", str(md), *led)
    assert r.returncode == 1, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("edgepipe: error: ")]
    assert len(err) == 1 and "2 of 2 latency checks failed" in err[0] and "over the 25% budget" in err[0], r.stderr
    assert "tflite-fp32 on cpu: latency" in err[0] and "onnx-fp32 on cpu: latency" in err[0]
    assert "FAIL" in r.stdout and "Recorded check run" in r.stdout
    acc, lat = ET.parse(junit).getroot().findall("testsuite")
    assert acc.get("failures") == "0" and lat.get("failures") == "2"
    assert "### edgepipe check" in md.read_text() and "### edgepipe latency check" in md.read_text()
    with Ledger.open(ledger_url) as ledger:
        checks = runs(ledger, "check", None, 10)
    assert len(checks) == 2 and [x["rows"] for x in checks] == [4, 4]


@pytest.mark.slow
def test_no_ledger_records_nothing_and_a_broken_ledger_keeps_the_reports(export, tmp_path):
    # --no-ledger (and EDGEPIPE_LEDGER=off): nothing is written anywhere
    quiet = tmp_path / "never.sqlite"
    b = _ok_json(run_cli("bench", str(export), *QUICK, "--ledger", str(quiet), "--no-ledger", "--json"))
    assert b["ledger"] is None and not quiet.exists()
    xdg = tmp_path / "xdg"
    r = run_cli("bench", str(export), *QUICK, env={"EDGEPIPE_LEDGER": "off", "XDG_DATA_HOME": str(xdg)})
    assert r.returncode == 0 and "Recorded" not in r.stdout and not xdg.exists()

    # a corrupt ledger: one line, exit 2, and the bench.json / eval.json / JUnit just written are there
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    for name in ("bench.json", EVAL_NAME):
        (export / name).unlink(missing_ok=True)
    r = run_cli("bench", str(export), *QUICK, "--ledger", str(bad))
    _one_line_error(r, "is corrupt or not a SQLite database", f"({export / 'bench.json'} was written)")
    assert json.loads((export / "bench.json").read_text())["kind"] == "edgepipe-bench"
    r = run_cli("eval", str(export), "--data", "digits", "--targets", "cpu", "--limit", "120", "--ledger", str(bad))
    _one_line_error(r, "corrupt", f"({export / EVAL_NAME} was written)")
    assert json.loads((export / EVAL_NAME).read_text())["kind"] == "edgepipe-eval"
    junit = tmp_path / "check.xml"
    _one_line_error(run_cli("check", str(export), "--junit", str(junit), "--ledger", str(bad)), "corrupt")
    assert junit.is_file()
    assert bad.read_bytes() == b"not a database" * 100

    # a ledger locked by another writer for longer than $EDGEPIPE_LEDGER_TIMEOUT
    led = tmp_path / "locked.sqlite"
    assert run_cli("ledger", "record", str(export / "bench.json"), "--ledger", str(led)).returncode == 0
    (export / "bench.json").unlink()
    locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(led), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        r = run_cli("bench", str(export), *QUICK, "--ledger", str(led), env={"EDGEPIPE_LEDGER_TIMEOUT": "1"})
        _one_line_error(r, "is locked by another process", "bench.json was written", "--no-ledger")
        assert (export / "bench.json").is_file()
    finally:
        locker.kill()
        locker.wait()
    with sqlite3.connect(led) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone()[0] == 1


def test_the_first_timed_row_waits_for_the_ledger(tiny_export, tmp_path):
    """The ledger is opened in a thread; it is open (its file created) before the first row is measured."""
    from edgepipe.pipeline import bench

    led = tmp_path / "ledger.sqlite"
    seen = []
    rep = bench(tiny_export, "cpu", artifacts=["tflite-fp32"], runs=3, min_seconds=0.0, warmup=0, threads=1,
                out=tmp_path / "out", ledger=led, progress=lambda ev, *a: seen.append((ev, led.is_file())))
    assert seen == [("start", True), ("done", True)]
    assert rep.ledger.kind == "bench" and rep.ledger.rows == {"bench_rows": [1]}
    assert "ledger" not in json.loads((tmp_path / "out" / "bench.json").read_text())
    none = bench(tiny_export, "cpu", artifacts=["tflite-fp32"], runs=3, min_seconds=0.0, warmup=0, threads=1,
                 out=tmp_path / "out2", ledger=tmp_path / "never.sqlite", record=False)
    assert none.ledger is None and not (tmp_path / "never.sqlite").exists()


# --------------------------------------------------------------------------------------------- check's gates
SOURCE = {"top1": 98.0, "top5": 100.0}
IDS = ("tflite-int8", "onnx-int8")


def _eval_row(aid: str, top1: float) -> dict:
    fmt, prec = aid.split("-", 1)
    m = {"top1": top1, "top5": 100.0, "agreement": 100.0}
    return {"artifact": aid, "format": fmt, "precision": prec, "sha256": f"sha-{aid}", "target": "cpu",
            "runtime": "litert" if fmt == "tflite" else "onnxruntime", "status": "ok", **m,
            "drop": drops(SOURCE, m), "lost": 2, "gained": 0}


def _folder(tmp_path: Path, top1: dict, median_ms: dict, threads: int = 2) -> Path:
    """An export folder with eval.json (top-1 per artifact) and bench.json (median latency per artifact)."""
    folder = tmp_path / "out" / "m"
    arts = [Artifact(id=a, format=a.split("-")[0], precision="int8", path=f"m.{a}", status="ok", sha256=f"sha-{a}",
                     verification=Verification(status="passed")) for a in IDS]
    folder.mkdir(parents=True)
    Manifest(model=SourceModel(name="m", kind="keras", input_shape=[1, 8, 8, 1], num_classes=10),
             artifacts=arts).save(folder)
    ev = {"schema_version": 1, "kind": "edgepipe-eval", "model": "m", "unit": "percent", "source": dict(SOURCE),
          "dataset": {"source": "digits", "split": "test", "samples": 450}, "results": [_eval_row(a, top1[a]) for a in IDS]}
    (folder / EVAL_NAME).write_text(json.dumps(ev))
    _write_bench(folder / "bench.json", median_ms, seed=1, threads=threads)
    return folder


def _write_bench(path: Path, median_ms: dict, seed: int, threads: int = 2) -> Path:
    rows = [bench_row(a, median_ms=ms, seed=seed + i, threads=threads, sha256=f"sha-{a}")
            for i, (a, ms) in enumerate(median_ms.items())]
    path.write_text(json.dumps(bench_report(rows, model="m", threads=threads, created=f"2025-01-0{seed}T00:00:00")))
    return path


def _check(*args: str) -> tuple[int, str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["check", *args])
    return rc, out.getvalue(), err.getvalue()


def test_both_gates_are_judged_before_check_fails(tmp_path):
    folder = _folder(tmp_path, {"tflite-int8": 97.5, "onnx-int8": 95.0}, {"tflite-int8": 2.0, "onnx-int8": 3.0})
    base = _write_bench(tmp_path / "base.json", {"tflite-int8": 2.0, "onnx-int8": 2.0}, seed=5)
    junit, md = tmp_path / "gate.xml", tmp_path / "gate.md"
    led = tmp_path / "l.sqlite"
    rc, out, err = _check(str(folder), "--max-drop", "1.0", "--baseline", str(base), "--junit", str(junit),
                          "--markdown", str(md), "--ledger", str(led), "--json")
    assert rc == 1 and err.count("\n") == 1, err
    assert "m: 1 of 2 checks failed: onnx-int8 on cpu: top-1" in err  # the accuracy gate ...
    assert "m: 1 of 2 latency checks failed" in err and "onnx-int8 on cpu: latency (slower by +" in err  # ... and latency
    assert "over the 5% budget" in err and "tflite-int8 on cpu: latency" not in err
    d = json.loads(out)
    assert d["passed"] is False and d["failed"] == 1 and d["latency"]["failed"] == 1
    root = ET.parse(junit).getroot()
    assert (root.get("tests"), root.get("failures")) == ("4", "2") and len(root.findall("testsuite")) == 2
    text = md.read_text()
    assert text.index("### edgepipe check: m") < text.index("### edgepipe latency check: m")
    with Ledger.open(led) as ledger:
        (run,) = runs(ledger, "check", None, 5)
    assert run["rows"] == 4 and d["ledger"]["run_id"] == run["id"]
    (tmp_path / "check.json").write_text(out)  # `check --json` output records both gates again, as written
    assert main(["ledger", "record", str(tmp_path / "check.json"), "--ledger", str(tmp_path / "other.sqlite")]) == 0
    with Ledger.open(tmp_path / "other.sqlite") as ledger:
        assert [r["rows"] for r in runs(ledger, "check", None, 5)] == [4]


def test_accuracy_gate_needs_no_bench_and_latency_gate_needs_one(tmp_path):
    folder = _folder(tmp_path, {"tflite-int8": 97.5, "onnx-int8": 97.5}, {"tflite-int8": 2.0, "onnx-int8": 2.0})
    (folder / "bench.json").unlink()
    rc, out, err = _check(str(folder), "--max-drop", "1.0", "--no-ledger")
    assert rc == 0 and "all 2 checks passed" in out and "latency" not in out and "Recorded" not in out
    rc, _, err = _check(str(folder), "--baseline", str(tmp_path / "x.json"))
    assert rc == 2 and "--baseline needs a current bench run: there is no bench.json in" in err
    rc, _, err = _check(str(folder), "--baseline", "latest~1", "--max-slowdown", "-5")
    assert rc == 2 and "bad --max-slowdown -5.0" in err


def test_baseline_from_the_ledger_latest_and_no_ledger(tmp_path, monkeypatch):
    folder = _folder(tmp_path, {"tflite-int8": 97.5, "onnx-int8": 97.5}, {"tflite-int8": 2.0, "onnx-int8": 2.0})
    led = tmp_path / "l.sqlite"
    older = _write_bench(tmp_path / "older.json", {"tflite-int8": 2.0, "onnx-int8": 2.0}, seed=3)
    for p in (older, folder / "bench.json"):  # as `edgepipe bench` would have: the baseline, then this run
        assert main(["ledger", "record", str(p), "--ledger", str(led)]) == 0
    rc, _, err = _check(str(folder), "--baseline", "latest", "--ledger", str(led))
    assert rc == 2 and "the baseline run 2 is the measurement being gated" in err and "latest~1" in err
    with Ledger.open(led) as ledger:
        n_runs = len(runs(ledger, None, None, 50))
    rc, out, err = _check(str(folder), "--baseline", "latest~1", "--ledger", str(led), "--no-ledger")
    assert rc == 0, err
    assert "all 2 latency checks passed (max slowdown 5%) (baseline: run 1)" in " ".join(out.split())
    with Ledger.open(led) as ledger:
        assert len(runs(ledger, None, None, 50)) == n_runs  # read the baseline, recorded nothing
    monkeypatch.setenv("EDGEPIPE_LEDGER", "off")
    rc, _, err = _check(str(folder), "--baseline", "latest~1")
    assert rc == 2 and "the ledger is turned off ($EDGEPIPE_LEDGER=off)" in err


def test_conditions_must_match_unless_forced(tmp_path):
    folder = _folder(tmp_path, {"tflite-int8": 97.5, "onnx-int8": 97.5}, {"tflite-int8": 2.0, "onnx-int8": 2.0})
    base = _write_bench(tmp_path / "base.json", {"tflite-int8": 2.0, "onnx-int8": 2.0}, seed=5, threads=4)
    rc, _, err = _check(str(folder), "--baseline", str(base), "--no-ledger")
    assert rc == 2 and "conditions differ for 2 row(s) (threads: 4 vs 2)" in err and "--force" in err
    rc, out, err = _check(str(folder), "--baseline", str(base), "--no-ledger", "--force", "--json")
    d = json.loads(out)
    assert rc == 0 and d["latency"]["forced"] and all("conditions differ (forced)" in (r["reason"] or "")
                                                      for r in d["latency"]["rows"])
