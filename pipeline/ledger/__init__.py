"""The results ledger: every bench, eval, check and sweep run with its raw samples and conditions.

A lazy facade (PEP 562): ``from edgepipe.pipeline import ledger`` costs nothing; the first use of a
name imports its module (SQLAlchemy takes ~0.12 s to import, numpy ~0.06 s, so neither is loaded
by `edgepipe --help`).

    from edgepipe.pipeline import ledger
    before = ledger.capture()
    ...run, write the report...
    ledger.record_bench(report, "results.sqlite", source="OUT/m/bench.json", before=before)
    with ledger.Ledger.open("results.sqlite") as led:
        ledger.history(led, model="m")
        ledger.latency_gate("latest~1", "latest", max_slowdown=5, ledger=led)

Modules: location (where), store (engine, lock, migrations, errors), schema (tables), conditions
(run conditions), record (record_*), query (reading runs back), stats (bootstrap), compare,
latency (the latency gate), trends (history), html (the history page), deploy (select).
"""
from __future__ import annotations

import importlib
from typing import Any

_NAMES: dict[str, str | tuple[str, str]] = {  # public name -> module (or (module, attribute))
    "record_bench": "record", "record_eval": "record", "record_check": "record", "record_sweep": "record",
    "Recorded": "record",
    "Ledger": "store", "LedgerError": "store", "open_for_reading": "store",
    "Location": "location", "resolve": "location", "default_path": "location",
    "capture": "conditions",
    "history": "trends", "runs": "trends", "info": "trends", "Series": "trends",
    "render_history_html": "html",
    "record_file": "record", "report_files": "record", "bench_run": "record", "eval_run": "record",
    "check_run": "record", "write_runs": "record",
    "Recorder": "recorder",
    "resolve_run": "query", "is_ledger_ref": "query", "BenchEntry": "query", "RunData": "query",
    "compare_runs": "compare", "Comparison": "compare",
    "latency_gate": "latency", "gate_runs": "latency", "LatencyGateResult": "latency",
    "check_max_slowdown": "latency", "merge_junit": "latency",
    "write_latency_reports": ("latency", "write_reports"), "enforce_latency": ("latency", "enforce"),
    "render_latency_markdown": ("latency", "render_markdown"), "render_latency_junit": ("latency", "render_junit"),
    "select_artifact": "deploy", "Selection": "deploy", "enforce_selection": ("deploy", "enforce"),
    "median_ratio": "stats", "RatioCI": "stats",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    where = _NAMES.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod, attr = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
