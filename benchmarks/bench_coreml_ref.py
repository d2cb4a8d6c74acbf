"""Speed of the Core ML reference interpreter (devices/runtimes/coreml_ref/) on MobileNet 224.

    python benchmarks/bench_coreml_ref.py                 # convert MobileNet 224 (weights=None), fp16 mlprogram
    python benchmarks/bench_coreml_ref.py --runs 20
    python benchmarks/bench_coreml_ref.py --package my.mlpackage   # time an existing package instead

Prints the median (and min/max) wall time of one ``predict`` on a single 224x224 image,
plus load time. Conversion needs TensorFlow and coremltools; the timed part imports neither.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def convert_mobilenet(out: Path, size: int) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import coremltools as ct
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNet(input_shape=(size, size, 3), weights=None)
    ml = ct.convert(model, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                    inputs=[ct.ImageType(shape=(1, size, size, 3), scale=1 / 127.5, bias=[-1, -1, -1])])
    path = out / f"mobilenet_{size}.mlpackage"
    ml.save(str(path))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="time this .mlpackage instead of converting MobileNet")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, help="limit BLAS threads (threadpoolctl); default: numpy's own")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.package or convert_mobilenet(Path(tmp), args.size)

        import numpy as np

        from edgepipe.devices.runtimes.coreml_ref import load_program

        t0 = time.perf_counter()
        model = load_program(path)
        load_s = time.perf_counter() - t0
        spec = model.inputs[0]
        shape = [1 if d < 0 else d for d in spec.shape]
        rng = np.random.default_rng(0)
        if spec.kind == "image":
            x = rng.integers(0, 256, size=shape).astype(np.float32)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        feed = {spec.name: x}
        import contextlib

        limit = contextlib.nullcontext()
        if args.threads:
            from threadpoolctl import threadpool_limits

            limit = threadpool_limits(limits=args.threads)
        with limit:
            for _ in range(args.warmup):
                model.predict(feed)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                model.predict(feed)
                times.append(time.perf_counter() - t0)

    res = {
        "model": str(args.package) if args.package else f"MobileNet {args.size} fp16 mlprogram (weights=None)",
        "compute_precision": model.compute_precision,
        "ops": sum(1 for _ in model.steps),
        "load_s": round(load_s, 4),
        "predict_median_s": round(statistics.median(times), 4),
        "predict_min_s": round(min(times), 4),
        "predict_max_s": round(max(times), 4),
        "runs": args.runs,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']}: predict median {res['predict_median_s'] * 1000:.0f} ms "
              f"(min {res['predict_min_s'] * 1000:.0f}, max {res['predict_max_s'] * 1000:.0f}, "
              f"{args.runs} runs), load {res['load_s'] * 1000:.0f} ms, {res['ops']} ops, "
              f"{res['cpus']} CPUs (load average {res['load_average_1min']}), "
              f"threads {args.threads or 'default'}, numpy {res['numpy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
