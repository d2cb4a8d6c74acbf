"""Benchmark reports people read and CI consumes.

* ``bench.json`` - the BenchReport itself (schema-versioned, host facts, every figure)
* ``bench.md``   - a Markdown summary ready for a CI step summary ($GITHUB_STEP_SUMMARY)
* ``bench.html`` - one self-contained page (no network, no script): inline SVG plots of latency
  per artifact per target with the p50-p90 range, size per artifact, latency against size,
  then the full table, the reasons for every row that did not run, and the top ops when profiled.

``compare(old, new)`` matches rows by (artifact, target, runtime) and reports the ratio of the
medians; a change beyond the threshold is flagged, and called significant only when the two
95 % confidence intervals of the median do not overlap. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from edgepipe.pipeline.base.bench import WRONG_OUTPUT, BenchReport, BenchRow
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.util import nice_ticks, write_text_atomic

TARGET_COLORS = {"cpu": "#1f77b4", "gpu": "#d62728", "edgetpu": "#2ca02c", "reference": "#9467bd"}
STATUS_ICON = {"ok": "ok", WRONG_OUTPUT: "WRONG OUTPUT", "failed": "FAILED", "skipped": "skipped",
               "unavailable": "unavailable"}


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------
@dataclass
class Change:
    artifact: str
    target: str
    runtime: str
    verdict: str  # regression | improvement | unchanged | new | missing | not comparable
    old_p50: Optional[float] = None
    new_p50: Optional[float] = None
    ratio: Optional[float] = None  # new / old (> 1 is slower)
    significant: Optional[bool] = None  # the 95 % CIs of the medians do not overlap
    note: Optional[str] = None


@dataclass
class Comparison:
    threshold: float
    changes: list[Change] = field(default_factory=list)
    same_host: bool = True
    notes: list[str] = field(default_factory=list)
    old_created: Optional[str] = None
    new_created: Optional[str] = None

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "regression"]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "improvement"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["regressions"] = len(self.regressions)
        d["improvements"] = len(self.improvements)
        return d


def compare(old: BenchReport, new: BenchReport, threshold: float = 0.10) -> Comparison:
    """Ratio of medians per (artifact, target, runtime); beyond ``threshold`` (0.10 = 10 %) is flagged."""
    if not (0 < threshold < 10):
        raise UserError(f"threshold {threshold} is out of range", "Use a fraction such as 0.1 for 10 %")
    cmp = Comparison(threshold=threshold, old_created=old.created, new_created=new.created)
    oc, nc = (old.host or {}).get("cpu", {}), (new.host or {}).get("cpu", {})
    if oc.get("model") != nc.get("model") or (old.host or {}).get("hostname") != (new.host or {}).get("hostname"):
        cmp.same_host = False
        cmp.notes.append(f"different hosts: {oc.get('model')} ({(old.host or {}).get('hostname')}) -> "
                         f"{nc.get('model')} ({(new.host or {}).get('hostname')}); ratios mix host and model changes")
    for k in ("threads", "runs", "min_seconds"):
        a, b = (old.settings or {}).get(k), (new.settings or {}).get(k)
        if a != b:
            cmp.notes.append(f"settings differ: {k} {a} -> {b}")
    olds = {r.key: r for r in old.rows}
    news = {r.key: r for r in new.rows}
    for key, nr in news.items():
        orow = olds.get(key)
        c = Change(artifact=nr.artifact, target=nr.target, runtime=nr.runtime, verdict="new",
                   new_p50=nr.stat("p50"))
        if orow is None:
            c.note = "not in the old report"
        elif not (orow.ok and nr.ok):
            c.verdict = "not comparable"
            c.old_p50 = orow.stat("p50")
            c.note = f"old {orow.status}, new {nr.status}"
        else:
            o, n = orow.stat("p50"), nr.stat("p50")
            c.old_p50 = o
            if not o or not n:
                c.verdict, c.note = "not comparable", "no median"
            else:
                c.ratio = n / o
                oci, nci = orow.latency_ms.get("ci95_p50"), nr.latency_ms.get("ci95_p50")
                if oci and nci:
                    c.significant = bool(nci[0] > oci[1] or nci[1] < oci[0])
                if c.ratio > 1 + threshold:
                    c.verdict = "regression"
                elif c.ratio < 1 / (1 + threshold):
                    c.verdict = "improvement"
                else:
                    c.verdict = "unchanged"
                if c.verdict != "unchanged" and c.significant is False:
                    c.note = "within noise: the confidence intervals overlap"
        cmp.changes.append(c)
    for key, orow in olds.items():
        if key not in news:
            cmp.changes.append(Change(artifact=orow.artifact, target=orow.target, runtime=orow.runtime,
                                      verdict="missing", old_p50=orow.stat("p50"), note="not in the new report"))
    return cmp


# ---------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------
def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _mb(nbytes: Optional[float]) -> str:
    return "-" if not nbytes else f"{nbytes / 1e6:.2f}"


def _kb_to_mb(kb: Optional[float]) -> str:
    return "-" if not kb else f"{kb / 1024:.0f}"


def _placement_text(r: BenchRow) -> str:
    p = r.placement or {}
    if not p:
        return "-"
    acc = p.get("accelerator")
    if p.get("fully_accelerated") is True:
        tot = p.get("ops_total")
        return f"all on {acc}" + (f" ({tot} ops)" if tot else "")
    if "ops_fallback" in p and p.get("ops_fallback") is not None and acc:
        fb = p.get("fallback_ops") or {}
        names = ", ".join(list(fb)[:3]) if isinstance(fb, dict) else ""
        return f"{p.get('ops_accelerated', '?')} on {acc}, {p['ops_fallback']} on CPU" + (f" ({names})" if names else "")
    if p.get("fully_accelerated") is False:
        return f"partly on {acc}"
    if acc is None and p.get("providers"):
        return "CPU"
    return str(acc or "-")


def _agreement_text(r: BenchRow) -> str:
    a = r.agreement or {}
    if "max_abs" not in a:
        return "-"
    s = f"max|Δ| {a['max_abs']:.2g}"
    if "top1_agreement" in a:
        s += f", top-1 {100 * a['top1_agreement']:.0f}%"
    return s


def _ci_text(r: BenchRow) -> str:
    ci = (r.latency_ms or {}).get("ci95_p50")
    return f"{_ms(ci[0])}–{_ms(ci[1])}" if ci else "-"


def _host_line(rep: BenchReport) -> str:
    h = rep.host or {}
    cpu = h.get("cpu", {})
    isa = ", ".join(cpu.get("isa", []))  # all of them: `edgepipe devices` shows the same list
    return (f"{cpu.get('model', '?')} ({cpu.get('arch', '?')}, {cpu.get('usable_cores', '?')} usable cores"
            + (f"; {isa}" if isa else "") + f"), {h.get('os', '?')}, Python {h.get('python', '?')}")


def _versions_line(rep: BenchReport) -> str:
    v = (rep.host or {}).get("versions", {})
    return ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "numpy")


def _multi_device(rep: BenchReport) -> bool:
    """Rows from a registered device (ssh/adb, devices/remote/): show a Device column."""
    return any(getattr(r, "device", "local") != "local" for r in rep.rows)


def _where(r: BenchRow) -> str:
    """'cpu', or 'cpu @ pi4' for a row measured on a registered device."""
    d = getattr(r, "device", "local")
    return r.target if d == "local" else f"{r.target} @ {d}"


def _device_lines(rep: BenchReport) -> list[str]:
    """'name (url): host line' for every device of a report with remote rows."""
    if not _multi_device(rep):
        return []
    out = []
    for name, ident in (rep.devices or {}).items():
        h = ident.get("host") if isinstance(ident.get("host"), dict) else (rep.host if len(rep.devices) == 1 else {})
        where = ident.get("url") or ("this host" if ident.get("kind") == "local" else "?")
        line = _host_line(SimpleNamespace(host=h)) if h and h.get("cpu") else (ident.get("error") or "no facts")
        vers = _versions_line(SimpleNamespace(host=h)) if h else ""
        out.append(f"{name} ({where}): {line}" + (f"; {vers}" if vers else ""))
    return out


def wrong_output_lines(rep: BenchReport) -> list[str]:
    """One line per wrong-output row, with its figures: what every report shows first."""
    out = []
    for r in rep.wrong_output_rows():
        chk = (r.agreement or {}).get("check") or {}
        top1 = chk.get("top1_agreement")
        figs = ", ".join(x for x in (
            f"top-1 agreement with {chk.get('against', 'cpu')} {100 * top1:.0f}%" if top1 is not None else "",
            f"output correlation {chk['centered']:.3f}" if chk.get("centered") is not None else "",
            f"max |Δ| {chk['max_abs']:.3g}" if chk.get("max_abs") is not None else "",
            f"on {chk.get('samples')} inputs" if chk.get("samples") else "") if x)
        p50 = r.stat("p50")
        timed = f"; it ran at p50 {_ms(p50)} ms, which is no speed figure for wrong answers" if p50 else ""
        out.append(f"{r.artifact} on {_where(r)} ({r.runtime}): WRONG OUTPUT: {figs}{timed}")
    return out


def _sorted_rows(rep: BenchReport) -> list[BenchRow]:
    order = {"cpu": 0, "gpu": 1, "edgetpu": 2}
    arts = []
    for r in rep.rows:
        if r.artifact not in arts:
            arts.append(r.artifact)
    devs = []
    for r in rep.rows:
        if getattr(r, "device", "local") not in devs:
            devs.append(getattr(r, "device", "local"))
    return sorted(rep.rows, key=lambda r: (r.status != WRONG_OUTPUT, devs.index(getattr(r, "device", "local")),
                                           arts.index(r.artifact), order.get(r.target, 9)))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(rep: BenchReport, comparison: Optional[Comparison] = None) -> str:
    s = rep.settings or {}
    c = rep.counts()
    out = [f"## edgepipe bench: {rep.model.get('name', '?')}", ""]
    wrong = wrong_output_lines(rep)
    if wrong:
        out += ["### ❌ Wrong outputs: these rows compute wrong answers, so they have no speed figure", ""]
        out += [f"- **{_md_escape(w)}**" for w in wrong] + [""]
    out.append(f"{c.get('ok', 0)} measured, {c.get(WRONG_OUTPUT, 0)} wrong output, {c.get('failed', 0)} failed, "
               f"{c.get('skipped', 0)} skipped, {c.get('unavailable', 0)} unavailable · {rep.created or ''}")
    out.append("")
    out.append(f"- **Host:** {_md_escape(_host_line(rep))}")
    out += [f"- **Device:** {_md_escape(d)}" for d in _device_lines(rep)]
    out.append(f"- **Runtimes:** {_md_escape(_versions_line(rep))}")
    out.append(f"- **Method:** each row in a fresh process; ≥ {s.get('runs')} runs and ≥ {s.get('min_seconds')} s "
               f"after {s.get('warmup')} warm-up runs; {s.get('threads')} threads; timed = write inputs + run + "
               f"read outputs; inputs: {s.get('inputs', '?')}")
    gpu = (rep.targets or {}).get("gpu", {}).get("tflite", {})
    if gpu.get("note"):
        out.append(f"- **GPU:** {_md_escape(gpu['note'])}")
    out.append("")
    multi = _multi_device(rep)
    out.append(("| Device " if multi else "") + "| Artifact | Target | Runtime | Status | p50 ms | 95% CI | p90 ms "
               "| p99 ms | Runs | Load ms | First ms | Peak RSS MB | Size MB | Placement | vs CPU |")
    out.append(("|---" if multi else "") + "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in _sorted_rows(rep):
        if r.ok:
            lat = r.latency_ms
            out.append(
                (f"| {_md_escape(r.device)} " if multi else "") +
                f"| {_md_escape(r.artifact)} | {r.target} | {_md_escape(r.runtime)} | ok | **{_ms(lat.get('p50'))}** "
                f"| {_ci_text(r)} | {_ms(lat.get('p90'))} | {_ms(lat.get('p99'))} | {lat.get('n', '-')} "
                f"| {_ms(r.load_ms)} | {_ms(r.first_ms)} | {_kb_to_mb(r.memory.get('peak_rss_kb'))} "
                f"| {_mb(r.size_bytes)} | {_md_escape(_placement_text(r))} | {_md_escape(_agreement_text(r))} |")
        else:
            out.append((f"| {_md_escape(r.device)} " if multi else "") +
                       f"| {_md_escape(r.artifact)} | {r.target} | {_md_escape(r.runtime)} | {STATUS_ICON[r.status]} "
                       f"| - | - | - | - | - | - | - | - | {_mb(r.size_bytes)} | - "
                       f"| {_md_escape(_agreement_text(r)) if r.status == WRONG_OUTPUT else '-'} |")
    not_run = [r for r in _sorted_rows(rep) if not r.ok and r.status != WRONG_OUTPUT]
    if not_run:
        out += ["", "### Rows that did not run", ""]
        for r in not_run:
            sig = f" ({r.signal})" if r.signal else ""
            out.append(f"- **{_md_escape(r.artifact)} on {_where(r)}** — {r.status}{sig}: {_md_escape(r.reason or '')}")
    notes = [(r, n) for r in rep.rows for n in r.notes]
    if notes:
        out += ["", "### Notes", ""]
        out += [f"- {_md_escape(r.artifact)} on {_where(r)}: {_md_escape(n)}" for r, n in notes]
    prof = [r for r in _sorted_rows(rep) if r.ok and r.profile and r.profile.get("top_ops")]
    if prof:
        out += ["", "### Top ops by time", ""]
        for r in prof:
            ops = ", ".join(f"{o['op']} {o['pct']:.0f}%" for o in r.profile["top_ops"][:5])
            out.append(f"- {_md_escape(r.artifact)} on {_where(r)} ({r.profile.get('source')}): {_md_escape(ops)}")
    if comparison is not None:
        out += ["", render_comparison_markdown(comparison)]
    out.append("")
    return "\n".join(out)


def render_comparison_markdown(cmp: Comparison) -> str:
    out = [f"### Comparison with the previous run (flag beyond ±{cmp.threshold:.0%})", ""]
    out.append(f"{len(cmp.regressions)} regression(s), {len(cmp.improvements)} improvement(s).")
    for n in cmp.notes:
        out.append(f"> {n}")
    out += ["", "| Artifact | Target | Old p50 ms | New p50 ms | Ratio | Verdict | Note |", "|---|---|---:|---:|---:|---|---|"]
    for c in cmp.changes:
        ratio = f"{c.ratio:.3f}" if c.ratio else "-"
        verdict = f"**{c.verdict}**" if c.verdict == "regression" else c.verdict
        out.append(f"| {_md_escape(c.artifact)} | {c.target} | {_ms(c.old_p50)} | {_ms(c.new_p50)} | {ratio} "
                   f"| {verdict} | {_md_escape(c.note or '')} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# SVG plots
# ---------------------------------------------------------------------------------------------
def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _nice_ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return [10.0 ** e for e in range(a, b + 1)]
    return nice_ticks(lo, hi, n)


class _Scale:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool):
        self.log = log
        if log:
            lo, hi = max(lo, 1e-6), max(hi, lo * 10)
            self.lo, self.hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        else:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        if self.log:
            v = max(v, self.lo)
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.a + f * (self.b - self.a)

    def ticks(self) -> list[float]:
        return [t for t in _nice_ticks(self.lo, self.hi, self.log) if self.lo - 1e-12 <= t <= self.hi + 1e-12]


def _fmt_tick(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def svg_latency(rep: BenchReport) -> str:
    """Horizontal bars: p50 per (artifact, target), whisker p50-p90, label with the figures."""
    rows = [r for r in _sorted_rows(rep) if r.ok and r.stat("p50")]
    bar_h, gap, left, right, top = 16, 6, 230, 120, 34
    width = 820
    height = top + max(1, len(rows)) * (bar_h + gap) + 30
    parts = [f'<svg id="plot-latency" class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="latency per artifact and target">',
             ]
    if not rows:
        parts.append(f'<text x="{left}" y="16" class="title">Latency per artifact and target</text>')
        parts.append(f'<text x="{left}" y="{top + 12}">no measured rows</text></svg>')
        return "\n".join(parts)
    hi = max(r.stat("p90") or r.stat("p50") for r in rows)
    lo = min(r.stat("p50") for r in rows)
    log = hi / max(lo, 1e-9) > 30
    parts.append(f'<text x="{left}" y="16" class="title">Latency per artifact and target: bar p50, line p50–p90 '
                 f'(ms{", log scale" if log else ""})</text>')
    sx = _Scale(lo / 2 if log else 0.0, hi * 1.05, left, width - right, log)
    for t in sx.ticks():
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 26}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" class="tick" text-anchor="middle">{_fmt_tick(t)}</text>')
    for i, r in enumerate(rows):
        y = top + i * (bar_h + gap)
        p50, p90 = r.stat("p50"), r.stat("p90") or r.stat("p50")
        col = TARGET_COLORS.get(r.target, "#7f7f7f")
        x0 = sx(sx.lo)
        parts.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" class="label" text-anchor="end">'
                     f'{_esc(r.artifact)} · {_esc(_where(r))}</text>')
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{max(1.0, sx(p50) - x0):.1f}" height="{bar_h}" '
                     f'fill="{col}"><title>{_esc(r.artifact)} on {_esc(_where(r))}: p50 {_ms(p50)} ms, '
                     f'p90 {_ms(p90)} ms, p99 {_ms(r.stat("p99"))} ms, n={r.latency_ms.get("n")}</title></rect>')
        yc = y + bar_h / 2
        parts.append(f'<line class="range" x1="{sx(p50):.1f}" y1="{yc}" x2="{sx(p90):.1f}" y2="{yc}" '
                     f'stroke="#222" stroke-width="2"/>')
        parts.append(f'<line x1="{sx(p90):.1f}" y1="{y + 3}" x2="{sx(p90):.1f}" y2="{y + bar_h - 3}" stroke="#222" '
                     f'stroke-width="2"/>')
        parts.append(f'<text x="{sx(p90) + 6:.1f}" y="{y + bar_h - 4}" class="value">{_ms(p50)} '
                     f'({_ms(p90)})</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _artifact_sizes(rep: BenchReport) -> list[tuple[str, int, str]]:
    seen = {}
    for r in rep.rows:
        if r.size_bytes and r.artifact not in seen:
            seen[r.artifact] = (r.artifact, int(r.size_bytes), f"{r.format} {r.precision}")
    return list(seen.values())


def svg_size(rep: BenchReport) -> str:
    items = _artifact_sizes(rep)
    bar_h, gap, left, right, top, width = 16, 6, 230, 90, 34, 820
    height = top + max(1, len(items)) * (bar_h + gap) + 30
    parts = [f'<svg id="plot-size" class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="size per artifact">',
             f'<text x="{left}" y="16" class="title">Size per artifact (MB)</text>']
    if not items:
        parts.append(f'<text x="{left}" y="{top + 12}">no sizes recorded</text></svg>')
        return "\n".join(parts)
    sx = _Scale(0.0, max(s for _, s, _ in items) / 1e6 * 1.05, left, width - right, False)
    for t in sx.ticks():
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 26}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 12}" class="tick" text-anchor="middle">{_fmt_tick(t)}</text>')
    for i, (aid, size, kind) in enumerate(items):
        y = top + i * (bar_h + gap)
        mb = size / 1e6
        parts.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" class="label" text-anchor="end">{_esc(aid)}</text>')
        parts.append(f'<rect class="bar" x="{sx(0):.1f}" y="{y}" width="{max(1.0, sx(mb) - sx(0)):.1f}" '
                     f'height="{bar_h}" fill="#8c6d31"><title>{_esc(aid)} ({_esc(kind)}): {size} bytes</title></rect>')
        parts.append(f'<text x="{sx(mb) + 6:.1f}" y="{y + bar_h - 4}" class="value">{mb:.2f}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def svg_scatter(rep: BenchReport) -> str:
    pts = [r for r in rep.rows if r.ok and r.stat("p50") and r.size_bytes]
    width, height, left, right, top, bottom = 820, 380, 70, 150, 34, 46
    parts = [f'<svg id="plot-scatter" class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="latency against size">',
             f'<text x="{left}" y="16" class="title">Latency (p50, ms) against size (MB)</text>']
    if not pts:
        parts.append(f'<text x="{left}" y="{top + 12}">no measured rows with a size</text></svg>')
        return "\n".join(parts)
    xs = [r.size_bytes / 1e6 for r in pts]
    ys = [r.stat("p50") for r in pts]
    xlog = max(xs) / max(min(xs), 1e-9) > 30
    ylog = max(ys) / max(min(ys), 1e-9) > 30
    sx = _Scale(min(xs) / 2 if xlog else 0.0, max(xs) * 1.1, left, width - right, xlog)
    sy = _Scale(min(ys) / 2 if ylog else 0.0, max(ys) * 1.1, height - bottom, top, ylog)
    for t in sx.ticks():
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{height - bottom}" class="grid"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">'
                     f'{_fmt_tick(t)}</text>')
    for t in sy.ticks():
        y = sy(t)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt_tick(t)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 8}" class="tick" text-anchor="middle">'
                 f'size MB{" (log)" if xlog else ""}</text>')
    parts.append(f'<text x="14" y="{(top + height - bottom) / 2:.0f}" class="tick" text-anchor="middle" '
                 f'transform="rotate(-90 14 {(top + height - bottom) / 2:.0f})">p50 ms{" (log)" if ylog else ""}</text>')
    for r, x, y in zip(pts, xs, ys):
        col = TARGET_COLORS.get(r.target, "#7f7f7f")
        parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{col}">'
                     f'<title>{_esc(r.artifact)} on {_esc(_where(r))}: {x:.2f} MB, p50 {_ms(y)} ms</title></circle>')
        parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" class="value">{_esc(r.artifact)}</text>')
    targets = sorted({r.target for r in pts}, key=lambda t: list(TARGET_COLORS).index(t) if t in TARGET_COLORS else 9)
    for i, t in enumerate(targets):
        y = top + 10 + i * 18
        parts.append(f'<circle cx="{width - right + 20}" cy="{y}" r="5" fill="{TARGET_COLORS.get(t, "#7f7f7f")}"/>')
        parts.append(f'<text x="{width - right + 30}" y="{y + 4}" class="label">{_esc(t)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.meta{color:#555;margin:2px 0} table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.failed td,tr.wrong-output td{background:#fdecea} tr.skipped td,tr.unavailable td{color:#777}
.wrong{border:2px solid #b00020;background:#fdecea;padding:4px 12px;margin:12px 0}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px}
.b-ok{background:#e6f4ea} .b-failed,.b-wrong-output{background:#f8d7da} .b-skipped,.b-unavailable{background:#eee}
svg.plot{display:block;margin:8px 0 16px;background:#fff}
svg .title{font-weight:600;font-size:13px} svg .label,svg .value{font-size:12px} svg .tick{font-size:11px;fill:#555}
svg .grid{stroke:#e5e5e5;stroke-width:1}
.reg{color:#b00020;font-weight:600} .imp{color:#137333}
"""


