"""`edgepipe sweep` without a cluster: the plan (TOML and flags), bad plans refused before anything runs,
`node start` checks, and Ctrl-C on the embedded Ray instance (which must listen on 127.0.0.1 only and
leave nothing running). The two-node cluster is in test_sweep_cluster.py."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import sweep_support as S
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.sweep.plan import load_plan
from edgepipe.pipeline.sweep.render import render_html, render_junit, render_markdown
from edgepipe.pipeline.sweep.run import prepare

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='Ray is not installed: pip install "edgepipe[cluster]"')
TINY = 'model = "mobilenet"\nweights = "none"\ninput_size = 32\nalpha = 0.25\nclasses = 10\n'


def plan_file(tmp_path: Path, text: str, name: str = "plan.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------------------ the plan
def test_plan_from_toml_with_relative_paths_and_defaults(tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "evalset").mkdir()
    p = plan_file(tmp_path, f'out = "res"\nprecisions = ["fp32", "int8"]\n[[models]]\n{TINY}name = "tiny"\n'
                            '[calibration]\nsource = "calib"\n[eval]\ndata = "evalset"\n[gate]\nmax_drop_for = {int8 = 1.5}\n')
    plan = load_plan(p)
    assert plan.out == str(tmp_path / "res")
    assert plan.calibration["source"] == str(tmp_path / "calib") and plan.eval["data"] == str(tmp_path / "evalset")
    assert plan.formats == ["tflite", "onnx"] and plan.devices == ["local"] and plan.bench["runs"] == 50
    assert plan.pairs(plan.models[0]) == [("tflite", "fp32"), ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "int8")]
    assert plan.gate["max_drop_for"] == {"int8": 1.5}
    assert load_plan(p).digest() == plan.digest()


def test_flags_override_the_plan_and_replace_its_models(tmp_path):
    p = plan_file(tmp_path, f'devices = ["local"]\n[[models]]\n{TINY}\n[bench]\nruns = 7\n')
    plan = load_plan(p, {"bench.runs": 3, "devices": "local,pi4", "out": "x"},
                     [{"model": "mobilenet_v2", "weights": "none", "input_size": "32"}])
    assert plan.bench["runs"] == 3 and plan.devices == ["local", "pi4"]
    assert plan.out == str(Path.cwd() / "x")
    assert [m["model"] for m in plan.models] == ["mobilenet_v2"]


def test_model_names_come_from_the_library_and_must_be_distinct(tmp_path):
    plan = load_plan(plan_file(tmp_path, f"[[models]]\n{TINY}\n[[models]]\n{TINY}seed = 1\n"))
    with pytest.raises(UserError, match="two models are named 'mobilenet'"):
        prepare(plan)
    plan = load_plan(plan_file(tmp_path, f'[[models]]\n{TINY}\n[[models]]\n{TINY}seed = 1\nname = "b"\n', "p2.toml"))
    assert [mj.name for mj in prepare(plan).models] == ["mobilenet", "b"]


@pytest.mark.parametrize("text, message", [
    ("[[models]\nmodel = 1", "is not valid TOML"),
    ('colour = "red"\n[[models]]\nmodel = "mobilenet"', "unknown key 'colour'"),
    ('[[models]]\nmodel = "mobilenet"\n[bench]\nruns = "many"', "[bench] runs must be int"),
    ('[[models]]\nmodel = "mobilenet"\nsize = 3', "unknown key 'size' in model 1"),
    ('formats = ["tflite"]', "names no model"),
])
def test_malformed_plans(tmp_path, text, message):
    with pytest.raises(UserError, match=None) as e:
        load_plan(plan_file(tmp_path, text))
    assert message in e.value.message


@pytest.mark.parametrize("plan_text, args, message", [
    (f"[[models]]\n{TINY}", ["--models", "nosuchnet"], "unknown model 'nosuchnet'"),
    (f"[[models]]\n{TINY}", ["--devices", "local,ghost"], "no device named 'ghost'"),
    (f"[[models]]\n{TINY}", ["--devices", "lcoal"], "For this machine's CPU write 'local'"),
    (f"[[models]]\n{TINY}", ["--eval-data", "digits", "--eval-limit", "50"], "limit 50 is below min_samples (100)"),
    ("[[models\n", [], "is not valid TOML"),
    (f"[[models]]\n{TINY}", ["--precisions", "int8"], "needs calibration data"),
    (f"[[models]]\n{TINY}", ["--max-drop-for", "int4=2"], "matches no precision, format or artifact"),
    (f"[[models]]\n{TINY}", ["--serial", "--ray", "127.0.0.1:1"], "--serial and --ray both given"),
])
def test_bad_plans_exit_2_with_one_line_before_anything_runs(tmp_path, plan_text, args, message):
    out = tmp_path / "out"
    r = S.cli("sweep", str(plan_file(tmp_path, plan_text)), "--out", str(out), *args,
              env={"EDGEPIPE_CONFIG": str(tmp_path / "cfg" / "devices.json")}, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgepipe: error: ") and message in lines[0], r.stderr
    assert not out.exists(), "nothing may run (or be written) for a bad plan"


def test_node_start_checks_its_devices_before_starting_ray(tmp_path):
    r = S.cli("node", "start", "--head", "--devices", "ghost", "--config", str(tmp_path / "devices.json"), timeout=60)
    assert r.returncode == 2 and "no device named 'ghost'" in r.stderr and "Traceback" not in r.stderr
    r = S.cli("node", "start", "--head", "--address", "127.0.0.1:6379", timeout=60)
    assert r.returncode == 2 and "either --head or --address" in r.stderr


# ------------------------------------------------------------------------------------------ embedded Ray
@pytest.mark.parametrize("engine", [pytest.param("embedded", marks=needs_ray), "serial"])
def test_ctrl_c_leaves_nothing_running(tmp_path, engine):
    """Ctrl-C while a job runs exits 130 and leaves no process (the embedded instance included, which
    listens on 127.0.0.1 only), no job temp folder and no half-written output."""
    pause, tmp = tmp_path / "pause", tmp_path / "tmp"
    pause.mkdir()
    tmp.mkdir()
    out = tmp_path / "out"
    before = set(Path("/tmp").glob("epray-*"))
    env = {**os.environ, "EDGEPIPE_SWEEP_PAUSE": str(pause), "TMPDIR": str(tmp),
           "EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([S.PY, "-m", "edgepipe.pipeline", "sweep", "--models", "mobilenet", "--weights", "none",
                             "--input-size", "32", "--alpha", "0.25", "--classes", "10", "--formats", "tflite",
                             "--out", str(out), *(["--cpus", "2"] if engine == "embedded" else ["--serial"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(pause.glob("*.started")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        started = S.tree(proc.pid)
        if engine == "embedded":
            socks = S.listening(started)
            assert len(socks) >= 3 and all(S.loopback_only(a) for _, a, _ in socks), socks
        assert list(tmp.glob("edgepipe-sweep-*")), "the paused job has its temp folder"
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            S.kill_tree(proc.pid)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    time.sleep(1)
    assert not S.alive(started | S.tree(proc.pid)), "Ctrl-C left processes running"
    assert not list(tmp.glob("edgepipe-sweep-*")), "a job's temp folder was left"
    assert set(Path("/tmp").glob("epray-*")) <= before, "the embedded instance's temp folder was left"
    assert not list(out.rglob(".sweep-*")) and not list(out.glob("*/manifest.json"))


@needs_ray
@pytest.mark.skipif(S.STRACE is None, reason="strace is not installed (apt install strace): cannot log connect()/bind()")
def test_embedded_instance_binds_and_connects_to_loopback_only(tmp_path):
    """A whole embedded sweep (Ray's servers, dashboard process, agents, workers, the export, bench
    agent) under strace: every connect() and bind() is to 127.0.0.1."""
    trace = tmp_path / "net.trace"
    r = subprocess.run(S.traced([S.PY, "-m", "edgepipe.pipeline", "sweep", "--models", "mobilenet", "--weights", "none",
                                 "--input-size", "32", "--alpha", "0.25", "--classes", "10", "--formats", "tflite",
                                 "--runs", "2", "--min-seconds", "0", "--out", str(tmp_path / "out"), "--json"], trace),
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["engine"]["mode"] == "embedded"
    assert len(trace.read_text().splitlines()) > 20
    assert S.foreign_addresses(trace) == []


@needs_ray
def test_unreachable_cluster_is_a_one_line_error(tmp_path):
    port = S.free_port()
    r = S.cli("sweep", "--models", "mobilenet", "--weights", "none", "--input-size", "32", "--ray",
              f"127.0.0.1:{port}", "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2 and f"no Ray cluster answers at 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_reports_json_keys(tmp_path):
    """A report renders (Markdown, HTML, JUnit) from its own JSON alone."""
    rep = {"models": {"m": {}}, "devices": ["local"], "wall_s": 1.0, "counts": {"run": 1, "reused": 0, "failed": 0},
           "engine": {"mode": "serial", "nodes": [{"id": "local", "name": "local", "host": "h", "ip": None, "cpus": 2,
                                                    "devices": [], "alive": True}]},
           "jobs": [{"kind": "export", "model": "m", "device": None, "status": "ok", "node_name": "local", "host": "h",
                     "seconds": 1.0, "reused": False, "reason": None}],
           "rows": [{"model": "m", "artifact": "tflite-fp32", "device": "local", "target": "cpu", "node": "local",
                     "host": "h", "verification": "passed", "top1": 90.0, "drop_top1": 0.0, "p50_ms": 0.1,
                     "p90_ms": 0.2, "bench": "ok", "gate": "pass"}],
           "gate": {"passed": False, "failed": 1, "checks": 1, "skipped": 0,
                    "rows": [{"model": "m", "artifact": "tflite-fp32", "device": None, "target": "cpu", "check": "top1",
                              "source_value": 90.0, "artifact_value": 80.0, "drop": 10.0, "budget": 1.0,
                              "status": "fail", "reason": "top-1 drop 10.00 > budget 1.0 points",
                              "name": "tflite-fp32 on cpu: top-1"}]}}
    md = render_markdown(rep)
    assert "gate 1 of 1 checks failed" in md and "| m | tflite-fp32 | local | cpu | local | h |" in md
    assert "❌ FAIL" in md and "top-1 drop 10.00" in md
    assert "<td class=\"fail\">fail</td>" in render_html(rep)
    xml = render_junit(rep)
    assert 'failures="1"' in xml and "<failure" in xml and json.dumps(rep)
