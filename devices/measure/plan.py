"""The one bench planner: for each (artifact, target), the row and what would measure it, or why not.

Local and remote runners use the same rules, in this order: a failed export is skipped; the Edge TPU
takes only full-int8 TFLite artifacts; a target with no registered runtime for the format is skipped;
then where the row would run says what it cannot do (Core ML off macOS; a device runs only what its
agent runs), then the runtime judges the artifact (not compiled for the Edge TPU, a dynamic batch on
the GPU: skipped wherever it runs), and last the host (no driver, library or device: unavailable; a
device that did not answer: failed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from edgepipe.pipeline.base.bench import BenchRow
from edgepipe.pipeline.base.manifest import Artifact

from edgepipe.devices.onboard.agent import MeasureSpec
from edgepipe.devices.runtimes.base import Runtime, runtimes_for
from edgepipe.devices.measure.settings import BenchSettings

EDGETPU_PRECISIONS = ("int8",)
EDGETPU_FORMATS = ("tflite", "edgetpu")


@dataclass
class Job:
    """A row to measure, with the artifact's file and the registered runtime that measures it."""

    row: BenchRow
    path: Path
    runtime: Runtime

    @property
    def agent_format(self) -> Optional[str]:
        """The agent's --format when the standalone agent measures it; None: the worker does."""
        return self.runtime.agent_format

    def spec(self, s: BenchSettings, threads: int, inputs: Optional[Path], outputs: Optional[Path],
             artifact: Optional[str] = None) -> MeasureSpec:
        """The MeasureSpec of this row (``artifact``: the path to name, e.g. a copy's on a device)."""
        return dataclasses.replace(s.measure_spec(threads), artifact=artifact or str(self.path),
                                   format=self.agent_format or self.row.format, target=self.row.target,
                                   inputs=str(inputs) if inputs else None,
                                   save_outputs=str(outputs) if outputs else None)


class Where(Protocol):
    """Where rows run (this host, a registered device): what it cannot do, and whether it can now."""

    name: str

    def skip_reason(self, rt: Runtime, art: Artifact) -> Optional[str]:
        """A reason the row is skipped there whatever the host's state (None: it could run)."""

    def unavailable(self, rt: Runtime, target: str) -> Optional[tuple[str, str]]:
        """(status, reason) when it cannot run there now: "unavailable" or "failed"; None: it can."""


class LocalHost:
    """This host: rows run in fresh processes, so availability is asked about a fresh process."""

    name = "local"

    def skip_reason(self, rt: Runtime, art: Artifact) -> Optional[str]:
        return rt.platform_reason()

    def unavailable(self, rt: Runtime, target: str) -> Optional[tuple[str, str]]:
        why = _ask(rt.host_available, "availability check failed")
        return ("unavailable", why) if why else None


def _ask(fn, what: str, *args) -> Optional[str]:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a runtime's own check must not stop the others
        return f"{what}: {e}"


def export_reason(art: Artifact) -> Optional[str]:
    """Why an artifact the export did not produce has nothing to run, or None."""
    if art.status in ("ok", "verify_failed"):
        return None
    if art.status == "failed" and art.error:
        return f"export failed: {art.error}"
    return f"export {art.status}: no artifact to run"


def plan_row(art: Artifact, target: str, folder: Path, where: Where) -> tuple[BenchRow, Optional[Job]]:
    """The row for (artifact, target) at ``where``, and the Job that measures it (None: the row says why not)."""
    row = BenchRow(artifact=art.id, format=art.format, precision=art.precision, target=target, runtime="-",
                   status="skipped", path=art.path, size_bytes=art.size_bytes, device=where.name)
    row.reason = export_reason(art)
    if row.reason:
        return row, None
    path = folder / art.path
    if row.size_bytes is None and path.is_file():
        row.size_bytes = path.stat().st_size
    if target == "edgetpu" and (art.precision not in EDGETPU_PRECISIONS or art.format not in EDGETPU_FORMATS):
        row.runtime = "litert-edgetpu"
        row.reason = (f"the Edge TPU runs only full-int8 TFLite artifacts compiled with edgetpu_compiler; "
                      f"this one is {art.precision} {art.format}")
        return row, None
    rts = runtimes_for(art.format, target)
    if not rts:
        row.reason = f"no runtime runs {art.format} artifacts on {target}"
        return row, None
    rt = rts[0]
    row.runtime = rt.name
    row.reason = where.skip_reason(rt, art) or _ask(rt.artifact_reason, "check failed", path, art.format)
    if row.reason:
        return row, None
    bad = where.unavailable(rt, target)
    if bad:
        row.status, row.reason = bad
        return row, None
    return row, Job(row, path, rt)
