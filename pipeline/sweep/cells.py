"""The one place the sweep calls edgepipe's library: export, eval, bench, check, and the checks a plan
needs before anything runs. Everything crossing this seam is plain data (dicts, paths, lists), so
the rest of pipeline/sweep does not depend on the library's classes, which are being renamed
(export_stage.run_export -> api.export, evaluate.evaluate -> api.evaluate, measure.bench.run_bench /
remote.runner.bench_devices -> api.bench, gate.run_check -> api.check): only this file changes then.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from edgepipe.devices.measure.bench import BenchReport, BenchSettings, resolve_targets, run_bench
from edgepipe.devices.measure.report import write_reports as write_bench_reports
from edgepipe.devices.remote.runner import Registry, bench_devices, merge_reports
from edgepipe.export import PRECISIONS, ExportOptions
from edgepipe.export.onnx import ONNX_INT8_MODES
from edgepipe.export.tflite import INT8_IO
from edgepipe.pipeline import evaluate as evaluate_mod
from edgepipe.pipeline import export_stage, gate, models
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import pkg_version
from edgepipe.pipeline.calibration import Reader, make_reader
from edgepipe.pipeline.datasets import check_spec

LOCAL = "local"  # the CPU of the machine that runs the sweep (bench's own meaning of "local")
CALIB_METHODS = (None, "minmax", "entropy", "percentile")


# ------------------------------------------------------------------------------------------ models
def model_request(m: dict) -> models.ModelRequest:
    """The library's validated model request for one plan entry (UserError for an unknown model)."""
    return models.resolve(m["model"], weights=m["weights"], input_size=m["input_size"], alpha=m["alpha"],
                          classes=m["classes"], preprocess=m["preprocess"], mean=m["mean"], std=m["std"],
                          scale=m["scale"], seed=m["seed"], labels_file=m["labels"], trust=m["trust"])


def model_identity(m: dict) -> dict:
    """What determines the model's weights (file hashes included): part of every job key."""
    return model_request(m).identity()


def export_pairs(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[dict]]:
    """(format, precision) pairs a model can be exported to, and the ones its formats do not offer."""
    formats = list(dict.fromkeys(f for f, _ in pairs))
    precisions = list(dict.fromkeys(p for _, p in pairs))
    plan, skipped = export_stage.build_plan(formats, precisions, False)
    wanted = set(pairs)
    return [fp for fp in plan if fp in wanted], skipped


def check_export_options(cal: dict, exp: dict) -> None:
    if exp["onnx_int8"] not in ONNX_INT8_MODES:
        raise UserError(f"unknown [export] onnx_int8 '{exp['onnx_int8']}'", f"Use one of: {', '.join(ONNX_INT8_MODES)}")
    if exp["int8_io"] not in INT8_IO:
        raise UserError(f"unknown [export] int8_io '{exp['int8_io']}'", f"Use one of: {', '.join(INT8_IO)}")
    if exp["calib_method"] not in CALIB_METHODS:
        raise UserError(f"unknown [export] calib_method '{exp['calib_method']}'", "Use minmax, entropy or percentile")
    if exp["verify_samples"] < 1 or cal["samples"] < 1:
        raise UserError("[export] verify_samples and [calibration] samples must be positive", "Give positive numbers")
    calibration_reader(cal, 0)


def calibration_reader(cal: dict, seed: int) -> Optional[Reader]:
    src = cal.get("source")
    if src is None:
        return None
    if src in ("digits", "random"):
        return make_reader(None, src, seed)
    return make_reader(src, None, seed)


# ------------------------------------------------------------------------------------------ eval, bench, gate
def check_eval(ev: dict) -> None:
    if ev.get("data") is None:
        return
    check_spec(ev["data"])
    evaluate_mod.resolve_targets(ev["targets"])
    if ev["min_samples"] < 1 or (ev["limit"] is not None and ev["limit"] < 1):
        raise UserError("[eval] limit and min_samples must be positive", "Give positive numbers")
    if ev["threads"] is not None and ev["threads"] < 1:
        raise UserError(f"[eval] threads must be at least 1 (got {ev['threads']})", "Leave it out for the default")


