#!/usr/bin/env python3
"""Harness fidelity: does `edgepipe bench` report what LiteRT's own benchmark tool reports?

    python benchmarks/bench_harness.py [--threads 2] [--runs 100] [--warmup 10] [--rounds 3]

Exports MobileNet v1 (weights=None, 224x224, alpha 1.0, static batch 1, fp32 TFLite) into a temp
folder with TensorFlow, then measures the same file, each in its own fresh process, interleaved
over ``--rounds`` rounds so slow drift on a shared machine hits every method alike:

  A. ``edgepipe bench`` (the CLI; LiteRT Interpreter + XNNPACK, timed = set inputs + invoke + read outputs)
  B. ``ai_edge_litert/tools/benchmark_litert_model.py`` (LiteRT's tool; CompiledModel + XNNPACK,
     times run_by_name only)
  C. the edgepipe agent with ``--api compiled_model`` (same LiteRT API as B, edgepipe's method)
  D. a bare ``interpreter.invoke()`` loop (inputs set once, nothing read back)

and prints the ratio of medians A/B and C/B (goal 0.97-1.03), and the per-invoke overhead of the
harness: A - D on MobileNet, and the same on a one-op model where the model costs almost nothing,
so the difference is the harness's own cost per measured run. Everything runs with the same threads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "devices" / "onboard" / "agent.py"


def export_mobilenet(folder: Path, size: int, alpha: float) -> Path:
    """MobileNet v1 fp32 TFLite + an edgepipe manifest, in a child process (TensorFlow stays out of this one)."""
    code = textwrap.dedent(f"""
        import keras, tensorflow as tf
        from pathlib import Path
        from edgepipe.pipeline.base.manifest import Manifest, SourceModel, Artifact
        from edgepipe.pipeline.base.util import sha256_file
        keras.utils.set_random_seed(0)
        inp = keras.Input(batch_shape=(1, {size}, {size}, 3))
        m = keras.applications.MobileNet(input_tensor=inp, weights=None, alpha={alpha})
        folder = Path({str(folder)!r})
        p = folder / "mobilenet_fp32.tflite"
        p.write_bytes(tf.lite.TFLiteConverter.from_keras_model(m).convert())
        man = Manifest(model=SourceModel(name="mobilenet", kind="builtin", weights=None,
                                         input_shape=[1, {size}, {size}, 3], num_classes=1000))
        man.artifacts.append(Artifact(id="tflite-fp32", format="tflite", precision="fp32", path=p.name,
                                      status="ok", sha256=sha256_file(p), size_bytes=p.stat().st_size))
        man.save(folder)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return folder / "mobilenet_fp32.tflite"


def run_edgepipe_bench(folder: Path, threads: int, runs: int, warmup: int) -> dict:
    out = folder / "bench-out"
    r = subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "bench", str(folder), "--targets", "cpu",
                        "--threads", str(threads), "--runs", str(runs), "--min-seconds", "0", "--warmup", str(warmup),
                        "--out", str(out), "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgepipe bench failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout)["rows"][0]
    return {"p50": row["latency_ms"]["p50"], "mean": row["latency_ms"]["mean"], "n": row["latency_ms"]["n"],
            "ci": row["latency_ms"]["ci95_p50"]}


def run_agent(model: Path, threads: int, runs: int, warmup: int, api: str) -> dict:
    r = subprocess.run([sys.executable, str(AGENT), "--artifact", str(model), "--format", "tflite", "--target", "cpu",
                        "--threads", str(threads), "--runs", str(runs), "--min-seconds", "0", "--warmup", str(warmup),
                        "--api", api], capture_output=True, text=True)
    d = json.loads(r.stdout)
    if d.get("status") != "ok":
        raise SystemExit(f"agent failed: {d}")
    return {"p50": d["latency_ms"]["p50"], "mean": d["latency_ms"]["mean"], "n": d["latency_ms"]["n"]}


def litert_tool_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ai_edge_litert")
    return Path(spec.origin).parent / "tools" / "benchmark_litert_model.py"


def run_litert_tool(model: Path, threads: int, runs: int, warmup: int, tmp: Path) -> dict:
    res = tmp / "litert_tool.json"
    r = subprocess.run([sys.executable, str(litert_tool_path()), f"--model={model}", f"--num_threads={threads}",
                        f"--num_runs={runs}", f"--warmup_runs={warmup}", f"--result_json={res}"],
                       capture_output=True, text=True)
    if r.returncode != 0 or not res.exists():
        raise SystemExit(f"benchmark_litert_model.py failed:\n{r.stderr[-3000:]}")
    lat = json.loads(res.read_text())["latency"]
    # the tool rounds to 0.01 ms: fine for MobileNet (tens of ms)
    return {"p50": lat["median_ms"], "mean": lat["avg_ms"], "n": lat["num_runs"]}


_BARE = r"""
import sys, time, json, numpy as np
from ai_edge_litert.interpreter import Interpreter
path, threads, runs, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if path == "--tiny":
    sys.path.insert(0, sys.argv[5])
    import probe
    it = Interpreter(model_content=probe.tiny_add_model(), num_threads=threads)
else:
    it = Interpreter(model_path=path, num_threads=threads)
it.allocate_tensors()
rng = np.random.default_rng(0)
for d in it.get_input_details():
    it.set_tensor(d["index"], rng.uniform(-1, 1, d["shape"]).astype(d["dtype"]))
for _ in range(warmup):
    it.invoke()
ts = []
clock = time.perf_counter
for _ in range(runs):
    t0 = clock(); it.invoke(); ts.append((clock() - t0) * 1000.0)
ts.sort()
print(json.dumps({"p50": float(np.percentile(ts, 50)), "mean": sum(ts) / len(ts), "n": len(ts)}))
"""


