"""`edgepipe export`: flags -> ``edgepipe.pipeline.export_stage.export(...)`` -> table or --json.

All policy (validation, which formats --targets adds, the recovery, the Edge TPU gate) lives in the
library call; this module maps flags to it and prints what it returns.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from edgepipe.pipeline import export_stage
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.records import ExportOutcome
from edgepipe.pipeline.base.util import quiet_tensorflow, stdout_to_stderr, unwind_on_sigterm

# When the output is not a terminal (a pipe, a CI log) nothing decides a width: print wide rather
# than cut artifact names, reasons and fixes at 80 columns.
WIDE = 400


def _floats(s: Optional[str], flag: str) -> Optional[list[float]]:
    if s is None:
        return None
    try:
        return [float(x) for x in s.replace(" ", ",").split(",") if x]
    except ValueError:
        raise UserError(f"bad {flag} '{s}'", f"Give numbers separated by commas, e.g. {flag} 0.5,0.5,0.5") from None


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.find_root().params.get("debug") or os.environ.get("EDGEPIPE_DEBUG"))


def _console(file: Optional[IO[str]] = None) -> Console:
    stream = file if file is not None else sys.stdout
    if stream.isatty():
        return Console(file=file, highlight=False)
    return Console(file=file, highlight=False, width=WIDE, soft_wrap=True)


@contextlib.contextmanager
def _terminal() -> Iterator[IO[str]]:
    """A handle on the real stderr, for progress while the export sends fd 2 to export.log."""
    sys.stderr.flush()
    term = os.fdopen(os.dup(2), "w", buffering=1)
    try:
        yield term
    finally:
        term.close()


def register(app: typer.Typer) -> None:
    app.command("export", no_args_is_help=True)(export_cmd)


def export_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Built-in name (mobilenet, resnet50, ...), a .keras/.h5 file or a SavedModel folder."),
    int8: bool = typer.Option(False, "--int8", help="Export the int8 variant of every selected format."),
    formats: Optional[str] = typer.Option(None, "--formats", "-f", help="Comma list: tflite,onnx,coreml,edgetpu (default: tflite,onnx,coreml)."),
    precisions: Optional[str] = typer.Option(None, "--precisions", "-p", help="Comma list: fp32,fp16,dynamic,int8,int16x8,palettized."),
    out: Path = typer.Option(Path("edgepipe-out"), "--out", "-o", help="Output folder; artifacts go to OUT/<model>/."),
    weights: str = typer.Option("imagenet", "--weights", help="Built-ins: imagenet | none | PATH to a weights file."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Input size: 224 or HxW."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Width multiplier (MobileNet family)."),
    classes: Optional[int] = typer.Option(None, "--classes", help="Number of classes (with --weights none)."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="none|unit|tf|caffe|torch (model files default to none: raw 0-255)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean override, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std override."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Pixel scale override (applied before mean/std)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Text file with one class name per line."),
    trust_model: bool = typer.Option(False, "--trust-model", help="Load Keras lambda layers (runs code from the model file)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of calibration images (searched recursively)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration source without --data: digits | random."),
    calib_samples: int = typer.Option(100, "--calib-samples", help="Number of calibration images."),
    calib_method: Optional[str] = typer.Option(None, "--calib-method", help="ONNX int8 calibration: minmax|entropy|percentile."),
    onnx_int8: str = typer.Option("u8s8-reduce-range", "--onnx-int8", help="ONNX int8 kernels: u8s8-reduce-range (safe on AVX2 without VNNI) | u8u8 | u8s8 | s8s8."),
    onnx_opset: int = typer.Option(17, "--onnx-opset", help="ONNX opset (13-18)."),
    int8_io: str = typer.Option("int8", "--int8-io", help="TFLite full-integer I/O type: int8 | uint8 | float32."),
    palette_bits: int = typer.Option(6, "--palette-bits", help="Core ML palettized: bits per weight (1,2,3,4,6,8)."),
    edgetpu_compiler: str = typer.Option("edgetpu_compiler", "--edgetpu-compiler", help="Edge TPU compiler name or path."),
    edgetpu_timeout: float = typer.Option(180.0, "--edgetpu-timeout", help="Seconds the Edge TPU compiler may take."),
    seed: int = typer.Option(0, "--seed", help="Seed for --weights none and random calibration."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify every artifact against the source model."),
    verify_samples: int = typer.Option(8, "--verify-samples", help="Images used to verify each artifact."),
    targets: Optional[str] = typer.Option(None, "--targets", help="Devices you will run on; with --int8, 'edgetpu' adds the Edge TPU artifact."),
    require_full_edgetpu: bool = typer.Option(False, "--require-full-edgetpu", help="Exit 1 when any op of an Edge TPU artifact would run on the CPU."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse identical earlier exports."),
    parallel: bool = typer.Option(True, "--parallel/--serial", help="Convert TFLite in a worker process while the other formats convert."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="With --int8: top-1 points an int8 artifact may lose on --eval-data (without labels: points of disagreement with the source model on calibration images held out of the calibration); over it, recoveries are tried (see docs/ci.md)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled set for --max-drop: a folder with one subfolder per class, or 'digits' (default with --calib digits)."),
    equalize: bool = typer.Option(True, "--equalize/--no-equalize", help="Cross-layer equalization of the Keras weights (BatchNormalization folded) before converting, when int8 artifacts are exported; the model's function is unchanged."),
    bias_correction: bool = typer.Option(False, "--bias-correction", help="Correct each layer's bias for the mean shift int8 weight rounding causes (changes the float model slightly)."),
) -> None:
    """Convert a model to verified TFLite, ONNX and Core ML artifacts."""
    options = {"int8_io": int8_io, "onnx_int8": onnx_int8, "calib_method": calib_method, "onnx_opset": onnx_opset,
               "palette_bits": palette_bits, "edgetpu_compiler": edgetpu_compiler, "edgetpu_timeout": edgetpu_timeout}
    _run(ctx, json_out, dict(
        model=model, formats=formats, precisions=precisions, int8=int8, out=out, data=data, calib=calib,
        calib_samples=calib_samples, options=options, weights=weights, input_size=input_size, alpha=alpha,
        classes=classes, preprocess=preprocess, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), scale=scale,
        labels=labels, trust_model=trust_model, seed=seed, verify=verify, verify_samples=verify_samples, cache=cache,
        parallel=parallel, targets=targets, max_drop=max_drop, eval_data=eval_data,
        require_full_edgetpu=require_full_edgetpu, equalize=equalize, bias_correction=bias_correction))


def _run(ctx: typer.Context, json_out: bool, kw: dict) -> None:
    """The library call with progress on the terminal, then the table (or --json), then the exit status."""
    debug = _debug(ctx)
    if not debug:
        quiet_tensorflow()
    unwind_on_sigterm()
    # Without --debug, converter output goes to OUT/<model>/export.log (the library captures it);
    # the terminal shows progress (on a duplicate of stderr), the table and one-line errors.
    with _terminal() as term, (stdout_to_stderr() if debug else contextlib.nullcontext()), \
            _Progress(_console(term), quiet=json_out) as prog:
        outcome = export_stage.export(**kw, capture_output=not debug, progress=prog)
    if json_out:
        sys.stdout.write(json.dumps(outcome.manifest.to_dict(), indent=2, default=str) + "\n")
        sys.stdout.flush()
    else:
        print_outcome(outcome, _console())
    outcome.raise_for_status()


class _Count(ProgressColumn):
    """done/total once the number of artifacts is known; nothing before (no "0/None")."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")


