"""edgepipe's stages and library API. The names most users need, importable without TensorFlow:

    from edgepipe.pipeline import export, bench, evaluate, check, inspect   # one per command
    from edgepipe.pipeline import compare, load_manifest, Manifest, EvalResult, CheckResult
    from edgepipe.pipeline import history, compare_runs, latency_gate, select_artifact    # the results ledger

Names are resolved lazily (PEP 562), so that importing the base layer
(``edgepipe.pipeline.base``), which every package builds on, never imports the stages.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "export": "edgepipe.pipeline.api",
    "bench": "edgepipe.pipeline.api",
    "evaluate": "edgepipe.pipeline.api",
    "check": "edgepipe.pipeline.api",
    "inspect": "edgepipe.pipeline.api",
    "inspect_layers": "edgepipe.pipeline.api",
    "enforce_bench": "edgepipe.pipeline.api",
    "enforce_eval": "edgepipe.pipeline.api",
    "enforce_check": "edgepipe.pipeline.api",
    "history": "edgepipe.pipeline.api",
    "compare_runs": "edgepipe.pipeline.api",
    "latency_gate": "edgepipe.pipeline.api",
    "enforce_latency": "edgepipe.pipeline.api",
    "select_artifact": "edgepipe.pipeline.api",
    "enforce_selection": "edgepipe.pipeline.api",
    "Recorded": "edgepipe.pipeline.base.recorded",
    "EvalResult": "edgepipe.pipeline.base.evaluation",
    "EvalRow": "edgepipe.pipeline.base.evaluation",
    "load_eval": "edgepipe.pipeline.base.evaluation",
    "Budget": "edgepipe.pipeline.gate",
    "CheckResult": "edgepipe.pipeline.gate",
    "CheckRow": "edgepipe.pipeline.gate",
    "GateConfig": "edgepipe.pipeline.gate",
    "EdgepipeError": "edgepipe.pipeline.base.errors",
    "GateFailure": "edgepipe.pipeline.base.errors",
    "UserError": "edgepipe.pipeline.base.errors",
    "Artifact": "edgepipe.pipeline.base.manifest",
    "Manifest": "edgepipe.pipeline.base.manifest",
    "load_manifest": "edgepipe.pipeline.base.manifest",
    "compare": "edgepipe.pipeline.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgepipe.pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
