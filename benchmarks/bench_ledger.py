"""What the ledger costs: recording a real bench run, and `history` on a 100,000-row ledger.

    python benchmarks/bench_ledger.py                      # both, on SQLite
    python benchmarks/bench_ledger.py --postgres URL       # also the history figures on PostgreSQL
    python benchmarks/bench_ledger.py --export DIR         # bench this export (default: the tests' tiny one)

1. Overhead. A real bench of a small export (TFLite fp32/int8 + ONNX fp32, cpu, the default 50 runs /
   1 s per row) through ``edgepipe.pipeline.api.bench`` as `edgepipe bench` calls it (a ``Recorder``
   opens the ledger while the rows are measured; the report is written, then recorded), in a fresh
   process per run, with and without recording (``record=False``), alternating, ``--rounds`` times. Figures: the whole-process wall-time ratio,
   and the time recording adds after the report is written (its share of the run).
2. History. A ledger of 100,000 bench rows (2,000 runs x 50 rows: 5 models x 5 artifacts x 2 targets,
   50 raw samples each) is built once, then `history` is timed in-process (filtered by model,
   by model + artifact, and unfiltered; newest 20 points per series) and as a whole `edgepipe
   history --model M --json` process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from sqlalchemy import func, select  # noqa: E402

from edgepipe.pipeline.ledger import Ledger, history  # noqa: E402
from edgepipe.pipeline.ledger import schema  # noqa: E402
from edgepipe.pipeline.ledger.record import bench_run  # noqa: E402

# `edgepipe bench`'s library call, as the CLI makes it (api.bench: the Recorder opens the ledger in a thread
# while the bench prepares and is waited for before the first row is timed; the reports are written, then
# recorded). Recorder.record_bench is wrapped only to time it: the tail the run pays after its reports.
_DRIVER = """
import json, sys, time
t0 = time.perf_counter()
from edgepipe.pipeline import api
from edgepipe.pipeline.ledger.recorder import Recorder
export, out, spec = sys.argv[1:4]
timed = {"tail_s": 0.0, "prepare_s": None}
record_bench = Recorder.record_bench
def timed_record(self, *a, **k):
    t = time.perf_counter()
    try:
        return record_bench(self, *a, **k)
    finally:
        timed["tail_s"], timed["prepare_s"] = time.perf_counter() - t, self.prepare_s
Recorder.record_bench = timed_record
report = api.bench(export, "cpu", artifacts=["tflite-fp32", "tflite-int8", "onnx-fp32"], out=out,
                   ledger=None if spec == "none" else spec, record=spec != "none")
print(json.dumps({**timed, "wall_s": time.perf_counter() - t0, "samples": sum(len(r.samples_ms) for r in report.rows),
                  "run_id": report.ledger.run_id if report.ledger else None}))
