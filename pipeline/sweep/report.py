"""The merged sweep report and its one gate result.

``sweep.json`` (``kind: edgepipe-sweep``, ``schema_version`` 1):
    plan, plan_id, engine (mode, address, nodes: id, name, host, ip, cpus, devices, alive), devices,
    jobs (kind, model, device, status, reason, node, node_name, host, seconds, reused),
    rows (one per model x artifact x device x bench target: export, verification, eval figures,
          bench figures, node and host of the bench, gate),
    gate (passed, failed, checks, skipped, rows: `edgepipe check` rows + model and device),
    counts, wall_s.
The gate holds `edgepipe check`'s rows for each model (accuracy budgets, verification, failed
exports), a row per bench measurement (failed fails, skipped/unavailable are skipped) and a failing
row for every job that could not run, with its reason.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.errors import EdgepipeError
from edgepipe.pipeline.base.util import write_json_atomic, write_text_atomic
from edgepipe.pipeline.sweep import cells
from edgepipe.pipeline.sweep.plan import ModelJobs, Prepared
from edgepipe.pipeline.sweep.render import render_html, render_junit, render_markdown, render_gate_markdown
from edgepipe.pipeline.sweep.state import OutputFolder

SCHEMA_VERSION = 1
KIND = "edgepipe-sweep"
WORST = {"fail": 2, "skipped": 1, "pass": 0}


def build_report(prepared: Prepared, out: OutputFolder, jobs: list[dict], engine: dict, wall_s: float) -> dict:
    names = {n["id"]: n["name"] for n in engine.get("nodes", [])}
    for j in jobs:
        j["node_name"] = names.get(j.get("node"), j.get("node"))
    gate_rows, rows = [], []
    for mj in prepared.models:
        mjobs = [j for j in jobs if j["model"] == mj.name]
        g = model_gate(prepared, out, mj, mjobs)
        gate_rows += g
        rows += model_rows(prepared, out, mj, mjobs, g, names)
    failed = [r for r in gate_rows if r["status"] == "fail"]
    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgepipe_version": cells.versions()["edgepipe"],
        "plan": prepared.plan.to_dict(), "plan_id": prepared.plan.digest(), "engine": engine,
        "devices": prepared.devices, "models": {mj.name: {"folder": mj.name, "skipped": mj.skipped}
                                                for mj in prepared.models},
        "jobs": jobs, "rows": rows,
        "gate": {"passed": not failed, "failed": len(failed), "checks": len(gate_rows),
                 "skipped": sum(r["status"] == "skipped" for r in gate_rows), "rows": gate_rows},
        "counts": {"jobs": len(jobs), "run": sum(not j["reused"] for j in jobs),
                   "reused": sum(bool(j["reused"]) for j in jobs),
                   "failed": sum(j["status"] != "ok" for j in jobs)},
        "wall_s": round(wall_s, 3),
    }


# ------------------------------------------------------------------------------------------ the gate
def _row(model: str, check: str, status: str, reason: Optional[str] = None, device: Optional[str] = None,
         **kw) -> dict:
    r = {"model": model, "artifact": kw.pop("artifact", "-"), "format": kw.pop("format", None),
         "precision": kw.pop("precision", None), "check": check, "target": kw.pop("target", None),
         "runtime": kw.pop("runtime", None), "source_value": None, "artifact_value": None, "drop": None,
         "budget": None, "budget_from": None, "status": status, "reason": reason, "device": device, **kw}
    what = r["artifact"] if r["artifact"] != "-" else ""
    what += f" on {r['target']}" if r["target"] else ""
    r.setdefault("name", f"{what}: {check}" if what else check)
    return r


def model_gate(prepared: Prepared, out: OutputFolder, mj: ModelJobs, mjobs: list[dict]) -> list[dict]:
    plan, rows = prepared.plan, []
    job = {(j["kind"], j.get("device")): j for j in mjobs}
    exp = job.get(("export", None))
    m = out.manifest(mj.name)
    if exp is None or exp["status"] != "ok" or m is None:
        why = exp["reason"] if exp else "not run"
        return [_row(mj.name, "export", "fail", f"export failed{_on(exp)}: {why}")]
    if plan.eval.get("data"):
        rows += _eval_gate(prepared, out, mj, job.get(("eval", None)))
    else:
        rows += _manifest_gate(mj.name, m, plan.gate["require_verified"])
    for d in prepared.devices:
        rows += _bench_gate(out, mj.name, d, job.get(("bench", d)))
    return rows


def _on(job: Optional[dict]) -> str:
    return f" on {job.get('node_name') or job.get('node')}" if job and job.get("node") else ""


def _eval_gate(prepared, out: OutputFolder, mj, ev: Optional[dict]) -> list[dict]:
    if ev is None or ev["status"] != "ok":
        return [_row(mj.name, "eval", "fail", f"evaluation failed{_on(ev)}: {ev['reason'] if ev else 'not run'}")]
    try:
        res = cells.check(out.model_dir(mj.name), prepared.plan.gate, prepared.selectors)
    except EdgepipeError as e:
        return [_row(mj.name, "check", "fail", e.one_line())]
    return [{"model": mj.name, "device": None, **r} for r in res["rows"]]


def _manifest_gate(model: str, m, require_verified: bool) -> list[dict]:
    rows = []
    for a in m.artifacts:
        ids = dict(artifact=a.id, format=a.format, precision=a.precision)
        if not a.path:
            rows.append(_row(model, "export", "fail", f"export failed: {a.error or a.status}", **ids))
        elif require_verified:
            ok = a.verification.status == "passed"
            rows.append(_row(model, "verified", "pass" if ok else "fail",
                             None if ok else f"verification {a.verification.status}: {a.verification.reason}", **ids))
    return rows


def _bench_gate(out: OutputFolder, model: str, device: str, job: Optional[dict]) -> list[dict]:
    if job is None or job["status"] != "ok":
        return [_row(model, "bench", "fail", f"bench failed{_on(job)}: {job['reason'] if job else 'not run'}",
                     device=device)]
    rep = out.json(out.bench_dir(model, device) / "bench.json") or {}
    rows = []
    for r in rep.get("rows", []):
        st = {"ok": "pass", "failed": "fail"}.get(r["status"], "skipped")
        rows.append(_row(model, "bench", st, r.get("reason") if st != "pass" else None, device=device,
                         artifact=r["artifact"], format=r["format"], precision=r["precision"], target=r["target"],
                         runtime=r.get("runtime")))
    return rows


# ------------------------------------------------------------------------------------------ the table
def model_rows(prepared: Prepared, out: OutputFolder, mj: ModelJobs, mjobs: list[dict], gate: list[dict],
               names: dict) -> list[dict]:
    m = out.manifest(mj.name)
    job = {(j["kind"], j.get("device")): j for j in mjobs}
    if m is None:  # the export failed: one row says so (the gate has the reason)
        exp = job.get(("export", None)) or {}
        return [{"model": mj.name, "artifact": "-", "export": "failed", "device": None, "node": exp.get("node_name"),
                 "host": exp.get("host"), "gate": "fail"}]
    ev = out.json(out.model_dir(mj.name) / "eval.json") if prepared.plan.eval.get("data") else None
    exp = job.get(("export", None)) or {}
    rows = []
    for a in m.artifacts:
        base = {"model": mj.name, "artifact": a.id, "format": a.format, "precision": a.precision,
                "export": a.status, "verification": a.verification.status, "size_bytes": a.size_bytes,
                "sha256": a.sha256, "export_node": exp.get("node_name"), "export_host": exp.get("host"),
                **_eval_figures(ev, a.id, job.get(("eval", None)))}
        per_device = [_bench_rows(base, out, mj.name, d, job.get(("bench", d)), gate) for d in prepared.devices]
        flat = [r for rs in per_device for r in rs]
        rows += flat or [{**base, "device": None, "gate": _gate_of(gate, a.id, None, None)}]
    return rows


def _eval_figures(ev: Optional[dict], aid: str, job: Optional[dict]) -> dict:
    if not ev:
        return {"top1": None, "top5": None, "agreement": None, "drop_top1": None, "eval_target": None,
                "eval_node": None}
    r = next((r for r in ev.get("results", []) if r["artifact"] == aid and r["status"] == "ok"), None) or {}
    return {"top1": r.get("top1"), "top5": r.get("top5"), "agreement": r.get("agreement"),
            "drop_top1": (r.get("drop") or {}).get("top1"), "eval_target": r.get("target"),
            "source_top1": ev.get("source", {}).get("top1"), "eval_node": (job or {}).get("node_name")}


def _bench_rows(base: dict, out: OutputFolder, model: str, device: str, job: Optional[dict],
                gate: list[dict]) -> list[dict]:
    rep = out.json(out.bench_dir(model, device) / "bench.json") if job and job["status"] == "ok" else None
    where = {"device": device, "node": (job or {}).get("node_name"), "host": (job or {}).get("host")}
    if rep is None:
        return [{**base, **where, "target": None, "bench": "failed", "bench_reason": (job or {}).get("reason"),
                 "p50_ms": None, "p90_ms": None, "gate": _gate_of(gate, base["artifact"], device, None)}]
    rows = []
    for r in (x for x in rep.get("rows", []) if x["artifact"] == base["artifact"]):
        lat = r.get("latency_ms") or {}
        rows.append({**base, **where, "target": r["target"], "runtime": r.get("runtime"), "bench": r["status"],
                     "bench_reason": r.get("reason"), "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"),
                     "threads": r.get("threads"), "gate": _gate_of(gate, base["artifact"], device, r["target"])})
    return rows


def _gate_of(gate: list[dict], artifact: str, device: Optional[str], target: Optional[str]) -> str:
    """The worst gate status of one row: its accuracy checks, and its own bench measurement."""
    mine = [g for g in gate if g["artifact"] in (artifact, "-") and
            (g.get("device") is None or (g["device"] == device and g.get("target") in (target, None)))]
    return max((g["status"] for g in mine), key=WORST.get, default="pass")


# ------------------------------------------------------------------------------------------ files
def write_outputs(report: dict, out: str | os.PathLike, junit: Optional[str] = None,
                  markdown: Optional[str] = None) -> dict:
    """sweep.json/.md/.html in OUT; the gate as JUnit XML and Markdown where asked (and appended to
    $GITHUB_STEP_SUMMARY when that is set, like `edgepipe check`)."""
    out = Path(out)
    written = {"json": str(write_json_atomic(out / "sweep.json", report)),
               "md": str(write_text_atomic(out / "sweep.md", render_markdown(report))),
               "html": str(write_text_atomic(out / "sweep.html", render_html(report)))}
    if junit:
        written["junit"] = str(write_text_atomic(junit, render_junit(report)))
    gate_md = render_gate_markdown(report)
    if markdown:
        written["markdown"] = str(write_text_atomic(markdown, gate_md))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(gate_md + "\n")
            written["step_summary"] = summary
        except OSError:
            pass  # a courtesy; the gate's verdict stands
    return written
