"""The one place the sweep calls edgepipe's library (``edgepipe.pipeline.api`` and the devices
facade): export, eval, bench, check, and the checks a plan needs before anything runs. Everything
crossing this seam is plain data (dicts, paths, lists), so the rest of pipeline/sweep does not
depend on the library's classes.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

from edgepipe.devices import (BenchReport, BenchSettings, Registry, bench_devices, parse_targets, run_bench,
                              write_reports as write_bench_reports)
from edgepipe.devices.remote.fleet import merge_reports
from edgepipe.export import PRECISIONS
from edgepipe.pipeline import api, gate, models
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import pkg_version
from edgepipe.pipeline.calibration import Reader, make_reader
from edgepipe.pipeline.datasets import check_spec
from edgepipe.pipeline.eval_stage import resolve_targets as eval_targets
from edgepipe.pipeline.export_plan import build_plan, format_options, prepare
from edgepipe.pipeline.export_stage import run as run_export

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
    plan, skipped = build_plan(formats, precisions, False)
    wanted = set(pairs)
    return [fp for fp in plan if fp in wanted], skipped


def format_option_values(exp: dict) -> dict:
    """The plan's [export] format options, by the keys the formats declare."""
    return {k: exp[k] for k in ("onnx_int8", "int8_io", "calib_method") if exp.get(k) is not None}


def check_export_options(cal: dict, exp: dict) -> None:
    for key, choices in (("calib_method", CALIB_METHODS),):
        if exp.get(key) not in choices:
            raise UserError(f"unknown [export] {key} '{exp[key]}'", "Use minmax, entropy or percentile")
    try:
        format_options(format_option_values(exp))  # each format validates its own options
    except UserError as e:
        raise UserError(f"[export]: {e.message}", e.hint) from None
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
    eval_targets(ev["targets"])
    if ev["min_samples"] < 1 or (ev["limit"] is not None and ev["limit"] < 1):
        raise UserError("[eval] limit and min_samples must be positive", "Give positive numbers")
    if ev["threads"] is not None and ev["threads"] < 1:
        raise UserError(f"[eval] threads must be at least 1 (got {ev['threads']})", "Leave it out for the default")
    if ev["limit"] is not None and ev["limit"] < ev["min_samples"]:
        raise UserError(f"[eval] limit {ev['limit']} is below min_samples ({ev['min_samples']}), the smallest set "
                        "evaluated", f"Raise limit, or set [eval] min_samples = {ev['limit']} if a noisier figure "
                        "is acceptable")


def bench_settings(b: dict) -> BenchSettings:
    return BenchSettings(targets=parse_targets(b["targets"]), threads=b["threads"], runs=b["runs"],
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
                           require_verified=bool(g["require_verified"]), confidence=float(g["confidence"]),
                           allow_inconclusive=bool(g["allow_inconclusive"]))


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
    src = cal.get("source")
    data, calib = (None, src) if src in ("digits", "random") else (src, None)
    req = prepare(model_request(m), formats=list(dict.fromkeys(f for f, _ in pairs)),
                  precisions=list(dict.fromkeys(p for _, p in pairs)), out=out, data=data, calib=calib,
                  calib_samples=cal["samples"], options=format_option_values(exp), seed=m["seed"],
                  verify=exp["verify"], verify_samples=exp["verify_samples"], cache=exp["cache"])
    req = dataclasses.replace(req, plan=[fp for fp in req.plan if fp in set(pairs)])  # exactly the plan's cells
    return run_export(req).manifest.to_dict()


def evaluate(folder: Path, ev: dict) -> dict:
    """eval.json's content for the export in ``folder`` (written there too)."""
    result = api.evaluate(folder, ev["data"], targets=ev["targets"], limit=ev["limit"], min_samples=ev["min_samples"],
                          labels_map=ev["labels_map"], threads=ev["threads"])
    return result.to_dict()


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
    """`edgepipe check`'s result (as its --json dict) for the export in ``folder``; needs its eval.json.
    An inconclusive row (the set too small to show the drop is within budget) fails, as in `check`,
    unless the plan allows it; then it counts as skipped."""
    cfg = gate_config(g, selectors)
    res = gate.run_check(folder, cfg).to_dict()
    for r in res["rows"]:
        if r["status"] == "inconclusive":
            r["reason"] = f"inconclusive: {r.get('reason') or 'the eval set is too small to show the drop is within budget'}"
            r["status"] = "skipped" if cfg.allow_inconclusive else "fail"
    return res


def versions() -> dict:
    return {"edgepipe": pkg_version("edgepipe"), "python": ".".join(map(str, sys.version_info[:3]))}