def run_bare(model: str, threads: int, runs: int, warmup: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _BARE, model, str(threads), str(runs), str(warmup), str(AGENT.parent)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bare invoke loop failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def tiny_overhead(threads: int, runs: int, tmp: Path) -> dict:
    """Harness cost per run on a one-op model: agent timed region vs a bare invoke()."""
    code = "import sys; sys.path.insert(0, sys.argv[1]); import probe; open(sys.argv[2], 'wb').write(probe.tiny_add_model())"
    tiny = tmp / "tiny_add.tflite"
    subprocess.run([sys.executable, "-c", code, str(AGENT.parent), str(tiny)], check=True)
    a = run_agent(tiny, threads, runs, 100, "interpreter")
    b = run_bare("--tiny", threads, runs, 100)
    return {"agent_p50_us": a["p50"] * 1000, "bare_invoke_p50_us": b["p50"] * 1000,
            "overhead_us": (a["p50"] - b["p50"]) * 1000}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity")
                    else 2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgepipe-harness-") as td:
        tmp = Path(td)
        folder = tmp / "export"
        folder.mkdir()
        model = export_mobilenet(folder, a.size, a.alpha)
        methods = {
            "edgepipe_bench": lambda: run_edgepipe_bench(folder, a.threads, a.runs, a.warmup),
            "litert_tool": lambda: run_litert_tool(model, a.threads, a.runs, a.warmup, tmp),
            "agent_compiled_model": lambda: run_agent(model, a.threads, a.runs, a.warmup, "compiled_model"),
            "bare_invoke": lambda: run_bare(str(model), a.threads, a.runs, a.warmup),
        }
        rng = random.Random(0)
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        rounds = []
        for i in range(a.rounds):
            order = list(methods)
            rng.shuffle(order)  # no method always runs first (or right after the export)
            rd = {k: methods[k]() for k in order}
            rounds.append({k: rd[k] for k in methods})
            print(f"round {i + 1}/{a.rounds}: " + ", ".join(f"{k} p50 {rd[k]['p50']:.2f} ms" for k in methods),
                  file=sys.stderr)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        med = {k: statistics.median(r[k]["p50"] for r in rounds) for k in methods}
        # paired per-round ratios: drift on a shared machine hits both sides of a pair alike
        pair = {
            "edgepipe_bench/litert_tool": [r["edgepipe_bench"]["p50"] / r["litert_tool"]["p50"] for r in rounds],
            "agent_compiled_model/litert_tool": [r["agent_compiled_model"]["p50"] / r["litert_tool"]["p50"]
                                                 for r in rounds],
            "edgepipe_bench/bare_invoke": [r["edgepipe_bench"]["p50"] / r["bare_invoke"]["p50"] for r in rounds],
        }
        tiny = tiny_overhead(a.threads, 2000, tmp)
        size = model.stat().st_size

    res = {
        "model": f"MobileNet v1 {a.size}x{a.size} alpha {a.alpha} fp32 TFLite ({size / 1e6:.1f} MB), weights=None",
        "threads": a.threads, "runs": a.runs, "warmup": a.warmup, "rounds": a.rounds,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "median_of_round_p50_ms": med,
        "paired_ratios": pair,
        "best_round_p50_ms": {k: min(r[k]["p50"] for r in rounds) for k in methods},
        "ratio_edgepipe_bench_to_litert_tool": statistics.median(pair["edgepipe_bench/litert_tool"]),
        "ratio_agent_compiled_model_to_litert_tool": statistics.median(pair["agent_compiled_model/litert_tool"]),
        "overhead_vs_bare_invoke_mobilenet_pct": 100 * (statistics.median(pair["edgepipe_bench/bare_invoke"]) - 1),
        "one_op_model": tiny,
        "rounds_detail": rounds,
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']}, {a.threads} threads, {a.runs} runs after {a.warmup} warm-up, median of {a.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:22s} p50 {v:8.3f} ms")
    rng_txt = lambda xs: f"rounds {min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
    print(f"  ratio edgepipe bench / LiteRT tool          {res['ratio_edgepipe_bench_to_litert_tool']:.3f}"
          f"  (goal 0.97-1.03; median of paired rounds, {rng_txt(pair['edgepipe_bench/litert_tool'])})")
    print(f"  ratio agent (CompiledModel) / LiteRT tool   {res['ratio_agent_compiled_model_to_litert_tool']:.3f}"
          f"  ({rng_txt(pair['agent_compiled_model/litert_tool'])})")
    print(f"  edgepipe bench vs bare invoke() (MobileNet) {res['overhead_vs_bare_invoke_mobilenet_pct']:+.1f}%"
          f"  ({rng_txt(pair['edgepipe_bench/bare_invoke'])})")
    best = res["best_round_p50_ms"]
    print(f"  best-round p50 ratios (contention only adds time): bench/tool "
          f"{best['edgepipe_bench'] / best['litert_tool']:.3f}, agent CompiledModel/tool "
          f"{best['agent_compiled_model'] / best['litert_tool']:.3f}, bench/bare "
          f"{best['edgepipe_bench'] / best['bare_invoke']:.3f}")
    if load_before:
        print(f"  load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
              f"on {os.cpu_count()} logical cores")
    print(f"  one-op model: agent {tiny['agent_p50_us']:.1f} us, bare invoke {tiny['bare_invoke_p50_us']:.1f} us, "
          f"harness overhead {tiny['overhead_us']:+.1f} us per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
