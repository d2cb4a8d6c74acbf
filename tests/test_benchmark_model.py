"""The parser for TensorFlow Lite's benchmark_model output, on logs in the formats the tool prints.

The fixtures in tests/fixtures/benchmark_model/ are edgepipe's own text written in the tool's
format (recent releases with the ``INFO:`` prefix, op-profiling tables with tab-separated columns,
an old release without prefixes, a GPU delegate failure, a run killed before its summary).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from edgepipe.devices.measure import benchmark_model as bm

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmark_model"


def load(name: str) -> bm.BenchmarkModelResult:
    return bm.parse((FIX / name).read_text())


def test_cpu_xnnpack_timings_memory_and_delegation():
    r = load("cpu_xnnpack_v2_16.txt")
    assert r.complete and r.error is None
    assert r.init_ms == pytest.approx(41.207)
    assert r.first_ms == pytest.approx(15.112)
    assert r.warmup_avg_ms == pytest.approx(8.20733)
    assert r.inference_avg_ms == pytest.approx(8.12152)
    # warm-up and measured runs come from the two count= lines, in microseconds -> ms
    assert r.warmup.count == 61 and r.warmup.max_ms == pytest.approx(15.112)
    inf = r.inference
    assert (inf.count, inf.min_ms, inf.max_ms, inf.avg_ms, inf.std_ms) == (246, 7.902, 9.641, 8.12152, 0.187)
    assert inf.first_ms == pytest.approx(8.19) and inf.curr_ms == pytest.approx(8.077)
    assert (r.requested_runs, r.requested_min_secs) == (40, 2.0)
    assert r.memory_init_mb == pytest.approx(7.42188) and r.memory_overall_mb == pytest.approx(9.60547)
    assert r.peak_memory_mb == pytest.approx(14.2383) and r.vmrss_mb == 13
    assert r.model_size_mb == pytest.approx(3.91462)
    assert r.params["Num threads"] == "4" and r.params["Use xnnpack"] == "1"
    assert r.delegates == [{"delegate": "TfLiteXNNPackDelegate", "accelerator": "xnnpack", "replaced": 65,
                            "total": 66, "partitions": 2}]
    assert r.op_profile is None


def test_cpu_row_fields_fill_the_bench_schema():
    f = bm.row_fields(load("cpu_xnnpack_v2_16.txt"), "cpu")
    lat = f["latency_ms"]
    assert lat["n"] == 246 and lat["mean"] == pytest.approx(8.12152) and lat["std"] == pytest.approx(0.187)
    # no median in the tool's output: the mean stands in, and both a flag and a note say so
    assert lat["p50"] == lat["mean"] and lat["p50_is_mean"] is True
    assert "ci95_p50" not in lat
    assert any("mean" in n for n in f["notes"])
    assert f["load_ms"] == pytest.approx(41.207) and f["first_ms"] == pytest.approx(15.112)
    assert f["throughput_ips"] == pytest.approx(1000 / 8.12152)
    assert f["memory"]["peak_rss_kb"] == round(14.2383 * 1024)
    assert f["memory"]["model_peak_kb"] == round(9.60547 * 1024)
    p = f["placement"]
    assert (p["accelerator"], p["ops_total"], p["ops_accelerated"], p["ops_fallback"]) == ("xnnpack", 66, 65, 1)
    assert p["fully_accelerated"] is False and p["partitions"] == 2


def test_gpu_op_profiling_uses_the_regular_runs_not_initialisation():
    r = load("gpu_profile_v2_16.txt")
    assert r.complete
    assert r.init_ms == pytest.approx(633.918) and r.inference.count == 193
    assert r.delegates[0]["accelerator"] == "gpu" and r.delegates[0]["replaced"] == 64
    prof = r.op_profile
    assert prof["source"] == "benchmark_model op profiling"
    # the regular-run tables, not the ModifyGraphWithDelegate/AllocateTensors ones of initialisation
    assert [o["op"] for o in prof["top_ops"]] == ["TfLiteGpuDelegateV2", "SOFTMAX", "RESHAPE"]
    assert prof["top_ops"][0]["ms"] == pytest.approx(4.811) and prof["top_ops"][0]["pct"] == pytest.approx(93.521)
    assert prof["total_ms_per_run"] == pytest.approx(4.811 + 0.328 + 0.006)
    assert prof["nodes"] == 3 and prof["runs"] == 193
    top = prof["top_nodes"][0]
    assert top["node"] == "MobilenetV2/Logits/Conv2d_1c_1x1/BiasAdd" and top["op"] == "TfLiteGpuDelegateV2"
    assert r.init_profile["top_ops"][0]["op"] == "ModifyGraphWithDelegate"
    f = bm.row_fields(r, "gpu")
    assert f["placement"]["accelerator"] == "gpu" and f["placement"]["ops_fallback"] == 2
    assert f["profile"] is prof
    assert f["memory"]["peak_rss_kb"] == round(101.359 * 1024)


def test_legacy_output_without_prefixes():
    r = load("legacy_v2_3.txt")
    assert r.complete
    assert r.init_ms == pytest.approx(3.911)
    assert r.warmup_avg_ms == pytest.approx(30.8716) and r.inference_avg_ms == pytest.approx(30.0931)
    assert r.first_ms is None  # the old summary line has no first inference ...
    assert bm.row_fields(r, "cpu")["first_ms"] == pytest.approx(46.12)  # ... the warm-up's first run stands in
    assert r.memory_init_mb == pytest.approx(2.98438) and r.memory_overall_mb == pytest.approx(11.6914)
    assert r.peak_memory_mb is None
    assert r.inference.count == 50 and r.params["Use gpu"] == "0"


def test_gpu_failure_is_not_complete_and_says_why():
    r = load("gpu_failed.txt")
    assert not r.complete and r.inference is None
    assert "Failed to apply GPU delegate" in r.error


def test_killed_mid_run_is_never_reported_complete():
    r = load("cpu_killed_midrun.txt")
    assert r.warmup is not None and r.warmup.count == 61
    assert r.inference is None and not r.complete
    assert "stopped before" in r.error


def test_all_same_and_single_run_stat_lines():
    r = load("all_same.txt")
    assert r.complete
    assert r.warmup.count == 1 and r.warmup.avg_ms == pytest.approx(1.873)
    assert r.inference.all_same and r.inference.count == 3
    assert r.inference.min_ms == r.inference.max_ms == r.inference.avg_ms == pytest.approx(1.602)
    assert r.inference.std_ms == 0.0


def test_stat_line_scientific_notation():
    st = bm.parse_stats("count=12 first=1.20611e+06 curr=1.19e+06 min=1.18e+06 max=1.20611e+06 avg=1.1934e+06 "
                        "std=7021")
    assert st.count == 12 and st.first_ms == pytest.approx(1206.11) and st.avg_ms == pytest.approx(1193.4)


def test_truncated_by_max_secs_is_flagged():
    text = (FIX / "cpu_xnnpack_v2_16.txt").read_text().replace("at least 40 iterations", "at least 400 iterations")
    f = bm.row_fields(bm.parse(text), "cpu")
    assert f["truncated"] is True and any("246 of 400" in n for n in f["notes"])


def test_command_line():
    argv = bm.command("/data/local/tmp/edgepipe/benchmark_model", "/data/local/tmp/x/m.tflite", "gpu", threads=2,
                      runs=30, min_secs=1.5, warmup=3, max_secs=60, profile=True)
    assert argv[0] == "/data/local/tmp/edgepipe/benchmark_model"
    assert "--graph=/data/local/tmp/x/m.tflite" in argv and "--num_threads=2" in argv
    assert "--use_gpu=true" in argv and "--use_xnnpack=false" in argv and "--enable_op_profiling=true" in argv
    assert "--num_runs=30" in argv and "--min_secs=1.5" in argv and "--warmup_runs=3" in argv
    assert "--max_secs=60" in argv
    cpu = bm.command("bm", "m.tflite", "cpu", 4, 50, 1, 5)
    assert "--use_xnnpack=true" in cpu and "--use_gpu=false" in cpu and "--enable_op_profiling=false" in cpu
    with pytest.raises(ValueError):
        bm.command("bm", "m.tflite", "edgetpu", 1, 1, 1, 1)
