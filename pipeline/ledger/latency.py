"""The latency gate: ``check --baseline REF --max-slowdown 5``.

A row fails when it is slower than its baseline by more than the budget with 95% confidence:
the lower end of the bootstrap CI of median(current) / median(baseline) exceeds 1 + budget/100.
Noise passes (its interval straddles 1), and so does a real slowdown within the budget.

    res = latency_gate("42", "OUT/tiny/bench.json", max_slowdown=5.0, ledger=None)
    write_reports(res, junit="latency.xml", markdown="latency.md")
    enforce(res)           # GateFailure (exit 1) naming the slow rows

Rows: pass / fail as above; a row measured now but failing (crash, timeout) fails; rows without
a baseline figure, without raw samples, or not measured now are listed as skipped. The baseline
and the current run must have been measured under the same conditions (else exit 2 naming what
differs, unless ``force``). ``to_dict()`` has the keys of ``CheckResult.to_dict()`` so the ledger
records it as check rows (check = "latency").
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Optional

from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.base.util import write_text_atomic
from edgepipe.pipeline.ledger.compare import RowComparison, compare_runs
from edgepipe.pipeline.ledger.query import RunData, resolve_run
from edgepipe.pipeline.ledger.stats import fmt_pct
from edgepipe.pipeline.ledger.store import Ledger


@dataclass
class LatencyRow:
    artifact: str
    target: str
    device: str
    runtime: str
    format: Optional[str] = None
    precision: Optional[str] = None
    baseline_p50: Optional[float] = None
    current_p50: Optional[float] = None
    change_pct: Optional[float] = None
    ci95_pct: Optional[list] = None  # [low, high] change of the median, percent
    budget: float = 5.0
    status: str = "pass"  # pass | fail | skipped
    reason: Optional[str] = None
    baseline_row: Optional[int] = None
    current_row: Optional[int] = None
    sha256: Optional[str] = None

    @property
    def name(self) -> str:
        where = f" @ {self.device}" if self.device != "local" else ""
        return f"{self.artifact} on {self.target}{where}: latency"


@dataclass
class LatencyGateResult:
    model: Optional[str]
    baseline: str
    current: str
    max_slowdown: float
    rows: list[LatencyRow] = field(default_factory=list)
    forced: bool = False

    @property
    def failed(self) -> list[LatencyRow]:
        return [r for r in self.rows if r.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def summary_line(self) -> str:
        n = sum(r.status != "skipped" for r in self.rows)
        who = self.model or "latency"
        if self.passed:
            return f"{who}: all {n} latency checks passed (max slowdown {_pct(self.max_slowdown)})"
        return f"{who}: {len(self.failed)} of {n} latency checks failed (max slowdown {_pct(self.max_slowdown)})"

    def to_dict(self) -> dict:
        rows = []
        for r in self.rows:
            rows.append({"artifact": r.artifact, "format": r.format, "precision": r.precision, "check": "latency",
                         "target": r.target, "device": r.device, "runtime": r.runtime,
                         "source_value": r.baseline_p50, "artifact_value": r.current_p50, "drop": r.change_pct,
                         "budget": r.budget, "budget_from": "default", "status": r.status, "reason": r.reason,
                         "ci95_pct": r.ci95_pct, "baseline_row": r.baseline_row, "current_row": r.current_row,
                         "sha256": r.sha256, "name": r.name})
        return {"model": self.model, "gate": "latency", "baseline": self.baseline, "current": self.current,
                "max_slowdown": self.max_slowdown, "forced": self.forced, "passed": self.passed,
                "failed": len(self.failed), "checks": len(self.rows),
                "skipped": sum(r.status == "skipped" for r in self.rows), "rows": rows}


def _pct(v: float) -> str:
    return f"{v:g}%"


def _row(rc: RowComparison, budget: float) -> LatencyRow:
    e = rc.b or rc.a
    r = LatencyRow(e.artifact, e.target, e.device, e.runtime, e.format, e.precision, budget=budget,
                   baseline_p50=rc.a.p50 if rc.a else None, current_p50=rc.b.p50 if rc.b else None,
                   baseline_row=rc.a.row_id if rc.a else None, current_row=rc.b.row_id if rc.b else None,
                   sha256=rc.b.sha256 if rc.b else None)
    if rc.b is None:
        r.status, r.reason = "skipped", "not measured in the current run"
    elif rc.b.status not in ("ok", "skipped", "unavailable"):
        r.status, r.reason = "fail", f"measurement {rc.b.status}: {rc.b.reason or 'no figure'}"
    elif rc.b.status != "ok":
        r.status, r.reason = "skipped", f"{rc.b.status} now: {rc.b.reason or ''}".strip()
    elif rc.a is None or rc.a.status != "ok":
        r.status, r.reason = "skipped", "no baseline figure" + (f" (baseline {rc.a.status})" if rc.a else "")
    elif rc.ci is None or rc.ci.low is None:
        r.status, r.reason = "skipped", (rc.ci.note if rc.ci else None) or "no interval"
        r.change_pct = rc.ci.change_pct if rc.ci else None
    else:
        ci = rc.ci
        r.change_pct = ci.change_pct
        r.ci95_pct = [(ci.low - 1) * 100, (ci.high - 1) * 100]
        if ci.exceeds(budget):
            r.status = "fail"
            r.reason = (f"slower by {fmt_pct(ci.change_pct)} (95% CI {fmt_pct(r.ci95_pct[0])} to "
                        f"{fmt_pct(r.ci95_pct[1])}), over the {_pct(budget)} budget")
    if rc.differs and r.status != "skipped":
        r.reason = "; ".join(filter(None, [r.reason, "conditions differ (forced): " + ", ".join(rc.differs)]))
    return r


def check_max_slowdown(max_slowdown: float) -> float:
    if isinstance(max_slowdown, bool) or not isinstance(max_slowdown, (int, float)) or math.isnan(max_slowdown) \
            or max_slowdown < 0:
        raise UserError(f"bad --max-slowdown {max_slowdown!r}", "Give a non-negative percentage, e.g. 5")
    return float(max_slowdown)


def _same_measurement(a: RunData, b: RunData) -> bool:
    """The baseline is the very run being gated (e.g. 'latest' right after the bench that recorded it)."""
    if not a.created or a.created != b.created:
        return False
    ka = {e.key: e.samples for e in a.entries}
    return bool(b.entries) and all(ka.get(e.key) == e.samples for e in b.entries)


def gate_runs(baseline: RunData, current: RunData, max_slowdown: float, force: bool = False) -> LatencyGateResult:
    check_max_slowdown(max_slowdown)
    if _same_measurement(baseline, current):
        raise UserError(f"the baseline {baseline.label} is the measurement being gated ({current.label})",
                        "Give an earlier run: 'latest~1' is the bench run before the newest one")
    cmp = compare_runs(baseline, current, force)
    rows = [_row(rc, float(max_slowdown)) for rc in cmp.rows]
    model = current.model or baseline.model
    return LatencyGateResult(model, baseline.label, current.label, float(max_slowdown), rows, force)


def latency_gate(baseline: str, current: str, max_slowdown: float, ledger: Optional[Ledger] = None,
                 force: bool = False, model: Optional[str] = None) -> LatencyGateResult:
    """Resolve both references (ledger run ids, 'latest', bench.json paths) and gate current on baseline."""
    return gate_runs(resolve_run(baseline, ledger, model), resolve_run(current, ledger, model), max_slowdown, force)


# --------------------------------------------------------------------------------------------- reports
def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def render_markdown(res: LatencyGateResult) -> str:
    icon = {"pass": "✅ pass", "fail": "❌ FAIL", "skipped": "⏭️ skipped"}
    head = "✅ passed" if res.passed else f"❌ {len(res.failed)} failed"
    lines = [f"### edgepipe latency check: {res.model or ''}: {head}", "",
             f"Baseline: {res.baseline}. Current: {res.current}. Budget: at most {_pct(res.max_slowdown)} slower "
             f"(median, 95% confidence).", "",
             "| artifact | target | device | baseline ms | current ms | change | 95% CI | budget | result |",
             "|---|---|---|---:|---:|---:|---|---:|---|"]
    for r in res.rows:
        ci = "-" if not r.ci95_pct else f"{fmt_pct(r.ci95_pct[0])} … {fmt_pct(r.ci95_pct[1])}"
        lines.append(f"| {r.artifact} | {r.target} | {r.device} | {_ms(r.baseline_p50)} | {_ms(r.current_p50)} | "
                     f"{fmt_pct(r.change_pct)} | {ci} | {_pct(r.budget)} | {icon[r.status]} |")
    notes = [r for r in res.rows if r.reason and r.status != "pass"]
    if notes:
        lines.append("")
        lines += [f"- **{r.name}**: {r.reason.replace('|', '/')}" for r in notes]
    return "\n".join(lines) + "\n"


def render_junit(res: LatencyGateResult) -> str:
    n_fail, n_skip = len(res.failed), sum(r.status == "skipped" for r in res.rows)
    counts = {"tests": str(len(res.rows)), "failures": str(n_fail), "errors": "0", "skipped": str(n_skip)}
    suites = ET.Element("testsuites", name="edgepipe latency check", **counts)
    suite = ET.SubElement(suites, "testsuite", name=f"edgepipe latency check: {res.model or ''}", **counts)
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="baseline", value=res.baseline)
    ET.SubElement(props, "property", name="current", value=res.current)
    ET.SubElement(props, "property", name="max_slowdown_pct", value=f"{res.max_slowdown:g}")
    for r in res.rows:
        tc = ET.SubElement(suite, "testcase", classname=f"edgepipe.{res.model or 'model'}.{r.artifact}", name=r.name)
        detail = (f"baseline {_ms(r.baseline_p50)} ms, current {_ms(r.current_p50)} ms, change "
                  f"{fmt_pct(r.change_pct)}, budget {_pct(r.budget)}")
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=r.reason or "failed", type="edgepipe.latency").text = detail
        elif r.status == "skipped":
            ET.SubElement(tc, "skipped", message=r.reason or "skipped")
        else:
            ET.SubElement(tc, "system-out").text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def merge_junit(*documents: str) -> str:
    """JUnit XML documents -> one ``<testsuites>`` holding every ``<testsuite>`` of each, with summed counts
    (what `edgepipe check` writes when both the accuracy and the latency gate ran)."""
    suites = [s for doc in documents for s in ET.fromstring(doc).iter("testsuite")]
    counts = {k: str(sum(int(s.get(k) or 0) for s in suites)) for k in ("tests", "failures", "errors", "skipped")}
    root = ET.Element("testsuites", name="edgepipe check", **counts)
    root.extend(suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_reports(res: LatencyGateResult, junit: Optional[str | os.PathLike] = None,
                  markdown: Optional[str | os.PathLike] = None, step_summary: bool = True,
                  accuracy: Optional[tuple[str, str]] = None) -> list[str]:
    """JUnit / Markdown files (and $GITHUB_STEP_SUMMARY), like the accuracy gate's write_reports.
    ``accuracy``: the accuracy gate's (JUnit XML, Markdown) of the same check: the JUnit file then holds
    both test suites and the Markdown both tables (accuracy first)."""
    written, md, xml = [], render_markdown(res), render_junit(res)
    if accuracy is not None:
        xml, md = merge_junit(accuracy[0], xml), f"{accuracy[1]}\n{md}"
    if junit:
        write_text_atomic(junit, xml)
        written.append(str(junit))
    if markdown:
        write_text_atomic(markdown, md)
        written.append(str(markdown))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary and summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(md + "\n")
            written.append(summary)
        except OSError:
            pass  # a courtesy; the verdict stands
    return written


def enforce(res: LatencyGateResult) -> None:
    if res.passed:
        return
    shown = "; ".join(f"{r.name} ({r.reason})" for r in res.failed[:6])
    more = f"; and {len(res.failed) - 6} more" if len(res.failed) > 6 else ""
    raise GateFailure(f"{res.summary_line()}: {shown}{more}", "See the table (or --markdown/--junit output)")
