"""`edgepipe sweep`: check the whole plan, then run export -> eval -> bench for every model and device
on an engine, reusing what an earlier run of the same plan finished, and write the merged report.

    plan = load_plan("sweep.toml")
    prepared = prepare(plan)                        # every name checked; nothing has run yet
    result = run_sweep(prepared, make_engine(False, None, None))
    result.report["gate"]["passed"]

Per model: one export job (every format x precision, each verified), then one eval job (when the
plan has [eval] data) and one bench job per device, which start as soon as the export is there.
The check (accuracy budgets) runs here at the end, on the files the jobs wrote.
"""
from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import edgepipe.pipeline.ledger as ledger_lib  # a lazy facade: SQLAlchemy loads when the sweep records
from edgepipe.export import CALIBRATED
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.sweep import cells, jobs
from edgepipe.pipeline.sweep.engine import Placement, RayEngine, SerialEngine
from edgepipe.pipeline.sweep.plan import ModelJobs, Prepared, SweepPlan
from edgepipe.pipeline.sweep.report import build_report, write_outputs
from edgepipe.pipeline.sweep.state import OutputFolder, key_of

Progress = Callable[[str, dict], None]
EXPORT_OUTPUTS = ("eval.json", "eval.log", "bench.json", "bench.md", "bench.html", "sweep-jobs.json")


def _quiet(event: str, info: dict) -> None:
    pass


@dataclass
class SweepResult:
    report: dict
    written: dict
    jobs: list[dict]
    ledger: Optional[Any] = None  # where the sweep was recorded (ledger.Recorded), None with record=False


# ------------------------------------------------------------------------------------------ checks
def prepare(plan: SweepPlan) -> Prepared:
    """Check every part of the plan that can be checked here (UserError, nothing runs)."""
    cells.check_export_options(plan.calibration, plan.export)
    cells.check_eval(plan.eval)
    if plan.devices:
        cells.bench_settings(plan.bench)
    models, names = [], set()
    for m in plan.models:
        req = cells.model_request(m)
        m["name"] = m["name"] or req.name
        if m["name"] in names:
            raise UserError(f"two models are named '{m['name']}'", "Give each [[models]] entry a distinct name")
        names.add(m["name"])
        pairs, skipped = cells.export_pairs(plan.pairs(m))
        if not pairs:
            raise UserError(f"model '{m['name']}': nothing to export ({'; '.join(s['reason'] for s in skipped)})",
                            "Choose precisions its formats support")
        needs = [f"{f} {p}" for f, p in pairs if p in CALIBRATED]
        if needs and plan.calibration["source"] is None:
            raise UserError(f"model '{m['name']}': {', '.join(needs)} needs calibration data",
                            "Add [calibration] source = \"digits\", \"random\" or a folder of images (or --calib)")
        models.append(ModelJobs(m["name"], m, pairs, skipped))
    selectors = {s for mj in models for f, p in mj.pairs for s in (f, p, f"{f}-{p}")}
    cells.gate_config(plan.gate, selectors)
    _keys(plan, models)
    return Prepared(plan, models, selectors)


def _keys(plan: SweepPlan, models: list[ModelJobs]) -> None:
    version = cells.versions()["edgepipe"]
    for mj in models:
        reader = cells.calibration_reader(plan.calibration, mj.model["seed"])
        mj.keys["export"] = key_of("export", cells.model_identity(mj.model), mj.pairs, plan.export,
                                   reader.identity() if reader else None, plan.calibration["samples"], version)
        mj.keys["eval"] = key_of("eval", mj.keys["export"], plan.eval)


def resolve_devices(prepared: Prepared, engine: SerialEngine | RayEngine) -> list[str]:
    """The plan's devices as names: registered here (serial, embedded) or owned by a node (cluster)."""
    plan, names = prepared.plan, []
    cluster = isinstance(engine, RayEngine) and engine.mode == "cluster"
    owned = sorted({d for n in engine.nodes() if n["alive"] for d in n["devices"]}) if cluster else None
    for d in plan.devices:
        if d == cells.LOCAL:
            add = [d]
        elif d == "all":
            add = owned if cluster else cells.registered_devices()
            if not add:
                raise UserError("devices = all, but no device is " + ("owned by a node" if cluster else
                                f"registered in {cells.registry_path()}"),
                                "Register one with `edgepipe devices add` (and start its node with --devices)")
        elif cluster:
            if d not in owned:
                raise UserError(f"no node of the cluster owns device '{d}' (owned: {', '.join(owned) or 'none'})",
                                f"Start the node it is attached to with `edgepipe node start --address ... --devices {d}`")
            add = [d]
        else:
            try:
                cells.check_registered(d)
            except UserError as e:
                if d.lower() in ("localhost", "cpu", "host") or difflib.get_close_matches(d.lower(), [cells.LOCAL]):
                    raise UserError(e.message, f"For this machine's CPU write '{cells.LOCAL}'; or {e.hint}") from None
                raise
            add = [d]
        names += [n for n in add if n not in names]
    prepared.devices = names
    for mj in prepared.models:
        for d in names:
            mj.keys[f"bench:{d}"] = key_of("bench", mj.keys["export"], plan.bench, d)
    return names


