"""A sweep plan: which models, formats, precisions, data, budgets and devices, from TOML and/or flags.

    out = "sweep-out"
    formats = ["tflite", "onnx"]
    precisions = ["fp32", "int8"]
    devices = ["local", "pi4"]          # registered names, "local" (the CPU of the machine running
                                        # the sweep) or "all"
    [[models]]
    model = "mobilenet"                 # a built-in name, or a .keras/.h5 file / SavedModel folder
    weights = "none"
    input_size = 96
    [calibration]  source = "digits"    # digits | random | a folder of images;  samples = 100
    [eval]         data = "digits"      # or an ImageFolder; leave [eval] out to skip evaluation
    [bench]        targets = ["cpu"]    # runs, min_seconds, warmup, threads, timeout
    [gate]         max_drop = 1.0       # metric, max_drop_for = {int8 = 1.5}, require_verified,
                                        # confidence = 0.95, allow_inconclusive = false (as `check`)

This module checks the plan's shape (TOML syntax, known keys, value types, paths); what the names
mean (a model exists, a format has a precision, a device is registered) is checked by
``cells.validate_plan`` through the library. Relative paths in a plan file are relative to the file.
Everything is plain data (JSON-able): jobs on other machines receive it as is.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from edgepipe.pipeline.base.errors import UserError

BUILTIN_DATA = ("digits", "random")
MODEL_DEFAULTS: dict[str, Any] = {
    "model": None, "name": None, "weights": "imagenet", "input_size": None, "alpha": None, "classes": None,
    "preprocess": None, "mean": None, "std": None, "scale": None, "seed": 0, "labels": None, "trust": False,
    "formats": None, "precisions": None,
}
SECTIONS: dict[str, dict[str, Any]] = {
    "calibration": {"source": None, "samples": 100},
    "export": {"verify": True, "verify_samples": 8, "onnx_int8": "u8s8-reduce-range", "int8_io": "int8",
               "calib_method": None, "cache": True},
    "eval": {"data": None, "limit": None, "min_samples": 100, "targets": ["cpu"], "threads": None,
             "labels_map": None},
    "bench": {"targets": ["cpu"], "runs": 50, "min_seconds": 1.0, "warmup": 5, "threads": None, "timeout": 600.0},
    "gate": {"max_drop": 1.0, "metric": "top1", "max_drop_for": {}, "require_verified": False,
             "confidence": 0.95, "allow_inconclusive": False},
}
TOP_DEFAULTS: dict[str, Any] = {"out": "sweep-out", "formats": ["tflite", "onnx"], "precisions": ["fp32"],
                                "devices": ["local"]}
# expected type of every scalar key (lists are checked by _strings)
TYPES: dict[str, tuple] = {
    "samples": (int,), "verify": (bool,), "verify_samples": (int,), "cache": (bool,), "limit": (int,),
    "min_samples": (int,), "threads": (int,), "runs": (int,), "min_seconds": (int, float), "warmup": (int,),
    "timeout": (int, float), "max_drop": (int, float), "require_verified": (bool,), "seed": (int,),
    "confidence": (float,), "allow_inconclusive": (bool,),
    "alpha": (int, float), "classes": (int,), "scale": (int, float), "trust": (bool,), "input_size": (int, str),
}
LISTS = ("formats", "precisions", "devices", "targets")


@dataclass
class SweepPlan:
    models: list[dict]
    out: str
    formats: list[str]
    precisions: list[str]
    devices: list[str]
    calibration: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    bench: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    source: Optional[str] = None  # the plan file, when there is one

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """What the plan asks for (not where it came from): the report's plan id."""
        d = {k: v for k, v in self.to_dict().items() if k != "source"}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def model(self, name: str) -> dict:
        return next(m for m in self.models if m["name"] == name)

    def pairs(self, m: dict) -> list[tuple[str, str]]:
        """The (format, precision) pairs asked for one model (before the formats' own rules)."""
        return [(f, p) for f in (m["formats"] or self.formats) for p in (m["precisions"] or self.precisions)]


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"plan file {path} not found", "Give the path of a sweep plan (.toml)") from None
    except IsADirectoryError:
        raise UserError(f"plan file {path} is a folder", "Give the path of a sweep plan (.toml)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})", "Fix the plan file (see docs/sweep.md)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read plan file {path}: {e}", "Give a readable UTF-8 .toml file") from None


def load_plan(path: Optional[str | Path] = None, overrides: Optional[dict] = None,
              models: Optional[list[dict]] = None) -> SweepPlan:
    """A plan from a TOML file and/or flags. ``overrides`` maps "key" or "section.key" to a value (flags
    win over the file); ``models`` (model dicts, e.g. from --models) replaces the file's models."""
    if path is None and models is None:
        raise UserError("no plan file and no --models", "Give a plan (edgepipe sweep plan.toml) or --models NAME,...")
    raw = read_toml(Path(path)) if path else {}
    base = Path(path).resolve().parent if path else Path.cwd()
    where = str(path) if path else "the flags"
    data = _merge(raw, overrides or {}, where)
    model_list = models if models is not None else _model_entries(raw.get("models"), where)
    if not model_list:
        raise UserError(f"{where} names no model", "Add a [[models]] entry with model = \"NAME or PATH\" (or --models)")
    plan = SweepPlan(models=[_model(m, i, base if models is None else Path.cwd(), where) for i, m in enumerate(model_list)],
                     out=_path(data["out"], base if "out" not in (overrides or {}) else Path.cwd()),
                     formats=_strings(data["formats"], "formats", where),
                     precisions=_strings(data["precisions"], "precisions", where),
                     devices=_strings(data["devices"], "devices", where, allow_empty=True),
                     source=str(Path(path).resolve()) if path else None,
                     **{s: data[s] for s in SECTIONS})
    _resolve_paths(plan, base, overrides or {})
    _unique_names(plan.models, where)
    return plan