def _html_head(rep: BenchReport) -> list[str]:
    s, c, e = rep.settings or {}, rep.counts(), _esc
    wrong = wrong_output_lines(rep)
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>edgepipe bench: {e(rep.model.get('name', '?'))}</title>", f"<style>{_CSS}</style></head><body>",
         f"<h1>edgepipe bench: {e(rep.model.get('name', '?'))}</h1>",
         *([f'<div class="wrong"><h2>Wrong outputs: these rows compute wrong answers, so they have no speed '
            f'figure</h2><ul>{"".join(f"<li>{e(w)}</li>" for w in wrong)}</ul></div>'] if wrong else []),
         f'<p class="meta">{c.get("ok", 0)} measured, {c.get(WRONG_OUTPUT, 0)} wrong output, {c.get("failed", 0)} '
         f'failed, {c.get("skipped", 0)} skipped, '
         f'{c.get("unavailable", 0)} unavailable · {e(rep.created or "")} · edgepipe {e(rep.edgepipe_version or "?")}</p>',
         f'<p class="meta"><b>Host:</b> {e(_host_line(rep))}</p>',
         *(f'<p class="meta"><b>Device:</b> {e(d)}</p>' for d in _device_lines(rep)),
         f'<p class="meta"><b>Runtimes:</b> {e(_versions_line(rep))}</p>',
         f'<p class="meta"><b>Method:</b> one fresh process per row; at least {e(s.get("runs"))} runs and '
         f'{e(s.get("min_seconds"))} s after {e(s.get("warmup"))} warm-up runs; {e(s.get("threads"))} threads; '
         f'timed region = write inputs + run + read outputs back; 95% CI of the median from order statistics; '
         f'inputs: {e(s.get("inputs", "?"))}.</p>']
    gpu = (rep.targets or {}).get("gpu", {}).get("tflite", {})
    if gpu.get("note"):
        h.append(f'<p class="meta"><b>GPU:</b> {e(gpu["note"])}</p>')
    return h


