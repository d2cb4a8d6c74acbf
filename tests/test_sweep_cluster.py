"""`edgepipe sweep` on a real two-node Ray cluster on 127.0.0.1.

The head and a second node are separate `edgepipe node start --block` processes (`ray start` with one
resource per device), each in its own session and short temp dir, with its own device registry:
the head owns ssh device "board-a", the second node "board-b", both served by a real sshd on
127.0.0.1. Every node and driver shares a token (token authentication). Tests stop only the
processes they started, by pid. Tiny models (MobileNet 0.25 at 32 px, untrained), two of them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import sweep_support as S
from edgepipe.pipeline.base.manifest import artifact_problem, load_manifest
from edgepipe.pipeline import ledger

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                       reason='Ray is not installed: pip install "edgepipe[cluster]" (the test extra installs it)'),
    pytest.mark.skipif(not (Path(S.SSHD).exists() and all(shutil.which(x) for x in ("ssh", "scp", "ssh-keygen"))),
                       reason="OpenSSH server/client not installed: run .ci/remote-deps.sh"),
]

PLAN = """
out = "{out}"
formats = ["tflite"]
precisions = ["fp32", "int8"]
devices = {devices}
[[models]]
model = "mobilenet"
name = "m0"
weights = "none"
input_size = 32
alpha = 0.25
classes = 10
seed = 0
[[models]]
model = "mobilenet"
name = "m1"
weights = "none"
input_size = 32
alpha = 0.25
classes = 10
seed = 1
[calibration]
source = "digits"
samples = 16
[export]
verify_samples = 4
[eval]
data = "digits"
limit = 100
[bench]
targets = ["cpu"]
runs = 3
min_seconds = 0.02
warmup = 0
threads = 1
timeout = 120
[gate]
max_drop = 1.0
"""


def write_plan(d: Path, out: Path, devices: list[str]) -> Path:
    p = d / f"plan-{out.name}.toml"
    p.write_text(PLAN.format(out=out, devices=json.dumps(devices)))
    return p


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    sshd = S.start_sshd(Path(tmp_path_factory.mktemp("sshd")))
    cfg = {k: d / f"cfg-{k}" / "devices.json" for k in ("a", "b", "all")}
    S.register(cfg["a"], "board-a", sshd, d / "dev-a")
    S.register(cfg["b"], "board-b", sshd, d / "dev-b")
    for name, sub in (("board-a", "dev-a"), ("board-b", "dev-b")):
        S.register(cfg["all"], name, sshd, d / sub)
    pause = d / "pause"
    pause.mkdir()
    (pause / "release").touch()  # node2 pauses its jobs only while this is absent (the kill test)
    port = S.free_port()
    address = f"127.0.0.1:{port}"
    nodes = [S.Node("head", ["board-a"], cfg["a"], {"EDGEPIPE_CACHE_DIR": str(d / "cache-head")}, d, head_port=port)]
    started: set[int] = set()

    def stop() -> None:
        nonlocal started
        started |= set().union(*(n.pids for n in nodes))
        for n in reversed(nodes):
            n.stop()

    try:
        S.wait_nodes(address, {"head"}, nodes)
        nodes.append(S.Node("node2", ["board-b"], cfg["b"], {"EDGEPIPE_CACHE_DIR": str(d / "cache-node2"),
                                                             "EDGEPIPE_SWEEP_PAUSE": str(pause)}, d, address=address))
        info = S.wait_nodes(address, {"head", "node2"}, nodes)
        yield SimpleNamespace(dir=d, address=address, head=nodes[0], node2=nodes[1], cfg=cfg, pause=pause,
                              ids={n["name"]: n["id"] for n in info}, sshd=sshd, stop=stop, traces=[])
    finally:
        stop()
        S.stop_sshd(sshd)
        assert not S.alive(started), "processes the test started are still running"


def driver_env(c, **extra) -> dict:
    return {**S.AUTH_ENV, "EDGEPIPE_CACHE_DIR": str(c.dir / "cache-driver"), **extra}


def run_sweep(c, plan: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`edgepipe sweep PLAN ARGS --json`, its connect()/bind() calls logged (see the last test)."""
    trace = c.dir / f"driver-{len(c.traces)}.trace"
    c.traces.append(trace)
    return subprocess.run(S.traced([S.PY, "-m", "edgepipe.pipeline", "sweep", str(plan), *args, "--json"], trace),
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or driver_env(c))})


def report_of(r: subprocess.CompletedProcess) -> dict:
    assert r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout)


def test_nodes_listen_on_loopback_only(cluster):
    for node in (cluster.head, cluster.node2):
        socks = S.listening(node.pids)
        assert len(socks) >= 3, f"{node.name}: expected Ray's servers to listen ({socks})"
        assert all(S.loopback_only(addr) for _, addr, _ in socks), f"{node.name} listens beyond loopback: {socks}"


def test_device_no_node_owns_is_a_bad_plan(cluster, tmp_path):
    out = tmp_path / "out"
    r = run_sweep(cluster, write_plan(tmp_path, out, ["local", "board-z"]), "--ray", cluster.address, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("engine:")]
    assert len(lines) == 1 and "no node of the cluster owns device 'board-z'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "sweep.json").exists() and not any(out.glob("*/manifest.json"))


