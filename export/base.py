"""The format seam. A format is one class that declares everything about its format:

    class MyFormat(Format):
        name = "myformat"
        suffix = ".ext"                     # or a directory suffix like ".mlpackage"
        precisions = ("fp32", "int8")
        default_precision = "fp32"
        Options = MyOptions                 # its own FormatOptions dataclass (validates itself)
        packages = ("tensorflow", "myconverter")   # converter distributions recorded in the manifest
        verifier = ("myruntime", "cpu")     # the runtime that runs (and so verifies) its artifacts

        def export(self, traced, precision, calibration, dest, options) -> ExportResult: ...

Registered by ``__init_subclass__``; ``edgepipe.export.FORMAT_MODULES`` lists the modules (one
line per format). The pipeline creates one instance per export, so a format keeps intermediate
results (a converted program every precision derives from) on ``self``.

``dest`` is a path inside a private temporary folder (the caller renames it into place once it is
complete), so a format never leaves a half-written artifact; side files it writes beside ``dest``
and lists in ``ExportResult.files`` are moved into the artifact's folder with it. Heavy converters
are imported through ``edgepipe.pipeline.base.lazy``, never at module import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

from edgepipe.pipeline.base.errors import ConversionError, UserError
from edgepipe.pipeline.base.manifest import TensorInfo
from edgepipe.pipeline.base.records import Calibration, Traced

# Every precision edgepipe knows, in the order they are listed/exported.
PRECISIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8", "palettized")
# precisions that need calibration data
CALIBRATED = ("int8", "int16x8")


def option(default: Any, *, flag: str, key: Optional[str] = None, choices: tuple = (),
           help: str = "") -> Any:
    """A FormatOptions field: ``key`` is its name among the export's options (default: the field
    name), ``flag`` the CLI flag named in errors, ``choices`` the values it accepts."""
    return field(default=default, metadata={"flag": flag, "key": key, "choices": choices, "help": help})


@dataclass(frozen=True)
class FormatOptions:
    """A format's own options. Subclasses add fields made with ``option()`` and may extend
    ``validate()``; the export builds them from one flat mapping of option values, where each
    format picks the keys it declares (several formats may share a key)."""

    @classmethod
    def keys(cls) -> dict[str, str]:
        """option key -> field name."""
        return {f.metadata.get("key") or f.name: f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "FormatOptions":
        kw = {name: values[key] for key, name in cls.keys().items() if values.get(key) is not None}
        opts = cls(**kw)
        opts.validate()
        return opts

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"unknown {f.metadata['flag']} '{value}'",
                                f"Use one of: {', '.join(str(c) for c in choices if c is not None)}")

    def to_dict(self) -> dict:
        """Keyed by option key: ``from_values(opts.to_dict())`` rebuilds it."""
        return {key: getattr(self, name) for key, name in self.keys().items()}


@dataclass
class ExportResult:
    path: Path
    inputs: list[TensorInfo] = field(default_factory=list)  # empty: the verifier runtime describes them
    outputs: list[TensorInfo] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # what was really used (recorded in the manifest)
    calibration: Optional[dict] = None
    extra: dict = field(default_factory=dict)
    # "image" when the artifact takes raw 0-255 pixels (Core ML ImageType), else "tensor"
    input_kind: str = "tensor"
    # side files written beside ``path``, kept in the artifact's folder (e.g. compiler logs)
    files: list[Path] = field(default_factory=list)
    # read I/O and placement from this file instead of ``path`` (e.g. the model before a compiler
    # turned it into something only an accelerator opens)
    described_by: Optional[Path] = None
    # conversion seconds when part of the conversion ran elsewhere (the worker process)
    seconds: Optional[float] = None


class ExportFailed(ConversionError):
    """A conversion failed after writing side files worth keeping (a compiler log)."""

    def __init__(self, message: str, hint: Optional[str] = None, files: Optional[list[Path]] = None):
        super().__init__(message, hint)
        self.files = list(files or [])


@dataclass
class Recovery:
    """One attempt a format offers for an int8 artifact over its accuracy budget."""

    name: str  # recorded in the manifest ("entropy calibration", "int16x8 activations", ...)
    precision: str  # the precision the attempt's artifact has
    tag: str  # what its file name says instead of the precision (int8_mixed ...)
    run: Callable[[Path], ExportResult]  # writes the attempt's artifact at the given path
    info: dict = field(default_factory=dict)  # recorded with the attempt (method, float_nodes ...)
    convert_s: float = 0.0  # conversion time spent before ``run`` (shared analysis)


@dataclass(frozen=True)
class WorkerJob:
    """A conversion a format can run in the worker process (see export/worker.py)."""

    format: str  # the registered format whose ``convert_saved_model`` runs it
    precision: str
    options: FormatOptions


class Format:
    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""
    precisions: ClassVar[tuple[str, ...]] = ()
    default_precision: ClassVar[str] = "fp32"
    #: exported when no format is named
    default: ClassVar[bool] = True
    #: its options (a FormatOptions subclass)
    Options: ClassVar[type[FormatOptions]] = FormatOptions
    #: converter distributions recorded in the manifest (``artifact.converter``)
    packages: ClassVar[tuple[str, ...]] = ("tensorflow",)
    #: (runtime name, target) that runs its artifacts here; see ``verifier_for_host``
    verifier: ClassVar[tuple[str, str]] = ("", "")
    #: the format name runtimes know its artifacts by (default: ``name``)
    runtime_format: ClassVar[str] = ""
    #: a device target this format exists for: ``int8`` with that target in ``targets`` adds it
    target: ClassVar[Optional[str]] = None
    #: a placement predictor the pipeline runs on its artifacts (devices' "edgetpu" analysis)
    placement: ClassVar[Optional[str]] = None
    #: formats whose per-export instance this one builds on (passed to ``__init__``)
    builds_on: ClassVar[tuple[str, ...]] = ()
    #: whether its conversions can run in the worker process (``worker_jobs``)
    worker: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["Format"]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not cls.name:
            return
        if cls.name in Format.registry:
            raise RuntimeError(f"format '{cls.name}' registered twice")
        bad = [p for p in cls.precisions if p not in PRECISIONS]
        if bad:
            raise RuntimeError(f"format '{cls.name}' names unknown precisions {bad}")
        if cls.default_precision not in cls.precisions:
            raise RuntimeError(f"format '{cls.name}': default precision {cls.default_precision} is not offered")
        Format.registry[cls.name] = cls

    # -- declarations --------------------------------------------------------------------------
    def filename(self, model_name: str, precision: str) -> str:
        return f"{model_name}_{precision}{self.suffix}"

    def verifier_for_host(self) -> tuple[str, str]:
        """(runtime name, target) that verifies its artifacts on this host (may depend on the platform)."""
        return self.verifier

    def runs_as(self) -> str:
        return self.runtime_format or self.name

    def unverifiable(self, path: Path) -> Optional[str]:
        """Why this artifact cannot be run here even though the format's runtime is installed."""
        return None

    # -- conversion ----------------------------------------------------------------------------
    def export(self, traced: Traced, precision: str, calibration: Optional[Calibration], dest: Path,
               options: FormatOptions) -> ExportResult:
        raise NotImplementedError

    def worker_jobs(self, precision: str, options: FormatOptions) -> list[tuple["Format", WorkerJob]]:
        """(instance that receives the result, job) for conversions the worker process can run."""
        return []

    def receive(self, job: WorkerJob, pending: Any) -> None:
        """A worker conversion for ``job`` is under way: ``pending.result()`` -> (bytes, used, seconds)."""

    @classmethod
    def convert_saved_model(cls, saved_model: Path, precision: str, calibration: Optional[Calibration],
                            options: FormatOptions) -> tuple[bytes, dict]:
        """The worker process's conversion (formats with ``worker = True``)."""
        raise NotImplementedError

    # -- after the export ----------------------------------------------------------------------
    def placement_report(self, prediction: dict, result: ExportResult) -> dict:
        """The placement record kept in ``artifact.extra[placement]`` (the prediction, merged with
        what a compiler decided when one ran)."""
        return prediction

    def recoveries(self, traced: Traced, calibration: Calibration,
                   options: FormatOptions) -> Iterator[list[Recovery]]:
        """Groups of recovery attempts for an int8 artifact over its accuracy budget. Every attempt of
        a group runs; the next group is tried only when none so far met the budget."""
        return iter(())

    # -- for the fidelity tools (per-layer report, float fallback) -------------------------------
    def float_format(self) -> "Format":
        """The format whose fp32 conversion is this one's float reference and whose re-quantization
        serves the per-layer report and the float fallback (default: itself)."""
        return self

    def options_from_record(self, used: Mapping[str, Any], calibration: Optional[Mapping[str, Any]]) -> FormatOptions:
        """The options an artifact was exported with, rebuilt from its manifest entry (``artifact.options``
        and ``artifact.calibration``), so it can be re-quantized the same way. Default: the defaults."""
        return self.Options()

    def int8_weight_levels(self, options: FormatOptions) -> Optional[int]:
        """The symmetric grid (levels each side of zero) its int8 weights are rounded to, for bias
        correction; None when it has no int8 weights."""
        return None

    def close(self) -> None:
        """Drop per-export state."""