"""


def _export(dest: Path) -> Path:
    from bench_artifacts import build_tiny_export

    return build_tiny_export(dest)


def _drive(export: Path, out: Path, spec: str) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _DRIVER, str(export), str(out), spec], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench failed: {r.stderr[-2000:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def overhead(export: Path, work: Path, rounds: int) -> dict:
    """Whole bench processes with and without recording, alternating; and the tail cost in each."""
    led = str(work / "overhead.sqlite")
    off, on, tails = [], [], []
    for i in range(rounds):
        w0, _ = _drive(export, work / f"off{i}", "none")
        w1, d = _drive(export, work / f"on{i}", led)
        off.append(w0)
        on.append(w1)
        tails.append(d["tail_s"])
        print(f"  round {i + 1}: without {w0:.2f} s, with {w1:.2f} s ({w1 / w0 - 1:+.1%}); opening the ledger "
              f"{d['prepare_s'] * 1000:.0f} ms (overlapped); after the report was written, recording took "
              f"{d['tail_s'] * 1000:.0f} ms ({d['tail_s'] / w1:.2%}); {d['samples']} raw samples")
    return {"without_s": statistics.median(off), "with_s": statistics.median(on), "tail_s": statistics.median(tails),
            "tail_share": statistics.median(t / w for t, w in zip(tails, on)),
            "process_ratio": statistics.median(b / a for a, b in zip(off, on)), "rounds": rounds}


def same_code_twice(export: Path, work: Path, runs: int) -> dict:
    """A/A: the same export benched ``runs`` times in a row, each run compared with the one before.
    Nothing changed, so every 'significant' row and every latency-gate failure is a false alarm of
    real run-to-run variation (load, clocks, caches), which the within-run bootstrap does not model."""
    from edgepipe.pipeline.ledger import compare_runs, gate_runs, resolve_run

    led = str(work / "aa.sqlite")
    ids = [_drive(export, work / f"aa{i}", led)[1]["run_id"] for i in range(runs)]
    sig = named = fails = rows = 0
    loads = []
    with Ledger.open(led) as ledger:
        for a, b in zip(ids, ids[1:]):
            ra, rb = resolve_run(str(a), ledger), resolve_run(str(b), ledger)
            cmp = compare_runs(ra, rb)  # --min-change 5 (the default)
            gate = gate_runs(ra, rb, 5.0)
            rows += len(cmp.compared)
            sig += sum(r.ci.significant for r in cmp.compared)
            named += sum(r.verdict in ("slower", "faster") for r in cmp.compared)
            fails += len(gate.failed)
            loads.append(max(x for x in (ra.load, rb.load, 0.0) if x is not None))
    return {"pairs": runs - 1, "rows": rows, "significant": sig, "named": named, "gate5_failures": fails,
            "load": max(x for x in loads if x is not None) if any(x is not None for x in loads) else None}


def build_big(url: str, rows_total: int = 100_000) -> float:
    """A ledger of ``rows_total`` bench rows (50 per run), written in batches of 100 runs."""
    from ledger_helpers import bench_report, bench_row

    arts = ["tflite-fp32", "tflite-int8", "tflite-fp16", "onnx-fp32", "onnx-int8"]
    per_run = 5 * len(arts) * 2
    t0 = time.perf_counter()
    with Ledger.open(url) as led:
        for batch in range(rows_total // per_run // 100):
            with led.write() as conn:
                for k in range(100):
                    i = batch * 100 + k
                    rows = [bench_row(a, t, median_ms=1.0 + j, n=50, seed=i + j, sha256=f"{j:064x}")
                            for j, (a, t) in enumerate((a, t) for a in arts for t in ("cpu", "gpu"))]
                    for m in range(5):
                        run, values = bench_run(bench_report(rows, model=f"model{m}",
                                                             created=f"2025-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}"),
                                                after={"loadavg": [0, 0, 0]})
                        rid = led.insert_run(conn, run)
                        led.insert_rows(conn, schema.bench_rows, [{**v, "run_id": rid} for v in values])
    return time.perf_counter() - t0


def _timed(fn, repeat: int = 5) -> float:
    best = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def history_figures(url: str) -> dict:
    with Ledger.open(url) as led:
        with led.read() as c:
            n = c.execute(select(func.count()).select_from(schema.bench_rows)).scalar()
        out = {"rows": n}
        out["model"] = _timed(lambda: history(led, model="model3"))
        out["model_artifact"] = _timed(lambda: history(led, model="model3", artifact="tflite-int8", target="cpu"))
        out["unfiltered"] = _timed(lambda: history(led), repeat=3)
        out["points_model"] = sum(len(s.points) for s in history(led, model="model3"))
        out["points_unfiltered"] = sum(len(s.points) for s in history(led))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "history", "--model", "model3", "--json",
                        "--ledger", url], capture_output=True, text=True)
    out["cli_model_process"] = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, help="An export folder to bench (default: the tests' tiny export).")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--postgres", help="Also time history on this (empty) PostgreSQL database URL.")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-history", action="store_true")
    ap.add_argument("--aa", type=int, default=0, metavar="N",
                    help="Also bench the same export N times and count false alarms between consecutive runs.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-ledger-") as td:
        work = Path(td)
        if not args.skip_overhead:
            export = args.export or _export(work / "tiny-export")
            print(f"1. recording overhead: bench of {export} (3 rows, cpu, 50 runs / 1 s each) with and without")
            o = overhead(export, work, args.rounds)
            print(f"   median of {o['rounds']}: without {o['without_s']:.2f} s, with {o['with_s']:.2f} s "
                  f"(ratio {o['process_ratio']:.3f}); recording after the report: {o['tail_s'] * 1000:.0f} ms = "
                  f"{o['tail_share']:.2%} of the run (goal < 2%)")
        if args.aa > 1:
            export = args.export or _export(work / "tiny-export")
            print(f"3. A/A: the same export benched {args.aa} times, each run compared with the previous one")
            a = same_code_twice(export, work, args.aa)
            n = max(1, a["rows"])
            print(f"   {a['pairs']} pairs, {a['rows']} rows compared: {a['significant']} significant "
                  f"({a['significant'] / n:.0%}), {a['named']} called slower/faster by compare (significant and at "
                  f"least 5%: {a['named'] / n:.0%}), {a['gate5_failures']} latency-gate failures at a 5% budget "
                  f"({a['gate5_failures'] / n:.0%}); highest load average {a['load']}")
        targets = [] if args.skip_history else [("sqlite", str(work / "big.sqlite"))]
        targets += [("postgresql", args.postgres)] if args.postgres else []
        for kind, url in targets:
            print(f"2. history on {kind}: building a 100,000-row ledger ...")
            secs = build_big(url)
            h = history_figures(url)
            print(f"   built in {secs:.1f} s; {h['rows']} bench rows")
            print(f"   history --model (newest 20 per series, {h['points_model']} points): {h['model'] * 1000:.0f} ms")
            print(f"   history --model --artifact --target: {h['model_artifact'] * 1000:.1f} ms")
            print(f"   history, no filter ({h['points_unfiltered']} points): {h['unfiltered'] * 1000:.0f} ms")
            print(f"   `edgepipe history --model model3 --json` whole process: {h['cli_model_process']:.2f} s "
                  f"(goal < 1 s)")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
