"""int8 accuracy by post-training method, per model and format, on real trained models.

    python benchmarks/bench_int8.py                       # all models, TFLite + ONNX, ~4 min on 2 cores
    python benchmarks/bench_int8.py --models digits_xception_unbalanced --formats tflite --json out.json

Models (trained here on scikit-learn's digits, tests/fidelity_models.py; nothing from a cache):

* ``digits_cnn``: the MobileNet-style test model (depthwise-separable, BN, ReLU6, 1-channel 32 px)
* ``digits_xception``: Xception-style (separable convs, residual adds, ReLU, avg+max pooled
  features concatenated; 3-channel 32 px)
* ``digits_xception_unbalanced``: the same weights with one channel of ``entry_sep1_bn`` scaled
  200x and its consumer scaled back (tests/fidelity_models.break_channel): the float model is
  unchanged (same predictions), the int8 activation range of that layer is not. This is what a
  BatchNormalization with one extreme gamma/variance does to a depthwise-separable network.

Methods, each one export through the real export stage and judged on the 450-image digits
test split (never calibrated on) against the float source model:

* ``no-cle``       100 calibration images, min/max ranges, nothing else (the default before
                   cross-layer equalization became one)
* ``default``      the export's defaults: ``no-cle`` plus cross-layer equalization on the Keras
                   weights (BatchNormalization folded first; ``--equalize``, on by default)
* ``bias``         bias correction of the int8 weight-rounding shift, without equalization
                   (``--no-equalize --bias-correction``; 8-bit grid for TFLite, 7-bit for ONNX)
* ``cle+bias``     both (``--bias-correction``)
* ``calib500``     the defaults with 500 calibration images
* ``percentile`` / ``entropy``  the defaults with onnxruntime's calibration methods (ONNX only;
                   TFLite's converter offers min/max only)
* ``fallback``     the ``no-cle`` artifact, then the per-layer report's worst layers kept in float
                   until the label-free budget holds (agreement with the float model on 200
                   held-out calibration images, max 1 point disagreement): what ``export
                   --max-drop 1 --data DIR`` ends with when nothing else recovers

Columns: int8 top-1 (%), drop in top-1 points with its 95% interval (paired, Tango score),
top-1 agreement with the float model (%), CPU latency per image (ms, median of 50, batch 1;
the 2-core build machine is shared, so compare within a run) and its ratio to the first method
(``no-cle``),
size (KB).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

MODELS = ("digits_cnn", "digits_xception", "digits_xception_unbalanced")
METHODS = ("no-cle", "default", "bias", "cle+bias", "calib500", "percentile", "entropy", "fallback")
# method -> export options (the export stage's own PTQ options; calibration settings apart)
OPTIONS = {"no-cle": {"equalize": False}, "bias": {"equalize": False, "bias_correction": True},
           "cle+bias": {"bias_correction": True}}
PREPROCESS = {"digits_cnn": "unit", "digits_xception": "tf", "digits_xception_unbalanced": "tf"}
FALLBACK_BUDGET = 1.0
HOLDOUT = 200


def prepare_models(work: Path, names) -> dict[str, Path]:
    import keras

    from fidelity_models import break_channel, train_into

    paths = train_into(work / "models")
    if "digits_xception_unbalanced" in names:
        m = keras.models.load_model(paths["digits_xception"])
        break_channel(m, "entry_sep1_bn", 17, 200.0)
        paths["digits_xception_unbalanced"] = work / "models" / "digits_xception_unbalanced.keras"
        m.save(paths["digits_xception_unbalanced"])
    return paths


def run_fallback(src, path: Path, fmt: str, work: Path) -> tuple[Path, dict]:
    from edgepipe.pipeline.base.records import Calibration
    from edgepipe.pipeline.fidelity.holdout import artifact_drop
    from edgepipe.pipeline.fidelity.report import fallback_recovery

    both = src.calibration(100 + HOLDOUT)
    calib = Calibration(both.raw[:100], both.data[:100], both.source)  # what the export calibrated on
    held = Calibration(both.raw[100:], both.data[100:], both.source)  # never calibrated on
    held_out = src.traced.reference(held.data)
    def measure(p: Path):
        return artifact_drop(p, fmt, held, held_out, budget=FALLBACK_BUDGET)

    rec, rep = fallback_recovery(path, fmt, calib, measure, FALLBACK_BUDGET, work, traced=src.traced)
    chosen = Path(rec.chosen.path) if rec.chosen else path
    return chosen, {"float_layers": rec.chosen.float_layers if rec.chosen else [],
                    "baseline_meets": rec.baseline.meets, "worst": rep.worst[0].layer if rep.worst else None}


def bench_model(name: str, path: Path, formats, methods, work: Path) -> list[dict]:
    from fidelity_harness import export_int8, judge, load_source

    src = load_source(path, PREPROCESS[name])
    rows, default, plain = [], {}, {}
    for method in methods:
        for fmt in formats:
            if method in ("percentile", "entropy") and fmt != "onnx":
                continue
            t0 = time.perf_counter()
            out = work / "out" / f"{name}-{method.replace('+', '_')}-{fmt}"
            extra: dict = {}
            try:
                if method == "fallback":
                    art = plain.get(fmt) or export_int8(path, src.preprocess, out, (fmt,), equalize=False)[fmt]
                    art, extra = run_fallback(src, Path(art), fmt, work / "fb" / f"{name}-{fmt}")
                else:
                    art = export_int8(path, src.preprocess, out, (fmt,), **OPTIONS.get(method, {}),
                                      calib_samples=500 if method == "calib500" else 100,
                                      calib_method=method if method in ("percentile", "entropy") else None)[fmt]
                    if method == "no-cle":
                        plain[fmt] = art
                row = {"model": name, "format": fmt, "method": method, **judge(art, fmt, src), **extra}
            except Exception as e:  # one failing method never stops the others
                row = {"model": name, "format": fmt, "method": method, "error": f"{type(e).__name__}: {e}"[:300]}
            row["seconds"] = round(time.perf_counter() - t0, 1)
            if fmt not in default and "error" not in row:  # the first method run is the latency baseline
                default[fmt] = {"path": art, "latency_ms": row["latency_ms"]}
            if "latency_ms" in row and fmt in default:
                row["latency_ratio"] = row["latency_ms"] / default[fmt]["latency_ms"]
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['format']} | {r['method']} | error: {r['error']} |"
    extra = f" float: {', '.join(r['float_layers'])} |" if r.get("float_layers") else " |"
    return (f"| {r['model']} | {r['format']} | {r['method']} | {r['top1']:.2f} | {r['drop']:+.2f} "
            f"[{r['drop_low']:+.2f}, {r['drop_high']:+.2f}] | {r['agreement']:.2f} | {r['latency_ms']:.3f} "
            f"({r.get('latency_ratio', 1.0):.2f}x) | {r['size_kb']:.0f} |{extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--formats", default="tflite,onnx")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    names = [m for m in a.models.split(",") if m]
    formats = [f for f in a.formats.split(",") if f]
    methods = [m for m in a.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as td:
        work = Path(a.work) if a.work else Path(td)
        paths = prepare_models(work, names)
        print("| model | format | method | int8 top-1 % | drop (points) [95% CI] | agreement % "
              "| latency ms (vs no-cle) | KB | note |")
        print("|---|---|---|---:|---|---:|---:|---:|---|")
        rows = []
        for name in names:
            rows += bench_model(name, paths[name], formats, methods, work)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