def _merge(raw: dict, overrides: dict, where: str) -> dict:
    unknown = [k for k in raw if k not in TOP_DEFAULTS and k not in SECTIONS and k != "models"]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'",
                        f"Use: {', '.join([*TOP_DEFAULTS, 'models', *SECTIONS])} (see docs/sweep.md)")
    data: dict[str, Any] = {k: raw.get(k, v) for k, v in TOP_DEFAULTS.items()}
    for s, defaults in SECTIONS.items():
        sec = raw.get(s, {})
        if not isinstance(sec, dict):
            raise UserError(f"{where}: '{s}' must be a table ([{s}])", f"Write it as a [{s}] section")
        bad = [k for k in sec if k not in defaults]
        if bad:
            raise UserError(f"{where}: unknown key '{bad[0]}' in [{s}]", f"Use one of: {', '.join(defaults)}")
        data[s] = {**defaults, **sec}
    for key, value in overrides.items():
        if "." in key:
            s, k = key.split(".", 1)
            data[s][k] = value
        else:
            data[key] = value
    for s in SECTIONS:
        for k, v in data[s].items():
            data[s][k] = _check_type(f"[{s}] {k}", k, v, where)
    return data


def _check_type(label: str, key: str, value: Any, where: str) -> Any:
    if value is None:
        return None
    if key in LISTS:
        return _strings(value, label, where)
    types = TYPES.get(key)
    if types and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        want = " or ".join(t.__name__ for t in types)
        raise UserError(f"{where}: {label} must be {want}, got {value!r}", f"Fix {label} in the plan")
    if key == "max_drop_for" and not isinstance(value, dict):
        raise UserError(f"{where}: {label} must be a table like {{int8 = 1.5}}", f"Fix {label} in the plan")
    return value


def _strings(value: Any, label: str, where: str, allow_empty: bool = False) -> list[str]:
    if isinstance(value, str):
        value = [v for v in (x.strip() for x in value.split(",")) if v]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{where}: {label} must be a list of names, got {value!r}",
                        f"Write e.g. {label} = [\"a\", \"b\"]")
    if not value and not allow_empty:
        raise UserError(f"{where}: {label} is empty", f"Name at least one in {label}")
    return list(dict.fromkeys(v.strip() for v in value))


def _model_entries(models: Any, where: str) -> list[dict]:
    if models is None:
        return []
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise UserError(f"{where}: 'models' must be a list of tables ([[models]])",
                        "Write one [[models]] section per model")
    return models


def _model(m: dict, i: int, base: Path, where: str) -> dict:
    bad = [k for k in m if k not in MODEL_DEFAULTS]
    if bad:
        raise UserError(f"{where}: unknown key '{bad[0]}' in model {i + 1}", f"Use: {', '.join(MODEL_DEFAULTS)}")
    d = {**MODEL_DEFAULTS, **m}
    if not isinstance(d["model"], str) or not d["model"].strip():
        raise UserError(f"{where}: model {i + 1} has no 'model' (a built-in name or a model file)",
                        "Add model = \"mobilenet\" or model = \"path/to/model.keras\"")
    for k in ("seed", "alpha", "classes", "scale", "trust", "input_size"):
        d[k] = _check_type(f"model {i + 1} {k}", k, d[k], where)
    for k in ("formats", "precisions"):
        d[k] = _strings(d[k], f"model {i + 1} {k}", where) if d[k] is not None else None
    cand = base / d["model"]
    if not Path(d["model"]).is_absolute() and cand.exists() and ("/" in d["model"] or "." in d["model"]):
        d["model"] = str(cand.resolve())
    if d["labels"]:
        d["labels"] = _path(d["labels"], base)
    return d


def _path(p: str, base: Path) -> str:
    if not isinstance(p, str) or not p:
        raise UserError(f"bad path {p!r}", "Give a folder or file path")
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def _resolve_paths(plan: SweepPlan, base: Path, overrides: dict) -> None:
    """Data folders are relative to the plan file (or to the working folder when they came from flags)."""
    for sec, key in (("calibration", "source"), ("eval", "data"), ("eval", "labels_map")):
        v = getattr(plan, sec)[key]
        if isinstance(v, str) and v not in BUILTIN_DATA:
            getattr(plan, sec)[key] = _path(v, Path.cwd() if f"{sec}.{key}" in overrides else base)


def _unique_names(models: list[dict], where: str) -> None:
    seen: set[str] = set()
    for m in models:
        if m["name"] is not None and m["name"] in seen:
            raise UserError(f"{where}: two models named '{m['name']}'", "Give each [[models]] entry a distinct name")
        if m["name"] is not None:
            seen.add(m["name"])


@dataclass
class ModelJobs:
    """One model of a prepared plan: its name, entry, export pairs and job keys."""

    name: str
    model: dict
    pairs: list[tuple[str, str]]
    skipped: list[dict]
    keys: dict = field(default_factory=dict)  # export, eval, bench:<device>


@dataclass
class Prepared:
    """A plan checked by run.prepare: model names resolved, export pairs and job keys computed."""

    plan: SweepPlan
    models: list[ModelJobs]
    selectors: set[str]
    devices: list[str] = field(default_factory=list)  # resolved on an engine (resolve_devices)