# ------------------------------------------------------------------------------------------ running
class Sweep:
    def __init__(self, prepared: Prepared, engine: SerialEngine | RayEngine, progress: Progress = _quiet):
        self.p, self.engine, self.progress = prepared, engine, progress
        self.out = OutputFolder(prepared.plan.out)
        self.jobs: list[dict] = []
        self.submitted: dict[Any, float] = {}

    def run(self) -> list[dict]:
        self.out.prepare()
        for mj in self.p.models:
            rec = self.out.finished(mj.name, "export", mj.keys["export"])
            if rec:
                self._reused("export", mj, rec)
                self._downstream(mj, None)
            else:
                self._submit("export", mj, None, Placement("cpu"))
        while self.engine.outstanding():
            for handle, result in self.engine.wait(1.0):
                self._done(handle, result)
        return self.jobs

    def _spec(self, kind: str, mj: ModelJobs, device: Optional[str] = None) -> dict:
        plan = self.p.plan
        key = mj.keys[f"bench:{device}" if kind == "bench" else kind]
        return {"kind": kind, "key": key, "model": mj.model, "device": device, "pairs": mj.pairs,
                "calibration": plan.calibration, "export": plan.export, "eval": plan.eval, "bench": plan.bench}

    def _submit(self, kind: str, mj: ModelJobs, payload: Any, placement: Placement, device: Optional[str] = None):
        h = self.engine.submit(self._spec(kind, mj, device), payload, placement)
        self.submitted[h] = time.time()
        self.progress("submit", {"kind": kind, "model": mj.name, "device": device})

    def _reused(self, kind: str, mj: ModelJobs, rec: dict, device: Optional[str] = None) -> None:
        self.jobs.append({**_summary(rec, kind, mj.name, device), "reused": True})
        self.progress("reused", self.jobs[-1])

    def _done(self, handle: Any, result: dict) -> None:
        mj = next(m for m in self.p.models if m.name == result["model"])
        row = {**_summary(result, result["kind"], mj.name, result.get("device")), "reused": False,
               "submitted": self.submitted.pop(handle, None), "received": time.time()}
        self.jobs.append(row)
        if result["status"] == "ok":
            self._write(mj, result)
        self.out.record(mj.name, result)
        self.progress("done", row)
        if result["kind"] == "export" and result["status"] == "ok":
            self._downstream(mj, self.engine.payload_of(handle, result))

    def _write(self, mj: ModelJobs, result: dict) -> None:
        kind = result["kind"]
        if kind == "export":
            self.out.write_export(mj.name, result["files"])
        elif kind == "eval":
            self.out.write_eval(mj.name, result)
        else:
            self.out.write_bench(mj.name, result["device"], result, cells.write_bench)

    def _downstream(self, mj: ModelJobs, payload: Any) -> None:
        todo: list[tuple[str, Optional[str], Placement]] = []
        if self.p.plan.eval.get("data"):
            todo.append(("eval", None, Placement("cpu")))
        for d in self.p.devices:
            todo.append(("bench", d, Placement("local") if d == cells.LOCAL else Placement("device", d)))
        for kind, device, placement in todo:
            key = mj.keys[f"bench:{device}" if kind == "bench" else kind]
            rec = self.out.finished(mj.name, kind, key, device)
            if rec:
                self._reused(kind, mj, rec, device)
                continue
            if payload is None:
                payload = self.engine.put({"files": self._export_files(mj.name)})
            self._submit(kind, mj, payload, placement, device)

    def _export_files(self, name: str) -> dict[str, bytes]:
        files = jobs.pack(self.out.model_dir(name))
        return {k: v for k, v in files.items()
                if k not in EXPORT_OUTPUTS and not k.startswith(("bench/", "source_predictions-"))}