def test_cluster_sweep_placement_report_serial_equality_and_resume(cluster, tmp_path):
    out = tmp_path / "cluster"
    plan = write_plan(tmp_path, out, ["local", "board-a", "board-b"])
    junit = tmp_path / "junit.xml"
    r = run_sweep(cluster, plan, "--ray", cluster.address, "--junit", str(junit), "--markdown", str(tmp_path / "g.md"))
    rep = report_of(r)
    assert rep["engine"]["mode"] == "cluster" and {n["name"] for n in rep["engine"]["nodes"]} == {"head", "node2"}
    jobs = rep["jobs"]
    assert all(j["status"] == "ok" for j in jobs), [(j["kind"], j["model"], j["reason"]) for j in jobs]
    _placement(cluster, jobs)
    _gate_is_right(rep, out, r, junit)
    assert all(row["node"] and row["host"] for row in rep["rows"]), "every row names its node and host"

    # the same plan without Ray: serial, with a note, and the same artifacts and figures
    shim = tmp_path / "no-ray"
    (shim / "ray").mkdir(parents=True)
    (shim / "ray" / "__init__.py").write_text("raise ImportError('ray is hidden for this test')\n")
    ser_out = tmp_path / "serial"
    env = {"PYTHONPATH": str(shim), "EDGEPIPE_CONFIG": str(cluster.cfg["all"]),
           "EDGEPIPE_CACHE_DIR": str(tmp_path / "cache-serial")}
    rs = S.cli("sweep", str(write_plan(tmp_path, ser_out, ["local", "board-a", "board-b"])), "--json", "--ledger",
               str(tmp_path / "ledger.sqlite"), env=env, timeout=900)
    ser = report_of(rs)
    _recorded(tmp_path / "ledger.sqlite", ser, ser_out)
    assert "Ray is not installed: running serially" in rs.stderr and 'pip install "edgepipe[cluster]"' in rs.stderr
    assert ser["engine"]["mode"] == "serial" and rs.returncode == r.returncode
    _same_results(out, ser_out, rep, ser)

    # a second run of the plan redoes nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tflite")}
    r2 = run_sweep(cluster, plan, "--ray", cluster.address)
    again = report_of(r2)
    assert again["counts"]["run"] == 0 and again["counts"]["reused"] == len(jobs), again["counts"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tflite")} == before
    assert again["gate"]["rows"] == rep["gate"]["rows"] and r2.returncode == r.returncode


def _recorded(path: Path, rep: dict, out: Path) -> None:
    """The sweep is one ledger run whose children are each model's bench, eval and check."""
    assert rep["ledger"]["kind"] == "sweep"
    with ledger.Ledger.open(str(path)) as led:
        runs = ledger.runs(led, limit=50)
    top = [r for r in runs if r["kind"] == "sweep"]
    assert len(top) == 1 and top[0]["id"] == rep["ledger"]["run_id"]
    kids = [r for r in runs if r["parent_id"] == top[0]["id"]]
    assert sorted(r["kind"] for r in kids) == ["bench"] * 2 + ["check"] * 2 + ["eval"] * 2
    assert {r["model"] for r in kids} == {"m0", "m1"}
    bench_rows = sum(len(json.loads((out / m / "bench.json").read_text())["rows"]) for m in ("m0", "m1"))
    assert sum(r["rows"] for r in kids if r["kind"] == "bench") == bench_rows > 0


def _placement(c, jobs: list[dict]) -> None:
    """Device jobs ran on the node owning the device, never two at once on one device; local
    benchmarks on the driver's node (the head)."""
    owner = {"board-a": c.ids["head"], "board-b": c.ids["node2"], "local": c.ids["head"]}
    bench = [j for j in jobs if j["kind"] == "bench"]
    assert len(bench) == 6
    for j in bench:
        assert j["node"] == owner[j["device"]], (j["device"], j["node_name"])
    for dev in owner:
        spans = sorted((j["started"], j["ended"]) for j in bench if j["device"] == dev)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two jobs overlapped on {dev}: {spans}"
    assert {j["node_name"] for j in jobs if j["kind"] in ("export", "eval")} <= {"head", "node2"}


def _gate_is_right(rep: dict, out: Path, r: subprocess.CompletedProcess, junit: Path) -> None:
    gate = rep["gate"]
    acc = [g for g in gate["rows"] if g["check"] == "top1"]
    assert len(acc) == 4  # 2 models x 2 artifacts, evaluated on cpu
    for g in acc:
        ev = json.loads((out / g["model"] / "eval.json").read_text())
        row = next(x for x in ev["results"] if x["artifact"] == g["artifact"] and x["status"] == "ok")
        assert g["drop"] == pytest.approx(row["drop"]["top1"])
        # as `check`: pass only when the drop's 95% interval lies within the budget (inconclusive fails)
        assert g["verdict"] in ("pass", "fail", "inconclusive") and g["low"] <= g["drop"] <= g["high"]
        assert g["status"] == ("pass" if g["verdict"] == "pass" and row["drop"]["top1"] <= 1.0 + 1e-9 else "fail")
    bench = [g for g in gate["rows"] if g["check"] == "bench"]
    assert len(bench) == 12 and all(g["status"] == "pass" for g in bench)
    failed = [g for g in gate["rows"] if g["status"] == "fail"]
    assert gate["passed"] == (not failed) and (r.returncode == (1 if failed else 0)), r.stderr[-2000:]
    xml = junit.read_text()
    assert xml.count("<testsuite ") == 2 and f'failures="{len(failed)}"' in xml
    md = (out / "sweep.md").read_text()
    assert "| model | artifact | device | target | node | host |" in md and "board-b" in md
    assert (out / "sweep.html").read_text().startswith("<!doctype html>")
    assert json.loads((out / "m0" / "bench.json").read_text())["settings"]["devices"] == ["local", "board-a", "board-b"]


def _same_results(a: Path, b: Path, ra: dict, rb: dict) -> None:
    for model in ("m0", "m1"):
        ma = json.loads((a / model / "manifest.json").read_text())
        mb = json.loads((b / model / "manifest.json").read_text())
        assert {x["id"]: x["sha256"] for x in ma["artifacts"]} == {x["id"]: x["sha256"] for x in mb["artifacts"]}
        ea = json.loads((a / model / "eval.json").read_text())
        eb = json.loads((b / model / "eval.json").read_text())
        keys = ("artifact", "target", "status", "top1", "top5", "agreement", "correct", "lost", "gained")
        assert [{k: x.get(k) for k in keys} for x in ea["results"]] == [{k: x.get(k) for k in keys} for x in eb["results"]]
        assert ea["source"]["top1"] == eb["source"]["top1"]
    cells = lambda rep: sorted((x["model"], x["artifact"], x["device"], x["target"], x["bench"]) for x in rep["rows"])
    assert cells(ra) == cells(rb)
    assert [(g["model"], g["name"], g.get("device"), g["status"]) for g in ra["gate"]["rows"]] == \
        [(g["model"], g["name"], g.get("device"), g["status"]) for g in rb["gate"]["rows"]]


def test_node_killed_mid_sweep(cluster, tmp_path):
    """node2 is stopped (SIGKILL, its whole process tree) while a job of this sweep runs on it: its
    export/eval is retried on the head, its device's bench fails with the reason, the rest completes,
    and nothing half-written is left. Runs last: it ends node2."""
    out = tmp_path / "out"
    for old in cluster.pause.glob("*.started"):
        old.unlink()
    (cluster.pause / "release").unlink()
    proc = subprocess.Popen([S.PY, "-m", "edgepipe.pipeline", "sweep", str(write_plan(tmp_path, out, ["local", "board-b"])),
                             "--ray", cluster.address, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **driver_env(cluster)})
    try:
        marker = _wait_marker(cluster.pause, proc)
        cluster.node2.kill()
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        (cluster.pause / "release").touch()
    rep = json.loads(stdout)
    assert proc.returncode == 1, stderr[-3000:]
    kind, model = marker.name.split("-")[:2]
    jobs = {(j["kind"], j["model"], j["device"]): j for j in rep["jobs"]}
    for (k, m, dev), j in jobs.items():
        if dev == "board-b":
            assert j["status"] == "failed" and "no live node owns device 'board-b'" in j["reason"], j
            assert "node2 left the cluster" in j["reason"], j["reason"]
        else:
            assert j["status"] == "ok", j
    if kind in ("export", "eval"):
        assert jobs[(kind, model, None)]["node_name"] == "head", "the interrupted job was retried on the head"
    assert not any(n["alive"] for n in rep["engine"]["nodes"] if n["name"] == "node2")
    fails = [g for g in rep["gate"]["rows"] if g["status"] == "fail"]
    assert fails and all(g["device"] == "board-b" or g["check"] == "top1" for g in fails)
    assert not list(out.rglob(".sweep-*")) and not list(out.rglob(".tmp-*"))
    _artifacts_intact(out)


def _wait_marker(pause: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(pause.glob("*.started"))
        if found:
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before a job started on node2: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("no job started on node2")


def _artifacts_intact(out: Path) -> None:
    for mf in out.glob("*/manifest.json"):
        m, folder = load_manifest(mf)
        assert all(artifact_problem(a, folder) is None for a in m.artifacts), mf


@pytest.mark.skipif(S.STRACE is None, reason="strace is not installed (apt install strace): cannot log connect()/bind()")
def test_nothing_but_loopback_was_bound_or_connected(cluster):
    """Every connect() and bind() of every process of the cluster (nodes, their Ray servers, workers,
    agents, jobs) and of the sweeps run against it went to 127.0.0.1 (runs last: it stops the cluster)."""
    cluster.stop()  # strace writes its log out when the traced processes are gone
    traces = [cluster.head.trace, cluster.node2.trace, *cluster.traces]
    assert all(t.is_file() for t in traces)
    assert sum(len(t.read_text().splitlines()) for t in traces) > 50, "the traces logged the cluster's sockets"
    for t in traces:
        assert S.foreign_addresses(t) == [], t
