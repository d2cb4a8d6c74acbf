"""`edgepipe bench` and `edgepipe report`: flags -> ``edgepipe.pipeline.api.bench`` -> print.

Never imports TensorFlow. The runtimes' native logs go to bench.log beside the results
(``--debug`` leaves them on the terminal).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from edgepipe.devices.measure.bench import BenchReport
from edgepipe.devices.measure.report import (_agreement_text, _ms, _placement_text, compare, render_html,
                                             render_markdown, wrong_output_lines)
from edgepipe.pipeline import api
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import write_text_atomic
from edgepipe.pipeline.cli.common import (LEDGER_HELP, NO_LEDGER_HELP, RowProgress, console, debug_enabled, emit_json,
                                          sentence, table)
from edgepipe.pipeline.logs import terminal

_PATH_HELP = "The folder `edgepipe export` wrote, its manifest.json, or a standalone .tflite/.onnx file."


def register(app: typer.Typer) -> None:
    app.command("bench", no_args_is_help=True,
                help="Measure every artifact of an export (or one .tflite/.onnx file) on each target; "
                     "write bench.json/.md/.html.")(bench)
    app.command("report", no_args_is_help=True, help="Re-render a bench.json as Markdown or HTML.")(report)


def bench(
    out_or_manifest: Path = typer.Argument(..., metavar="PATH", help=_PATH_HELP),
    targets: str = typer.Option("cpu", "--targets", "-t", help="Comma-separated: cpu,gpu,edgetpu (or all)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: usable cores, at most 4)."),
    runs: int = typer.Option(50, "--runs", help="At least this many measured runs per row."),
    min_seconds: float = typer.Option(1.0, "--min-seconds", help="And at least this many seconds per row."),
    warmup: int = typer.Option(5, "--warmup", help="Warm-up runs after the first inference."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Comma-separated artifact ids (default all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.json/.md/.html and bench.log (default: "
                                                           "the export folder; edgepipe-out/<name>/ for a file)."),
    compare_to: Optional[Path] = typer.Option(None, "--compare", help="A previous bench.json to compare with."),
    threshold: float = typer.Option(0.10, "--threshold", help="Flag changes of the median beyond this fraction."),
    profile: bool = typer.Option(False, "--profile", help="Also profile ops where the runtime can (slower)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz of preprocessed samples (default: the "
                                                                  "manifest's reference samples, else random)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds before one row is killed and failed."),
    json_: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    device: Optional[str] = typer.Option(None, "--device", "-d",
                                         help="Measure on registered devices: NAME, a comma-separated list, 'all' "
                                              "(every registered device) and/or 'local' (default: this host only)."),
    benchmark_binary: Optional[Path] = typer.Option(None, "--benchmark-binary",
                                                    help="adb devices: TFLite's benchmark_model built for the phone."),
    config: Optional[str] = typer.Option(None, "--config", help="Device registry (default: $EDGEPIPE_CONFIG, "
                                                                "else $XDG_CONFIG_HOME/edgepipe/devices.json)."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
    no_ledger: bool = typer.Option(False, "--no-ledger", help=NO_LEDGER_HELP),
) -> None:
    out_dir = api.results_dir(out_or_manifest, out)
    with terminal() as term, RowProgress(console(file=term), quiet=json_, unit="rows") as prog:
        rep = api.bench(out_or_manifest, targets, device=device, threads=threads, runs=runs, min_seconds=min_seconds,
                        warmup=warmup, artifacts=_ids(artifacts), profile=profile, inputs=inputs, timeout=timeout,
                        out=out_dir, compare_to=compare_to, threshold=threshold, config=config,
                        benchmark_binary=benchmark_binary, progress=_on_row(prog), log=not debug_enabled(),
                        ledger=ledger, record=not no_ledger)
    cmp = api.bench_comparison(rep, compare_to, threshold)
    paths = {k: out_dir / name for k, name in api.BENCH_FILES.items()}
    if json_:
        d = rep.to_dict()
        d.setdefault("ledger", None)
        d["written"] = {k: str(v) for k, v in paths.items()}
        if cmp is not None:
            d["comparison"] = cmp.to_dict()
        emit_json(d)
    else:
        _print_summary(rep, cmp, paths)
    api.enforce_bench(rep, out_dir)


def _ids(spec: Optional[str]) -> Optional[list[str]]:
    return [a.strip() for a in spec.split(",") if a.strip()] if spec else None


def _on_row(prog: RowProgress):
    def on_progress(event: str, row, i: int, n: int) -> None:
        prog.total(n, n)
        if event == "start":
            prog.describe(f"{row.artifact} on {_where(row)}")
            return
        prog.advance(1)
        fig = f"p50 {row.stat('p50'):.3f} ms" if row.ok and row.stat("p50") else (row.reason or "")
        prog.row_done(f"{row.artifact} on {_where(row)}: {row.status} {fig}")

    return on_progress


def _where(r) -> str:
    """'cpu', or 'cpu @ pi4' for a row measured on a registered device."""
    return r.target if getattr(r, "device", "local") == "local" else f"{r.target} @ {r.device}"


def _print_summary(report: BenchReport, cmp, paths: dict) -> None:
    con = console(stderr=False)
    for line in wrong_output_lines(report):  # first: no speed figure without correct outputs
        con.print(f"[bold red]{line}[/]", soft_wrap=True)
    t = table("Artifact", "Target", "Runtime", "Status", "p50 ms", "p90 ms", "Runs", "Peak RSS MB", "Placement",
              title=f"edgepipe bench: {report.model.get('name')}")
    for r in report.rows:
        if r.ok:
            t.add_row(r.artifact, _where(r), r.runtime, "[green]ok[/]", _ms(r.stat("p50")), _ms(r.stat("p90")),
                      str(r.latency_ms.get("n")), f"{(r.memory.get('peak_rss_kb') or 0) / 1024:.0f}",
                      _placement_text(r) + (f"; {_agreement_text(r)}" if r.agreement else ""))
        else:
            color = "yellow" if r.status in ("skipped", "unavailable") else "red"
            t.add_row(r.artifact, _where(r), r.runtime, f"[{color}]{r.status}[/]", "-", "-", "-", "-", "-")
    con.print(t)
    for r in report.rows:
        if not r.ok:
            sig = f" [{r.signal}]" if r.signal and r.signal not in (r.reason or "") else ""
            con.print(f"  {r.artifact} on {_where(r)}: {r.status}{sig}: {r.reason or ''}", soft_wrap=True)
    if cmp is not None:
        _print_comparison(con, cmp)
    log = paths["json"].parent / "bench.log"
    logged = f"; runtime logs in {log}" if log.is_file() else ""
    con.print(f"Wrote {paths['json']}, {paths['md'].name}, {paths['html'].name}{logged}", soft_wrap=True)
    if report.ledger is not None:
        con.print(sentence(report.ledger.summary()), soft_wrap=True)


def _print_comparison(con, cmp) -> None:
    con.print(f"Compared with the previous run: {len(cmp.regressions)} regression(s), "
              f"{len(cmp.improvements)} improvement(s) (threshold ±{cmp.threshold:.0%})")
    for c in cmp.regressions:
        con.print(f"  [red]regression[/] {c.artifact} on {c.target}: {_ms(c.old_p50)} -> {_ms(c.new_p50)} ms "
                  f"(x{c.ratio:.2f}){'; ' + c.note if c.note else ''}", soft_wrap=True)
    for n in cmp.notes:
        con.print(f"  note: {n}", soft_wrap=True)


def report(
    bench_json: Path = typer.Argument(..., metavar="BENCH_JSON", help="A bench.json (or the folder holding it)."),
    fmt: str = typer.Option("md", "--format", "-f", help="md or html."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of printing to stdout."),
    compare_to: Optional[Path] = typer.Option(None, "--compare", help="A previous bench.json to compare with."),
    threshold: float = typer.Option(0.10, "--threshold", help="Flag changes of the median beyond this fraction."),
    json_: bool = typer.Option(False, "--json", help="Print {format, path} (or the comparison) as JSON."),
) -> None:
    if fmt not in ("md", "html"):
        raise UserError(f"unknown report format '{fmt}'", "Use --format md or --format html")
    rep = BenchReport.load(bench_json)
    cmp = compare(BenchReport.load(compare_to), rep, threshold) if compare_to else None
    text = render_markdown(rep, cmp) if fmt == "md" else render_html(rep, cmp)
    if out:
        write_text_atomic(out, text)
    if json_:
        d = {"format": fmt, "path": str(out) if out else None}
        if cmp is not None:
            d["comparison"] = cmp.to_dict()
        emit_json(d)
    elif not out:
        sys.stdout.write(text)
    else:
        sys.stderr.write(f"wrote {out}\n")
