"""A sweep report as Markdown, self-contained HTML, and its gate as JUnit XML / Markdown."""
from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from typing import Any, Optional

ICON = {"pass": "✅ pass", "fail": "❌ FAIL", "skipped": "⏭️ skipped"}
ROW_COLS = (("model", "model"), ("artifact", "artifact"), ("device", "device"), ("target", "target"),
            ("node", "node"), ("host", "host"), ("verified", "verification"), ("top-1", "top1"),
            ("Δ top-1", "drop_top1"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("bench", "bench"), ("gate", "gate"))
GATE_COLS = (("model", "model"), ("artifact", "artifact"), ("device", "device"), ("target", "target"),
             ("check", "check"), ("source", "source_value"), ("artifact", "artifact_value"), ("drop", "drop"),
             ("budget", "budget"), ("result", "status"))
JOB_COLS = (("job", "kind"), ("model", "model"), ("device", "device"), ("status", "status"), ("node", "node_name"),
            ("host", "host"), ("s", "seconds"), ("reused", "reused"))


DECIMALS = {"top1": 2, "drop_top1": 2, "source_value": 2, "artifact_value": 2, "drop": 2, "budget": 2,
            "p50_ms": 3, "p90_ms": 3, "seconds": 1}


def cell(v: Any, key: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{DECIMALS[key]}f}" if key in DECIMALS else f"{v:g}"
    return str(v)


def label(r: dict) -> str:
    """A gate row as one phrase: 'm0 tflite-int8 on cpu: top1', 'm0 bench @ pi4'."""
    return f"{r['model']} {r['name']}" + (f" @ {r['device']}" if r.get("device") else "")


def short_node(node: Optional[str]) -> Optional[str]:
    """Ray node ids are 56 hex digits; names are short. Show 8 of an id."""
    return node[:8] if node and len(node) == 56 and all(c in "0123456789abcdef" for c in node) else node


def headline(rep: dict) -> str:
    g, c = rep["gate"], rep["counts"]
    verdict = "passed" if g["passed"] else f"{g['failed']} of {g['checks'] - g['skipped']} checks failed"
    return (f"edgepipe sweep: {len(rep['models'])} model(s), {len(rep['devices'])} device(s) on "
            f"{rep['engine']['mode']} ({len(rep['engine'].get('nodes', []))} node(s)): gate {verdict}; "
            f"jobs {c['run']} run, {c['reused']} reused, {c['failed']} failed; {rep['wall_s']:.1f} s")


# ------------------------------------------------------------------------------------------ Markdown
def _md_table(cols, rows, fmt=lambda k, v: cell(v, k)) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt(k, r.get(k)).replace("|", "\\|").replace("\n", " ") for _, k in cols) + " |")
    return out


def _fmt(k: str, v) -> str:
    if k in ("gate", "status") and v in ICON:
        return ICON[v]
    if k in ("node", "node_name"):
        return cell(short_node(v))
    return cell(v, k)


def render_markdown(rep: dict) -> str:
    lines = [f"# {headline(rep)}", "", "## Results", ""]
    lines += _md_table(ROW_COLS, rep["rows"], _fmt)
    lines += ["", "## Gate", ""] + render_gate_markdown(rep).splitlines()[2:]
    lines += ["", "## Nodes", ""]
    lines += _md_table((("node", "name"), ("id", "id"), ("host", "host"), ("ip", "ip"), ("cpus", "cpus"),
                        ("devices", "devices"), ("alive", "alive")),
                       [{**n, "id": short_node(n["id"]), "devices": ", ".join(n["devices"]) or "-"}
                        for n in rep["engine"].get("nodes", [])])
    lines += ["", "## Jobs", ""] + _md_table(JOB_COLS, rep["jobs"], _fmt)
    notes = [j for j in rep["jobs"] if j.get("reason")]
    lines += [""] + [f"- **{j['kind']} {j['model']}{' on ' + j['device'] if j.get('device') else ''}**: "
                     f"{j['reason']}" for j in notes]
    return "\n".join(lines) + "\n"


def render_gate_markdown(rep: dict) -> str:
    g = rep["gate"]
    head = "✅ passed" if g["passed"] else f"❌ {g['failed']} failed"
    lines = [f"### edgepipe sweep gate: {head}", ""]
    lines += _md_table(GATE_COLS, g["rows"], _fmt)
    notes = [r for r in g["rows"] if r.get("reason") and r["status"] != "pass"]
    if notes:
        lines.append("")
        lines += [f"- **{label(r)}**: {r['reason']}" for r in notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ HTML
CSS = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
       ".pass{color:#17702a}.fail{color:#b00020;font-weight:bold}.skipped{color:#8a6d00}")


def _html_table(cols, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in cols)
    body = []
    for r in rows:
        tds = []
        for _, k in cols:
            v = r.get(k)
            cls = f' class="{v}"' if k in ("gate", "status") and v in ICON else ""
            tds.append(f"<td{cls}>{html.escape(cell(short_node(v) if k in ('node', 'node_name') else v, k))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(rep: dict) -> str:
    nodes = [{**n, "id": short_node(n["id"]), "devices": ", ".join(n["devices"]) or "-"}
             for n in rep["engine"].get("nodes", [])]
    notes = "".join(f"<li><b>{html.escape(label(r))}</b>: {html.escape(r['reason'])}</li>"
                    for r in rep["gate"]["rows"] if r.get("reason") and r["status"] != "pass")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgepipe sweep</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(headline(rep))}</h1>"
            f"<h2>Results</h2>{_html_table(ROW_COLS, rep['rows'])}"
            f"<h2>Gate</h2>{_html_table(GATE_COLS, rep['gate']['rows'])}<ul>{notes}</ul>"
            f"<h2>Nodes</h2>{_html_table(((h, h) for h in ('name', 'id', 'host', 'ip', 'cpus', 'devices', 'alive')), nodes)}"
            f"<h2>Jobs</h2>{_html_table(JOB_COLS, rep['jobs'])}</body></html>\n")


# ------------------------------------------------------------------------------------------ JUnit
def render_junit(rep: dict) -> str:
    g = rep["gate"]
    suites = ET.Element("testsuites", name="edgepipe sweep", tests=str(g["checks"]), failures=str(g["failed"]),
                        errors="0", skipped=str(g["skipped"]))
    for model in rep["models"]:
        rows = [r for r in g["rows"] if r["model"] == model]
        fails, skips = sum(r["status"] == "fail" for r in rows), sum(r["status"] == "skipped" for r in rows)
        suite = ET.SubElement(suites, "testsuite", name=f"edgepipe sweep: {model}", tests=str(len(rows)),
                              failures=str(fails), errors="0", skipped=str(skips))
        for r in rows:
            tc = ET.SubElement(suite, "testcase", classname=f"edgepipe.{model}.{r['artifact']}", name=label(r))
            detail = (f"source {cell(r.get('source_value'), 'top1')}, artifact {cell(r.get('artifact_value'), 'top1')}, "
                      f"drop {cell(r.get('drop'), 'drop')}, budget {cell(r.get('budget'), 'budget')}")
            if r["status"] == "fail":
                ET.SubElement(tc, "failure", message=r.get("reason") or "failed", type=f"edgepipe.{r['check']}").text = detail
            elif r["status"] == "skipped":
                ET.SubElement(tc, "skipped", message=r.get("reason") or "skipped")
            else:
                ET.SubElement(tc, "system-out").text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
