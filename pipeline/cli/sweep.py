"""`edgepipe sweep` and `edgepipe node start`: thin glue over edgepipe.pipeline.sweep."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.base.util import stdout_to_stderr, unwind_on_sigterm
from edgepipe.pipeline.cli.common import LEDGER_HELP, NO_LEDGER_HELP, sentence
from edgepipe.pipeline.gate import parse_overrides
from edgepipe.pipeline.sweep import cells, raynet
from edgepipe.pipeline.sweep.engine import SerialEngine, make_engine
from edgepipe.pipeline.sweep.plan import load_plan
from edgepipe.pipeline.sweep.render import short_node, headline, label
from edgepipe.pipeline.sweep.run import prepare, run_sweep


def _models(names: Optional[str], **kw) -> Optional[list[dict]]:
    if not names:
        return None
    return [{"model": n.strip(), **{k: v for k, v in kw.items() if v is not None}}
            for n in names.split(",") if n.strip()]


def _overrides(**kw) -> dict:
    return {k.replace("__", "."): v for k, v in kw.items() if v not in (None, [], ())}


def register(app: typer.Typer) -> None:
    app.command("sweep", no_args_is_help=True)(sweep)
    node = typer.Typer(help="Join this machine to a Ray cluster for `edgepipe sweep`, with its devices.",
                       no_args_is_help=True)
    node.command("start", no_args_is_help=True)(node_start)
    app.add_typer(node, name="node")


def sweep(
    plan_file: Optional[Path] = typer.Argument(None, help="A sweep plan (.toml); flags override it. See docs/sweep.md."),
    models: Optional[str] = typer.Option(None, "--models", "-m", help="Comma list of built-in names or model files (replaces the plan's models)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="For --models built-ins: imagenet | none | PATH."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="For --models: 224 or HxW."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="For --models: width multiplier (MobileNet family)."),
    classes: Optional[int] = typer.Option(None, "--classes", help="For --models built-ins with --weights none."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="For --models files: none|unit|tf|caffe|torch."),
    formats: Optional[str] = typer.Option(None, "--formats", "-f", help="Comma list: tflite,onnx,coreml,edgetpu."),
    precisions: Optional[str] = typer.Option(None, "--precisions", "-p", help="Comma list: fp32,fp16,dynamic,int8,..."),
    devices: Optional[str] = typer.Option(None, "--devices", "-d", help="Comma list: local (this machine's CPU), registered names, or all."),
    targets: Optional[str] = typer.Option(None, "--targets", "-t", help="Bench targets on each device (default cpu)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration: digits | random | a folder of images."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Calibration images per model."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled set: digits or an ImageFolder (omit: no eval)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate at most N images (seeded subset)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Gate: largest allowed drop, in points."),
    metric: Optional[str] = typer.Option(None, "--metric", help="Gate: top1 | top5 | agreement (comma list)."),
    max_drop_for: Optional[List[str]] = typer.Option(None, "--max-drop-for", help="Gate override: int8=1.5 (repeatable)."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Bench: at least this many measured runs per row."),
    min_seconds: Optional[float] = typer.Option(None, "--min-seconds", help="Bench: and at least this many seconds."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Bench: runtime threads."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: the plan's, else sweep-out)."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Run on the Ray cluster at HOST:PORT (see `edgepipe node start`)."),
    serial: bool = typer.Option(False, "--serial", help="Run every job in this process, without Ray."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="CPUs of the embedded Ray instance (default: all)."),
    config: Optional[str] = typer.Option(None, "--config", help="Device registry (default: $EDGEPIPE_CONFIG, else ~/.config/edgepipe/devices.json)."),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="Reuse identical earlier exports (default on)."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write the gate as JUnit XML here."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the gate as Markdown here (also appended to $GITHUB_STEP_SUMMARY)."),
    json_out: bool = typer.Option(False, "--json", help="Print sweep.json on stdout."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help=LEDGER_HELP),
    no_ledger: bool = typer.Option(False, "--no-ledger", help=NO_LEDGER_HELP),
) -> None:
    """Export, verify, evaluate, benchmark and gate many models on many devices, in parallel on Ray."""
    if serial and ray_address:
        raise UserError("--serial and --ray both given", "Use one: --serial (no Ray) or --ray HOST:PORT")
    if config:
        os.environ["EDGEPIPE_CONFIG"] = str(Path(config).expanduser().resolve())
    plan = load_plan(plan_file, _overrides(
        out=str(out) if out else None, formats=formats, precisions=precisions, devices=devices,
        bench__targets=targets, calibration__source=calib, calibration__samples=calib_samples,
        eval__data=eval_data, eval__limit=eval_limit, gate__max_drop=max_drop, gate__metric=metric,
        gate__max_drop_for=cells_overrides(max_drop_for), bench__runs=runs, bench__min_seconds=min_seconds,
        bench__threads=threads, export__cache=cache),
        _models(models, weights=weights, input_size=input_size, alpha=alpha, classes=classes, preprocess=preprocess))
    prepared = prepare(plan)
    engine = make_engine(serial, ray_address, cpus)
    say = _Say()
    if isinstance(engine, SerialEngine) and not serial:
        say.line(f"note: Ray is not installed: running serially. {raynet.INSTALL_HINT}")
    unwind_on_sigterm()
    with stdout_to_stderr():  # Ray and converters print to fd 1; keep --json clean
        res = run_sweep(prepared, engine, say, junit=str(junit) if junit else None,
                        markdown=str(markdown) if markdown else None, ledger=ledger, record=not no_ledger)
    if json_out:
        sys.stdout.write(json.dumps({**res.report, "written": res.written,
                                     "ledger": res.ledger.to_dict() if res.ledger else None},
                                    indent=2, default=str) + "\n")
        sys.stdout.flush()
    else:
        _print(res.report, res.written)
        if res.ledger is not None:
            say.line(sentence(res.ledger.summary()))
    gate = res.report["gate"]
    if not gate["passed"]:
        bad = [r for r in gate["rows"] if r["status"] == "fail"]
        shown = "; ".join(f"{label(r)} ({r['reason']})" for r in bad[:5])
        raise GateFailure(f"sweep gate: {len(bad)} check(s) failed: {shown}{'; ...' if len(bad) > 5 else ''}",
                          f"See {res.written['md']}")


def cells_overrides(items: Optional[List[str]]) -> Optional[dict]:
    """--max-drop-for int8=1.5,onnx=2 (repeatable) -> {"int8": 1.5, "onnx": 2.0}."""
    if not items:
        return None
    return parse_overrides(items)


class _Say:
    """One line per event on stderr (no live display: jobs may run in this process and log meanwhile)."""

    def __init__(self) -> None:
        self.done = 0
        self.names: dict = {}

    def line(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def __call__(self, event: str, info: dict) -> None:
        if event == "engine":
            self.names = {n["id"]: n["name"] for n in info["nodes"]}
            nodes = [n for n in info["nodes"] if n["alive"]]
            where = f" at {info['address']}" if info.get("address") else ""
            self.line(f"engine: {info['mode']}{where}, {len(nodes)} node(s), "
                      f"{sum(n['cpus'] or 0 for n in nodes):g} CPUs; devices: {', '.join(info['devices']) or 'none'}")
        elif event in ("done", "reused"):
            self.done += 1
            dev = f" on {info['device']}" if info.get("device") else ""
            what = "reused" if event == "reused" else info["status"]
            node = self.names.get(info.get("node"), short_node(info.get("node")))
            at = f" [node {node}, host {info.get('host')}]" if info.get("node") else ""
            secs = f" {info['seconds']:.1f} s" if info.get("seconds") and event == "done" else ""
            why = f": {info['reason']}" if info.get("reason") and event == "done" else ""
            self.line(f"[{self.done}] {info['kind']} {info['model']}{dev}: {what}{secs}{at}{why}")


def _print(rep: dict, written: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    t = Table(title=headline(rep), title_justify="left")
    cols = ("model", "artifact", "device", "target", "node", "top-1", "Δ top-1", "p50 ms", "gate")
    for c in cols:
        t.add_column(c)
    style = {"pass": "[green]pass[/]", "fail": "[red]FAIL[/]", "skipped": "[yellow]skipped[/]"}
    f = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"
    for r in rep["rows"]:
        t.add_row(r["model"], r["artifact"], r.get("device") or "-", r.get("target") or "-",
                  short_node(r.get("node")) or "-", f(r.get("top1")), f(r.get("drop_top1")), f(r.get("p50_ms"), 3),
                  style.get(r["gate"], r["gate"]))
    con.print(t)
    for r in rep["gate"]["rows"]:
        if r["status"] == "fail":
            con.print(f"[red]{label(r)}[/]: {r['reason']}", soft_wrap=True)
    con.print(f"Wrote {written['json']}, {Path(written['md']).name}, {Path(written['html']).name}", soft_wrap=True)


def node_start(
    head: bool = typer.Option(False, "--head", help="Start the head node (the cluster's address is this machine's)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join the cluster whose head is at HOST:PORT."),
    port: Optional[int] = typer.Option(None, "--port", help="With --head: the port (default 6379)."),
    devices: Optional[str] = typer.Option(None, "--devices", help="Comma list of registered devices attached to this machine."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs this node offers (default: all)."),
    name: Optional[str] = typer.Option(None, "--name", help="The node's name in reports (default: its address)."),
    node_ip: Optional[str] = typer.Option(None, "--node-ip", help="The address this node is reached at (127.0.0.1: one machine only)."),
    temp_dir: Optional[str] = typer.Option(None, "--temp-dir", help="Ray's temp folder on this node (keep it short)."),
    config: Optional[str] = typer.Option(None, "--config", help="This node's device registry (default: $EDGEPIPE_CONFIG, else ~/.config/edgepipe/devices.json)."),
    block: bool = typer.Option(False, "--block", help="Stay in the foreground until stopped (Ctrl-C stops the node)."),
    ray_args: Optional[List[str]] = typer.Option(None, "--ray-arg", help="One more `ray start` option, e.g. --ray-arg=--object-manager-port=8076 (repeatable)."),
) -> None:
    """`ray start` with one resource per device this machine owns: bench jobs for a device run here only."""
    raynet.require_ray("edgepipe node start")
    if config:
        os.environ["EDGEPIPE_CONFIG"] = str(Path(config).expanduser().resolve())
    names = [d.strip() for d in (devices or "").split(",") if d.strip()]
    raynet.check_devices(names, cells.check_registered)
    argv = raynet.node_start_argv(head=head, address=address, port=port, devices=names, num_cpus=num_cpus,
                                  name=name, temp_dir=temp_dir, block=block, node_ip=node_ip) + list(ray_args or [])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edgepipe.pipeline.sweep.raynet", *argv])
