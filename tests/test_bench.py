"""edgepipe bench on real runtimes: LiteRT (XNNPACK) and onnxruntime on the CPU, the Edge TPU and
Core ML rows that cannot run here, a runtime that dies with a signal, bad input, `edgepipe devices`.

The artifacts are built here from a tiny Keras model with the real converters (TFLite fp32 and
full-int8, ONNX through tf2onnx, all with a static batch of 1), plus a dynamic-batch TFLite model,
a one-op flatbuffer shaped like an edgetpu_compiler output, and a Core ML mlprogram. The builder lives in
bench_artifacts.py; conftest.py's ``tiny_export`` fixture builds it once per session.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe.devices import BenchReport, BenchSettings, MeasureSpec, run_bench
from edgepipe.devices.measure.bench import command
from edgepipe.devices.measure.plan import LocalHost, plan_row
from edgepipe.devices.onboard import agent
from edgepipe.pipeline.cli.main import main as cli_main
from edgepipe.pipeline.base.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]
ONBOARD = REPO / "devices" / "onboard"
AGENT = ONBOARD / "agent.py"
FAST = dict(runs=12, min_seconds=0.05, warmup=1, threads=1)


@pytest.fixture()
def export_copy(tiny_export, tmp_path) -> Path:
    """A private copy tests may damage."""
    dst = tmp_path / "export"
    shutil.copytree(tiny_export, dst)
    return dst


@pytest.fixture(scope="session")
def cpu_report(tiny_export) -> BenchReport:
    return run_bench(tiny_export, settings=BenchSettings(targets=["cpu"], profile=True, **FAST))


def _rows(report: BenchReport) -> dict:
    return {(r.artifact, r.target): r for r in report.rows}


# --------------------------------------------------------------------------------------------- cpu
@pytest.mark.parametrize("aid", ["tflite-fp32", "tflite-int8", "tflite-dynbatch", "onnx-fp32"])
def test_cpu_rows_have_sane_figures(cpu_report, aid):
    r = _rows(cpu_report)[(aid, "cpu")]
    assert r.status == "ok", r.reason
    lat = r.latency_ms
    assert lat["n"] >= FAST["runs"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    lo, hi = lat["ci95_p50"]
    assert lo <= lat["p50"] <= hi and lat["ci_coverage"] >= 0.95
    assert len(r.samples_ms) == lat["n"]
    assert r.measured_s >= FAST["min_seconds"]
    assert r.load_ms > 0 and r.first_ms > 0 and len(r.warmup_ms) == FAST["warmup"]
    assert r.throughput_ips == pytest.approx(1000.0 / lat["mean"], rel=1e-6)
    assert r.threads == 1
    assert r.memory["peak_rss_kb"] >= r.memory["after_load_rss_kb"] >= r.memory["baseline_rss_kb"] > 0
    assert r.runtime_version  # a real version string from the runtime that ran
    assert r.runner == "agent"
    assert r.input_source == "file"  # the manifest's reference samples, not random data
    assert r.inputs[0]["shape"][1:] == [32, 32, 3]


def test_cpu_runtime_facts(cpu_report):
    rows = _rows(cpu_report)
    fp32 = rows[("tflite-fp32", "cpu")]
    assert fp32.runtime == "litert" and fp32.runtime_api == "interpreter"
    assert fp32.placement["accelerator"] == "xnnpack"
    assert fp32.placement["ops_total"] > 0 and fp32.placement["fully_accelerated"] is True
    cumsum = rows[("tflite-cumsum", "cpu")]  # ops XNNPACK does not take run on TFLite's own kernels
    assert cumsum.status == "ok" and cumsum.placement["fully_accelerated"] is False
    assert cumsum.placement["fallback_ops"] == {"CUMSUM": 1}
    assert cumsum.placement["ops_accelerated"] == cumsum.placement["ops_total"] - 1 >= 2
    int8 = rows[("tflite-int8", "cpu")]
    assert int8.inputs[0]["dtype"] == "int8" and int8.inputs[0]["scale"]
    onnx = rows[("onnx-fp32", "cpu")]
    assert onnx.runtime == "onnxruntime"
    assert onnx.placement["providers"][0] == "CPUExecutionProvider"
    assert cpu_report.settings["inputs"].startswith("reference.npz")
    assert cpu_report.host["cpu"]["logical_cores"] >= 1


def test_onnxruntime_profile_top_ops(cpu_report):
    prof = _rows(cpu_report)[("onnx-fp32", "cpu")].profile
    assert prof["source"] == "onnxruntime profiler"
    ops = [o["op"] for o in prof["top_ops"]]
    assert "Conv" in ops
    assert sum(o["pct"] for o in prof["top_ops"]) <= 100.0 + 1e-6
    assert all(n["provider"] == "CPUExecutionProvider" for n in prof["top_nodes"])
    # LiteRT has no per-op profiler in Python: the row says so instead of inventing one
    lite = _rows(cpu_report)[("tflite-fp32", "cpu")].profile
    assert lite.get("source") is None and "no per-op profiler" in lite["note"]


def test_rows_that_cannot_run_say_why(cpu_report):
    rows = _rows(cpu_report)
    failed_export = rows[("onnx-int8", "cpu")]
    assert failed_export.status == "skipped" and "export failed" in failed_export.reason
    assert "no calibration data" in failed_export.reason
    coreml = rows[("coreml-fp32", "cpu")]
    if sys.platform != "darwin":
        assert coreml.status == "skipped" and coreml.reason == "Core ML runtime needs macOS"


def test_crashing_runtime_fails_only_its_row(tiny_export, monkeypatch):
    # Test hook documented in devices/onboard/agent.py: the agent SIGSEGVs itself when the artifact's
    # file name contains EDGEPIPE_AGENT_CRASH, right after loading the model.
    monkeypatch.setenv("EDGEPIPE_AGENT_CRASH", "tiny_int8")
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["cpu"], artifacts=["tflite-fp32", "tflite-int8", "onnx-fp32"],
                                               agreement=False, **FAST))
    rows = _rows(rep)
    crashed = rows[("tflite-int8", "cpu")]
    assert crashed.status == "failed"
    assert crashed.signal == "SIGSEGV" and crashed.reason == "the runtime crashed with SIGSEGV after loading the model"
    assert "EDGEPIPE_AGENT_CRASH" in (crashed.stderr_tail or "")
    assert rows[("tflite-fp32", "cpu")].status == "ok"
    assert rows[("onnx-fp32", "cpu")].status == "ok"


def test_timeout_and_time_cap(tiny_export):
    # a row that runs past --timeout is killed and failed; the agent itself stops measuring at
    # half the timeout and says it fell short of what was asked
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], runs=5,
                                                        min_seconds=0, warmup=0, threads=1, timeout_s=0.05))
    assert rep.rows[0].status == "failed" and rep.rows[0].reason == "timed out after 0.05 s"
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], runs=10 ** 8,
                                                        min_seconds=0, warmup=0, threads=1, timeout_s=3,
                                                        agreement=False))
    r = rep.rows[0]
    assert r.status == "ok" and r.truncated is True and r.latency_ms["n"] < 10 ** 8
    assert 1.0 <= r.measured_s < 3 and "short of 100000000 runs" in r.notes[0]


def test_edgetpu_rows_unavailable_or_skipped_with_reasons(tiny_export):
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["edgetpu"], **FAST))
    rows = _rows(rep)
    assert {r.status for r in rep.rows} <= {"skipped", "unavailable", "ok"}
    assert all(r.reason for r in rep.rows if r.status != "ok")
    assert rows[("tflite-fp32", "edgetpu")].status == "skipped"
    assert "int8" in rows[("tflite-fp32", "edgetpu")].reason
    assert rows[("tflite-int8", "edgetpu")].status == "skipped"
    assert "not compiled" in rows[("tflite-int8", "edgetpu")].reason
    compiled = rows[("edgetpu-int8", "edgetpu")]
    if rep.targets["edgetpu"].get("tflite", {}).get("available"):
        pytest.skip("an Edge TPU runtime is installed here; the unavailable path cannot be shown")
    assert compiled.status == "unavailable"
    assert "libedgetpu" in compiled.reason


def test_registered_runtime_measured_by_worker(tiny_export):
    # Runtimes the standalone agent does not know (here the Core ML reference interpreter) are
    # measured by bench's worker mode with the same method, in their own process too.
    rep = run_bench(tiny_export, settings=BenchSettings(targets=["reference"], artifacts=["coreml-fp32", "tflite-fp32"],
                                               **FAST))
    rows = _rows(rep)
    ml = rows[("coreml-fp32", "reference")]
    assert ml.status == "ok", ml.reason
    assert ml.runner == "worker" and ml.runtime == "coreml-reference"
    assert ml.latency_ms["n"] >= FAST["runs"] and 0 < ml.stat("p50") <= ml.stat("p90")
    assert ml.input_source == "file" and ml.memory["peak_rss_kb"] > 0
    lite = rows[("tflite-fp32", "reference")]
    assert lite.status == "skipped" and "no runtime runs tflite" in lite.reason


# --------------------------------------------------------------------------------------------- agent
@pytest.mark.parametrize("name", ["agent.py", "probe.py", "predict.py"])
def test_onboard_files_are_standalone_python39(name):
    src = (ONBOARD / name).read_text()
    tree = ast.parse(src, feature_version=(3, 9))  # no 3.10+ syntax
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module.split(".")[0])
    # runtime libraries are imported by name (importlib), only when a session needs one
    third_party = {m for m in mods if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party <= {"numpy", "agent"}, third_party  # probe/predict: the agent beside them
    assert "edgepipe" not in mods and "tensorflow" not in mods
    assert name != "agent.py" or ("agent" not in mods and "probe" not in mods)  # the agent stands alone
    assert len(src.splitlines()) <= 800


def test_agent_cli_from_a_copy_outside_the_repo(tiny_export, tmp_path):
    # the way it runs on a board: a lone copy of the file, no edgepipe on the path
    lone = tmp_path / "agent.py"
    shutil.copy(AGENT, lone)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-X", "importtime", str(lone), "--artifact",
                        str(tiny_export / "tiny_int8.tflite"), "--format", "tflite", "--target", "cpu",
                        "--threads", "1", "--runs", "5", "--min-seconds", "0", "--warmup", "0"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)  # exactly one JSON object on stdout
    assert d["status"] == "ok" and d["runtime"]["name"] in ("ai_edge_litert", "tflite_runtime")
    assert d["input_source"] == "random" and d["inputs"][0]["dtype"] == "int8"
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "edgepipe" not in imported and "tensorflow" not in imported


def test_agent_unavailable_target_exit_code(tiny_export):
    r = subprocess.run([sys.executable, str(AGENT), "--artifact", str(tiny_export / "tiny_fp32.onnx"),
                        "--format", "onnx", "--target", "gpu", "--runs", "1"],
                       capture_output=True, text=True, timeout=120)
    d = json.loads(r.stdout)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here")
    assert r.returncode == 3 and d["status"] == "unavailable" and "CUDAExecutionProvider" in d["reason"]


def test_median_ci_matches_binomial_tables():
    # classic distribution-free ranks for the 95% CI of the median (1-based)
    for n, (lo, hi) in {10: (2, 9), 20: (6, 15), 50: (18, 33), 100: (40, 61)}.items():
        xs = [float(i) for i in range(1, n + 1)]
        a, b, cov = agent.median_ci(xs)
        assert (a, b) == (lo, hi)
        assert cov >= 0.95
    s = agent.summarize(list(np.random.default_rng(1).exponential(2.0, 501)))
    xs = np.random.default_rng(1).exponential(2.0, 501)
    assert s["p50"] == pytest.approx(np.percentile(xs, 50))
    assert s["p99"] == pytest.approx(np.percentile(xs, 99))
    assert s["std"] == pytest.approx(np.std(xs, ddof=1))


def test_measure_honours_runs_and_min_seconds():
    class Doubler(agent.Session):
        inputs = [agent.Tensor("x", [1], "float32")]

        def run_native(self, feeds):
            return [feeds[0] * 2]

    res, first = agent.measure(Doubler(), [[np.ones(1, np.float32)]], MeasureSpec(runs=7, min_seconds=0.05, warmup=2))
    assert res["latency_ms"]["n"] >= 7 and res["measured_s"] >= 0.05 and len(res["warmup_ms"]) == 2
    assert first[0][0] == 2.0 and res["truncated"] is False
    res, _ = agent.measure(Doubler(), [[np.ones(1, np.float32)]],
                           MeasureSpec(runs=10 ** 9, min_seconds=0, warmup=0, max_seconds=0.05))
    assert res["truncated"] is True and res["latency_ms"]["n"] < 10 ** 9


def test_measure_spec_round_trips_through_argv_and_dict():
    spec = MeasureSpec(artifact="m.tflite", format="tflite", target="gpu", threads=3, runs=7, min_seconds=0.25,
                       max_seconds=300.0, warmup=0, profile=True, inputs="x.npz", save_outputs="y.npz")
    argv = spec.to_argv()
    assert argv[:6] == ["--artifact", "m.tflite", "--format", "tflite", "--target", "gpu"]
    assert "--profile" in argv and "--predict-out" not in argv and "--delegate" not in argv
    assert agent.parse_spec(argv) == spec
    assert MeasureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    # threads travel as int | None: none given means the runtime's own default, 0 reads the same
    bare = MeasureSpec(artifact="m.onnx", format="onnx")
    assert "--threads" not in bare.to_argv() and agent.parse_spec(bare.to_argv()).threads is None
    assert agent.parse_spec(bare.to_argv() + ["--threads", "0"]).threads is None
    with pytest.raises(SystemExit):
        agent.parse_spec(["--artifact", "m.onnx", "--format", "onnx", "--runs", "0"])


def test_bench_settings_derive_each_rows_spec_and_command(tiny_export):
    s = BenchSettings(targets=["cpu", "reference"], runs=9, min_seconds=0.5, warmup=2, timeout_s=40,
                      profile=True).validate()
    from edgepipe.pipeline.base.manifest import load_manifest

    m, folder = load_manifest(tiny_export)
    row, job = plan_row(m.artifact("tflite-int8"), "cpu", folder, LocalHost())
    spec = job.spec(s, 2, Path("in.npz"), None)
    assert (spec.threads, spec.runs, spec.min_seconds, spec.max_seconds, spec.warmup, spec.profile) == (
        2, 9, 0.5, 20.0, 2, True)
    assert (spec.format, spec.target, spec.inputs, spec.save_outputs) == ("tflite", "cpu", "in.npz", None)
    cmd = command(job, spec)
    assert cmd[:2] == [sys.executable, str(AGENT)] and agent.parse_spec(cmd[2:]) == spec  # one serialisation
    row, job = plan_row(m.artifact("coreml-fp32"), "reference", folder, LocalHost())
    cmd = command(job, job.spec(s, 1, None, None))
    assert cmd[1:3] == ["-m", "edgepipe.devices.measure.worker"] and "--runtime" in cmd
    assert agent.parse_spec(cmd[cmd.index("--artifact"):]).format == "coreml"


# --------------------------------------------------------------------------------------------- CLI
def _cli(*args) -> int:
    return cli_main(list(args))


def test_cli_bench_writes_reports_and_never_imports_tensorflow(tiny_export, tmp_path):
    out = tmp_path / "out"
    code = ("import sys, json\n"
            "from edgepipe.pipeline.cli import main\n"
            f"rc = main(['bench', {str(tiny_export)!r}, '--targets', 'cpu', '--artifacts', 'tflite-fp32,onnx-fp32', "
            f"'--runs', '5', '--min-seconds', '0', '--warmup', '0', '--threads', '1', '--out', {str(out)!r}, '--json'])\n"
            "sys.stderr.write(json.dumps({'rc': rc, 'tf': 'tensorflow' in sys.modules, "
            "'keras': 'keras' in sys.modules}) + '\\n')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    status = json.loads(r.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "tf": False, "keras": False}, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert {row["status"] for row in d["rows"]} == {"ok"}
    assert Path(d["written"]["json"]) == out / "bench.json"
    assert BenchReport.load(out / "bench.json").rows[0].latency_ms["n"] >= 5
    assert (out / "bench.md").read_text().startswith("## edgepipe bench: tiny")


def test_cli_devices_json(capsys):
    assert _cli("devices", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    cpu = [t for t in d["targets"] if t["target"] == "cpu" and t["runtime"] == "litert"][0]
    assert cpu["available"] is True and cpu["versions"]["ai-edge-litert"]
    assert all(t["available"] or t["reason"] for t in d["targets"])
    assert {t["target"] for t in d["targets"]} >= {"cpu", "gpu", "edgetpu"}
    assert d["host"]["cpu"]["logical_cores"] >= 1 and isinstance(d["host"]["cpu"]["isa"], list)
    if sys.platform != "darwin":
        coreml = [t for t in d["targets"] if "coreml" in t["formats"]]
        assert coreml and not coreml[0]["available"] and "macOS" in coreml[0]["reason"]


def test_cli_unknown_target_exit_2(tiny_export, capsys):
    assert _cli("bench", str(tiny_export), "--targets", "cpu,npu") == 2
    err = capsys.readouterr().err
    assert "unknown target 'npu'" in err and err.count("\n") == 1


def test_cli_unknown_artifact_exit_2(tiny_export, capsys):
    assert _cli("bench", str(tiny_export), "--artifacts", "nope") == 2
    assert "no artifact 'nope'" in capsys.readouterr().err


def test_cli_missing_artifact_exit_2(export_copy, capsys):
    (export_copy / "tiny_fp32.onnx").unlink()
    assert _cli("bench", str(export_copy), "--runs", "1", "--min-seconds", "0") == 2
    err = capsys.readouterr().err
    assert "missing" in err and "onnx-fp32" in err
    assert not (export_copy / "bench.json").exists()


def test_cli_corrupt_artifact_exit_2(export_copy, capsys):
    p = export_copy / "tiny_fp32.tflite"
    p.write_bytes(p.read_bytes()[:100])
    assert _cli("bench", str(export_copy), "--runs", "1", "--min-seconds", "0") == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_newer_manifest_schema_exit_2(export_copy, capsys):
    mp = export_copy / "manifest.json"
    d = json.loads(mp.read_text())
    d["schema_version"] = 99
    mp.write_text(json.dumps(d))
    assert _cli("bench", str(export_copy)) == 2
    assert "newer" in capsys.readouterr().err


def test_cli_bad_numbers_exit_2(tiny_export, capsys):
    assert _cli("bench", str(tiny_export), "--runs", "0") == 2
    assert "--runs" in capsys.readouterr().err


def test_cli_crash_row_exit_1_but_reports_written(export_copy, monkeypatch, capsys):
    monkeypatch.setenv("EDGEPIPE_AGENT_CRASH", "tiny_fp32.onnx")
    rc = _cli("bench", str(export_copy), "--artifacts", "tflite-fp32,onnx-fp32", "--runs", "3", "--min-seconds", "0",
              "--warmup", "0", "--threads", "1")
    assert rc == 1
    assert "1 of 2 rows failed" in capsys.readouterr().err
    rep = BenchReport.load(export_copy / "bench.json")
    assert _rows(rep)[("onnx-fp32", "cpu")].signal == "SIGSEGV"
    assert _rows(rep)[("tflite-fp32", "cpu")].status == "ok"
    assert "SIGSEGV" in (export_copy / "bench.md").read_text()


def test_manifest_loads(tiny_export):
    m, folder = load_manifest(tiny_export)
    assert folder == tiny_export and len(m.artifacts) == 8
