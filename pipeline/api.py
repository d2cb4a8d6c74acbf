"""edgepipe's library API: what each `edgepipe` command does, callable from Python.

    from edgepipe.pipeline import export, bench, evaluate, check, inspect

    report = bench("edgepipe-out/mobilenet", targets="cpu,gpu")        # BenchReport, bench.json/.md/.html
    result = evaluate("edgepipe-out/mobilenet", "digits")               # EvalResult, eval.json
    gate = check("edgepipe-out/mobilenet", max_drop=1.0)                # CheckResult (enforce_check raises)
    info = inspect("edgepipe-out/mobilenet/mobilenet_int8.tflite")      # dict (op table, I/O, Edge TPU)

Every function validates its input before any expensive work and raises ``UserError`` (exit 2
at the CLI) naming the problem and the fix. ``bench`` and ``evaluate`` take an export folder, its
manifest.json, or a standalone .tflite/.onnx file (results then go to ``edgepipe-out/<stem>/``).
They send the runtimes' native logs to ``bench.log`` / ``eval.log`` beside the results unless
``log=False``. Results that ran but failed are data (rows with a status); ``enforce_bench``,
``enforce_eval`` and ``enforce_check`` turn them into the exceptions the CLI maps to exit 1.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from edgepipe.devices import (BenchReport, BenchSettings, Registry, bench_devices, check_benchmark_binary, compare,
                              parse_targets, resolve_devices, run_bench, write_reports)
from edgepipe.devices.measure.report import Comparison
from edgepipe.pipeline import gate, standalone
from edgepipe.pipeline.base.errors import StageFailure
from edgepipe.pipeline.base.evaluation import EvalResult
from edgepipe.pipeline.base.manifest import find_manifest, load_manifest
from edgepipe.pipeline.eval_stage import EvalRequest, validate
from edgepipe.pipeline.export_stage import export
from edgepipe.pipeline.eval_stage import evaluate as _evaluate
from edgepipe.pipeline.gate import Budget, CheckResult, GateConfig
from edgepipe.pipeline.fidelity.layers import DEFAULT_ISOLATED_CAP, DEFAULT_ISOLATED_IMAGES, DEFAULT_SAMPLES
from edgepipe.pipeline.inspect_layers import LAYERS_DIR, LayerInspection, export_folder
from edgepipe.pipeline.inspect_layers import inspect_layers as _inspect_layers
from edgepipe.pipeline.inspect_stage import inspect_artifact
from edgepipe.pipeline.logs import native_logs
from edgepipe.pipeline.options import check_threads

BENCH_FILES = {"json": "bench.json", "md": "bench.md", "html": "bench.html"}

__all__ = ["BENCH_FILES", "bench", "bench_comparison", "check", "enforce_bench", "enforce_check", "enforce_eval",
           "evaluate", "export", "inspect", "inspect_layers", "results_dir"]


def inspect(path: str | os.PathLike) -> dict:
    """`edgepipe inspect`: a .tflite/.onnx file's ops, quantization, I/O (and Edge TPU placement)."""
    return inspect_artifact(path)


def inspect_layers(path: str | os.PathLike, *, artifact: Optional[str] = None, samples: int = DEFAULT_SAMPLES,
                   isolated_cap: int = DEFAULT_ISOLATED_CAP, isolated_images: int = DEFAULT_ISOLATED_IMAGES,
                   progress: Optional[Callable[[str], None]] = None, log: bool = True) -> list[LayerInspection]:
    """`edgepipe inspect --layers`: the per-layer error report of each int8 artifact of an export folder (or
    of the one artifact named), written to ``<folder>/layers/<id>/layers.json`` and ``layers.html``. What
    TensorFlow and the runtimes print goes to ``<folder>/layers/layers.log`` unless ``log=False``."""
    logfile = export_folder(path) / LAYERS_DIR / "layers.log" if log else None
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    with native_logs(logfile):
        return _inspect_layers(path, artifact=artifact, samples=samples, isolated_cap=isolated_cap,
                               isolated_images=isolated_images, progress=progress)


