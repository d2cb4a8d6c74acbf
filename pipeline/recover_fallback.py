"""The export recovery's last step: float fallback of the worst layers the per-layer report names.

For an int8 artifact still over its budget after its format's own attempts (recover.py), the
per-layer report (pipeline/fidelity) is built on the export's calibration images with the export's
own traced model and format instance, and the worst layers are kept in float (1, 2, 4, 8, 16) until
the judge (recover_judges.py) says the budget holds. The report is written beside the artifact
(``layers/<artifact id>/layers.json`` and ``layers.html``); every candidate becomes a recovery
attempt with the layers kept in float, the ops that run in float, its size and CPU latency, its
drop with the interval and why those layers; the chosen one's cost against the artifact is kept.

Formats whose artifact is its float format's own int8 artifact and whose probe can write a
fallback (TFLite, ONNX) take part; others (Core ML weight-only, Edge TPU) are left as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgepipe.export import ExportResult, Format
from edgepipe.pipeline.base.manifest import Artifact
from edgepipe.pipeline.base.records import ArtifactRecovery, RecoveryAttempt
from edgepipe.pipeline.export_run import ExportRun, describe, one_line
from edgepipe.pipeline.fidelity.fallback import Attempt
from edgepipe.pipeline.fidelity.layers import write_report
from edgepipe.pipeline.fidelity.report import fallback_recovery, probe_class
from edgepipe.pipeline.fidelity.stats import DropResult
from edgepipe.pipeline.recover_judges import Judge

LAYERS_DIR = "layers"


def supports_fallback(f: Format) -> bool:
    """Whether an artifact of ``f`` can be re-quantized with layers kept in float."""
    if f.float_format() is not f:
        return False
    try:
        return probe_class(f).supports_fallback
    except Exception:  # noqa: BLE001 - no probe for this format: no fallback
        return False


def fallback_attempts(run: ExportRun, a: Artifact, f: Format, judge: Judge, budget: float, work: Path,
                      rec: ArtifactRecovery) -> Optional[tuple[RecoveryAttempt, Path, ExportResult]]:
    """Add the float fallback's attempts to ``rec``; (the chosen attempt, its file, its ExportResult) or None."""
    if not supports_fallback(f) or run.calibration is None or a.path is None:
        return None
    seen: dict[str, dict] = {}

    def measure(p: Path) -> DropResult:
        figures, res = judge.judge(p, a.format)
        seen[str(p)] = figures
        if res is None:
            raise RuntimeError(figures.get("error") or "the candidate could not be evaluated")
        return res

    run.progress("stage", {"name": f"accuracy check: {a.id}: per-layer report, float fallback"})
    try:
        fb, report = fallback_recovery(run.req.folder / a.path, f, run.calibration, measure, budget,
                                       work / f"{a.id}-fallback", traced=run.traced, options=run.req.options_for(a.format))
    except Exception as e:  # noqa: BLE001 - the artifact stays; the note says why the step did not run
        rec.note = f"float fallback not tried: {one_line(e, 300)}"
        return None
    rel = Path(LAYERS_DIR) / a.id
    write_report(report, run.req.folder / rel)
    rec.layers = str(rel / "layers.json")
    a.extra = {**(a.extra or {}), "layers": rec.layers}
    for att in fb.attempts:
        rec.attempts.append(_row(att, seen.get(str(att.path), {})))
        run.progress("note", {"message": f"{a.id}: {att.name}: " + (
            "failed" if rec.attempts[-1].drop is None else f"drop {rec.attempts[-1].drop:.2f}")})
    if fb.chosen is None or fb.chosen.path is None:
        rec.note = fb.note or rec.note
        return None
    rec.cost = fb.cost
    dest = Path(fb.chosen.path)
    kept = {k: v for k, v in (a.options or {}).items() if k not in ("input_kind", "recovered_by")}
    res = ExportResult(dest, options={**kept, **fb.options}, calibration=a.calibration)
    describe(f, res, dest)
    return rec.attempts[-1], dest, res


def _row(att: Attempt, figures: dict) -> RecoveryAttempt:
    """A float fallback candidate as a recovery attempt of the manifest."""
    nodes = [{"tensor": n} for n in att.float_nodes] if att.float_nodes else None
    row = RecoveryAttempt(att.name, "int8", size_bytes=att.size_bytes, float_nodes=nodes,
                          float_layers=list(att.float_layers) or None, latency_ms=att.latency_ms,
                          why=att.why or None, error=att.error)
    for k in ("drop", "top1", "agreement", "runtime", "interval", "error"):
        if figures.get(k) is not None:
            setattr(row, k, figures[k])
    row.meets = att.meets
    return row