def _html_row(r: BenchRow, multi: bool) -> str:
    e, lat = _esc, r.latency_ms or {}

    def num(v) -> str:
        return f'<td class="num">{e(v)}</td>'

    reason = (r.reason or "") + (f" ({r.signal})" if r.signal and r.signal not in (r.reason or "") else "")
    if r.notes:
        reason = "; ".join([reason] + list(r.notes)) if reason else "; ".join(r.notes)
    mean = f"{_ms(lat.get('mean'))} ± {_ms(lat.get('std'))}" if r.ok else "-"
    return (f'<tr class="{e(r.status)}">{"<td>" + e(r.device) + "</td>" if multi else ""}'
            f'<td>{e(r.artifact)}</td><td>{e(r.format)}</td><td>{e(r.precision)}</td>'
            f'<td>{e(r.target)}</td><td>{e(r.runtime)}{" " + e(r.runtime_version) if r.runtime_version else ""}</td>'
            f'<td><span class="badge b-{e(r.status)}">{e(r.status)}</span></td>'
            + num(_ms(lat.get("p50")) if r.ok else "-") + f"<td>{e(_ci_text(r) if r.ok else '-')}</td>"
            + num(_ms(lat.get("p90")) if r.ok else "-") + num(_ms(lat.get("p99")) if r.ok else "-")
            + num(mean) + num(lat.get("n", "-") if r.ok else "-") + num(_ms(r.load_ms)) + num(_ms(r.first_ms))
            + num(_kb_to_mb((r.memory or {}).get("peak_rss_kb"))) + num(_mb(r.size_bytes))
            + f"<td>{e(_placement_text(r) if r.ok else '-')}</td><td>{e(_agreement_text(r))}</td>"
            f"<td>{e(reason)}</td></tr>")


