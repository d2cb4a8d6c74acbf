"""Eval throughput: `edgepipe eval`'s artifact loop against a bare interpreter loop on the same images.

    python benchmarks/bench_eval.py                      # trains/exports the digits test model first
    python benchmarks/bench_eval.py OUT/<model> --data digits --repeat 7 --json

For every TFLite / ONNX artifact in the model folder, on the CPU:

* edgepipe: ``edgepipe.pipeline.eval_artifacts.evaluate_file`` — what `edgepipe eval` runs per artifact x
  target: load the session through the runtime seam, quantize the set, run it image by image
  (batch 1), dequantize, compute top-1/top-5/agreement/drops.
* bare: the loop a user would write by hand over the same preprocessed images already in memory:
  ``Interpreter`` + one vectorised quantization of the set for int8 inputs (the same work eval
  does) + ``set_tensor``/``invoke``/``get_tensor`` + argmax per image (LiteRT), or
  ``InferenceSession.run`` per image (onnxruntime, float I/O), then accuracy.

Both include creating the interpreter/session. Repeats are interleaved (edgepipe, bare, edgepipe,
...) and the median is reported; ratio = edgepipe images/s / bare images/s (goal >= 0.9). The
source predictions are cached beforehand (one `edgepipe eval` run), as in CI, so no TensorFlow is
imported in this process (checked).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _digits_export(work: Path) -> Path:
    """Train (cached) and export the digits test model to int8 TFLite + ONNX; returns the model folder."""
    sys.path.insert(0, str(REPO / "tests"))
    code = ("import sys; sys.path.insert(0, %r); import digits_model; print(digits_model.digits_model_path())"
            % str(REPO / "tests"))
    model = Path(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
                 .stdout.strip().splitlines()[-1])
    from edgepipe.pipeline.images import write_digits_folder

    calib = write_digits_folder(work / "train_png", "train")
    dest = work / "digits.keras"
    dest.write_bytes(model.read_bytes())
    subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "export", str(dest), "--preprocess", "unit", "--int8",
                    "--precisions", "fp32", "--formats", "tflite,onnx", "--data", str(calib), "--out", str(work / "out")],
                   check=True, capture_output=True)
    return work / "out" / "digits"


def _bare_tflite(path: Path, data: np.ndarray, labels: np.ndarray, threads=None) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    i_idx = d["index"]
    o_idx = it.get_output_details()[0]["index"]
    native = data
    if d["dtype"] != np.float32:
        scale, zp = d["quantization"]
        info = np.iinfo(d["dtype"])
        native = np.clip(np.round(data / np.float32(scale) + zp), info.min, info.max).astype(d["dtype"])
    preds = np.empty(len(native), np.int64)
    for i in range(len(native)):
        it.set_tensor(i_idx, native[i:i + 1])
        it.invoke()
        preds[i] = it.get_tensor(o_idx)[0].argmax()
    return float((preds == labels).mean())


def _bare_onnx(path: Path, native: np.ndarray, labels: np.ndarray, threads=None) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    preds = np.empty(len(native), np.int64)
    for i in range(len(native)):
        preds[i] = s.run(None, {name: native[i:i + 1]})[0][0].argmax()
    return float((preds == labels).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", help="OUT/<model> from edgepipe export (default: export the digits model)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    folder = Path(args.model_dir) if args.model_dir else _digits_export(work)
    # Warm the source-prediction cache (a child process imports TensorFlow once), as CI's first eval does.
    subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "eval", str(folder), "--data", args.data,
                    "--targets", "cpu", "--json"], check=True, capture_output=True)

    from edgepipe.devices.runtimes.base import runtimes_for
    from edgepipe.pipeline.base.evaluation import EvalRow, classification_metrics
    from edgepipe.pipeline.base.manifest import load_manifest
    from edgepipe.pipeline.datasets import load_labelled
    from edgepipe.pipeline.eval_artifacts import EvalContext, evaluate_file
    from edgepipe.pipeline.source_predictions import source_predictions
    from edgepipe.pipeline.base.preprocessing import Preprocessing

    m, folder = load_manifest(folder)
    src = m.model
    ds = load_labelled(args.data, src.input_shape, src.num_classes, model_labels=src.labels)
    data = ds.data(Preprocessing.from_dict(src.preprocessing))
    src_out, info = source_predictions(m, folder, ds)
    assert info["cached"], "source predictions should have been cached by the warm-up eval"
    smet = classification_metrics(src_out, ds.labels)
    source = {"top1": smet["top1"], "top5": smet["top5"]}
    src_pred = src_out.argmax(1)
    ctx = EvalContext(ds, data, int(src.num_classes), source, src_pred, args.threads)

    rows = []
    for a in m.artifacts:
        if a.format not in ("tflite", "onnx") or not a.path:
            continue
        path = folder / a.path
        rt = runtimes_for(a.format, "cpu")[0]
        bare_fn = _bare_tflite if a.format == "tflite" else _bare_onnx
        t_ep, t_bare, loop_ep = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            row = evaluate_file(path, a.format, rt, EvalRow(a.id, a.format, a.precision), ctx)
            t_ep.append(time.perf_counter() - t0)
            loop_ep.append(row.seconds)
            t0 = time.perf_counter()
            acc = bare_fn(path, data, ds.labels, args.threads)
            t_bare.append(time.perf_counter() - t0)
        assert row.status == "ok", row
        assert abs(acc * 100 - row.top1) < 1e-9, (acc, row.top1)  # the same computation
        ep, bare = statistics.median(t_ep), statistics.median(t_bare)
        rows.append({"artifact": a.id, "images": ds.n, "edgepipe_s": round(ep, 4), "bare_s": round(bare, 4),
                     "edgepipe_img_s": round(ds.n / ep, 1), "bare_img_s": round(ds.n / bare, 1),
                     "ratio": round(bare / ep, 3), "edgepipe_loop_only_img_s": round(ds.n / statistics.median(loop_ep), 1),
                     "top1": row.top1})

    # The whole command as CI runs it (process start, imports, data loading, every artifact, eval.json).
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "eval", str(folder), "--data", args.data,
                    "--targets", "cpu", "--json"], check=True, capture_output=True)
    cli_s = time.perf_counter() - t0
    result = {"model": src.name, "data": args.data, "images": ds.n, "repeat": args.repeat, "rows": rows,
              "cli_eval_s": round(cli_s, 3), "tensorflow_imported": "tensorflow" in sys.modules}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{src.name}: {ds.n} images ({args.data}), median of {args.repeat}, CPU")
        print(f"{'artifact':<14}{'edgepipe img/s':>16}{'bare img/s':>12}{'ratio':>8}{'top-1':>8}")
        for r in rows:
            print(f"{r['artifact']:<14}{r['edgepipe_img_s']:>16.0f}{r['bare_img_s']:>12.0f}{r['ratio']:>8.3f}{r['top1']:>8.2f}")
        print(f"`edgepipe eval --targets cpu` end to end (cached source predictions): {cli_s:.2f} s; "
              f"TensorFlow imported here: {result['tensorflow_imported']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
