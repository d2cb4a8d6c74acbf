"""Export wall time: `edgepipe export mobilenet --int8` (all formats, verified) against a plain
script making the same raw converter calls in one process, side by side in one run.

    python benchmarks/bench_export.py [--size 224] [--repeats 1]

Both sides start a fresh Python process (TensorFlow import included), build the same
MobileNet (weights=None, seed 0), calibrate on the same 100 digits images and write
TFLite int8, ONNX int8 (QDQ) and Core ML int8-weight artifacts. Prints each side's wall
time, the ratio edgepipe / plain, and edgepipe's stage breakdown from its manifest.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLAIN = r'''
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
t = {}
t0 = time.perf_counter()
import tensorflow as tf, keras, tf2onnx, onnx, coremltools as ct
import coremltools.optimize.coreml as cto
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationMethod
from edgepipe.pipeline.calibration import DigitsReader, calibrate
from edgepipe.pipeline.base.preprocessing import Preprocessing
t["imports"] = time.perf_counter() - t0
out, size = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
keras.utils.set_random_seed(0)
model = keras.applications.MobileNet(input_shape=(size, size, 3), weights=None)
t["build"] = time.perf_counter() - t0
pp = Preprocessing.from_mode("tf")
cal = calibrate(DigitsReader(None, 0), 100, (1, size, size, 3), pp)
def rep():
    for i in range(cal.n):
        yield [cal.data[i:i+1]]
t0 = time.perf_counter()
inp = keras.Input(batch_shape=(1, size, size, 3)); static = keras.Model(inp, model(inp))
c = tf.lite.TFLiteConverter.from_keras_model(static)
c.optimizations = [tf.lite.Optimize.DEFAULT]; c.representative_dataset = rep
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
c.inference_input_type = tf.int8; c.inference_output_type = tf.int8
open(f"{out}/m.tflite", "wb").write(c.convert())
t["tflite_int8"] = time.perf_counter() - t0
t0 = time.perf_counter()
spec = tf.TensorSpec((1, size, size, 3), tf.float32, name="input")
fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
tf2onnx.convert.from_function(fn, input_signature=[spec], opset=17, output_path=f"{out}/fp32.onnx")
class R:
    def __init__(s): s.it = iter(range(cal.n))
    def get_next(s):
        i = next(s.it, None)
        return None if i is None else {"input": cal.data[i:i+1]}
quantize_static(f"{out}/fp32.onnx", f"{out}/m.onnx", R(), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax)
t["onnx_int8"] = time.perf_counter() - t0
t0 = time.perf_counter()
cf = fn.get_concrete_function()
ml = ct.convert([cf], source="tensorflow", inputs=[ct.ImageType(name="input", shape=(1, size, size, 3), scale=1/127.5, bias=[-1, -1, -1])],
                convert_to="mlprogram", compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS16)
ml = cto.linear_quantize_weights(ml, config=cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")))
ml.save(f"{out}/m.mlpackage")
t["coreml_int8"] = time.perf_counter() - t0
print("STAGES", {k: round(v, 2) for k, v in t.items()})
'''


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return dt, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TQDM_DISABLE": "1"}
    rows = []
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            plain_s, plain_out = timed([sys.executable, "-c", PLAIN, d, str(a.size)], env)
            ep_s, ep_out = timed([sys.executable, "-m", "edgepipe.pipeline", "export", "mobilenet", "--int8",
                                  "--weights", "none", "--input-size", str(a.size), "--calib", "digits",
                                  "--out", f"{d}/ep", "--no-cache", "--json"], env)
            m = json.loads(ep_out)
            stages = {k: v for k, v in m["timings"].items()}
            for art in m["artifacts"]:
                stages[art["id"]] = art["timings"]
            rows.append((plain_s, ep_s))
            print(f"run {r + 1}: plain {plain_s:.1f} s, edgepipe {ep_s:.1f} s, ratio {ep_s / plain_s:.2f}")
            print("  plain", [l for l in plain_out.splitlines() if l.startswith("STAGES")][0][7:])
            print("  edgepipe", json.dumps(stages))
    ratios = sorted(e / p for p, e in rows)
    print(f"median ratio edgepipe/plain: {ratios[len(ratios) // 2]:.2f} (goal <= 0.8, never > 1.1)")


if __name__ == "__main__":
    main()
