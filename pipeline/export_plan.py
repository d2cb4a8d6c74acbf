"""What to export, validated in milliseconds without TensorFlow: the ExportRequest.

``prepare()`` turns a library call (or the CLI's flags) into an ExportRequest, or raises a
UserError naming the problem and the fix: unknown formats, precisions or option values, missing
calibration data, an unwritable output folder, a --max-drop without int8 artifacts...
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from edgepipe.devices import parse_targets
from edgepipe.export import CALIBRATED, PRECISIONS, FormatOptions, default_formats, format_class, formats, option_keys
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.calibration import Reader, calib_hint, make_reader
from edgepipe.pipeline.datasets import check_spec
from edgepipe.pipeline.models import ModelRequest, resolve

DEFAULT_CALIB_SAMPLES = 100
DEFAULT_VERIFY_SAMPLES = 8
DEFAULT_HOLDOUT_SAMPLES = 200  # the label-free budget's held-out images, read beyond --calib-samples
# the placement predictor --require-full-edgetpu gates on
EDGETPU = "edgetpu"

Names = Union[str, Sequence[str], None]


@dataclass
class ExportRequest:
    model: ModelRequest
    plan: list[tuple[str, str]]  # (format, precision)
    out: Path
    reader: Optional[Reader] = None  # calibration data, or None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    verify: bool = True
    verify_samples: int = DEFAULT_VERIFY_SAMPLES
    options: dict[str, FormatOptions] = field(default_factory=dict)  # per format name
    use_cache: bool = True
    skipped: list[dict] = field(default_factory=list)
    parallel: bool = True  # worker-process conversions overlap the others
    max_drop: Optional[float] = None  # accuracy budget of int8 artifacts (top-1 points), or None
    eval_data: Optional[str] = None  # the labelled set --max-drop measures on; None: label-free (held-out images)
    require_full_edgetpu: bool = False
    capture_output: bool = True  # converter chatter to OUT/<model>/export.log
    equalize: bool = True  # cross-layer equalization before converting, when int8 artifacts are planned
    bias_correction: bool = False  # correct the int8 weight-rounding shift of each layer's bias
    holdout_samples: int = DEFAULT_HOLDOUT_SAMPLES  # label-free budget: images held out of the calibration read

    @property
    def label_free(self) -> bool:
        """--max-drop without labelled images: the budget is top-1 agreement with the source model on
        calibration images held out of the calibration."""
        return self.max_drop is not None and self.eval_data is None

    @property
    def quantizes(self) -> bool:
        """Whether an artifact of the plan is calibrated (int8, int16x8): where the PTQ options apply."""
        return any(p in CALIBRATED for _, p in self.plan)

    @property
    def folder(self) -> Path:
        return self.out / self.model.name

    @property
    def formats(self) -> list[str]:
        return list(dict.fromkeys(f for f, _ in self.plan))

    def options_for(self, fmt: str) -> FormatOptions:
        return self.options.get(fmt) or format_class(fmt).Options()

    def cache_parts(self) -> dict:
        """What determines the export's outputs (with versions and code: the cache key)."""
        return {"model": self.model.identity(), "plan": self.plan, "verify": self.verify,
                "verify_samples": self.verify_samples, "calib_samples": self.calib_samples,
                "calibration": self.reader.identity() if self.reader is not None else None,
                "options": {f: self.options_for(f).to_dict() for f in self.formats},
                "ptq": {"equalize": self.equalize, "bias_correction": self.bias_correction}}


def split_names(names: Names) -> Optional[list[str]]:
    if names is None:
        return None
    items = names.split(",") if isinstance(names, str) else names
    return [x.strip().lower() for x in items if x.strip()]


def format_options(values: Optional[Mapping[str, Any]]) -> dict[str, FormatOptions]:
    """Every registered format's options from one flat mapping (each takes the keys it declares)."""
    values = dict(values or {})
    unknown = sorted(set(values) - option_keys())
    if unknown:
        raise UserError(f"unknown export option '{unknown[0]}'", f"Known: {', '.join(sorted(option_keys()))}")
    return {name: cls.Options.from_values(values) for name, cls in formats().items()}


def build_plan(fmts: Optional[list[str]], precisions: Optional[list[str]],
               int8: bool) -> tuple[list[tuple[str, str]], list[dict]]:
    """(format, precision) pairs to export, and the requested pairs a format cannot do."""
    fnames = fmts or default_formats()
    classes = {f: format_class(f) for f in fnames}  # UserError on an unknown format
    for p in precisions or []:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision '{p}'", f"Use one or more of: {', '.join(PRECISIONS)}")
    plan, skipped = [], []
    for f, cls in classes.items():
        wanted = list(precisions or []) + (["int8"] if int8 else [])
        for p in dict.fromkeys(wanted or [cls.default_precision]):
            if p in cls.precisions:
                plan.append((f, p))
            else:
                skipped.append({"format": f, "precision": p,
                                "reason": f"{f} has no {p} variant (it offers {', '.join(cls.precisions)})"})
    if not plan:
        raise UserError("nothing to export: " + "; ".join(s["reason"] for s in skipped),
                        "Choose precisions the selected formats support")
    return plan, skipped