class _Progress:
    """Rich progress for the export's events, on the console it is given (the terminal's stderr)."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        # the export replaces sys.stdout/sys.stderr with export.log: Rich must not redirect them to
        # the terminal (that is how onnxruntime's logging warnings used to reach it, twice)
        self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _Count(),
                          TimeElapsedColumn(), console=console, transient=True, disable=quiet,
                          redirect_stdout=False, redirect_stderr=False)
        self.stage = self.p.add_task("starting", total=None)

    def __enter__(self) -> "_Progress":
        self.p.__enter__()
        return self

    def __exit__(self, typ: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.p.__exit__(typ, exc, tb)

    def __call__(self, event: str, info: dict) -> None:
        if event == "note":
            if not self.quiet:
                self.console.print(f"[yellow]note:[/] {escape(info['message'])}", soft_wrap=True)
            return
        described = {"stage": lambda: f"{info['name']} {info.get('detail', '')}".strip(),
                     "cache": lambda: f"reusing cached export {info['key'][:12]}",
                     "convert": lambda: f"converting {info['id']}", "verify": lambda: f"verifying {info['id']}"}
        if event in described:
            self.p.update(self.stage, description=described[event]())
        elif event == "artifacts":
            self.p.update(self.stage, description="exporting", total=info["total"], completed=0)
        elif event == "done":
            self.p.advance(self.stage)


def _fmt(x: Any, f: str) -> str:
    return "-" if x is None else format(x, f)


def print_outcome(outcome: ExportOutcome, c: Console) -> None:
    """The export table, then what failed or was not verified, and why."""
    m = outcome.manifest
    t = Table(title=escape(f"{m.model.name} -> {outcome.folder}"), title_justify="left")
    for col, just in (("artifact", "left"), ("MB", "right"), ("status", "left"), ("check", "left"),
                      ("corr", "right"), ("max err", "right"), ("top-1", "right"), ("s", "right")):
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for a in m.artifacts:
        v = a.verification
        size = f"{a.size_bytes / 1e6:.2f}" if a.size_bytes else "-"
        status = {"ok": "[green]ok[/]", "verify_failed": "[red]mismatch[/]"}.get(a.status, f"[red]{a.status}[/]")
        check = {"passed": "[green]passed[/]", "failed": "[red]failed[/]"}.get(v.status, v.status.replace("_", " "))
        t.add_row(escape(a.id), size, status, check, _fmt(v.centered_cosine, ".4f"), _fmt(v.max_abs, ".2g"),
                  _fmt(v.top1_agreement, ".2f"), _fmt(a.timings.get("convert_s"), ".1f"))
    c.print(t)
    c.print("corr: correlation with the source model's outputs (log-probabilities for softmax outputs); "
            "check: run in its runtime and compared (Core ML on Linux: edgepipe's reference interpreter)")
    for a in m.artifacts:
        if a.error:
            c.print(f"[red]{escape(a.id)}[/]: {escape(a.error)}", soft_wrap=True)
        elif a.verification.status == "not_verified":
            c.print(f"[yellow]{escape(a.id)}[/]: {escape(a.verification.reason or '')}", soft_wrap=True)
    for line in _ptq_lines(m.model.options or {}):
        c.print(line, soft_wrap=True)
    if outcome.cache_hit:
        c.print(f"reused cached export ({m.extra.get('cache', {}).get('seconds')} s)")


def _ptq_lines(options: dict) -> list[str]:
    """What cross-layer equalization and bias correction did before the conversion (manifest model.options)."""
    ptq = options.get("ptq") or {}
    eq, bias = ptq.get("equalize"), ptq.get("bias_correction")
    lines = []
    if eq:
        lines.append(f"cross-layer equalization: {len(eq.get('pairs', []))} layer pairs, "
                     f"{len(eq.get('folded', []))} BatchNormalizations folded" if eq.get("applied")
                     else f"[yellow]cross-layer equalization skipped[/]: {escape(eq.get('skipped', ''))}")
    if bias:
        lines.append(f"bias correction: {len(bias.get('layers', []))} layers (int8 grid of {bias.get('levels')})"
                     if bias.get("applied")
                     else f"[yellow]bias correction skipped[/]: {escape(bias.get('skipped', ''))}")
    return lines
