"""`edgepipe check`: the CI gate. eval.json x budgets -> pass/fail rows, JUnit XML, Markdown.

Budgets follow Olive's evaluator shape: a typed config holding, per metric, a goal of type
"max degradation" (the largest allowed drop, in percentage points, of the artifact against the
source model on the same images), with overrides by precision, format or artifact id
(most specific wins: artifact id > precision > format > default).

    GateConfig(budgets=[Budget("top1", 1.0, {"int8": 1.5})], require_verified=True)

Rows
    * one per (artifact, target, metric) that eval ran, judged by the drop's interval from the
      paired counts eval.json records (pipeline/fidelity/stats.py; ``confidence``, default 0.95):
      pass when the whole interval is within the budget; fail when the drop is over the budget
      (or, with ``max_class_drop``, one class's interval lies wholly over that); inconclusive when
      the drop is within the budget but the interval reaches past it (the set is too small to show
      it), which fails the gate unless ``allow_inconclusive``. Rows of an eval.json written without
      counts are judged by their point estimate, as before, with a note;
    * one per bench row of a bench.json beside eval.json whose outputs were checked: fail for a
      ``wrong-output`` row (its target computes wrong answers);
    * an artifact whose export failed, or whose evaluation errored: fail;
    * targets eval skipped (runtime unavailable here): listed as skipped, never fail;
    * ``require_verified``: one row per artifact, fail unless verification passed;
    * ``require_full_edgetpu``: one row per artifact carrying ``extra["edgetpu"]``, fail when
      any op would run on the CPU (``edgepipe.devices.edgetpu.require_full_edgetpu``).
The gate fails (``GateFailure``, exit 1) when any row fails (or is inconclusive, unless allowed).
Before any row, the baseline is checked: a source model that does no better than guessing on the eval set (wrong class mapping
or preprocessing, almost always) makes every drop meaningless, so check refuses it (exit 2),
unless the model is untrained on purpose (a built-in exported with ``--weights none``), where
it warns instead. TensorFlow-free.
"""
from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from edgepipe.devices.graph.edgetpu import require_full_edgetpu
from edgepipe.export.base import PRECISIONS
from edgepipe.pipeline.base.bench import WRONG_OUTPUT, BenchReport
from edgepipe.pipeline.base.errors import GateFailure, UserError
from edgepipe.pipeline.base.evaluation import METRIC_LABELS, METRICS, EvalResult, EvalRow, load_eval
from edgepipe.pipeline.base.manifest import Manifest, load_manifest
from edgepipe.pipeline.base.recorded import Recorded
from edgepipe.pipeline.base.util import write_text_atomic
from edgepipe.pipeline.fidelity.stats import drop_from_counts

EPS = 1e-9
DEFAULT_CONFIDENCE = 0.95
BENCH_NAME = "bench.json"


@dataclass
class Budget:
    """Max degradation of one metric, in percentage points, with per-selector overrides."""

    metric: str = "top1"
    max_drop: float = 1.0
    overrides: dict[str, float] = field(default_factory=dict)  # artifact id | precision | format -> points

    def __post_init__(self):
        if self.metric not in METRICS:
            raise UserError(f"unknown metric '{self.metric}'", f"Use one of: {', '.join(METRICS)}")
        for k, v in [("default", self.max_drop), *self.overrides.items()]:
            flag = "--max-drop" if k == "default" else f"--max-drop-for {k}="
            shown = f"{flag} {v}" if k == "default" else f"{flag}{v}"
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                raise UserError(f"{shown} is not a number of percentage points",
                                "Give the largest allowed drop, e.g. --max-drop 1.0")
            if v < 0:
                raise UserError(f"{shown} is negative: a budget is the largest drop allowed, in points, "
                                "so a negative one could never pass",
                                "Give 0 or more, e.g. --max-drop 1.0 (one point of top-1)")

    def for_artifact(self, artifact_id: str, fmt: str, precision: str) -> tuple[float, str]:
        """(budget, where it came from)."""
        for key in (artifact_id, precision, fmt):
            if key in self.overrides:
                return float(self.overrides[key]), key
        return float(self.max_drop), "default"