def _html_table(rep: BenchReport) -> list[str]:
    multi = _multi_device(rep)
    cols = (["Device"] if multi else []) + [
        "Artifact", "Format", "Precision", "Target", "Runtime", "Status", "p50 ms", "95% CI", "p90 ms", "p99 ms",
        "mean ± std", "Runs", "Load ms", "First ms", "Peak RSS MB", "Size MB", "Placement", "vs CPU", "Reason"]
    return (["<h2>All rows</h2><table><thead><tr>" + "".join(f"<th>{_esc(x)}</th>" for x in cols)
             + "</tr></thead><tbody>"] + [_html_row(r, multi) for r in _sorted_rows(rep)] + ["</tbody></table>"])


def _html_profiles(rep: BenchReport) -> list[str]:
    e, h = _esc, []
    for r in (r for r in _sorted_rows(rep) if r.ok and r.profile and r.profile.get("top_ops")):
        h.append(f"<p><b>{e(r.artifact)} on {e(_where(r))}</b> ({e(r.profile.get('source'))}, "
                 f"{_ms(r.profile.get('total_ms_per_run'))} ms of kernels per run)</p><table><tr><th>Op</th>"
                 "<th>ms/run</th><th>%</th><th>Nodes</th></tr>")
        h += [f'<tr><td>{e(o["op"])}</td><td class="num">{_ms(o["ms"])}</td><td class="num">{o["pct"]:.1f}</td>'
              f'<td class="num">{e(o.get("nodes", ""))}</td></tr>' for o in r.profile["top_ops"]]
        h.append("</table>")
    return (["<h2>Top ops by time</h2>"] + h) if h else []