def results_dir(path: str | os.PathLike, out: Optional[str | os.PathLike] = None) -> Path:
    """Where bench/eval results of ``path`` go: ``out``, else the export folder, else edgepipe-out/<stem>/."""
    if out is not None:
        return Path(out)
    if standalone.is_artifact_file(path):
        return standalone.default_out(path)
    return find_manifest(path).parent


# --------------------------------------------------------------------------- bench
def _bench_checks(device: Optional[str], config: Optional[str], benchmark_binary: Optional[str | os.PathLike],
                  compare_to: Optional[str | os.PathLike], threshold: float) -> Optional[BenchReport]:
    """Everything that can fail fast does so before the first measurement."""
    old = BenchReport.load(compare_to) if compare_to else None
    if old is not None:
        compare(old, old, threshold)  # raises the UserError for a bad threshold
    if device:
        resolve_devices(device, Registry(config))  # unknown names fail here
        if benchmark_binary:
            check_benchmark_binary(benchmark_binary)
    return old


def bench(path: str | os.PathLike, targets: str | Sequence[str] = "cpu", *, device: Optional[str] = None,
          threads: Optional[int] = None, runs: int = 50, min_seconds: float = 1.0, warmup: int = 5,
          artifacts: Optional[Sequence[str]] = None, profile: bool = False,
          inputs: Optional[str | os.PathLike] = None, timeout: float = 600.0,
          out: Optional[str | os.PathLike] = None, compare_to: Optional[str | os.PathLike] = None,
          threshold: float = 0.10, config: Optional[str] = None,
          benchmark_binary: Optional[str | os.PathLike] = None,
          progress: Optional[Callable] = None, log: bool = True) -> BenchReport:
    """`edgepipe bench`: measure every artifact on each target (here, or on registered devices with
    ``device``), write bench.json/.md/.html to ``results_dir(path, out)`` and return the report."""
    settings = BenchSettings(targets=parse_targets(targets), threads=check_threads(threads), runs=runs,
                             min_seconds=min_seconds, warmup=warmup, artifacts=list(artifacts) if artifacts else None,
                             profile=profile, timeout_s=timeout, inputs=str(inputs) if inputs else None).validate()
    out_dir = results_dir(path, out)
    old = _bench_checks(device, config, benchmark_binary, compare_to, threshold)
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-file-") as td:
        manifest_path = path
        if standalone.is_artifact_file(path):
            manifest_path = standalone.write_file_manifest(standalone.file_manifest(path), Path(td))
        with native_logs(out_dir / "bench.log" if log else None):
            if device:
                report = bench_devices(manifest_path, settings, device, config=config, progress=progress,
                                       benchmark_binary=str(benchmark_binary) if benchmark_binary else None)
            else:
                report = run_bench(manifest_path, settings=settings, progress=progress)
    if manifest_path != path:  # a standalone file: the temporary manifest is gone, name the file
        report.manifest = str(Path(path).resolve())
    write_reports(report, out_dir, compare(old, report, threshold) if old is not None else None)
    return report


def bench_comparison(report: BenchReport, compare_to: Optional[str | os.PathLike],
                     threshold: float = 0.10) -> Optional[Comparison]:
    """The report against an earlier bench.json (None when there is none)."""
    return compare(BenchReport.load(compare_to), report, threshold) if compare_to else None


def enforce_bench(report: BenchReport, out_dir: str | os.PathLike) -> None:
    """StageFailure (exit 1) when a row failed or computed wrong outputs; the others were measured and written."""
    failed = [r for r in report.rows if r.status == "failed"]
    if failed:
        raise StageFailure(f"{len(failed)} of {len(report.rows)} rows failed "
                           f"({', '.join(f'{r.artifact} on {r.target}' for r in failed[:3])}); the others were "
                           f"written to {out_dir}", "See the reasons in bench.md")
    wrong = report.wrong_output_rows()
    if wrong:
        raise StageFailure(f"{len(wrong)} of {len(report.rows)} rows computed wrong outputs "
                           f"({', '.join(f'{r.artifact} on {r.target}' for r in wrong[:3])}): no speed figure for "
                           f"them; written to {out_dir}", "See the figures at the top of bench.md; `edgepipe eval "
                           "--targets` on that target shows the accuracy it really has there")


