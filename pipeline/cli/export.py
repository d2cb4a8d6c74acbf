"""`edgepipe export`: thin glue over pipeline.export_stage."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _split(s: Optional[str]) -> Optional[list[str]]:
    if s is None:
        return None
    return [x.strip().lower() for x in s.split(",") if x.strip()]


def _floats(s: Optional[str], flag: str) -> Optional[list[float]]:
    if s is None:
        return None
    from edgepipe.pipeline.base.errors import UserError

    try:
        return [float(x) for x in s.replace(" ", ",").split(",") if x]
    except ValueError:
        raise UserError(f"bad {flag} '{s}'", f"Give numbers separated by commas, e.g. {flag} 0.5,0.5,0.5") from None


def register(app: typer.Typer) -> None:
    @app.command("export", no_args_is_help=True)
    def export_cmd(
        model: str = typer.Argument(..., help="Built-in name (mobilenet, resnet50, ...), a .keras/.h5 file or a SavedModel folder."),
        int8: bool = typer.Option(False, "--int8", help="Export the int8 variant of every selected format."),
        formats: Optional[str] = typer.Option(None, "--formats", "-f", help="Comma list: tflite,onnx,coreml (default: all)."),
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
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration source without --data: random | digits."),
        calib_samples: int = typer.Option(100, "--calib-samples", help="Number of calibration images."),
        calib_method: Optional[str] = typer.Option(None, "--calib-method", help="ONNX int8 calibration: minmax|entropy|percentile."),
        onnx_int8: str = typer.Option("u8s8-reduce-range", "--onnx-int8", help="ONNX int8 kernels: u8s8-reduce-range (safe on AVX2 without VNNI) | u8u8 | u8s8 | s8s8."),
        int8_io: str = typer.Option("int8", "--int8-io", help="TFLite full-integer I/O type: int8 | uint8 | float32."),
        seed: int = typer.Option(0, "--seed", help="Seed for --weights none and random calibration."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Verify every artifact against the source model."),
        verify_samples: int = typer.Option(8, "--verify-samples", help="Images used to verify each artifact."),
        targets: Optional[str] = typer.Option(None, "--targets", help="Devices you will run on; with --int8, 'edgetpu' adds the Edge TPU artifact."),
        require_full_edgetpu: bool = typer.Option(False, "--require-full-edgetpu", help="Exit 1 when any op of an Edge TPU artifact would run on the CPU."),
        cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse identical earlier exports."),
        parallel: bool = typer.Option(True, "--parallel/--serial", help="Convert TFLite in a worker process while the other formats convert."),
        json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
        max_drop: Optional[float] = typer.Option(None, "--max-drop", help="With --int8: top-1 points an int8 artifact may lose on --eval-data; over it, recoveries are tried (see docs/ci.md)."),
        eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Labelled set for --max-drop: a folder with one subfolder per class, or 'digits' (default with --calib digits)."),
    ):
        """Convert a model to verified TFLite, ONNX and Core ML artifacts."""
        from edgepipe.pipeline import export_stage, models
        from edgepipe.pipeline.calibration import make_reader
        from edgepipe.pipeline.base.errors import UserError
        from edgepipe.export import ExportOptions
        from edgepipe.export.onnx import ONNX_INT8_MODES
        from edgepipe.export.tflite import INT8_IO

        if onnx_int8 not in ONNX_INT8_MODES:
            raise UserError(f"unknown --onnx-int8 '{onnx_int8}'", f"Use one of: {', '.join(ONNX_INT8_MODES)}")
        if int8_io not in INT8_IO:
            raise UserError(f"unknown --int8-io '{int8_io}'", f"Use one of: {', '.join(INT8_IO)}")
        if calib_method not in (None, "minmax", "entropy", "percentile"):
            raise UserError(f"unknown --calib-method '{calib_method}'", "Use minmax, entropy or percentile")
        if verify_samples < 1:
            raise UserError(f"bad --verify-samples {verify_samples}", "Give a positive number")
        req_model = models.resolve(model, weights=weights, input_size=input_size, alpha=alpha, classes=classes,
                                   preprocess=preprocess, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                                   scale=scale, seed=seed, labels_file=labels, trust=trust_model)
        from edgepipe.devices.runtimes.base import parse_targets

        fmts = _split(formats)
        if targets is not None and "edgetpu" in parse_targets(targets) and int8:
            fmts = list(dict.fromkeys((fmts or ["tflite", "onnx", "coreml"]) + ["edgetpu"]))
        if require_full_edgetpu and fmts is not None and "edgetpu" not in fmts:
            raise UserError("--require-full-edgetpu needs an Edge TPU artifact",
                            "Add --formats edgetpu (or --int8 --targets edgetpu)")
        plan, skipped = export_stage.build_plan(fmts, _split(precisions), int8)
        reader = make_reader(data, calib, seed)
        req = export_stage.ExportRequest(
            model=req_model, plan=plan, out=out, reader=reader, calib_samples=calib_samples, verify=verify,
            verify_samples=verify_samples, use_cache=cache, skipped=skipped, parallel=parallel,
            options=ExportOptions(seed=seed, onnx_int8=onnx_int8, int8_io=int8_io, calib_method=calib_method))
        export_stage.validate(req)
        from edgepipe.pipeline.recover import after_export, summarize as recovery_summary, validate_options  # --max-drop hook
        eval_spec = validate_options(max_drop, eval_data, data, calib, plan)
        from edgepipe.pipeline.base.util import unwind_on_sigterm

        unwind_on_sigterm()
        from edgepipe.pipeline.cli.main import debug_enabled
        from edgepipe.pipeline.base.util import converter_chatter_to_log, quiet_tensorflow, stdout_to_stderr

        debug = debug_enabled()
        if not debug:
            quiet_tensorflow()
        # Converters and TensorFlow print freely on fds 1 and 2: without --debug that goes to
        # OUT/<model>/export.log, so the terminal shows progress, the table and one-line errors.
        with converter_chatter_to_log(req.folder / "export.log", enabled=not debug) as term, \
                stdout_to_stderr(), _Progress(quiet=json_out, file=term) as prog:
            for s in skipped:
                prog.note(f"skipped {s['format']} {s['precision']}: {s['reason']}")
            manifest = export_stage.run_export(req, prog)
            recovery = after_export(req, manifest, max_drop=max_drop, eval_data=eval_spec, progress=prog)
        if json_out:
            from edgepipe.pipeline.cli.main import emit_json

            emit_json(manifest.to_dict())
        else:
            _print_table(manifest, req.folder)
        export_stage.summarize(manifest)
        if require_full_edgetpu:
            from edgepipe.devices.graph.edgetpu import require_full_edgetpu as gate

            for a in manifest.artifacts:
                if a.format == "edgetpu" and a.ok:
                    gate(a.extra.get("edgetpu"))
        recovery_summary(recovery)


class _Progress:
    """Rich progress on stderr for the export stages."""

    def __init__(self, quiet: bool = False, file=None):
        from rich.console import Console

        from edgepipe.pipeline.cli.main import console

        self.console = Console(file=file, highlight=False) if file is not None else console()
        self.quiet = quiet
        self.p = None

    def __enter__(self):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                          console=self.console, transient=True, disable=self.quiet)
        self.p.__enter__()
        self.stage = self.p.add_task("starting", total=None)
        self.arts = None
        return self

    def __exit__(self, *exc):
        self.p.__exit__(*exc)

    def note(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]note:[/] {msg}")

    def __call__(self, event: str, info: dict) -> None:
        if event == "stage":
            self.p.update(self.stage, description=f"{info['name']} {info.get('detail', '')}".strip())
        elif event == "cache":
            self.p.update(self.stage, description=f"reusing cached export {info['key'][:12]}")
        elif event == "artifacts":
            self.p.update(self.stage, description="exporting", total=info["total"], completed=0)
        elif event == "convert":
            self.p.update(self.stage, description=f"converting {info['id']}")
        elif event == "verify":
            self.p.update(self.stage, description=f"verifying {info['id']}")
        elif event == "done":
            self.p.advance(self.stage)


def _print_table(m, folder: Path) -> None:
    from rich.table import Table

    from edgepipe.pipeline.cli.main import console

    c = console(stderr=False)
    t = Table(title=f"{m.model.name} -> {folder}", title_justify="left")
    for col, just in (("artifact", "left"), ("MB", "right"), ("status", "left"), ("check", "left"),
                      ("corr", "right"), ("max err", "right"), ("top-1", "right"), ("s", "right")):
        t.add_column(col, justify=just, no_wrap=True)
    for a in m.artifacts:
        v = a.verification
        size = f"{a.size_bytes / 1e6:.2f}" if a.size_bytes else "-"
        status = {"ok": "[green]ok[/]", "verify_failed": "[red]mismatch[/]"}.get(a.status, f"[red]{a.status}[/]")
        fmt = lambda x, f: "-" if x is None else format(x, f)
        check = {"passed": "[green]passed[/]", "failed": "[red]failed[/]"}.get(v.status, v.status.replace("_", " "))
        t.add_row(a.id, size, status, check, fmt(v.centered_cosine, ".4f"), fmt(v.max_abs, ".2g"),
                  fmt(v.top1_agreement, ".2f"), fmt(a.timings.get("convert_s"), ".1f"))
    c.print(t)
    c.print("corr: correlation with the source model's outputs (log-probabilities for softmax outputs); "
            "check: run in its runtime and compared (Core ML on Linux: edgepipe's reference interpreter)")
    for a in m.artifacts:
        if a.error:
            c.print(f"[red]{a.id}[/]: {a.error}")
        elif a.verification.status == "not_verified":
            c.print(f"[yellow]{a.id}[/]: {a.verification.reason}")
    if m.extra.get("cache", {}).get("hit"):
        c.print(f"reused cached export ({m.extra['cache']['seconds']} s)")