def _summary(rec: dict, kind: str, model: str, device: Optional[str]) -> dict:
    w = rec.get("where") or {}
    started, ended = rec.get("started"), rec.get("ended")
    return {"kind": kind, "model": model, "device": device, "status": rec.get("status"), "reason": rec.get("reason"),
            "node": w.get("node"), "host": w.get("host"), "started": started, "ended": ended,
            "seconds": round(ended - started, 3) if started and ended else None}


def run_sweep(prepared: Prepared, engine: SerialEngine | RayEngine, progress: Progress = _quiet,
              junit: Optional[str] = None, markdown: Optional[str] = None, ledger: Any = None,
              record: bool = True) -> SweepResult:
    """Check the devices (against the cluster when joining one), run every job, write the reports, stop
    the engine, then record the sweep in the results ledger (``ledger``: a path or postgresql:// URL,
    None: the default one; ``record=False``: nothing). Ctrl-C cancels the jobs and stops what this run
    started."""
    clock = {"start": time.time()}
    where = ledger_lib.resolve(ledger, disabled=not record)  # a bad --ledger fails here, before any job
    before = ledger_lib.capture() if where is not None else None
    cluster = isinstance(engine, RayEngine) and engine.mode == "cluster"
    if not cluster:  # devices registered here: checked before anything starts
        resolve_devices(prepared, engine)
    try:
        engine.start([] if cluster else [d for d in prepared.devices if d != cells.LOCAL])
        if cluster:
            resolve_devices(prepared, engine)
        clock["engine"] = time.time()
        progress("engine", {**engine.describe(), "nodes": engine.nodes(), "devices": prepared.devices})
        sweep = Sweep(prepared, engine, progress)
        try:
            done = sweep.run()
        except BaseException:
            engine.cancel_all()
            raise
        info = {**engine.describe(), "nodes": engine.nodes()}
        clock["jobs"] = time.time()
    finally:
        engine.stop()
    clock["stop"] = time.time()
    merge_benches(prepared, OutputFolder(prepared.plan.out))
    info["timings"] = {"start_s": round(clock["engine"] - clock["start"], 3),
                       "jobs_s": round(clock["jobs"] - clock["engine"], 3),
                       "stop_s": round(clock["stop"] - clock["jobs"], 3)}
    report = build_report(prepared, OutputFolder(prepared.plan.out), done, info, time.time() - clock["start"])
    written = write_outputs(report, prepared.plan.out, junit=junit, markdown=markdown)
    recorded = record_sweep(prepared, report, written, where, before) if where is not None else None
    return SweepResult(report, written, done, recorded)


def record_sweep(prepared: Prepared, report: dict, written: dict, ledger: Any, before: Optional[dict]) -> Any:
    """One sweep run in the ledger with every model's merged bench report and eval result as child runs
    (after the reports are written: a ledger that fails raises LedgerError, the reports stay)."""
    out = OutputFolder(prepared.plan.out)
    benches, evals, checks = [], [], []
    gate_rows = (report.get("gate") or {}).get("rows") or []
    for mj in prepared.models:
        folder = out.model_dir(mj.name)
        bench, ev = out.json(folder / "bench.json"), out.json(folder / "eval.json")
        if bench and bench.get("rows"):  # under the plan's name of the model (two entries may share a source)
            benches.append({**bench, "model": {**(bench.get("model") or {}), "name": mj.name}})
        if ev and ev.get("results") is not None:
            evals.append({**ev, "model": mj.name})
        rows = [r for r in gate_rows if r.get("model") == mj.name]
        if rows:
            failed = sum(r.get("status") == "fail" for r in rows)
            checks.append({"model": mj.name, "folder": str(folder) if folder.is_dir() else None,
                           "passed": not failed, "failed": failed, "checks": len(rows), "rows": rows})
    meta = {k: v for k, v in report.items() if k != "rows"} | {"cells": report.get("rows") or []}
    return ledger_lib.record_sweep(meta, ledger, benches=benches, evals=evals, checks=checks,
                                   source=written.get("json"), before=before)


def merge_benches(prepared: Prepared, out: OutputFolder) -> None:
    """OUT/<model>/bench.json|md|html: every device's report of the model in one (`bench --device` shape)."""
    for mj in prepared.models:
        reps = [out.json(out.bench_dir(mj.name, d) / "bench.json") for d in prepared.devices]
        reps = [r for r in reps if r]
        if reps and out.model_dir(mj.name).is_dir():
            cells.write_bench(cells.merge_bench(reps), out.model_dir(mj.name))


__all__ = ["Prepared", "SweepResult", "merge_benches", "prepare", "resolve_devices", "run_sweep"]
