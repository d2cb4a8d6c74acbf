"""The per-layer report as a terminal table, Markdown, and one self-contained HTML page (inline
SVG, no script, no network): SQNR per layer in graph order, accumulated as a line and isolated
(model output, only that layer quantized) as dots, the worst layers marked; then the table.
"""
from __future__ import annotations

import html
from typing import Optional

from edgepipe.pipeline.fidelity.layer_rows import LayerReport, LayerRow
from edgepipe.pipeline.fidelity.tensors import SQNR_CAP_DB

WORST_SHOWN = 5


def _db(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"


def _fig(f, attr: str = "sqnr_db") -> Optional[float]:
    return None if f is None else getattr(f, attr)


def summary_lines(rep: LayerReport) -> list[str]:
    agree = "" if rep.output_agreement is None else f", top-1 agreement {rep.output_agreement:.1f}%"
    lines = [f"{rep.artifact} ({rep.format}) against {rep.reference} on {rep.images} {rep.data} image(s): "
             f"output SQNR {rep.output.sqnr_db:.1f} dB, cosine {rep.output.cosine:.4f}{agree}"]
    iso = rep.isolated or {}
    if iso.get("skipped"):
        lines.append(f"isolated pass: not run ({iso['skipped']})")
    else:
        lines.append(f"isolated pass: {iso.get('layers', 0)} layer(s) on {iso.get('images', 0)} image(s)"
                     + (f"; {iso['capped']}" if iso.get("capped") else ""))
    return lines


def worst_lines(rep: LayerReport, k: int = WORST_SHOWN) -> list[str]:
    out = []
    for r in rep.worst[:k]:
        what = (f"alone it costs the output {_db(r.own_db)} dB SQNR" if r.own_db is not None
                else f"loses {_db(r.delta_db)} dB here")
        out.append(f"{r.rank + 1}. {r.layer} [{r.op}] {what}: {r.reason}")
    return out


def text_table(rep: LayerReport) -> str:
    head = ["#", "layer", "op", "acc dB", "acc ch dB", "delta dB", "iso dB", "iso out dB", "own dB", "cosine",
            "rank"]
    rows = [[str(r.index), r.layer[:40], r.op, _db(r.accumulated.sqnr_db), _db(r.accumulated.channel_sqnr_db),
             _db(r.delta_db), _db(_fig(r.isolated)), _db(_fig(r.isolated_output)), _db(r.own_db),
             f"{r.accumulated.cosine:.4f}", "-" if r.rank is None else str(r.rank + 1)] for r in rep.rows]
    widths = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w if i in (1, 2) else "{:>%d}" % w for i, w in enumerate(widths))
    body = [fmt.format(*head)] + [fmt.format(*x) for x in rows]
    return "\n".join(summary_lines(rep) + ["", *body, "", "worst layers:", *worst_lines(rep)])