def bench_settings(b: dict) -> BenchSettings:
    return BenchSettings(targets=resolve_targets(b["targets"]), threads=b["threads"], runs=b["runs"],
                         min_seconds=float(b["min_seconds"]), warmup=b["warmup"],
                         timeout_s=float(b["timeout"])).validate()


def gate_config(g: dict, selectors: set[str]) -> gate.GateConfig:
    """Budgets of the plan's [gate]; a selector that matches nothing is an error, as for `check`."""
    known = set(PRECISIONS) | selectors
    for key in g["max_drop_for"]:
        if key not in known:
            raise UserError(f"[gate] max_drop_for '{key}' matches no precision, format or artifact",
                            f"Use one of: {', '.join(sorted(known))}")
    overrides = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                 for k, v in g["max_drop_for"].items()}
    metrics = gate.parse_metrics(g["metric"] if isinstance(g["metric"], str) else ",".join(g["metric"]))
    return gate.GateConfig([gate.Budget(mt, float(g["max_drop"]), dict(overrides)) for mt in metrics],
                           require_verified=bool(g["require_verified"]))


# ------------------------------------------------------------------------------------------ devices
def registered_devices(config: Optional[str] = None) -> list[str]:
    return sorted(Registry(config).devices)


def check_registered(name: str, config: Optional[str] = None) -> None:
    """UserError naming the registry when ``name`` is not registered on this machine."""
    Registry(config).get(name)


def registry_path(config: Optional[str] = None) -> str:
    return str(Registry(config).path)


# ------------------------------------------------------------------------------------------ the work
def fresh_keras() -> None:
    """Keras names tensors with a process-wide counter (keras_tensor, keras_tensor_91, ...) that ends up
    in a TFLite artifact's signature: reset it, so an export is the same whatever this process exported
    before (a serial sweep, a reused Ray worker) - byte for byte what `edgepipe export` writes."""
    keras = sys.modules.get("keras")
    if keras is not None:
        keras.backend.clear_session()


def export(m: dict, pairs: list[tuple[str, str]], cal: dict, exp: dict, out: Path) -> dict:
    """Export one model (every pair) into ``out``/<model>/; returns the manifest as a dict."""
    fresh_keras()
    req = export_stage.ExportRequest(
        model=model_request(m), plan=list(pairs), out=out, reader=calibration_reader(cal, m["seed"]),
        calib_samples=cal["samples"], verify=exp["verify"], verify_samples=exp["verify_samples"],
        use_cache=exp["cache"],
        options=ExportOptions(seed=m["seed"], onnx_int8=exp["onnx_int8"], int8_io=exp["int8_io"],
                              calib_method=exp["calib_method"]))
    return export_stage.run_export(req).to_dict()


def evaluate(folder: Path, ev: dict) -> dict:
    """eval.json's content for the export in ``folder`` (written there too)."""
    req = evaluate_mod.EvalRequest(folder, ev["data"], targets=ev["targets"], limit=ev["limit"],
                                   min_samples=ev["min_samples"], labels_map=ev["labels_map"], threads=ev["threads"])
    return evaluate_mod.evaluate(req)


def bench(folder: Path, device: str, b: dict) -> dict:
    """A bench report (as a dict) of every artifact in ``folder`` on ``device`` ("local" or registered)."""
    s = bench_settings(b)
    if device == LOCAL:
        return run_bench(folder, settings=s).to_dict()
    return bench_devices(folder, s, device).to_dict()


def write_bench(report: dict, out_dir: Path) -> list[str]:
    """bench.json, bench.md and bench.html for one report (or a merge of several devices' reports)."""
    return [str(p) for p in write_bench_reports(BenchReport.from_dict(report), out_dir).values()]


def merge_bench(reports: list[dict]) -> dict:
    return merge_reports([BenchReport.from_dict(r) for r in reports]).to_dict()


def check(folder: Path, g: dict, selectors: set[str]) -> dict:
    """`edgepipe check`'s result (as its --json dict) for the export in ``folder``; needs its eval.json."""
    return gate.run_check(folder, gate_config(g, selectors)).to_dict()


def versions() -> dict:
    return {"edgepipe": pkg_version("edgepipe"), "python": ".".join(map(str, sys.version_info[:3]))}