def select_formats(fmts: Optional[list[str]], int8: bool, targets: Names, require_full_edgetpu: bool) -> Optional[list[str]]:
    """The formats to export: as named (None: the defaults), plus with ``int8`` every format made for
    one of ``targets`` (``--int8 --targets edgetpu`` adds the Edge TPU format)."""
    target_list = [] if targets is None else parse_targets(targets if isinstance(targets, str) else ",".join(targets))
    if int8 and target_list:
        extra = [n for n, cls in formats().items() if cls.target in target_list]
        if extra:
            fmts = list(dict.fromkeys((fmts or default_formats()) + extra))
    chosen = fmts or default_formats()
    if require_full_edgetpu and not any(format_class(f).placement == EDGETPU for f in chosen):
        raise UserError("--require-full-edgetpu needs an Edge TPU artifact",
                        "Add --formats edgetpu (or --int8 --targets edgetpu)")
    return fmts


def check_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".edgepipe-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}", "Choose a writable --out folder") from e


def validate(req: ExportRequest) -> None:
    needs_calib = [f"{f} {p}" for f, p in req.plan if p in CALIBRATED]
    if needs_calib and req.reader is None:
        raise UserError(f"{', '.join(needs_calib)} needs calibration data", calib_hint())
    if req.calib_samples < 1:
        raise UserError(f"bad --calib-samples {req.calib_samples}", "Give a positive number")
    if req.verify_samples < 1:
        raise UserError(f"bad --verify-samples {req.verify_samples}", "Give a positive number")
    check_output(req.out)


def recovery_data(max_drop: Optional[float], eval_data: Optional[str], data: Optional[str],
                  calib: Optional[str], plan: list[tuple[str, str]]) -> Optional[str]:
    """The labelled set --max-drop will use, checked before any expensive work (None without --max-drop)."""
    if max_drop is None:
        if eval_data is not None:
            raise UserError("--eval-data is only used with --max-drop", "Add --max-drop POINTS, or drop --eval-data")
        return None
    if math.isnan(max_drop) or max_drop < 0:
        raise UserError(f"bad --max-drop {max_drop}", "Give a non-negative number of top-1 points")
    if not any(p == "int8" for _, p in plan):
        raise UserError("--max-drop applies to int8 artifacts, and none is being exported", "Add --int8")
    spec = eval_data
    if spec is None:
        if calib == "digits":
            spec = "digits"
        elif data and Path(data).is_dir() and any(d.is_dir() and not d.name.startswith(".") for d in Path(data).iterdir()):
            spec = data  # calibration images arranged by class
        elif calib == "random":
            raise UserError("--max-drop needs labelled images or real calibration images to measure the drop "
                            "(--calib random is noise: agreement on it says nothing)",
                            "Give --data DIR (your images: part is held out to judge agreement with the source "
                            "model), or --eval-data DIR (one subfolder per class) or --eval-data digits")
        else:
            return None  # label-free: agreement with the source model on held-out calibration images
    check_spec(spec)
    return spec


def prepare(model: Union[str, ModelRequest], *, formats: Names = None, precisions: Names = None,
            int8: bool = False, out: Union[str, os.PathLike] = "edgepipe-out", data: Optional[str] = None,
            calib: Optional[str] = None, calib_samples: int = DEFAULT_CALIB_SAMPLES,
            options: Optional[Mapping[str, Any]] = None, verify: bool = True,
            verify_samples: int = DEFAULT_VERIFY_SAMPLES, cache: bool = True, parallel: bool = True,
            targets: Names = None, max_drop: Optional[float] = None, eval_data: Optional[str] = None,
            require_full_edgetpu: bool = False, seed: int = 0, capture_output: bool = True,
            equalize: bool = True, bias_correction: bool = False, **model_args: Any) -> ExportRequest:
    """Validate an export (see ``export_stage.export`` for the arguments); no TensorFlow."""
    opts = format_options(options)
    if verify_samples < 1:
        raise UserError(f"bad --verify-samples {verify_samples}", "Give a positive number")
    req_model = model if isinstance(model, ModelRequest) else resolve(model, seed=seed, **model_args)
    fmts = select_formats(split_names(formats), int8, targets, require_full_edgetpu)
    plan, skipped = build_plan(fmts, split_names(precisions), int8)
    req = ExportRequest(model=req_model, plan=plan, out=Path(out), reader=make_reader(data, calib, seed),
                        calib_samples=calib_samples, verify=verify, verify_samples=verify_samples,
                        options={f: opts[f] for f, _ in plan}, use_cache=cache, skipped=skipped, parallel=parallel,
                        require_full_edgetpu=require_full_edgetpu, capture_output=capture_output,
                        equalize=equalize, bias_correction=bias_correction)
    validate(req)
    req.max_drop = max_drop
    req.eval_data = recovery_data(max_drop, eval_data, data, calib, plan)
    if max_drop is not None:
        req.use_cache = False  # the recovery measures and may replace artifacts: never served from the cache
    return req