def markdown(rep: LayerReport) -> str:
    lines = [f"### Per-layer error: {rep.artifact}", "", *summary_lines(rep), "",
             "| rank | layer | op | accumulated SQNR dB | own output SQNR dB | reason |",
             "|---:|---|---|---:|---:|---|"]
    for r in rep.worst[:WORST_SHOWN]:
        lines.append(f"| {r.rank + 1} | {r.layer} | {r.op} | {_db(r.accumulated.sqnr_db)} | "
                     f"{_db(r.own_db)} | {(r.reason or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _own(r: LayerRow) -> Optional[float]:
    """own_db when the layer adds error of its own (the cap means: all of it came in with its inputs)."""
    return r.own_db if r.own_db is not None and r.own_db < SQNR_CAP_DB else None


def svg_plot(rep: LayerReport, width: int = 900, height: int = 320) -> str:
    rows = rep.rows
    left, right, top, bottom = 50, 20, 20, 50
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    if not rows:
        return parts[0] + f'<text x="{left}" y="{top + 12}">no layers</text></svg>'
    vals = [v for r in rows for v in (r.accumulated.sqnr_db, _own(r)) if v is not None]
    lo, hi = min(0.0, min(vals)), max(10.0, max(vals))
    pw, ph = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (pw * (i + 0.5) / len(rows))

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    for t in range(int(lo // 10) * 10, int(hi) + 1, 10):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t}</text>')
    worst = {r.tensor for r in rep.worst[:WORST_SHOWN]}
    for k, r in enumerate(rows):
        if r.tensor in worst:
            parts.append(f'<rect x="{x(k) - pw / len(rows) / 2:.1f}" y="{top}" width="{pw / len(rows):.1f}" '
                         f'height="{ph}" fill="#fde0e0"><title>{html.escape(r.layer)}: rank {r.rank + 1}</title>'
                         '</rect>')
    pts = " ".join(f"{x(k):.1f},{y(r.accumulated.sqnr_db):.1f}" for k, r in enumerate(rows))
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for k, r in enumerate(rows):
        tip = html.escape(f"{r.layer} ({r.op}): accumulated {r.accumulated.sqnr_db:.1f} dB")
        parts.append(f'<circle cx="{x(k):.1f}" cy="{y(r.accumulated.sqnr_db):.1f}" r="3" fill="#1f77b4">'
                     f'<title>{tip}</title></circle>')
        v = _own(r)
        if v is not None:
            tip = html.escape(f"{r.layer}: its own share of the output error, {v:.1f} dB")
            parts.append(f'<rect x="{x(k) - 3:.1f}" y="{y(v) - 3:.1f}" width="6" height="6" fill="#d62728">'
                         f'<title>{tip}</title></rect>')
    parts.append(f'<text x="{left}" y="{height - 22}">layers in graph order. Blue: accumulated SQNR (dB) of each '
                 'layer. Red: model-output SQNR of the layer quantized alone, its inputs\' share removed</text>'
                 f'<text x="{left}" y="{height - 8}">(none where it adds nothing of its own). '
                 f'Shaded: the worst {WORST_SHOWN}.</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(rep: LayerReport) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{r.index}</td><td>{e(r.layer)}</td><td>{e(r.op)}</td><td>{_db(r.accumulated.sqnr_db)}</td>"
        f"<td>{_db(r.accumulated.channel_sqnr_db)}</td><td>{_db(r.delta_db)}</td><td>{_db(_fig(r.isolated))}</td>"
        f"<td>{_db(_fig(r.isolated_output))}</td><td>{_db(r.own_db)}</td><td>{r.accumulated.rel_error:.4f}</td>"
        f"<td>{r.accumulated.cosine:.4f}</td><td>{'' if r.rank is None else r.rank + 1}</td>"
        f"<td>{e(r.reason or '') if r.rank is not None and r.rank < WORST_SHOWN else ''}</td></tr>"
        for r in rep.rows)
    worst = "".join(f"<li>{e(s)}</li>" for s in worst_lines(rep))  # the lines carry their rank
    summary = "".join(f"<p>{e(s)}</p>" for s in summary_lines(rep))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>layers: {e(rep.artifact)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}td:nth-child(n+4){text-align:right}"
            "</style></head><body>"
            f"<h1>Per-layer error of {e(rep.artifact)}</h1>{summary}<h2>Worst layers</h2>"
            f"<ul style='list-style:none'>{worst}</ul>"
            f"{svg_plot(rep)}<h2>All layers</h2><table><tr><th>#</th><th>layer</th><th>op</th>"
            "<th>accumulated SQNR dB</th><th>channel SQNR dB</th><th>delta dB</th><th>isolated SQNR dB</th>"
            "<th>isolated output SQNR dB</th><th>own output SQNR dB</th><th>rel. error</th><th>cosine</th>"
            "<th>rank</th><th>likely reason</th>"
            f"</tr>{rows}</table></body></html>")
