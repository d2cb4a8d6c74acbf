"""edgepipe's library API: what each `edgepipe` command does, callable from Python.

    from edgepipe.pipeline import export, bench, evaluate, check, inspect

    report = bench("edgepipe-out/mobilenet", targets="cpu,gpu")        # BenchReport, bench.json/.md/.html
    result = evaluate("edgepipe-out/mobilenet", "digits")               # EvalResult, eval.json
    gate = check("edgepipe-out/mobilenet", max_drop=1.0)                # CheckResult (enforce_check raises)
    info = inspect("edgepipe-out/mobilenet/mobilenet_int8.tflite")      # dict (op table, I/O, Edge TPU)

bench, evaluate and check record what they return in the results ledger (``ledger=``: a SQLite file
or a postgresql:// URL; default $EDGEPIPE_LEDGER, else ~/.local/share/edgepipe/ledger.sqlite;
``record=False`` records nothing) after writing their own report; ``.ledger`` on the result says
where (a ``Recorded``: run id and row ids). From the ledger (docs/ledger.md):

    series = history(model="mobilenet")                                 # [Series], oldest point first
    cmp = compare_runs("latest~1", "latest")                            # Comparison, bootstrap 95% CIs
    lat = latency_gate("latest~1", "edgepipe-out/mobilenet", 5.0)       # LatencyGateResult
    sel = select_artifact("local", max_drop=1.0, out="deployment.json") # Selection (enforce_selection raises)
    gate = check("edgepipe-out/mobilenet", baseline="latest~1")         # both gates; enforce_check raises for either

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
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import edgepipe.pipeline.ledger as ledger_lib  # a lazy facade: SQLAlchemy and numpy load when a ledger is used
from edgepipe.devices import (BenchReport, BenchSettings, Registry, bench_devices, check_benchmark_binary, compare,
                              parse_targets, resolve_devices, run_bench, write_reports)
from edgepipe.devices.measure.report import Comparison
from edgepipe.pipeline import gate, standalone
from edgepipe.pipeline.base.errors import GateFailure, StageFailure, UserError
from edgepipe.pipeline.base.evaluation import EVAL_NAME, EvalResult
from edgepipe.pipeline.base.manifest import find_manifest, load_manifest
from edgepipe.pipeline.base.util import write_json_atomic
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

if TYPE_CHECKING:
    from edgepipe.pipeline.ledger.compare import Comparison as RunComparison
    from edgepipe.pipeline.ledger.deploy import Selection
    from edgepipe.pipeline.ledger.latency import LatencyGateResult
    from edgepipe.pipeline.ledger.recorder import Recorder
    from edgepipe.pipeline.ledger.trends import Series

BENCH_FILES = {"json": "bench.json", "md": "bench.md", "html": "bench.html"}
#: where results are recorded: a SQLite file (or folder), a postgresql:// URL, or None (the default ledger)
LedgerSpec = Union[str, os.PathLike, None]

__all__ = ["BENCH_FILES", "LedgerSpec", "bench", "bench_comparison", "check", "compare_runs", "enforce_bench",
           "enforce_check", "enforce_eval", "enforce_latency", "enforce_selection", "evaluate", "export", "history",
           "inspect", "inspect_layers", "latency_gate", "results_dir", "select_artifact"]


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


def _recorder(ledger: LedgerSpec, record: bool) -> "Recorder":
    """Opens the ledger in a thread while the run prepares (a bad ``ledger`` value fails here, before any work)."""
    return ledger_lib.Recorder(ledger, disabled=not record)


def _after_ledger_opens(rec: "Recorder", progress: Optional[Callable]) -> Callable:
    """``progress``, except that the first measured row waits for the ledger to be open, so that opening it
    (importing SQLAlchemy, the schema check) never competes with a timed measurement for the CPU."""
    def on_progress(event: str, *args) -> None:
        if event == "start":
            rec.wait()
        if progress is not None:
            progress(event, *args)

    return on_progress


def _measure(path: str | os.PathLike, settings: BenchSettings, device: Optional[str], config: Optional[str],
             benchmark_binary: Optional[str | os.PathLike], log_file: Optional[Path], progress: Callable) -> BenchReport:
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-file-") as td:
        manifest_path = path
        if standalone.is_artifact_file(path):
            manifest_path = standalone.write_file_manifest(standalone.file_manifest(path), Path(td))
        with native_logs(log_file):
            if device:
                report = bench_devices(manifest_path, settings, device, config=config, progress=progress,
                                       benchmark_binary=str(benchmark_binary) if benchmark_binary else None)
            else:
                report = run_bench(manifest_path, settings=settings, progress=progress)
    if manifest_path != path:  # a standalone file: the temporary manifest is gone, name the file
        report.manifest = str(Path(path).resolve())
    return report


def bench(path: str | os.PathLike, targets: str | Sequence[str] = "cpu", *, device: Optional[str] = None,
          threads: Optional[int] = None, runs: int = 50, min_seconds: float = 1.0, warmup: int = 5,
          artifacts: Optional[Sequence[str]] = None, profile: bool = False,
          inputs: Optional[str | os.PathLike] = None, timeout: float = 600.0,
          out: Optional[str | os.PathLike] = None, compare_to: Optional[str | os.PathLike] = None,
          threshold: float = 0.10, config: Optional[str] = None,
          benchmark_binary: Optional[str | os.PathLike] = None,
          progress: Optional[Callable] = None, log: bool = True,
          ledger: LedgerSpec = None, record: bool = True) -> BenchReport:
    """`edgepipe bench`: measure every artifact on each target (here, or on registered devices with
    ``device``), write bench.json/.md/.html to ``results_dir(path, out)``, record the report in the
    ledger (raw samples, sha256, conditions; ``report.ledger`` says where) and return it. A ledger
    failure raises ``LedgerError`` (exit 2) after the reports were written; failed rows are recorded
    like the others (``enforce_bench`` raises for them)."""
    settings = BenchSettings(targets=parse_targets(targets), threads=check_threads(threads), runs=runs,
                             min_seconds=min_seconds, warmup=warmup, artifacts=list(artifacts) if artifacts else None,
                             profile=profile, timeout_s=timeout, inputs=str(inputs) if inputs else None).validate()
    out_dir = results_dir(path, out)
    old = _bench_checks(device, config, benchmark_binary, compare_to, threshold)
    with _recorder(ledger, record) as rec:
        report = _measure(path, settings, device, config, benchmark_binary, out_dir / "bench.log" if log else None,
                          _after_ledger_opens(rec, progress))
        paths = write_reports(report, out_dir, compare(old, report, threshold) if old is not None else None)
        report.ledger = rec.record_bench(report, source=paths["json"])
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
             predictor: Optional[Callable] = None, ledger: LedgerSpec = None, record: bool = True) -> EvalResult:
    """`edgepipe eval`: accuracy of the source model and every artifact on a labelled set (a folder
    with one subfolder per class, or 'digits'); writes eval.json, records it in the ledger
    (``result.ledger``; a ledger failure raises ``LedgerError`` after eval.json was written) and
    returns it. A standalone .tflite/.onnx file gets absolute accuracy (no source model, no drops)."""
    req = EvalRequest(path, data, targets=targets, limit=limit, min_samples=min_samples, labels_map=labels_map,
                      source_model=source_model, threads=threads, artifacts=list(artifacts) if artifacts else None,
                      device=device, config=config, preprocess=preprocess, out=out)
    plan = validate(req)
    with _recorder(ledger, record) as rec:
        with native_logs(plan.out / "eval.log" if log else None):
            res = _evaluate(req, _after_ledger_opens(rec, progress), predictor)
        res.ledger = rec.record_eval(res, source=plan.out / EVAL_NAME)
    return res


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
          baseline: Optional[str | os.PathLike] = None, max_slowdown: float = 5.0, force: bool = False,
          ledger: LedgerSpec = None, record: bool = True,
          confidence: float = gate.DEFAULT_CONFIDENCE, max_class_drop: Optional[float] = None,
          allow_inconclusive: bool = False) -> CheckResult:
    """`edgepipe check`: eval.json against the budgets and, with ``baseline`` (a ledger run id,
    'latest~N', or a bench.json), the latency gate: the bench.json beside the manifest against the
    baseline (``result.latency``; a row fails when it is slower than ``max_slowdown`` percent with 95%
    confidence). Writes the JUnit/Markdown reports asked for (both gates in one file each; also appended
    to $GITHUB_STEP_SUMMARY), records the check in the ledger, and returns it. ``enforce_check(result)``
    raises when a check of either gate failed.

    Each drop is judged with its ``confidence`` interval from the paired predictions: pass when the
    interval lies within the budget, fail when the drop is over it, inconclusive (fails unless
    ``allow_inconclusive``) when the set is too small to show it is under (docs/ci.md).
    ``max_class_drop``: fail an artifact one of whose classes drops more than this (interval wholly over)."""
    m, folder = load_manifest(path)
    if isinstance(max_drop_for, dict):
        max_drop_for = [f"{k}={v}" for k, v in max_drop_for.items()]
    overrides = gate.parse_overrides(max_drop_for, m)
    metrics = gate.parse_metrics(metric if isinstance(metric, str) else ",".join(metric))
    cfg = GateConfig([Budget(mt, max_drop, dict(overrides)) for mt in metrics], require_verified=require_verified,
                     require_full_edgetpu=require_full_edgetpu, allow_chance_source=allow_chance_source,
                     confidence=confidence, max_class_drop=max_class_drop, allow_inconclusive=allow_inconclusive)
    current = _current_bench(folder, max_slowdown) if baseline is not None else None
    with _recorder(ledger, record) as rec:
        res = gate.run_check(path, cfg)
        if baseline is not None:
            res.latency = _gate_latency(str(baseline), current, max_slowdown, force, rec, ledger, res.model)
            res.reports = ledger_lib.write_latency_reports(res.latency, junit, markdown,
                                                           accuracy=(gate.render_junit(res), gate.render_markdown(res)))
        else:
            res.reports = gate.write_reports(res, junit, markdown)
        res.ledger = rec.record_check(res, source=junit or markdown)
    return res


def _current_bench(folder: Path, max_slowdown: float) -> Path:
    """The run the latency gate judges: the bench.json beside the manifest (checked before any work)."""
    ledger_lib.check_max_slowdown(max_slowdown)
    p = folder / BENCH_FILES["json"]
    if not p.is_file():
        raise UserError(f"--baseline needs a current bench run: there is no {BENCH_FILES['json']} in {folder}",
                        f"Run `edgepipe bench {folder}` first (or leave --baseline out to gate accuracy only)")
    return p


def _gate_latency(baseline: str, current: Path, max_slowdown: float, force: bool, rec: "Recorder",
                  spec: LedgerSpec, model: Optional[str]) -> "LatencyGateResult":
    if not ledger_lib.is_ledger_ref(baseline):  # a bench.json: no ledger needed
        return ledger_lib.latency_gate(baseline, str(current), max_slowdown, force=force, model=model)
    led = rec.ledger()
    if led is not None:
        return ledger_lib.latency_gate(baseline, str(current), max_slowdown, ledger=led, force=force, model=model)
    with ledger_lib.open_for_reading(spec) as led:  # this check is not recorded (--no-ledger); the baseline is read
        return ledger_lib.latency_gate(baseline, str(current), max_slowdown, ledger=led, force=force, model=model)


def enforce_check(result: CheckResult) -> None:
    """GateFailure (exit 1) naming the failing rows of the accuracy gate and of the latency gate (both
    gates are judged before raising, so one failure never hides the other)."""
    failures = []
    for enforce, part in ((gate.enforce, result), (ledger_lib.enforce_latency, result.latency)):
        try:
            if part is not None:
                enforce(part)
        except GateFailure as e:
            failures.append(e)
    if len(failures) > 1:
        raise GateFailure("; ".join(f.message.rstrip(".") for f in failures), failures[0].hint)
    if failures:
        raise failures[0]


# --------------------------------------------------------------------------- the ledger
def history(model: Optional[str] = None, *, artifact: Optional[str] = None, target: Optional[str] = None,
            device: Optional[str] = None, last: int = 20, ledger: LedgerSpec = None) -> list["Series"]:
    """`edgepipe history`: bench figures per (model, artifact, target, device, runtime) series, the newest
    ``last`` runs of each, oldest first. Filters take comma lists."""
    with ledger_lib.open_for_reading(ledger) as led:
        return ledger_lib.history(led, model=model, artifact=artifact, target=target, device=device, last=last)


def compare_runs(a: str | os.PathLike, b: str | os.PathLike = "latest", *, force: bool = False,
                 model: Optional[str] = None, min_change: float = 5.0, ledger: LedgerSpec = None) -> "RunComparison":
    """`edgepipe compare A B`: per row, median(B) / median(A) with a bootstrap 95% interval; "slower" /
    "faster" when significant and at least ``min_change`` percent. ``a``/``b``: ledger run ids,
    'latest[~N]' (of ``model``), or bench.json paths (no ledger needed). Refuses (UserError) rows measured
    under different conditions unless ``force``."""
    refs = [str(a), str(b)]
    if not any(ledger_lib.is_ledger_ref(r) for r in refs):
        return ledger_lib.compare_runs(*(ledger_lib.resolve_run(r, None) for r in refs), force, min_change)
    with ledger_lib.open_for_reading(ledger) as led:
        runs = [ledger_lib.resolve_run(r, led, model) for r in refs]
    return ledger_lib.compare_runs(*runs, force, min_change)


def latency_gate(baseline: str | os.PathLike, current: str | os.PathLike = "latest", max_slowdown: float = 5.0, *,
                 force: bool = False, model: Optional[str] = None, ledger: LedgerSpec = None,
                 junit: Optional[str | os.PathLike] = None,
                 markdown: Optional[str | os.PathLike] = None) -> "LatencyGateResult":
    """The latency gate alone: ``current`` (a run reference, or a model folder / bench.json) against
    ``baseline``; writes the JUnit/Markdown reports asked for. ``enforce_latency`` raises when a row failed."""
    refs = [str(baseline), str(current)]
    if any(ledger_lib.is_ledger_ref(r) for r in refs):
        with ledger_lib.open_for_reading(ledger) as led:
            res = ledger_lib.latency_gate(*refs, max_slowdown, ledger=led, force=force, model=model)
    else:
        res = ledger_lib.latency_gate(*refs, max_slowdown, force=force, model=model)
    ledger_lib.write_latency_reports(res, junit, markdown)
    return res


def enforce_latency(result: "LatencyGateResult") -> None:
    """GateFailure (exit 1) naming the rows slower than the budget."""
    ledger_lib.enforce_latency(result)


def select_artifact(device: str, max_drop: float = 1.0, *, metric: str = "top1", model: Optional[str] = None,
                    target: Optional[str] = None, out: Optional[str | os.PathLike] = None,
                    ledger: LedgerSpec = None) -> "Selection":
    """`edgepipe select`: the fastest artifact benched on ``device`` whose accuracy drop (same sha256,
    from the ledger's eval rows) is within ``max_drop``; written to ``out`` as JSON when one qualifies."""
    with ledger_lib.open_for_reading(ledger) as led:
        sel = ledger_lib.select_artifact(led, device, max_drop, metric, model, target)
    if out is not None and sel.choice is not None:
        write_json_atomic(out, sel.to_dict())
    return sel


def enforce_selection(selection: "Selection") -> None:
    """GateFailure (exit 1) when no artifact qualifies, naming the closest."""
    ledger_lib.enforce_selection(selection)
