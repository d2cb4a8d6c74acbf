"""`edgepipe devices`, `edgepipe bench`, `edgepipe report`: thin glue over edgepipe.devices.

Nothing heavy at import: the command bodies import the library lazily. Never imports TensorFlow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    # `devices` is a sub-app in cli_remote.py (list, add, remove); its listing calls devices() below
    app.command("bench", help="Measure every artifact of an export on each target; write bench.json/.md/.html.")(bench)
    app.command("report", help="Re-render a bench.json as Markdown or HTML.")(report)


# --------------------------------------------------------------------------------------------- devices
def devices(json_: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    from edgepipe.devices.measure import host
    from edgepipe.pipeline.cli.main import console, emit_json

    facts = host.host_facts()
    rows = host.target_table()
    if json_:
        emit_json({"host": facts, "targets": rows})
        return
    from rich.table import Table

    con = console(stderr=False)
    cpu = facts["cpu"]
    con.print(f"[bold]{cpu['model']}[/] ({cpu['arch']}), {cpu['usable_cores']} usable of {cpu['logical_cores']} "
              f"logical cores, {(facts.get('memory_bytes') or 0) / 2**30:.1f} GiB · {facts['os']}")
    if cpu.get("isa"):
        con.print(f"ISA: {', '.join(cpu['isa'])}")
    t = Table(show_lines=False)
    for c in ("Target", "Runtime", "Formats", "Status", "Versions / reason"):
        t.add_column(c)
    for r in rows:
        vers = ", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items())
        status = "[green]available[/]" if r["available"] else "[yellow]unavailable[/]"
        detail = vers if r["available"] else (r.get("reason") or "")
        if r["available"] and r.get("details", {}).get("note"):
            detail += f"\n{r['details']['note']}"
        t.add_row(r["target"], r["runtime"], ",".join(r["formats"]), status, detail)
    con.print(t)
    for r in rows:
        for a in (r.get("details") or {}).get("vulkan_adapters", []) or []:
            con.print(f"Vulkan adapter: {a['name']} ({a['type']}, Vulkan {a['vulkan']})")
    for g in facts.get("nvidia_gpus") or []:
        con.print(f"NVIDIA GPU: {g['name']} (driver {g['driver']}, {g['memory']})")
    for d in facts.get("edgetpu_devices") or []:
        con.print(f"Edge TPU: {d['name']} ({d.get('id') or d.get('path')})")


# --------------------------------------------------------------------------------------------- bench
def bench(
    out_or_manifest: Path = typer.Argument(..., help="The folder `edgepipe export` wrote, or its manifest.json."),
    targets: str = typer.Option("cpu", "--targets", "-t", help="Comma-separated: cpu,gpu,edgetpu (or all)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: usable cores, at most 4)."),
    runs: int = typer.Option(50, "--runs", help="At least this many measured runs per row."),
    min_seconds: float = typer.Option(1.0, "--min-seconds", help="And at least this many seconds per row."),
    warmup: int = typer.Option(5, "--warmup", help="Warm-up runs after the first inference."),
    artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Comma-separated artifact ids (default all)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for bench.json/.md/.html (default: the manifest's)."),
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
) -> None:
    from edgepipe.devices import BenchReport, BenchSettings, compare, parse_targets, run_bench, write_reports
    from edgepipe.pipeline.cli.main import console, emit_json
    from edgepipe.pipeline.base.errors import StageFailure
    from edgepipe.pipeline.base.manifest import find_manifest

    # every check that can fail fast does so before the first measurement
    settings = BenchSettings(
        targets=parse_targets(targets), threads=threads, runs=runs, min_seconds=min_seconds, warmup=warmup,
        artifacts=[a.strip() for a in artifacts.split(",") if a.strip()] if artifacts else None,
        profile=profile, timeout_s=timeout, inputs=str(inputs) if inputs else None,
    ).validate()
    old = BenchReport.load(compare_to) if compare_to else None
    if old is not None and not (0 < threshold < 10):
        compare(old, old, threshold)  # raises the UserError for a bad threshold
    out_dir = out or find_manifest(out_or_manifest).parent
    if device:  # unknown device names and a missing binary fail here, before any measurement
        from edgepipe.devices import Registry, check_benchmark_binary, resolve_devices

        resolve_devices(device, Registry(config))
        if benchmark_binary:
            check_benchmark_binary(benchmark_binary)

    con = console(stderr=True)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=True, disable=not con.is_terminal) as prog:
        task = prog.add_task("measuring", total=None)

        def on_progress(event, row, i, n):
            prog.update(task, total=n, completed=i,
                        description=f"{row.artifact} on {row.target}" if event == "start" else "measuring")
            if event == "done" and not con.is_terminal:
                fig = f"p50 {row.stat('p50'):.3f} ms" if row.ok and row.stat("p50") else (row.reason or "")
                at = f" @ {row.device}" if row.device != "local" else ""
                con.print(f"[{i}/{n}] {row.artifact} on {row.target}{at}: {row.status} {fig}")

        if device:
            from edgepipe.devices import bench_devices

            report = bench_devices(out_or_manifest, settings, device, config=config,
                                   benchmark_binary=str(benchmark_binary) if benchmark_binary else None,
                                   progress=on_progress)
        else:
            report = run_bench(out_or_manifest, settings=settings, progress=on_progress)
    cmp = compare(old, report, threshold) if old is not None else None
    paths = write_reports(report, out_dir, cmp)
    failed = [r for r in report.rows if r.status == "failed"]
    if json_:
        d = report.to_dict()
        d["written"] = {k: str(v) for k, v in paths.items()}
        if cmp is not None:
            d["comparison"] = cmp.to_dict()
        emit_json(d)
    else:
        _print_summary(report, cmp, paths)
    if failed:
        raise StageFailure(f"{len(failed)} of {len(report.rows)} rows failed "
                           f"({', '.join(f'{r.artifact} on {r.target}' for r in failed[:3])}); the others were written "
                           f"to {paths['json'].parent}", "See the reasons in bench.md")


def _where(r) -> str:
    """'cpu', or 'cpu @ pi4' for a row measured on a registered device."""
    return r.target if getattr(r, "device", "local") == "local" else f"{r.target} @ {r.device}"


def _print_summary(report, cmp, paths) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgepipe.devices.measure.report import _agreement_text, _ms, _placement_text

    con = Console(highlight=False)
    if not con.is_terminal:
        con = Console(highlight=False, width=160)
    t = Table(title=f"edgepipe bench: {report.model.get('name')}")
    for c in ("Artifact", "Target", "Runtime", "Status", "p50 ms", "p90 ms", "Runs", "Peak RSS MB", "Placement"):
        t.add_column(c, overflow="fold")
    for r in report.rows:
        if r.ok:
            t.add_row(r.artifact, _where(r), r.runtime, "[green]ok[/]", _ms(r.stat("p50")), _ms(r.stat("p90")),
                      str(r.latency_ms.get("n")), f"{(r.memory.get('peak_rss_kb') or 0) / 1024:.0f}",
                      _placement_text(r) + (f"; {_agreement_text(r)}" if r.agreement else ""))
        else:
            color = "red" if r.status == "failed" else "yellow"
            t.add_row(r.artifact, _where(r), r.runtime, f"[{color}]{r.status}[/]", "-", "-", "-", "-", "-")
    con.print(t)
    for r in report.rows:
        if not r.ok:
            sig = f" [{r.signal}]" if r.signal and r.signal not in (r.reason or "") else ""
            con.print(f"  {r.artifact} on {_where(r)}: {r.status}{sig}: {r.reason or ''}", soft_wrap=True)
    if cmp is not None:
        con.print(f"Compared with the previous run: {len(cmp.regressions)} regression(s), "
                  f"{len(cmp.improvements)} improvement(s) (threshold ±{cmp.threshold:.0%})")
        for c in cmp.regressions:
            con.print(f"  [red]regression[/] {c.artifact} on {c.target}: {_ms(c.old_p50)} -> {_ms(c.new_p50)} ms "
                      f"(x{c.ratio:.2f}){'; ' + c.note if c.note else ''}", soft_wrap=True)
        for n in cmp.notes:
            con.print(f"  note: {n}", soft_wrap=True)
    con.print(f"Wrote {paths['json']}, {paths['md'].name}, {paths['html'].name}", soft_wrap=True)


# --------------------------------------------------------------------------------------------- report
def report(
    bench_json: Path = typer.Argument(..., help="A bench.json (or the folder holding it)."),
    fmt: str = typer.Option("md", "--format", "-f", help="md or html."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of printing to stdout."),
    compare_to: Optional[Path] = typer.Option(None, "--compare", help="A previous bench.json to compare with."),
    threshold: float = typer.Option(0.10, "--threshold", help="Flag changes of the median beyond this fraction."),
    json_: bool = typer.Option(False, "--json", help="Print {format, path} (or the comparison) as JSON."),
) -> None:
    import sys

    from edgepipe.devices import BenchReport, compare, render_html, render_markdown
    from edgepipe.pipeline.cli.main import emit_json
    from edgepipe.pipeline.base.errors import UserError
    from edgepipe.pipeline.base.util import write_text_atomic

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
