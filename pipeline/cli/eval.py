"""`edgepipe eval` and `edgepipe check`: flags -> ``edgepipe.pipeline.api`` -> print."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from edgepipe.pipeline import api
from edgepipe.pipeline.base.evaluation import METRIC_LABELS, EvalResult, EvalRow
from edgepipe.pipeline.cli.common import (LEDGER_HELP, NO_LEDGER_HELP, RowProgress, console, debug_enabled, emit_json,
                                          sentence, table)
from edgepipe.pipeline.gate import CheckResult, points_text
from edgepipe.pipeline.logs import terminal

_TARGETS_HELP = ("Comma list of cpu,gpu,reference,edgetpu, or all (default: the fast targets here: cpu, and gpu on a "
                 "hardware GPU; the software GPU and the Core ML reference interpreter only when named).")


def register(app: typer.Typer) -> None:
    app.command("eval", no_args_is_help=True)(eval_cmd)
    app.command("check", no_args_is_help=True)(check_cmd)


def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="PATH", help="The folder `edgepipe export` wrote (OUT/<model>), its manifest.json, "
                                               "or a standalone .tflite/.onnx file (absolute accuracy only)."),
    data: str = typer.Option(..., "--data", help="Labelled images: a folder with one subfolder per class, or 'digits'."),
    targets: Optional[str] = typer.Option(None, "--targets", help=_TARGETS_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate at most N images (a fixed, seeded subset)."),
    min_samples: int = typer.Option(100, "--min-samples", help="Refuse eval sets smaller than this."),
    labels_map: Optional[str] = typer.Option(None, "--labels-map", help="File mapping class folder names to model "
                                                                        "class indices (JSON or 'name index' lines)."),
    source_model: Optional[str] = typer.Option(None, "--source-model", help="The exported model file, if it moved "
                                                                            "since the export."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Comma list of artifact ids (default: all)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads (default: the runtime's)."),
    device: Optional[str] = typer.Option(None, "--device", help="Evaluate the TFLite/ONNX artifacts on this registered "
                                                                "ssh/adb device (its cpu) instead of here."),
    config: Optional[str] = typer.Option(None, "--config", help="The device registry (default: $EDGEPIPE_CONFIG, "
                                                                "else ~/.config/edgepipe/devices.json)."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="A standalone file only: none|unit|tf|caffe|"
                                                                        "torch, when the file does not record it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and eval.log (default: the export "
                                                           "folder; edgepipe-out/<name>/ for a file)."),
    json_out: bool = typer.Option(False, "--json", help="Print eval.json on stdout (and where it was recorded, "
                                                        "under \"ledger\")."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
    no_ledger: bool = typer.Option(False, "--no-ledger", help=NO_LEDGER_HELP),
) -> None:
    """Accuracy of the source model and every artifact on a labelled set; writes eval.json."""
    with terminal() as term, RowProgress(console(file=term), quiet=json_out) as prog:
        res = api.evaluate(model_dir, data, targets=targets, limit=limit, min_samples=min_samples,
                           labels_map=labels_map, source_model=source_model,
                           artifacts=[a.strip() for a in artifacts.split(",") if a.strip()] if artifacts else None,
                           threads=threads, device=device, config=config, preprocess=preprocess, out=out,
                           progress=_on_event(prog), log=not debug_enabled(), ledger=ledger, record=not no_ledger)
    if json_out:
        emit_json({**res.to_dict(), "ledger": res.ledger.to_dict() if res.ledger else None})
    else:
        _print_eval(res, api.results_dir(model_dir, out))
    for w in res.notes:
        console().print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
    api.enforce_eval(res)


def _on_event(prog: RowProgress):
    def on_event(event: str, info: dict) -> None:
        if event in ("stage", "source"):
            prog.describe(f"{info.get('name', '')} {info.get('detail', '')}".strip())
        elif event == "plan":
            prog.total(info["images"], info["jobs"])
        elif event == "start":
            prog.describe(f"{info['id']} on {info['where']}")
        elif event == "images":
            prog.advance(info["count"])
        elif event == "done":
            r: EvalRow = info["row"]
            fig = f"top-1 {r.top1:.2f} %, {r.images_per_s or 0:.0f} img/s" if r.ok else (r.reason or "")
            prog.row_done(f"{r.artifact} on {r.where}: {r.status} {fig}")

    return on_event


def _f(v: Optional[float], nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _print_eval(res: EvalResult, out_dir: Path) -> None:
    c = console(stderr=False)
    ds, src = res.dataset, res.source
    split = f" ({ds['split']} split)" if ds.get("split") else ""
    cols = ["artifact", "target", "top-1", "top-5", "agreement", "Δ top-1", "lost/gained", "img/s"]
    if src is None:  # a standalone file: absolute accuracy only
        cols = ["artifact", "target", "top-1", "top-5", "img/s"]
    t = table(*cols, title=f"{res.model}: {ds['source']}{split}, {ds['samples']} images")
    if src is not None:
        t.add_row("source model", "-", _f(src["top1"]), _f(src["top5"]), "100.00", "-", "-", "-")
    for r in res.results:
        t.add_row(*_eval_cells(r, src is not None))
    c.print(t)
    for r in res.results:
        if r.status != "ok":
            c.print(f"[{'yellow' if r.status == 'skipped' else 'red'}]{r.artifact} {r.where or '-'}[/]: {r.reason}",
                    soft_wrap=True)
    if ds.get("skipped"):
        c.print(f"[yellow]note:[/] {ds['skipped']} images failed to decode and were skipped")
    pred = (src or {}).get("predictions") or {}
    head = (f"source predictions {'reused from' if pred.get('cached') else 'cached in'} {pred.get('path')}; "
            if src is not None else "")
    log = out_dir / "eval.log"
    logged = f"; runtime logs in {log}" if log.is_file() else ""
    c.print(f"{head}wrote {out_dir / 'eval.json'} ({res.seconds:.1f} s){logged}", soft_wrap=True)
    if res.ledger is not None:
        c.print(sentence(res.ledger.summary()), soft_wrap=True)


def _eval_cells(r: EvalRow, with_source: bool) -> list[str]:
    where = r.where or "-"
    if r.status == "ok":
        if not with_source:
            return [r.artifact, where, _f(r.top1), _f(r.top5), _f(r.images_per_s, 0)]
        return [r.artifact, where, _f(r.top1), _f(r.top5), _f(r.agreement), _f((r.drop or {}).get("top1")),
                f"{r.lost}/{r.gained}", _f(r.images_per_s, 0)]
    color = "yellow" if r.status == "skipped" else "red"
    return [r.artifact, where, f"[{color}]{r.status}[/]"] + [""] * (5 if with_source else 2)


def check_cmd(
    model_dir: Path = typer.Argument(..., metavar="PATH", help="The folder `edgepipe export` wrote (OUT/<model>); needs its eval.json."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Largest allowed drop against the source model, in "
                                                           "percentage points."),
    metric: str = typer.Option("top1", "--metric", help="top1 | top5 | agreement (comma list for several)."),
    max_drop_for: Optional[List[str]] = typer.Option(None, "--max-drop-for", help="Override per precision, format or "
                                                                                  "artifact id: int8=1.5 (repeatable)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Level of each drop's interval (paired predictions)."),
    max_class_drop: Optional[float] = typer.Option(None, "--max-class-drop", help="Fail when one class's drop lies "
                                                                                  "wholly over this many points."),
    allow_inconclusive: bool = typer.Option(False, "--allow-inconclusive", help="Pass, with a warning, drops within "
                                            "the budget that the set is too small to confirm (default: they fail)."),
    require_verified: bool = typer.Option(False, "--require-verified", help="Fail artifacts whose verification did "
                                                                            "not pass."),
    require_full_edgetpu: bool = typer.Option(False, "--require-full-edgetpu", help="Fail Edge TPU artifacts with ops "
                                                                                    "on the CPU."),
    allow_chance_source: bool = typer.Option(False, "--allow-chance-source",
                                             help="Gate even when the source model does no better than guessing on "
                                                  "the eval set (by default check refuses: exit 2)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown summary here (also appended to "
                                                                     "$GITHUB_STEP_SUMMARY when set)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Also gate latency: the bench.json beside the "
                                                                    "manifest against this run (a ledger run id, "
                                                                    "'latest~1', or a bench.json)."),
    max_slowdown: float = typer.Option(5.0, "--max-slowdown", help="With --baseline: fail a row slower than this many "
                                                                   "percent with 95% confidence."),
    force: bool = typer.Option(False, "--force", help="With --baseline: gate even when the runs' conditions differ "
                                                      "(threads, CPU, runtime version, device)."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
    no_ledger: bool = typer.Option(False, "--no-ledger", help=NO_LEDGER_HELP),
) -> None:
    """CI gate: exit 1 when an artifact loses more accuracy than its budget allows (or, with --baseline, runs
    slower than --max-slowdown allows). --junit/--markdown hold both gates."""
    res = api.check(model_dir, max_drop, metric=metric, max_drop_for=max_drop_for, require_verified=require_verified,
                    require_full_edgetpu=require_full_edgetpu, allow_chance_source=allow_chance_source,
                    junit=junit, markdown=markdown, baseline=baseline, max_slowdown=max_slowdown, force=force,
                    ledger=ledger, record=not no_ledger, confidence=confidence, max_class_drop=max_class_drop,
                    allow_inconclusive=allow_inconclusive)
    if json_out:
        emit_json({**res.to_dict(), "reports": res.reports, "ledger": res.ledger.to_dict() if res.ledger else None})
    else:
        _print_check(res, console(stderr=False))
        if res.latency is not None:
            _print_latency(res.latency, console(stderr=False))
        if res.ledger is not None:
            console(stderr=False).print(sentence(res.ledger.summary()), soft_wrap=True)
    for w in res.warnings:
        console().print(f"[bold yellow]warning:[/] {w}", soft_wrap=True)
    api.enforce_check(res)


def _print_check(res: CheckResult, c: Console) -> None:
    pct = f"{100 * res.config.confidence:g}% interval"
    t = table("artifact", "target", "check", "source", "artifact", "drop", pct, "budget", "result",
              title=res.summary_line())
    style = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]",
             "inconclusive": "[yellow]inconclusive[/]" + (" (allowed)" if res.config.allow_inconclusive else "")}
    for r in res.rows:
        budget = "-" if r.budget is None else points_text(r.budget)
        t.add_row(r.artifact, r.target or "-", METRIC_LABELS.get(r.check, r.check), _f(r.source_value),
                  _f(r.artifact_value), _f(r.drop), r.interval_text(), budget, style[r.status])
    c.print(t)
    for r in res.rows:
        if r.reason and r.status != "pass":
            c.print(f"[{'red' if r.status == 'fail' else 'yellow'}]{r.name}[/]: {r.reason}", soft_wrap=True)
    for n in res.notes:
        c.print(f"note: {n}", soft_wrap=True)


def _print_latency(lat, c: Console) -> None:
    t = table("artifact", "target", "device", "baseline ms", "current ms", "change", "95% CI", "budget", "result",
              title=f"{lat.summary_line()} (baseline: {lat.baseline})")
    style = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]"}
    for r in lat.rows:
        ci = "-" if not r.ci95_pct else f"{r.ci95_pct[0]:+.1f}% … {r.ci95_pct[1]:+.1f}%"
        t.add_row(r.artifact, r.target, r.device, _f(r.baseline_p50, 4), _f(r.current_p50, 4),
                  "-" if r.change_pct is None else f"{r.change_pct:+.1f}%", ci, f"{r.budget:g}%", style[r.status])
    c.print(t)
    for r in lat.rows:
        if r.reason and r.status != "pass":
            c.print(f"[{'red' if r.status == 'fail' else 'yellow'}]{r.name}[/]: {r.reason}", soft_wrap=True)
