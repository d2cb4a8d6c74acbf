"""`edgepipe history`, `edgepipe compare`, `edgepipe select` and `edgepipe ledger info|runs|record`.

Flags -> the ledger library -> print. ``edgepipe.pipeline.ledger`` is a lazy facade: SQLAlchemy and
numpy are imported when a command runs, not when `edgepipe --help` registers the commands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

import edgepipe.pipeline.ledger as ledger
from edgepipe.pipeline import api
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import write_text_atomic
from edgepipe.pipeline.cli.common import LEDGER_HELP
ledger_app = typer.Typer(name="ledger", help="The results ledger: where it is, its runs, importing reports.",
                         no_args_is_help=True, add_completion=False, rich_markup_mode=None)


def register(app: typer.Typer) -> None:
    app.command("history", help="Bench figures over time per (model, artifact, target, device): "
                                "a table, --json, or an HTML page with one trend plot per series.")(history)
    app.command("compare", help="Compare two bench runs row by row: ratio of medians with a bootstrap 95% CI.",
                no_args_is_help=True)(compare)
    app.command("select", help="Pick the fastest artifact on a device within an accuracy budget; "
                               "write the choice as JSON.", no_args_is_help=True)(select)
    ledger_app.command("info", help="Where the ledger is, its schema version and row counts.")(info)
    ledger_app.command("runs", help="The newest runs recorded.")(runs)
    ledger_app.command("record", help="Record existing reports (bench.json, eval.json, check --json output, "
                                      "or a model folder holding them).", no_args_is_help=True)(record)
    app.add_typer(ledger_app, name="ledger")


def _out() -> Console:
    con = Console(highlight=False)
    return con if con.is_terminal else Console(highlight=False, width=200)


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _open(spec: Optional[str]):
    """Open the ledger for reading; a default file that does not exist yet is an error, not a new file."""
    return ledger.open_for_reading(spec)


# --------------------------------------------------------------------------------------------- history
def history(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name(s), comma-separated."),
    artifact: Optional[str] = typer.Option(None, "--artifact", "-a", help="Artifact id(s), e.g. tflite-int8."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Target(s): cpu, gpu, edgetpu."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="Device name(s): local or registered."),
    last: int = typer.Option(20, "--last", help="The newest N runs of each series."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML page here."),
    json_: bool = typer.Option(False, "--json", help="Print the series as JSON."),
    ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
) -> None:
    series = api.history(model, artifact=artifact, target=target, device=device, last=last, ledger=ledger_spec)
    where = ledger.resolve(ledger_spec).shown
    if html:
        filters = {"model": model, "artifact": artifact, "target": target, "device": device, "last": last}
        write_text_atomic(html, ledger.render_history_html(series, where, filters))
    if json_:
        _emit({"ledger": where, "series": [s.to_dict() for s in series],
               **({"html": str(html)} if html else {})})
        return
    _print_history(series, where)
    if html:
        sys.stderr.write(f"wrote {html}\n")


def _print_history(series, where: str) -> None:
    con = _out()
    if not series:
        con.print(f"No bench rows match in {where}.")
        return
    t = Table(title=f"edgepipe history ({where})")
    for c in ("series", "run", "date", "p50 ms", "p90 ms", "n", "vs prev", "sha256", "commit"):
        t.add_column(c, overflow="fold")
    for s in series:
        prev = None
        for i, p in enumerate(s.points):
            delta = "-"
            if p.p50 is not None and prev is not None:
                delta = f"{(p.p50 / prev - 1) * 100:+.1f}%"
            t.add_row(s.title if i == 0 else "", str(p.run_id), (p.created or "")[:19].replace("T", " "),
                      f"{p.p50:.4g}" if p.p50 is not None else p.status, f"{p.p90:.4g}" if p.p90 is not None else "-",
                      str(p.n or "-"), delta, (p.sha256 or "-")[:10], (p.git_commit or "-")[:10])
            prev = p.p50 if p.p50 is not None else prev
    con.print(t)


# --------------------------------------------------------------------------------------------- compare
def compare(
    a: str = typer.Argument(..., help="Baseline: a ledger run id, 'latest~1', or a bench.json path."),
    b: str = typer.Argument("latest", help="Current: a ledger run id, 'latest' (default), or a bench.json path."),
    force: bool = typer.Option(False, "--force", help="Compare even when the runs' conditions differ."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With 'latest': the newest run of this model."),
    min_change: float = typer.Option(5.0, "--min-change", help="Call a row slower/faster only when its change is "
                                                               "significant AND at least this many percent "
                                                               "(0: any significant change)."),
    json_: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
) -> None:
    cmp = api.compare_runs(a, b, force=force, model=model, min_change=min_change, ledger=ledger_spec)
    if json_:
        _emit(cmp.to_dict())
        return
    _print_compare(cmp)


def _print_compare(cmp) -> None:
    con = _out()
    t = Table(title=f"A: {cmp.a.label} ({cmp.a.created or '?'})  vs  B: {cmp.b.label} ({cmp.b.created or '?'})")
    for c in ("artifact", "target", "device", "A p50 ms", "B p50 ms", "B/A", "95% CI", "verdict"):
        t.add_column(c, overflow="fold")
    color = {"slower": "red", "faster": "green"}
    for r in cmp.rows:
        e = r.b or r.a
        ci = r.ci
        ratio = f"{ci.ratio:.3f}" if ci and ci.ratio else "-"
        band = f"{ci.low:.3f}–{ci.high:.3f}" if ci and ci.low is not None else (r.note or "-")
        verdict = f"within ±{cmp.min_change:g}%" if r.verdict == "within threshold" else r.verdict
        t.add_row(e.artifact, e.target, e.device, f"{r.a.p50:.4g}" if r.a and r.a.p50 else "-",
                  f"{r.b.p50:.4g}" if r.b and r.b.p50 else "-", ratio, band,
                  f"[{color[verdict]}]{verdict}[/]" if verdict in color else verdict)
    con.print(t)
    for r in cmp.rows:
        if r.note and r.ci is not None and r.ci.low is not None:
            con.print(f"  {r.name}: {r.note}", soft_wrap=True)
    for n in cmp.notes:
        con.print(f"[yellow]note:[/] {n}", soft_wrap=True)
    n = {v: sum(r.verdict == v for r in cmp.rows) for v in ("slower", "faster", "within threshold",
                                                             "no significant change")}
    con.print(f"{n['slower']} slower, {n['faster']} faster, {n['within threshold']} changed by less than "
              f"{cmp.min_change:g}%, {n['no significant change']} without a significant change (slower/faster: the 95% "
              f"bootstrap CI of the ratio of medians excludes 1 and the median moved by at least {cmp.min_change:g}%)",
              soft_wrap=True)


# --------------------------------------------------------------------------------------------- select
def select(
    device: str = typer.Option(..., "--device", "-d", help="The device: 'local' (this host) or a registered name."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Largest allowed accuracy drop, percentage points."),
    metric: str = typer.Option("top1", "--metric", help="top1 | top5 | agreement."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model (needed when several are benched)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only this target (cpu, gpu, edgetpu)."),
    out: Path = typer.Option(Path("deployment.json"), "--out", "-o", help="Where to write the choice (JSON)."),
    json_: bool = typer.Option(False, "--json", help="Print the selection as JSON."),
    ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
) -> None:
    sel = api.select_artifact(device, max_drop, metric=metric, model=model, target=target, out=out,
                              ledger=ledger_spec)
    d = sel.to_dict()
    if sel.choice is not None:
        d["written"] = str(out)
    if json_:
        _emit(d)
    else:
        _print_select(sel, out)
    api.enforce_selection(sel)


def _print_select(sel, out: Path) -> None:
    con = _out()
    if not sel.candidates:
        return
    t = Table(title=f"Artifacts on {sel.device} ({sel.metric} drop budget {sel.max_drop:g} points)")
    for c in ("artifact", "target", "runtime", "p50 ms", "drop", "eval", "bench row", "eval row", "qualifies"):
        t.add_column(c, overflow="fold")
    for c in sel.candidates:
        t.add_row(c.artifact, c.target, c.runtime, f"{c.p50_ms:.4g}", "-" if c.drop is None else f"{c.drop:.2f}",
                  c.eval_match or "none", str(c.bench_row), str(c.eval_row or "-"),
                  "[green]yes[/]" if c.qualifies else "[red]no[/]")
    con.print(t)
    if sel.choice is not None:
        c = sel.choice
        con.print(f"Ship {c.artifact} ({c.sha256[:12]}) on {c.target} with {c.runtime}: {c.p50_ms:.4g} ms median, "
                  f"{c.drop:.2f} points of {sel.metric} lost (bench row {c.bench_row}, eval row {c.eval_row}). "
                  f"Wrote {out}", soft_wrap=True)


# --------------------------------------------------------------------------------------------- ledger *
def info(json_: bool = typer.Option(False, "--json", help="Print JSON."),
         ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP)) -> None:
    with _open(ledger_spec) as led:
        d = ledger.info(led)
    if json_:
        _emit(d)
        return
    counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in d["counts"].items())
    _out().print(f"{d['location']} ({d['kind']}), schema version {d['schema_version']}: {counts}", soft_wrap=True)


def runs(kind: Optional[str] = typer.Option(None, "--kind", help="bench, eval, check or sweep (comma list)."),
         model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name(s)."),
         limit: int = typer.Option(20, "--limit", help="How many (newest first)."),
         json_: bool = typer.Option(False, "--json", help="Print JSON."),
         ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP)) -> None:
    with _open(ledger_spec) as led:
        rows = ledger.runs(led, kind, model, limit)
    if json_:
        _emit(rows)
        return
    t = Table(title="edgepipe ledger runs")
    for c in ("id", "kind", "created", "model", "rows", "host", "commit", "parent"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(str(r["id"]), r["kind"], (r["created"] or "")[:19].replace("T", " "), r["model"] or "-",
                  str(r["rows"]), r["host"] or "-", (r["git_commit"] or "-")[:10], str(r["parent_id"] or "-"))
    _out().print(t)


def record(paths: list[Path] = typer.Argument(..., help="bench.json / eval.json / check JSON files, or model "
                                                         "folders (their bench.json and eval.json)."),
           json_: bool = typer.Option(False, "--json", help="Print what was recorded as JSON."),
           ledger_spec: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP)) -> None:
    files = ledger.report_files(paths)
    loc = ledger.resolve(ledger_spec)
    if loc is None:
        raise UserError("the ledger is turned off ($EDGEPIPE_LEDGER=off)", "Pass --ledger PATH or URL")
    with ledger.Ledger.open(loc) as led:
        done = [ledger.record_file(f, led) for f in files]
    if json_:
        _emit([r.to_dict() for r in done])
        return
    for f, r in zip(files, done):
        sys.stderr.write(f"{f}: {r.summary()}\n")