@dataclass
class GateConfig:
    budgets: list[Budget] = field(default_factory=lambda: [Budget()])
    require_verified: bool = False
    require_full_edgetpu: bool = False
    allow_chance_source: bool = False  # gate even when the source model does not beat guessing on the set
    confidence: float = DEFAULT_CONFIDENCE  # of each drop's interval
    max_class_drop: Optional[float] = None  # fail when one class's drop interval lies wholly over this (points)
    allow_inconclusive: bool = False  # an inconclusive row passes with a warning instead of failing the gate

    def __post_init__(self):
        if not isinstance(self.confidence, (int, float)) or not 0.5 < self.confidence < 1.0:
            raise UserError(f"--confidence {self.confidence} is not a level between 0.5 and 1",
                            "Give the interval's confidence level, e.g. --confidence 0.95")
        if self.max_class_drop is not None and (math.isnan(self.max_class_drop) or self.max_class_drop < 0):
            raise UserError(f"--max-class-drop {self.max_class_drop} is not a non-negative number of points",
                            "Give the largest drop one class may show, e.g. --max-class-drop 5")


@dataclass
class CheckRow:
    artifact: str
    format: str
    precision: str
    check: str  # top1 | top5 | agreement | verified | edgetpu | export | eval
    target: Optional[str] = None
    runtime: Optional[str] = None
    source_value: Optional[float] = None
    artifact_value: Optional[float] = None
    drop: Optional[float] = None
    budget: Optional[float] = None
    budget_from: Optional[str] = None
    status: str = "pass"  # pass | fail | inconclusive | skipped
    reason: Optional[str] = None
    # the statistics (rows judged from image counts; None for an eval.json written without them)
    samples: Optional[int] = None
    low: Optional[float] = None  # the drop's interval, points
    high: Optional[float] = None
    confidence: Optional[float] = None
    verdict: Optional[str] = None  # pass | fail | inconclusive: the interval against the budget
    needed: Optional[int] = None  # inconclusive: images at which the interval would clear the budget
    worst_class: Optional[dict] = None  # {cls, n, drop, low, high, lost, gained}

    def interval_text(self) -> str:
        if self.low is None or self.high is None:
            return "-"
        return f"[{self.low:.2f}, {self.high:.2f}]"

    @property
    def name(self) -> str:
        where = f" on {self.target}" if self.target else ""
        what = METRIC_LABELS.get(self.check, self.check)
        return f"{self.artifact}{where}: {what}"


