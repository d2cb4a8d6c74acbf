"""The history page: one trend plot per series, self-contained (inline SVG + CSS, no script, no URL).

A strict Content-Security-Policy (``default-src 'none'``) makes the browser refuse any load even if
a value in the data looked like a URL; every value is HTML-escaped. The geometry is fixed
(``HEADER_PX``, ``PLOT_PX`` per series, the plot area inside each) so a test can find each plot in
a screenshot.
"""
from __future__ import annotations

import html
from typing import Optional

from edgepipe.pipeline.base.util import nice_ticks
from edgepipe.pipeline.ledger.trends import Series

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; script-src 'none'; connect-src 'none'; "
       "font-src 'none'; media-src 'none'; object-src 'none'; frame-src 'none'; base-uri 'none'; form-action 'none'")
WIDTH = 800
HEADER_PX = 110
PLOT_PX = 260  # one <section> per series, this tall
SVG_H = 240
AREA = (70, 40, WIDTH - 30, SVG_H - 40)  # x0, y0, x1, y1 of the data area inside each plot
P50_COLOR = "#1f5fbf"
P90_COLOR = "#e07b00"

_STYLE = f"""
body {{ margin: 0; font: 13px/1.35 system-ui, sans-serif; color: #222; background: #fff; }}
header {{ height: {HEADER_PX}px; box-sizing: border-box; padding: 10px 16px; overflow: hidden;
          border-bottom: 1px solid #ddd; }}
h1 {{ font-size: 18px; margin: 0 0 6px 0; }}
header p {{ margin: 2px 0; color: #555; }}
section.series {{ height: {PLOT_PX}px; margin: 0; padding: 0; overflow: hidden; }}
svg text {{ font: 11px system-ui, sans-serif; fill: #333; }}
svg text.title {{ font-size: 13px; font-weight: 600; }}
svg .grid {{ stroke: #e6e6e6; stroke-width: 1; }}
svg .axis {{ stroke: #999; stroke-width: 1; }}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _y_range(vals: list[float]) -> tuple[float, float]:
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 1.0
    return max(0.0, lo - pad), hi + pad


def _axes(lo: float, hi: float, sy, n: int) -> list[str]:
    x0, y0, x1, y1 = AREA
    out = [f'<line class="axis" x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}"/>',
           f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for t in nice_ticks(lo, hi, 4):
        y = sy(t)
        out.append(f'<line class="grid" x1="{x0 + 1}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<text x="{x0 - 54}" y="{(y0 + y1) / 2:.0f}" transform="rotate(-90 {x0 - 54} {(y0 + y1) / 2:.0f})" '
               f'text-anchor="middle">ms</text>')
    return out


def svg_series(s: Series, index: int) -> str:
    """One series' trend: p50 (line + points) and p90 (dashed), x = the runs in order."""
    x0, y0, x1, y1 = AREA
    pts = s.ok_points()
    head = (f'<svg id="plot-{index}" class="plot" width="{WIDTH}" height="{SVG_H}" viewBox="0 0 {WIDTH} {SVG_H}" '
            f'role="img" aria-label="{_esc(s.title)}">'
            f'<text class="title" x="{x0}" y="18">{_esc(s.title)}</text>')
    if not pts:
        return head + f'<text x="{x0}" y="{(y0 + y1) / 2:.0f}">no successful measurement</text></svg>'
    lo, hi = _y_range([p.p50 for p in pts] + [p.p90 for p in pts if p.p90 is not None])

    def sy(v: float) -> float:
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    def sx(i: int) -> float:
        return (x0 + x1) / 2 if len(pts) == 1 else x0 + 12 + i * (x1 - x0 - 24) / (len(pts) - 1)

    parts = [head, *_axes(lo, hi, sy, len(pts))]
    p90 = [(sx(i), sy(p.p90)) for i, p in enumerate(pts) if p.p90 is not None]
    if len(p90) > 1:
        parts.append(f'<polyline fill="none" stroke="{P90_COLOR}" stroke-width="1.5" stroke-dasharray="5 3" '
                     f'points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in p90)}"/>')
    line = " ".join(f"{sx(i):.1f},{sy(p.p50):.1f}" for i, p in enumerate(pts))
    parts.append(f'<polyline fill="none" stroke="{P50_COLOR}" stroke-width="2.5" points="{line}"/>')
    for i, p in enumerate(pts):
        tip = (f"run {p.run_id} ({p.created}): p50 {p.p50:.4g} ms, p90 {p.p90 if p.p90 is None else f'{p.p90:.4g}'}"
               f" ms, n={p.n}, sha256 {(p.sha256 or '?')[:12]}, commit {(p.git_commit or '-')[:10]}")
        parts.append(f'<circle cx="{sx(i):.1f}" cy="{sy(p.p50):.1f}" r="4" fill="{P50_COLOR}">'
                     f'<title>{_esc(tip)}</title></circle>')
    for i in sorted({0, len(pts) - 1}):
        anchor = "start" if i == 0 and len(pts) > 1 else "end" if len(pts) > 1 else "middle"
        parts.append(f'<text x="{sx(i):.1f}" y="{y1 + 16}" text-anchor="{anchor}">run {pts[i].run_id} · '
                     f'{_esc((pts[i].created or "")[:10])}</text>')
    ly = SVG_H - 10
    parts.append(f'<line x1="{x1 - 210}" y1="{ly - 4}" x2="{x1 - 186}" y2="{ly - 4}" stroke="{P50_COLOR}" '
                 f'stroke-width="2.5"/><text x="{x1 - 180}" y="{ly}">p50</text>'
                 f'<line x1="{x1 - 146}" y1="{ly - 4}" x2="{x1 - 122}" y2="{ly - 4}" stroke="{P90_COLOR}" '
                 f'stroke-width="1.5" stroke-dasharray="5 3"/><text x="{x1 - 116}" y="{ly}">p90</text>'
                 f'<text x="{x1}" y="{ly}" text-anchor="end">{len(pts)} runs</text>')
    return "".join(parts) + "</svg>"


def render_history_html(series: list[Series], ledger: str, filters: Optional[dict] = None) -> str:
    """The whole page (a string): a header, then one fixed-height section per series."""
    f = ", ".join(f"{k}={v}" for k, v in (filters or {}).items() if v) or "none"
    n_points = sum(len(s.points) for s in series)
    body = [f'<section class="series" id="series-{i}">{svg_series(s, i)}</section>' for i, s in enumerate(series)]
    if not series:
        body.append('<section class="series"><p style="padding:16px">No bench rows match.</p></section>')
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        "<title>edgepipe history</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<header><h1>edgepipe history</h1><p>Ledger: {_esc(ledger)}</p>"
        f"<p>Filters: {_esc(f)} · {len(series)} series, {n_points} points · median latency (p50) per run, "
        f"p90 dashed</p></header>",
        *body,
        "</body></html>",
    ]) + "\n"
