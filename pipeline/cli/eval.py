"""`edgepipe eval` and `edgepipe check`: thin glue over pipeline.evaluate and pipeline.gate."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval", no_args_is_help=True)
    def eval_cmd(
        model_dir: Path = typer.Argument(..., help="The folder `edgepipe export` wrote (OUT/<model>) or its manifest.json."),
        data: str = typer.Option(..., "--data", help="Labelled images: a folder with one subfolder per class, or 'digits'."),
        targets: Optional[str] = typer.Option(None, "--targets", help="Comma list of cpu,gpu,reference,edgetpu (default: cpu,gpu,reference where available)."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate at most N images (a fixed, seeded subset)."),
        min_samples: int = typer.Option(100, "--min-samples", help="Refuse eval sets smaller than this."),
        labels_map: Optional[str] = typer.Option(None, "--labels-map", help="File mapping class folder names to model class indices (JSON or 'name index' lines)."),
        source_model: Optional[str] = typer.Option(None, "--source-model", help="The exported model file, if it moved since the export."),
        artifacts: Optional[str] = typer.Option(None, "--artifacts", help="Comma list of artifact ids (default: all)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Runtime threads."),
        device: Optional[str] = typer.Option(None, "--device", help="Evaluate the TFLite/ONNX artifacts on this registered ssh/adb device (its cpu) instead of here."),
        config: Optional[str] = typer.Option(None, "--config", help="The device registry (default: $EDGEPIPE_CONFIG, else ~/.config/edgepipe/devices.json)."),
        json_out: bool = typer.Option(False, "--json", help="Print eval.json on stdout."),
    ):
        """Accuracy of the source model and every artifact on a labelled set; writes eval.json."""
        from edgepipe.pipeline.base.errors import StageFailure
        from edgepipe.pipeline.evaluate import EvalRequest, evaluate, validate

        req = EvalRequest(model_dir, data, targets=targets, limit=limit, min_samples=min_samples,
                          labels_map=labels_map, source_model=source_model, threads=threads,
                          device=device, config=config,
                          artifacts=[a.strip() for a in artifacts.split(",") if a.strip()] if artifacts else None)
        validate(req)
        from edgepipe.pipeline.base.util import stdout_to_stderr

        prog = _Progress(quiet=json_out)
        try:
            with stdout_to_stderr():  # runtimes print to fd 1 (LiteRT's GPU accelerator does); keep --json clean
                res = evaluate(req, prog)
        finally:
            prog.close()
        if json_out:
            from edgepipe.pipeline.cli.main import emit_json

            emit_json(res)
        else:
            _print_eval(res)
        errors = [r for r in res["results"] if r["status"] == "error"]
        if errors:
            lines = "; ".join(f"{r['artifact']} on {_where(r)}: {r.get('reason')}" for r in errors[:4])
            raise StageFailure(f"{len(errors)} evaluation(s) failed ({lines})", "The others were written to eval.json")

    @app.command("check", no_args_is_help=True)
    def check_cmd(
        model_dir: Path = typer.Argument(..., help="The folder `edgepipe export` wrote (OUT/<model>); needs its eval.json."),
        max_drop: float = typer.Option(1.0, "--max-drop", help="Largest allowed drop against the source model, in percentage points."),
        metric: str = typer.Option("top1", "--metric", help="top1 | top5 | agreement (comma list for several)."),
        max_drop_for: Optional[List[str]] = typer.Option(None, "--max-drop-for", help="Override per precision, format or artifact id: int8=1.5 (repeatable)."),
        require_verified: bool = typer.Option(False, "--require-verified", help="Fail artifacts whose verification did not pass."),
        require_full_edgetpu: bool = typer.Option(False, "--require-full-edgetpu", help="Fail Edge TPU artifacts with ops on the CPU."),
        junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write a Markdown summary here (also appended to $GITHUB_STEP_SUMMARY when set)."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ):
        """CI gate: exit 1 when an artifact loses more accuracy than its budget allows."""
        from edgepipe.pipeline.gate import (Budget, GateConfig, enforce, parse_metrics, parse_overrides, run_check, write_reports)
        from edgepipe.pipeline.base.manifest import load_manifest

        m, _ = load_manifest(model_dir)
        overrides = parse_overrides(max_drop_for, m)
        cfg = GateConfig([Budget(mt, max_drop, dict(overrides)) for mt in parse_metrics(metric)],
                         require_verified=require_verified, require_full_edgetpu=require_full_edgetpu)
        res = run_check(model_dir, cfg)
        written = write_reports(res, junit, markdown)
        if json_out:
            from edgepipe.pipeline.cli.main import emit_json

            emit_json({**res.to_dict(), "reports": written})
        else:
            _print_check(res)
        enforce(res)


class _Progress:
    def __init__(self, quiet: bool):
        from edgepipe.pipeline.cli.main import console

        self.console = console()
        self.quiet = quiet
        self.status = None if quiet else self.console.status("evaluating")
        if self.status:
            self.status.start()

    def __call__(self, event: str, info: dict) -> None:
        if not self.status:
            return
        if event == "stage":
            self.status.update(f"{info['name']} {info.get('detail', '')}".strip())
        elif event == "source":
            self.status.update(info["detail"])
        elif event == "artifact":
            self.status.update(f"evaluating {info['id']}")

    def close(self) -> None:
        if self.status:
            self.status.stop()


def _where(r: dict) -> str:
    """target, or target@device for rows evaluated on a remote device."""
    t = r.get("target") or "-"
    return f"{t}@{r['device']}" if r.get("device") not in (None, "local") else t


def _print_eval(res: dict) -> None:
    from rich.table import Table

    from edgepipe.pipeline.cli.main import console

    c = console(stderr=False)
    ds, src = res["dataset"], res["source"]
    split = f" ({ds['split']} split)" if ds.get("split") else ""
    t = Table(title=f"{res['model']}: {ds['source']}{split}, {ds['samples']} images")
    for col in ("artifact", "target", "top-1", "top-5", "agreement", "Δ top-1", "lost/gained", "img/s"):
        t.add_column(col)
    f = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"
    t.add_row("source model", "-", f(src["top1"]), f(src["top5"]), "100.00", "-", "-", "-")
    for r in res["results"]:
        if r["status"] == "ok":
            t.add_row(r["artifact"], _where(r), f(r["top1"]), f(r["top5"]), f(r["agreement"]),
                      f(r["drop"]["top1"]), f"{r['lost']}/{r['gained']}", f(r.get("images_per_s"), 0))
        else:
            color = "yellow" if r["status"] == "skipped" else "red"
            t.add_row(r["artifact"], _where(r), f"[{color}]{r['status']}[/]", "", "", "", "", "")
    c.print(t)
    for r in res["results"]:
        if r["status"] != "ok":
            c.print(f"[{'yellow' if r['status'] == 'skipped' else 'red'}]{r['artifact']} "
                    f"{_where(r)}[/]: {r.get('reason')}")
    if ds.get("skipped"):
        c.print(f"[yellow]note:[/] {ds['skipped']} images failed to decode and were skipped")
    pred = src.get("predictions", {})
    c.print(f"source predictions {'reused from' if pred.get('cached') else 'cached in'} {pred.get('path')}; "
            f"wrote eval.json ({res['seconds']:.1f} s)")


def _print_check(res) -> None:
    from rich.table import Table

    from edgepipe.pipeline.cli.main import console
    from edgepipe.pipeline.evaluate import METRIC_LABELS
    from edgepipe.pipeline.gate import _pts

    c = console(stderr=False)
    t = Table(title=res.summary_line())
    for col in ("artifact", "target", "check", "source", "artifact", "drop", "budget", "result"):
        t.add_column(col)
    f = lambda v: "-" if v is None else f"{v:.2f}"
    style = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]"}
    for r in res.rows:
        t.add_row(r.artifact, r.target or "-", METRIC_LABELS.get(r.check, r.check), f(r.source_value),
                  f(r.artifact_value), f(r.drop), "-" if r.budget is None else _pts(r.budget), style[r.status])
    c.print(t)
    for r in res.rows:
        if r.reason and r.status != "pass":
            c.print(f"[{'red' if r.status == 'fail' else 'yellow'}]{r.name}[/]: {r.reason}")