@dataclass
class CheckResult:
    model: str
    folder: str
    dataset: dict
    config: GateConfig
    rows: list[CheckRow]
    warnings: list[str] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # report files written (JUnit, Markdown, step summary)
    latency: Optional[Any] = None  # the latency gate's result (ledger.LatencyGateResult) when check had a baseline
    ledger: Optional[Recorded] = None  # where this check was recorded
    notes: list[str] = field(default_factory=list)  # how rows were judged, for the reader (not warnings)

    @property
    def failed(self) -> list[CheckRow]:
        """The rows that fail the gate: failed ones, and inconclusive ones unless allowed."""
        return [r for r in self.rows if r.status == "fail"
                or (r.status == "inconclusive" and not self.config.allow_inconclusive)]

    @property
    def inconclusive(self) -> list[CheckRow]:
        return [r for r in self.rows if r.status == "inconclusive"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        passed = self.passed and (self.latency is None or self.latency.passed)  # both gates: what the exit code says
        return {"model": self.model, "folder": self.folder, "passed": passed,
                "failed": len(self.failed), "checks": len(self.rows),
                "skipped": sum(r.status == "skipped" for r in self.rows),
                "dataset": self.dataset, "config": asdict(self.config),
                "rows": [asdict(r) | {"name": r.name} for r in self.rows], "warnings": list(self.warnings),
                "notes": list(self.notes),
                **({"latency": self.latency.to_dict()} if self.latency is not None else {}),
                **({"ledger": self.ledger.to_dict()} if self.ledger is not None else {})}

    def summary_line(self) -> str:
        n = len([r for r in self.rows if r.status != "skipped"])
        unsure = len(self.inconclusive)
        if self.passed:
            return f"{self.model}: all {n} checks passed" + (f" ({unsure} inconclusive, allowed)" if unsure else "")
        fails = sum(r.status == "fail" for r in self.rows)
        if not fails:
            return f"{self.model}: {unsure} of {n} checks inconclusive (too few images to show the budget holds)"
        return f"{self.model}: {fails} of {n} checks failed" + (f", {unsure} inconclusive" if unsure else "")


# --------------------------------------------------------------------------- parsing
def parse_overrides(items: Optional[Sequence[str]], m: Optional[Manifest] = None) -> dict[str, float]:
    """["int8=1.5", "onnx-int8=2"] -> {"int8": 1.5, "onnx-int8": 2.0}; selectors checked against the manifest."""
    out: dict[str, float] = {}
    for raw in items or []:
        for item in (s.strip() for s in raw.split(",")):
            if not item:
                continue
            mt = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*=\s*(-?[0-9]*\.?[0-9]+)", item)
            if not mt:
                raise UserError(f"malformed --max-drop-for '{item}'",
                                "Write SELECTOR=POINTS, e.g. --max-drop-for int8=1.5 (selector: precision, format or artifact id)")
            key, val = mt.group(1), float(mt.group(2))
            if val < 0:
                raise UserError(f"--max-drop-for {item} is negative: a budget is the largest drop allowed, in points",
                                "Give 0 or more, e.g. --max-drop-for int8=1.5")
            if m is not None:
                known = set(PRECISIONS) | {a.format for a in m.artifacts} | {a.id for a in m.artifacts}
                if key not in known:
                    raise UserError(f"--max-drop-for '{key}' matches no precision, format or artifact",
                                    f"Use one of: {', '.join(sorted(known))}")
            out[key] = val
    return out


def parse_metrics(spec: Optional[str]) -> list[str]:
    ms = [s.strip().lower().replace("-", "") for s in (spec or "top1").split(",") if s.strip()]
    for mt in ms:
        if mt not in METRICS:
            raise UserError(f"unknown metric '{mt}'", f"Use one of: {', '.join(METRICS)}")
    return list(dict.fromkeys(ms))


# --------------------------------------------------------------------------- the gate
def run_check(model_dir: str | os.PathLike, config: GateConfig) -> CheckResult:
    m, folder = load_manifest(model_dir)
    ev, ev_path = load_eval(folder)
    _check_fresh(m, ev, ev_path)
    warnings = _check_baseline(m, ev, config.allow_chance_source)
    by_art: dict[str, list[EvalRow]] = {}
    for r in ev.results:
        by_art.setdefault(r.artifact, []).append(r)
    rows: list[CheckRow] = []
    for a in m.artifacts:
        if not a.path:
            rows.append(CheckRow(a.id, a.format, a.precision, "export", status="fail",
                                 reason=f"export failed: {a.error or a.status}"))
            continue
        for r in by_art.get(a.id, []):
            rows.extend(_eval_rows(a, r, ev.source or {}, config))
        if config.require_verified:
            v = a.verification
            ok = v.status == "passed"
            rows.append(CheckRow(a.id, a.format, a.precision, "verified", None, v.checker, status="pass" if ok else "fail",
                                 reason=None if ok else f"verification {v.status}" + (f": {v.reason}" if v.reason else "")))
    if config.require_full_edgetpu:
        rows.extend(_edgetpu_rows(m))
    out_rows, out_warnings = _output_rows(m, folder)
    rows.extend(out_rows)
    res = CheckResult(m.model.name, str(folder), ev.dataset, config, rows, warnings + out_warnings,
                      notes=_count_notes(rows))
    if config.allow_inconclusive and res.inconclusive:
        res.warnings.append(f"{len(res.inconclusive)} check(s) inconclusive, passed because of --allow-inconclusive: "
                            "the eval set is too small to show their drops are within the budget")
    return res


def _count_notes(rows: list[CheckRow]) -> list[str]:
    old = [r for r in rows if r.check in METRICS and r.status != "skipped" and r.drop is not None and r.confidence is None]
    if not old:
        return []
    return [f"{len(old)} drop(s) judged by the point estimate alone: eval.json carries no image counts for them "
            "(written by an older edgepipe); re-run `edgepipe eval` for intervals and the inconclusive verdict"]


def _output_rows(m: Manifest, folder: Path) -> tuple[list[CheckRow], list[str]]:
    """bench.json beside eval.json: a row whose outputs disagree with the CPU's (status wrong-output) fails;
    rows whose outputs were checked and agree pass."""
    path = folder / BENCH_NAME
    if not path.is_file():
        return [], []
    try:
        bench = BenchReport.load(path)
    except UserError as e:
        return [], [f"{BENCH_NAME} not read: {e.message}"]
    arts = {a.id: a for a in m.artifacts if a.path}
    rows, stale = [], []
    for b in bench.rows:
        a = arts.get(b.artifact)
        check = (b.agreement or {}).get("check")
        if a is None or (b.status != WRONG_OUTPUT and not check):
            continue
        if a.size_bytes and b.size_bytes and a.size_bytes != b.size_bytes:
            stale.append(f"{b.artifact} on {b.target}")
            continue
        where = b.target if b.device in (None, "local") else f"{b.target}@{b.device}"
        ok = b.status != WRONG_OUTPUT
        rows.append(CheckRow(a.id, a.format, a.precision, "outputs", where, b.runtime, status="pass" if ok else "fail",
                             reason=None if ok else f"bench: {b.reason or 'outputs disagree'} ({BENCH_NAME})"))
    warn = [f"{BENCH_NAME} is stale for {', '.join(stale)} (the artifact changed since the bench): re-run "
            "`edgepipe bench`"] if stale else []
    return rows, warn


def _eval_rows(a, r: EvalRow, source: dict, config: GateConfig) -> list[CheckRow]:
    """One eval row -> its check rows: skipped, failed evaluation, or one per budget."""
    if r.status == "skipped":
        return [CheckRow(a.id, a.format, a.precision, "eval", r.where, r.runtime, status="skipped", reason=r.reason)]
    if r.status != "ok":
        return [CheckRow(a.id, a.format, a.precision, "eval", r.where, r.runtime, status="fail",
                         reason=f"evaluation failed: {r.reason}")]
    out = []
    for b in config.budgets:
        budget, origin = b.for_artifact(a.id, a.format, a.precision)
        src_v = 100.0 if b.metric == "agreement" else source[b.metric]
        row = CheckRow(a.id, a.format, a.precision, b.metric, r.where, r.runtime, src_v, getattr(r, b.metric),
                       r.drop[b.metric], budget, origin)
        counts = r.flips(b.metric)
        if counts is None:
            _judge_point(row, r)
        else:
            _judge_interval(row, counts, config)
        out.append(row)
    return out


def _judge_point(row: CheckRow, r: EvalRow) -> None:
    """An eval.json row without image counts: the point estimate against the budget, as before intervals."""
    assert row.drop is not None and row.budget is not None
    if row.drop <= row.budget + EPS:
        return
    row.status = "fail"
    row.reason = (f"{METRIC_LABELS[row.check]} drop {row.drop:.2f} > budget {_pts(row.budget)} points"
                  f" ({r.lost or 0} images lost, {r.gained or 0} gained)")


def _judge_interval(row: CheckRow, counts: tuple[int, int, int, list], config: GateConfig) -> None:
    """The drop's interval from the paired counts against the budget (pipeline/fidelity/stats.py):
    pass when the whole interval is within it; fail when the interval lies over it, when the point
    estimate is over it, or when one class's interval lies over ``max_class_drop``; else inconclusive."""
    n, lost, gained, per_class = counts
    assert row.budget is not None
    res = drop_from_counts(n, lost, gained, metric="agreement" if row.check == "agreement" else "top1",
                           per_class=[tuple(c) for c in per_class], confidence=config.confidence,
                           budget=row.budget, class_budget=config.max_class_drop)
    row.samples, row.low, row.high, row.confidence = n, res.low, res.high, config.confidence
    row.verdict, row.worst_class = res.verdict, res.worst_class.to_dict() if res.worst_class else None
    over = row.drop is not None and row.drop > row.budget + EPS
    if res.verdict == "pass":
        return
    row.needed = res.needed
    row.status = "fail" if res.verdict == "fail" or over else "inconclusive"
    what = "disagreement" if row.check == "agreement" else f"{METRIC_LABELS[row.check]} drop"
    flips = f"{lost} disagree" if row.check == "agreement" else f"{lost} lost, {gained} gained"
    head = (f"{what} {row.drop:.2f} > budget {_pts(row.budget)} points" if over
            else f"{what} {row.drop:.2f}, within the budget of {_pts(row.budget)} points,")
    pct = f"{100 * config.confidence:g}%"
    bad = [c for c in res.per_class if config.max_class_drop is not None and c.low > config.max_class_drop + EPS]
    if res.verdict == "fail" and not over and bad:  # a class over --max-class-drop
        c = bad[0]
        row.reason = (f"class {c.cls} drops {c.drop:.1f} [{c.low:.1f}, {c.high:.1f}] points on its {c.n} images, "
                      f"over --max-class-drop {_pts(config.max_class_drop or 0.0)} ({pct} interval)")
    elif res.verdict == "fail":
        row.reason = f"{head} ({flips} of {n} images; {pct} interval {row.interval_text()} lies over the budget)"
    else:
        more = (f"about {res.needed} images at these rates would show it is {'over' if over else 'under'} the budget"
                if res.needed else "the observed drop sits on the budget")
        row.reason = (f"{head} but its {pct} interval {row.interval_text()} ({flips} of {n} images) reaches past "
                      f"it: {more}")


def _check_fresh(m: Manifest, ev: EvalResult, ev_path: Path) -> None:
    if ev.source is None:
        raise UserError(f"{ev_path} evaluated a standalone file, without a source model to compare with",
                        f"Run `edgepipe eval {ev_path.parent} --data ...` on the export folder first")
    evaluated: dict[str, Optional[str]] = {}
    for r in ev.results:
        evaluated.setdefault(r.artifact, r.sha256)
    for a in m.artifacts:
        if not a.path:
            continue
        if a.id not in evaluated:
            raise UserError(f"{ev_path} has no results for artifact {a.id} (exported after the evaluation?)",
                            f"Re-run `edgepipe eval {ev_path.parent} --data ...`")
        if a.sha256 and evaluated[a.id] and evaluated[a.id] != a.sha256:
            raise UserError(f"{ev_path} is stale: {a.id} changed since it was evaluated",
                            f"Re-run `edgepipe eval {ev_path.parent} --data ...`")


def _check_baseline(m: Manifest, ev: EvalResult, allow: bool = False) -> list[str]:
    """Refuse a source model at chance level on the eval set (warn for an untrained built-in)."""
    why = ev.at_chance()
    if why is None:
        return []
    if not m.model.trained:
        return [f"{why}: expected, the source model is untrained (exported with --weights none), so the drops "
                "only measure what conversion changes"]
    if allow:
        return [f"{why}: gating anyway (--allow-chance-source)"]
    raise UserError(f"{why}, so every drop against it is meaningless (eval data: {_dataset_line(ev.dataset)})",
                    "The labels probably do not match the model's classes, or the preprocessing is wrong: check "
                    "`eval --labels-map` (or `export --labels`) and `export --preprocess`, then re-run `edgepipe eval` "
                    "(or pass --allow-chance-source to gate on this baseline anyway)")


def _edgetpu_rows(m: Manifest) -> list[CheckRow]:
    rows = []
    for a in m.artifacts:
        report = (a.extra or {}).get("edgetpu")
        if not report:
            continue
        try:
            require_full_edgetpu(report)
            counts = report.get("counts") or {}
            rows.append(CheckRow(a.id, a.format, a.precision, "edgetpu", "edgetpu", status="pass",
                                 artifact_value=counts.get("edgetpu"), source_value=counts.get("total")))
        except GateFailure as e:
            rows.append(CheckRow(a.id, a.format, a.precision, "edgetpu", "edgetpu", status="fail",
                                 reason=e.message.splitlines()[0]))
    if not rows:
        ids = ", ".join(a.id for a in m.artifacts) or "none"
        raise UserError(f"--require-full-edgetpu: no artifact carries an Edge TPU analysis (artifacts: {ids})",
                        "Export one with `edgepipe export ... --int8 --targets edgetpu` (or --formats edgetpu), "
                        "or drop --require-full-edgetpu")
    return rows


# --------------------------------------------------------------------------- reports
def points_text(v: float) -> str:
    """1 -> '1.0', 1.25 -> '1.25': budgets as the user wrote them, never '1 points'."""
    return f"{v:.1f}" if abs(v * 10 - round(v * 10)) < 1e-9 else f"{v:g}"


_pts = points_text


def _fmt(v: Optional[float], nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _dataset_line(ds: dict) -> str:
    src = ds.get("source", "?")
    where = ds.get("location") or ""
    split = f" {ds['split']} split" if ds.get("split") else ""
    return f"{src}{split}{' ' + where if where and src == 'folder' else ''}, {ds.get('samples', '?')} images"


def _budget_line(cfg: GateConfig) -> str:
    parts = []
    for b in cfg.budgets:
        s = f"{METRIC_LABELS[b.metric]} max drop {_pts(b.max_drop)} points"
        if b.overrides:
            s += " (" + ", ".join(f"{k}: {_pts(v)}" for k, v in b.overrides.items()) + ")"
        parts.append(s)
    parts.append(f"{100 * cfg.confidence:g}% intervals from the paired predictions; an interval reaching past "
                 f"the budget is inconclusive ({'allowed' if cfg.allow_inconclusive else 'fails the gate'})")
    if cfg.max_class_drop is not None:
        parts.append(f"no class over {_pts(cfg.max_class_drop)} points")
    if cfg.require_verified:
        parts.append("verification must pass")
    if cfg.require_full_edgetpu:
        parts.append("Edge TPU artifacts fully mapped")
    return "; ".join(parts)


def _status_text(res: CheckResult, r: CheckRow) -> str:
    if r.status == "inconclusive":
        return "⚠️ inconclusive" + (" (allowed)" if res.config.allow_inconclusive else "")
    return {"pass": "✅ pass", "fail": "❌ FAIL", "skipped": "⏭️ skipped"}[r.status]


def _interval_cell(r: CheckRow) -> str:
    if r.low is None:
        return "-"
    worst = r.worst_class
    cls = f"; worst class {worst['cls']}: {worst['drop']:.1f}" if worst and worst["drop"] > 0 else ""
    return f"{r.interval_text()} ({r.samples} images{cls})"


def render_markdown(res: CheckResult) -> str:
    fails, unsure = sum(r.status == "fail" for r in res.rows), len(res.inconclusive)
    head = "✅ passed" if res.passed else f"❌ {fails} failed" if fails else f"⚠️ {unsure} inconclusive"
    pct = f"{100 * res.config.confidence:g}%"
    lines = [f"### edgepipe check: {res.model}: {head}", "",
             f"Budgets: {_budget_line(res.config)}. Data: {_dataset_line(res.dataset)}.", "",
             f"| artifact | target | check | source | artifact | drop | budget | result | {pct} interval |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in res.rows:
        budget = "-" if r.budget is None else _pts(r.budget) + (f" ({r.budget_from})" if r.budget_from not in (None, "default") else "")
        lines.append(f"| {r.artifact} | {r.target or '-'} | {METRIC_LABELS.get(r.check, r.check)} | "
                     f"{_fmt(r.source_value)} | {_fmt(r.artifact_value)} | {_fmt(r.drop)} | {budget} | "
                     f"{_status_text(res, r)} | {_interval_cell(r)} |")
    for w in res.warnings:
        lines[2:2] = [f"> ⚠️ **warning:** {_md_escape(w)}", ""]
    notes = [r for r in res.rows if r.reason and r.status != "pass"]
    if notes:
        lines.append("")
        for r in notes:
            lines.append(f"- **{r.name}**: {_md_escape(r.reason)}")
    lines += ["", *(f"> {_md_escape(n)}" for n in res.notes)] if res.notes else []
    return "\n".join(lines) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_junit(res: CheckResult) -> str:
    n_fail = len(res.failed)
    n_skip = sum(r.status == "skipped" for r in res.rows)
    suites = ET.Element("testsuites", name="edgepipe check", tests=str(len(res.rows)), failures=str(n_fail),
                        errors="0", skipped=str(n_skip))
    suite = ET.SubElement(suites, "testsuite", name=f"edgepipe check: {res.model}", tests=str(len(res.rows)),
                          failures=str(n_fail), errors="0", skipped=str(n_skip))
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="budgets", value=_budget_line(res.config))
    ET.SubElement(props, "property", name="data", value=_dataset_line(res.dataset))
    for r in res.rows:
        tc = ET.SubElement(suite, "testcase", classname=f"edgepipe.{res.model}.{r.artifact}", name=r.name)
        detail = (f"source {_fmt(r.source_value)}, artifact {_fmt(r.artifact_value)}, drop {_fmt(r.drop)}, "
                  f"budget {'-' if r.budget is None else _pts(r.budget)}")
        if r.low is not None:
            detail += f", {100 * (r.confidence or 0):g}% interval {_interval_cell(r)}, verdict {r.verdict}"
        if r.status == "fail" or (r.status == "inconclusive" and not res.config.allow_inconclusive):
            kind = "inconclusive" if r.status == "inconclusive" else r.check
            f = ET.SubElement(tc, "failure", message=r.reason or "failed", type=f"edgepipe.{kind}")
            f.text = detail
        elif r.status == "skipped":
            ET.SubElement(tc, "skipped", message=r.reason or "skipped")
        else:
            ET.SubElement(tc, "system-out").text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_reports(res: CheckResult, junit: Optional[str | os.PathLike] = None,
                  markdown: Optional[str | os.PathLike] = None, step_summary: bool = True) -> list[str]:
    """Write the JUnit and Markdown files asked for; append the Markdown to $GITHUB_STEP_SUMMARY when set."""
    written = []
    md = None
    if junit:
        write_text_atomic(junit, render_junit(res))
        written.append(str(junit))
    if markdown:
        md = render_markdown(res)
        write_text_atomic(markdown, md)
        written.append(str(markdown))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary and summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write((md or render_markdown(res)) + "\n")
            written.append(summary)
        except OSError:
            pass  # the summary is a courtesy; the gate's verdict stands
    return written


def enforce(res: CheckResult) -> None:
    """Raise GateFailure naming the failing rows."""
    if res.passed:
        return
    shown = "; ".join(f"{r.name} ({r.reason})" for r in res.failed[:6])
    more = f"; and {len(res.failed) - 6} more" if len(res.failed) > 6 else ""
    raise GateFailure(f"{res.summary_line()}: {shown}{more}",
                      "See the table above (or --markdown/--junit output)")
