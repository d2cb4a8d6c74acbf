"""The runtime seam: one class per (runtime, target), registered by name.

A runtime answers three things:
  check(artifact_path, fmt) -> None | reason   why it cannot run here, in words a user can act on
  load(artifact_path, options) -> Session
  Session.run(inputs) -> outputs               float in, float out (quantization handled inside)

Verification (export), bench and eval are written once against this interface.
No TensorFlow import anywhere in devices/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from edgepipe.pipeline.base.errors import UnsupportedArtifact, UserError
from edgepipe.pipeline.base.manifest import TensorInfo

TARGETS = ("cpu", "gpu", "edgetpu", "reference")


@dataclass
class RunOptions:
    threads: Optional[int] = None
    profile: bool = False
    extra: dict = field(default_factory=dict)


class Session:
    """A loaded artifact. Subclasses implement ``_run_native`` and fill inputs/outputs."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    #: facts about placement / acceleration, filled by runtimes that know them
    facts: dict

    def run(self, inputs: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Float inputs (the model's preprocessed input) -> float outputs."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        native = [quantize(x, t) for x, t in zip(inputs, self.inputs)]
        outs = self.run_native(native)
        return [dequantize(y, t) for y, t in zip(outs, self.outputs)]

    def run_native(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def quantize(x: np.ndarray, t: TensorInfo) -> np.ndarray:
    dt = np.dtype(t.dtype)
    if dt.kind == "f":
        return np.ascontiguousarray(x, dtype=dt)
    q = t.quantization or {}
    scale = np.asarray(q.get("scale") or [1.0], np.float32)
    zp = np.asarray(q.get("zero_point") or [0], np.float32)
    if np.asarray(x).dtype == dt:
        return np.ascontiguousarray(x)
    info = np.iinfo(dt)
    y = np.round(np.asarray(x, np.float32) / scale + zp)
    return np.clip(y, info.min, info.max).astype(dt)


def dequantize(y: np.ndarray, t: TensorInfo) -> np.ndarray:
    dt = np.dtype(t.dtype)
    if dt.kind == "f":
        return np.asarray(y, np.float32)
    q = t.quantization or {}
    if not q.get("scale"):
        return np.asarray(y, np.float32)
    scale = np.asarray(q["scale"], np.float32)
    zp = np.asarray(q.get("zero_point") or [0], np.float32)
    return (np.asarray(y, np.float32) - zp) * scale


class Runtime:
    """Base class; subclasses register themselves by ``key`` = (name, target)."""

    name: ClassVar[str] = ""
    target: ClassVar[str] = "cpu"
    formats: ClassVar[tuple[str, ...]] = ()
    registry: ClassVar[dict[tuple[str, str], type["Runtime"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.name:
            return
        key = (cls.name, cls.target)
        if key in Runtime.registry:
            raise RuntimeError(f"runtime {key} registered twice")
        if cls.target not in TARGETS:
            raise RuntimeError(f"runtime {key}: unknown target {cls.target}")
        Runtime.registry[key] = cls

    # -- the three questions ----------------------------------------------
    def available(self) -> Optional[str]:
        """None when usable on this host, else the reason it is not."""
        return None

    def check(self, path: str | Path, fmt: str) -> Optional[str]:
        if fmt not in self.formats:
            return f"{self.name} on {self.target} runs {', '.join(self.formats)} artifacts, not {fmt}"
        why = self.available()
        if why:
            return why
        if not Path(path).exists():
            return f"artifact {path} is missing"
        return None

    def load(self, path: str | Path, options: RunOptions | None = None) -> Session:
        raise NotImplementedError

    def versions(self) -> dict:
        return {}


def runtimes_for(fmt: str, target: str | None = None) -> list[Runtime]:
    _load_all()
    return [cls() for (n, t), cls in Runtime.registry.items()
            if fmt in cls.formats and (target is None or t == target)]


def get_runtime(fmt: str, target: str = "cpu") -> Runtime:
    rts = runtimes_for(fmt, target)
    if not rts:
        raise UnsupportedArtifact(f"no runtime runs {fmt} artifacts on {target}")
    return rts[0]


def all_runtimes() -> list[Runtime]:
    _load_all()
    return [cls() for cls in Runtime.registry.values()]


def parse_targets(spec: str | None) -> list[str]:
    if not spec:
        return ["cpu"]
    out = []
    for t in (s.strip() for s in spec.split(",")):
        if not t:
            continue
        if t == "all":
            return [x for x in TARGETS]
        if t not in TARGETS:
            raise UserError(f"unknown target '{t}'", f"Use one or more of: {', '.join(TARGETS)}")
        out.append(t)
    return out


def _load_all() -> None:
    # Importing the modules registers their runtimes. Each module imports its
    # runtime library lazily, so this stays cheap.
    from edgepipe.devices import RUNTIME_MODULES  # noqa: F401
    import importlib

    for m in RUNTIME_MODULES:
        importlib.import_module(f"edgepipe.devices.{m}")