def _html_comparison(cmp: Comparison) -> list[str]:
    e = _esc
    h = [f"<h2>Comparison with the previous run (flag beyond ±{cmp.threshold:.0%})</h2>",
         f"<p>{len(cmp.regressions)} regression(s), {len(cmp.improvements)} improvement(s).</p>",
         *(f'<p class="meta">{e(n)}</p>' for n in cmp.notes),
         "<table><tr><th>Artifact</th><th>Target</th><th>Old p50 ms</th><th>New p50 ms</th><th>Ratio</th>"
         "<th>Verdict</th><th>Note</th></tr>"]
    for ch in cmp.changes:
        cls = "reg" if ch.verdict == "regression" else "imp" if ch.verdict == "improvement" else ""
        h.append(f"<tr><td>{e(ch.artifact)}</td><td>{e(ch.target)}</td><td class=\"num\">{_ms(ch.old_p50)}</td>"
                 f"<td class=\"num\">{_ms(ch.new_p50)}</td><td class=\"num\">"
                 f"{f'{ch.ratio:.3f}' if ch.ratio else '-'}</td><td class=\"{cls}\">{e(ch.verdict)}</td>"
                 f"<td>{e(ch.note or '')}</td></tr>")
    return h + ["</table>"]


def render_html(rep: BenchReport, comparison: Optional[Comparison] = None) -> str:
    """One self-contained page: plots, the full table, reasons, top ops, the comparison."""
    h = _html_head(rep) + ["<h2>Latency</h2>", svg_latency(rep), "<h2>Size</h2>", svg_size(rep),
                           "<h2>Latency against size</h2>", svg_scatter(rep)]
    h += _html_table(rep) + _html_profiles(rep)
    h += _html_comparison(comparison) if comparison is not None else []
    return "\n".join(h + ["</body></html>"])


def write_reports(rep: BenchReport, out_dir: str | os.PathLike,
                  comparison: Optional[Comparison] = None) -> dict[str, Path]:
    """bench.json, bench.md and bench.html in ``out_dir`` (each written atomically)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = {"json": rep.save(d / "bench.json"),
             "md": write_text_atomic(d / "bench.md", render_markdown(rep, comparison)),
             "html": write_text_atomic(d / "bench.html", render_html(rep, comparison))}
    return paths
