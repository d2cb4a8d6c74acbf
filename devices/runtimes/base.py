"""The runtime seam: one class per (runtime, target), registered by ``__init_subclass__``.

A Runtime answers:
  available() -> None | reason          can this process use it (host_available(): can a fresh one)
  artifact_reason(path, fmt) -> reason  what about the artifact stops it on any host (not compiled for
                                        the Edge TPU, a dynamic batch on the GPU, an unsupported op)
  check(path, fmt) -> None | reason     both, plus the platform: why it cannot run here
  load(path, spec) -> Session           the agent's Session (devices/onboard/agent.py): run() floats,
                                        run_native() native dtypes, placement(), close()
  versions() -> {distribution: version}

Runtimes the standalone agent runs itself set ``agent_format`` ("tflite", "onnx"): bench measures
them with the agent (here or on a device) and ``load`` opens the agent's own session. Others (the Core
ML reference interpreter, a third-party runtime) implement ``load`` and are measured by the worker
(devices/measure/worker.py) with the same method. Verification, eval and bench use this interface.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

from edgepipe.pipeline.base.errors import UnsupportedArtifact, UserError
from edgepipe.pipeline.base.manifest import TensorInfo

from edgepipe.devices.onboard import agent
from edgepipe.devices.onboard.agent import MeasureSpec, Session, Tensor, dequantize, quantize
from edgepipe.devices.runtimes import RUNTIME_MODULES

__all__ = ["TARGETS", "MeasureSpec", "RunOptions", "Runtime", "Session", "Tensor", "all_runtimes", "dequantize",
           "get_runtime", "load_all", "parse_targets", "quantize", "runtime_name", "runtimes_for", "to_tensor_info"]

TARGETS = ("cpu", "gpu", "edgetpu", "reference")
#: The load options pipeline callers pass (``RunOptions(threads=2)``): the one spec, MeasureSpec.
RunOptions = MeasureSpec


def to_tensor_info(t: Any) -> TensorInfo:
    """A session's tensor (the agent's Tensor, or any object with name/shape/dtype/quantization) as the
    manifest's TensorInfo."""
    q = getattr(t, "quantization", None)
    return TensorInfo(name=t.name, shape=[int(s) for s in t.shape], dtype=str(t.dtype),
                      quantization={"scale": list(q["scale"]), "zero_point": list(q.get("zero_point") or [])}
                      if q and q.get("scale") else None)


class Runtime:
    """Base class; subclasses register themselves by ``(name, target)``."""

    name: ClassVar[str] = ""
    target: ClassVar[str] = "cpu"
    formats: ClassVar[tuple[str, ...]] = ()
    agent_format: ClassVar[Optional[str]] = None  # the agent's --format when the agent runs it itself
    load_hint: ClassVar[Optional[str]] = None  # what to do when load() refuses an artifact
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

    def available(self) -> Optional[str]:
        """None when this process can use it, else the reason it cannot."""
        return None

    def host_available(self) -> Optional[str]:
        """Whether a fresh process on this host can (bench measures in fresh processes)."""
        return self.available()

    def platform_reason(self) -> Optional[str]:
        """Why this runtime can never run on this operating system (e.g. Core ML off macOS), or None."""
        return None

    def artifact_reason(self, path: str | Path, fmt: str) -> Optional[str]:
        """What about the artifact stops this runtime on any host, or None."""
        if fmt not in self.formats:
            return f"{self.name} on {self.target} runs {', '.join(self.formats)} artifacts, not {fmt}"
        if not Path(path).exists():
            return f"artifact {path} is missing"
        return None

    def check(self, path: str | Path, fmt: str) -> Optional[str]:
        """Why it cannot run this artifact here (None: it can)."""
        return self.artifact_reason(path, fmt) or self.platform_reason() or self.available()

    def load(self, path: str | Path, spec: Optional[MeasureSpec] = None) -> Session:
        """Open the artifact. Agent-run runtimes open the agent's session; its errors become
        UnsupportedArtifact (missing runtime, device, or an artifact the runtime refuses)."""
        if self.agent_format is None:
            raise NotImplementedError(f"{type(self).__name__} must implement load()")
        spec = dataclasses.replace(spec or MeasureSpec(), artifact=str(path), format=self.agent_format,
                                   target=self.target)
        try:
            return agent.open_session(spec)
        except agent.AgentError as e:
            raise UnsupportedArtifact(str(e), self.load_hint) from e

    def versions(self) -> dict:
        return {}


def load_all() -> None:
    """Import every runtime module (importing one registers its runtimes)."""
    for m in RUNTIME_MODULES:
        importlib.import_module(m)


_load_all = load_all  # the name pipeline/verify.py and pipeline/recover.py still import


def _import_plugin(module: Optional[str], file: Optional[str]) -> None:
    """Import the module that registers a runtime: by name, else from its file (a test module, a script)."""
    if module and module != "__main__":
        try:
            importlib.import_module(module)
            return
        except ImportError:
            if not file:
                raise
    if file:
        name = module if module and module != "__main__" else f"edgepipe_runtime_{Path(file).stem}"
        found = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(found)
        sys.modules[name] = mod  # as an import would (dataclasses and pickling look it up)
        found.loader.exec_module(mod)


def load_runtime(name: str, target: str, module: Optional[str] = None, file: Optional[str] = None) -> Runtime:
    """The registered runtime (name, target); ``module`` (or, when it is not importable, ``file``) is
    imported first for runtimes registered outside RUNTIME_MODULES (a plugin, a test module, a script)."""
    load_all()
    if (name, target) not in Runtime.registry:
        _import_plugin(module, file)
    cls = Runtime.registry.get((name, target))
    if cls is None:
        raise agent.Unavailable(f"no runtime {name} on {target} is registered")
    return cls()


def runtimes_for(fmt: str, target: str | None = None) -> list[Runtime]:
    load_all()
    return [cls() for (n, t), cls in Runtime.registry.items() if fmt in cls.formats and target in (None, t)]


def get_runtime(fmt: str, target: str = "cpu") -> Runtime:
    rts = runtimes_for(fmt, target)
    if not rts:
        raise UnsupportedArtifact(f"no runtime runs {fmt} artifacts on {target}")
    return rts[0]


def runtime_name(fmt: str, target: str) -> Optional[str]:
    """The name of the runtime that runs ``fmt`` on ``target`` (the first registered), or None."""
    rts = runtimes_for(fmt, target)
    return rts[0].name if rts else None


def all_runtimes() -> list[Runtime]:
    load_all()
    return [cls() for cls in Runtime.registry.values()]


def parse_targets(spec: str | Sequence[str] | None) -> list[str]:
    """'cpu,gpu' (or a list) -> validated targets, in order, without repeats. 'all' is every target
    (TARGETS: cpu, gpu, edgetpu, reference); None is ["cpu"]. Raises UserError naming a bad one."""
    if spec is None:
        return ["cpu"]
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t and t.strip()]
    if not items:
        raise UserError("no target given", f"Use one or more of: {', '.join(TARGETS)} (or all)")
    out: list[str] = []
    for t in items:
        if t != "all" and t not in TARGETS:
            raise UserError(f"unknown target '{t}'", f"Use one or more of: {', '.join(TARGETS)} (or all)")
        out += [x for x in (TARGETS if t == "all" else (t,)) if x not in out]
    return out