# --------------------------------------------------------------------------- eval
def evaluate(path: str | os.PathLike, data: str, *, targets: Optional[str | Sequence[str]] = None,
             limit: Optional[int] = None, min_samples: int = 100, labels_map: Optional[str] = None,
             source_model: Optional[str] = None, threads: Optional[int] = None,
             artifacts: Optional[Sequence[str]] = None, device: Optional[str] = None, config: Optional[str] = None,
             preprocess: Optional[str] = None, out: Optional[str | os.PathLike] = None,
             progress: Optional[Callable[[str, dict], None]] = None, log: bool = True,
             predictor: Optional[Callable] = None) -> EvalResult:
    """`edgepipe eval`: accuracy of the source model and every artifact on a labelled set (a folder
    with one subfolder per class, or 'digits'); writes eval.json and returns it. A standalone
    .tflite/.onnx file gets absolute accuracy (no source model, no drops)."""
    req = EvalRequest(path, data, targets=targets, limit=limit, min_samples=min_samples, labels_map=labels_map,
                      source_model=source_model, threads=threads, artifacts=list(artifacts) if artifacts else None,
                      device=device, config=config, preprocess=preprocess, out=out)
    plan = validate(req)
    with native_logs(plan.out / "eval.log" if log else None):
        return _evaluate(req, progress or (lambda event, info: None), predictor)


def enforce_eval(result: EvalResult) -> None:
    """StageFailure (exit 1) when an evaluation raised; the other rows were written to eval.json."""
    errors = result.errors
    if errors:
        lines = "; ".join(f"{r.artifact} on {r.where or '-'}: {r.reason}" for r in errors[:4])
        raise StageFailure(f"{len(errors)} evaluation(s) failed ({lines})", "The others were written to eval.json")


# --------------------------------------------------------------------------- check
def check(path: str | os.PathLike, max_drop: float = 1.0, *, metric: str | Sequence[str] = "top1",
          max_drop_for: Optional[Sequence[str] | dict[str, float]] = None, require_verified: bool = False,
          require_full_edgetpu: bool = False, allow_chance_source: bool = False,
          junit: Optional[str | os.PathLike] = None, markdown: Optional[str | os.PathLike] = None,
          confidence: float = gate.DEFAULT_CONFIDENCE, max_class_drop: Optional[float] = None,
          allow_inconclusive: bool = False) -> CheckResult:
    """`edgepipe check`: eval.json against the budgets; writes the JUnit/Markdown reports asked for
    (and appends to $GITHUB_STEP_SUMMARY). ``enforce_check(result)`` raises when a check failed.

    Each drop is judged with its ``confidence`` interval from the paired predictions: pass when the
    interval lies within the budget, fail when the drop is over it, inconclusive (fails unless
    ``allow_inconclusive``) when the set is too small to show it is under (docs/ci.md).
    ``max_class_drop``: fail an artifact one of whose classes drops more than this (interval wholly over)."""
    m, _ = load_manifest(path)
    if isinstance(max_drop_for, dict):
        max_drop_for = [f"{k}={v}" for k, v in max_drop_for.items()]
    overrides = gate.parse_overrides(max_drop_for, m)
    metrics = gate.parse_metrics(metric if isinstance(metric, str) else ",".join(metric))
    cfg = GateConfig([Budget(mt, max_drop, dict(overrides)) for mt in metrics], require_verified=require_verified,
                     require_full_edgetpu=require_full_edgetpu, allow_chance_source=allow_chance_source,
                     confidence=confidence, max_class_drop=max_class_drop, allow_inconclusive=allow_inconclusive)
    res = gate.run_check(path, cfg)
    res.reports = gate.write_reports(res, junit, markdown)
    return res


def enforce_check(result: CheckResult) -> None:
    """GateFailure (exit 1) naming the failing rows."""
    gate.enforce(result)
