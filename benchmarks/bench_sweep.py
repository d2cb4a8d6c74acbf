"""`edgepipe sweep` wall time: --serial against the embedded Ray instance, side by side in one run, and
Ray's scheduling overhead per job on a plan of tiny models.

    python benchmarks/bench_sweep.py                 # both parts
    python benchmarks/bench_sweep.py --part seed     # the six seed models only
    python benchmarks/bench_sweep.py --part tiny     # the overhead only

seed: the six seed Keras applications at small sizes (weights=None, 10 classes), TFLite and ONNX,
fp32 and int8 (calibrated on 16 digits images), each verified, evaluated on 100 digits images and
benchmarked on this machine's CPU (5 runs, 1 thread), gated at 5 points. The export cache is off, so
both sides really convert. Prints each side's wall time and the ratio Ray / serial (goal <= 0.7).

tiny: four MobileNet 0.25 at 32 px (TFLite fp32, no eval, a short local bench): serial against Ray
with ONE CPU, so jobs run one at a time on both sides. Ray's overhead per job is the gap between a
job ending and the next queued job starting on that CPU (dispatch, result transfer, the driver's
bookkeeping); the fixed cost is starting and stopping the instance.

Each run is a fresh `edgepipe sweep` process (as a user would run it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"vgg16": 32, "vgg19": 32, "resnet50": 32, "inception_v3": 75, "xception": 71, "mobilenet": 32}
MODEL = """[[models]]
model = "{model}"
name = "{name}"
weights = "none"
input_size = {size}
classes = 10
seed = {seed}
"""
SEED_PLAN = """formats = ["tflite", "onnx"]
precisions = ["fp32", "int8"]
devices = ["local"]
[calibration]
source = "digits"
samples = 16
[export]
verify_samples = 4
cache = false
[eval]
data = "digits"
limit = 100
[bench]
targets = ["cpu"]
runs = 5
min_seconds = 0.1
warmup = 1
threads = 1
[gate]
max_drop = 5.0
"""
TINY_PLAN = """formats = ["tflite"]
precisions = ["fp32"]
devices = ["local"]
[export]
verify_samples = 2
cache = false
[bench]
targets = ["cpu"]
runs = 3
min_seconds = 0.01
warmup = 0
threads = 1
"""


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of the whole machine, from /proc/stat (others' work included)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return f[3] + f[4], sum(f)


def sweep(plan: Path, out: Path, *extra: str) -> tuple[float, dict]:
    t0, (i0, n0) = time.perf_counter(), cpu_times()
    r = subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "sweep", str(plan), "--out", str(out), "--json",
                        *extra], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - t0
    if not r.stdout.strip():
        sys.exit(f"sweep failed ({r.returncode}): {r.stderr[-3000:]}")
    rep = json.loads(r.stdout)
    bad = [j for j in rep["jobs"] if j["status"] != "ok"]
    if bad:
        sys.exit(f"jobs failed: {[(j['kind'], j['model'], j['reason']) for j in bad]}")
    i1, n1 = cpu_times()
    rep["idle"] = (i1 - i0) / max(n1 - n0, 1)  # share of the machine's CPU time left idle during the run
    return wall, rep


def stage_seconds(rep: dict) -> dict:
    out: dict = {}
    for j in rep["jobs"]:
        out[j["kind"]] = round(out.get(j["kind"], 0.0) + (j["seconds"] or 0.0), 1)
    return out


def seed_part(d: Path) -> None:
    plan = d / "seed.toml"
    plan.write_text(SEED_PLAN + "".join(MODEL.format(model=m, name=m, size=s, seed=0) for m, s in SIZES.items()))
    ser_wall, ser = sweep(plan, d / "serial", "--serial")
    ray_wall, ray = sweep(plan, d / "ray")
    print(f"six seed models, tflite+onnx x fp32+int8, verify + eval + cpu bench + gate ({len(ser['jobs'])} jobs)")
    print(f"  --serial        {ser_wall:7.1f} s   machine idle {ser['idle']:.0%};  "
          f"job seconds by stage {stage_seconds(ser)}")
    print(f"  embedded Ray    {ray_wall:7.1f} s   machine idle {ray['idle']:.0%};  "
          f"job seconds by stage {stage_seconds(ray)}  (instance start {ray['engine']['timings']['start_s']:.1f} s, "
          f"stop {ray['engine']['timings']['stop_s']:.1f} s)")
    print(f"  ratio Ray / serial: {ray_wall / ser_wall:.2f} (goal <= 0.7)")


def gaps(rep: dict) -> list[float]:
    """Idle time of the single CPU between a job ending and the next one starting, for jobs that
    were already queued when the previous one ended."""
    js = sorted((j for j in rep["jobs"] if j["started"]), key=lambda j: j["started"])
    return [b["started"] - a["ended"] for a, b in zip(js, js[1:]) if b["submitted"] <= a["ended"]]


def tiny_part(d: Path, n: int = 4) -> None:
    plan = d / "tiny.toml"
    plan.write_text(TINY_PLAN + "".join(MODEL.format(model="mobilenet", name=f"t{i}", size=32, seed=i)
                                        .replace("classes = 10", "classes = 10\nalpha = 0.25") for i in range(n)))
    ser_wall, ser = sweep(plan, d / "tiny-serial", "--serial")
    ray_wall, ray = sweep(plan, d / "tiny-ray", "--cpus", "1")
    g = gaps(ray)
    t = ray["engine"]["timings"]
    print(f"{n} tiny models, {len(ray['jobs'])} jobs, Ray with 1 CPU (jobs one at a time, as serial)")
    print(f"  --serial {ser_wall:.1f} s; Ray {ray_wall:.1f} s (instance start {t['start_s']:.1f} s, stop {t['stop_s']:.1f} s)")
    print(f"  job seconds: serial {sum(j['seconds'] for j in ser['jobs']):.1f}, Ray {sum(j['seconds'] for j in ray['jobs']):.1f}")
    if g:
        print(f"  scheduling overhead per job (CPU idle between queued jobs): median {1000 * statistics.median(g):.0f} ms, "
              f"max {1000 * max(g):.0f} ms over {len(g)} hand-offs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "seed", "tiny"), default="all")
    ap.add_argument("--keep", help="Keep the outputs in this folder")
    a = ap.parse_args()
    d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGEPIPE_CACHE_DIR", str(d / "cache"))
    if a.part in ("all", "tiny"):
        tiny_part(d)
    if a.part in ("all", "seed"):
        seed_part(d)
    print(f"outputs: {d}")


if __name__ == "__main__":
    main()
