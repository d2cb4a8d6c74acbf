"""Export: bad input fails fast with one line and exit 2; file models; cache; atomic writes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import pytest

from conftest import run_cli


def _one_line_error(res, code=2):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("edgepipe: error:"), lines
    assert "Traceback" not in res.stderr
    return lines[0]


def test_help_is_fast_and_does_not_import_tensorflow():
    code = ("import sys, time; t=time.perf_counter(); from edgepipe.pipeline.cli import main; "
            "rc = main(['--help']); print('TF' if 'tensorflow' in sys.modules else 'noTF', time.perf_counter()-t)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "noTF" in res.stdout, res.stdout + res.stderr
    assert "export" in res.stdout and "bench" in res.stdout
    assert float(res.stdout.split()[-1]) < 1.0


@pytest.mark.parametrize("args,needle", [
    (["export", "mobilenett", "--weights", "none"], "unknown model 'mobilenett'"),
    (["export", "mobilenett", "--weights", "none"], "Did you mean 'mobilenet'?"),
    (["export", "models/nope.keras"], "unknown model 'models/nope.keras': no such file"),
    (["export", "mobilenet", "--weights", "none", "--formats", "tflite,caffe"], "unknown format 'caffe'"),
    (["export", "mobilenet", "--weights", "none", "--precisions", "int4"], "unknown precision 'int4'"),
    (["export", "mobilenet", "--weights", "none", "--int8"], "needs calibration data"),
    (["export", "mobilenet", "--weights", "none", "--int8"], "or --calib digits"),  # every offline source named
    (["export", "mobilenet", "--weights", "none", "--int8"], "--calib random"),
    (["export", "mobilenet", "--weights", "none", "--palette-bits", "5"], "unknown --palette-bits '5'"),
    (["export", "mobilenet", "--weights", "none", "--require-full-edgetpu"], "needs an Edge TPU artifact"),
    (["export", "/nonexistent/model.keras"], "unknown model"),
    (["export", "mobilenet", "--weights", "none", "--input-size", "16"], "at least 32px"),
    (["export", "vgg16", "--alpha", "0.5", "--weights", "none"], "has no --alpha"),
    (["export", "mobilenet", "--classes", "10"], "--classes only applies"),
    (["export", "mobilenet", "--weights", "none", "--calib", "noise"], "unknown calibration source"),
    (["export", "mobilenet", "--weights", "none", "--onnx-int8", "u4"], "unknown --onnx-int8"),
    (["export", "mobilenet", "--weights", "none", "--formats", "onnx", "--precisions", "palettized"], "nothing to export"),
])
def test_bad_input_is_one_line_exit_2_before_tensorflow(args, needle, tmp_path):
    t0 = time.perf_counter()
    res = run_cli(*args, "--out", str(tmp_path / "out"))
    line = _one_line_error(res)
    assert needle in line
    assert time.perf_counter() - t0 < 8, "validation must happen before the TensorFlow import"


def test_empty_calibration_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    line = _one_line_error(run_cli("export", "mobilenet", "--weights", "none", "--int8",
                                   "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")))
    assert "no images in" in line


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(run_cli("export", "mobilenet", "--weights", "none", "--out", str(blocker / "sub")))
    assert "cannot write to output folder" in line


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"this is not a zip archive")
    line = _one_line_error(run_cli("export", str(bad), "--out", str(tmp_path / "o"), "--no-cache"))
    assert "broken.keras is not a valid .keras file" in line


def test_debug_shows_traceback(tmp_path):
    res = run_cli("--debug", "export", "mobilenett", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "Traceback" in res.stderr


def test_imagenet_weights_offline_names_the_file(tmp_path):
    env = {"KERAS_HOME": str(tmp_path / "keras_home"), "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    res = run_cli("export", "mobilenet", "--input-size", "128", "--alpha", "0.25", "--formats", "tflite",
                  "--out", str(tmp_path / "o"), "--no-cache", env=env)
    line = _one_line_error(res)
    assert "mobilenet_2_5_128_tf.h5" in line and "--weights none" in line  # Keras' own file name


@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel"])
def test_user_model_files_export_and_verify(kind, tiny_keras_files, tmp_path):
    src = tiny_keras_files[kind]
    res = run_cli("export", str(src), "--formats", "tflite,onnx", "--precisions", "fp32,fp16",
                  "--preprocess", "unit", "--out", str(tmp_path), "--no-cache", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout)
    assert m["model"]["kind"] == kind
    assert m["model"]["input_shape"] == [1, 40, 40, 3]
    assert m["model"]["preprocessing"]["mode"] == "unit"
    assert len(m["artifacts"]) == 4
    for a in m["artifacts"]:
        assert a["status"] == "ok", a
        assert a["verification"]["status"] == "passed", a["verification"]
        assert a["inputs"][0]["shape"][0] == 1  # static batch of one
        f = tmp_path / m["model"]["name"] / a["path"]
        assert f.stat().st_size == a["size_bytes"]
    fp32 = [a for a in m["artifacts"] if a["id"] == "tflite-fp32"][0]
    assert fp32["verification"]["max_abs"] < 1e-4


def test_grayscale_model_int8_with_digits(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10)(x)
    path = tmp_path / "gray.keras"
    keras.Model(inp, out).save(path)
    res = run_cli("export", str(path), "--formats", "tflite,onnx,coreml", "--int8", "--preprocess", "unit",
                  "--calib", "digits", "--calib-samples", "32", "--out", str(tmp_path / "o"), "--no-cache", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout)
    arts = {a["id"]: a for a in m["artifacts"]}
    assert arts["tflite-int8"]["inputs"][0]["dtype"] == "int8"
    assert arts["tflite-int8"]["inputs"][0]["shape"] == [1, 28, 28, 1]
    assert arts["tflite-int8"]["calibration"]["source"] == "digits"
    assert arts["tflite-int8"]["calibration"]["samples"] == 32
    for a in ("tflite-int8", "onnx-int8"):
        assert arts[a]["verification"]["status"] == "passed", arts[a]["verification"]
        assert arts[a]["verification"]["data"] == "digits"
    assert arts["coreml-int8"]["options"]["input_kind"] == "image"


def test_repeated_export_is_served_from_cache_without_tensorflow(tmp_path):
    env = {"EDGEPIPE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["export", "mobilenet", "--weights", "none", "--input-size", "32", "--alpha", "0.25", "--classes", "4",
            "--formats", "tflite,onnx", "--out", str(tmp_path / "o"), "--json"]
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    m1 = json.loads(first.stdout)
    log = tmp_path / "o" / "mobilenet" / "export.log"
    original_log = log.read_text()
    assert original_log.startswith("[edgepipe] ") and "export of mobilenet" in original_log
    (tmp_path / "o" / "mobilenet" / "mobilenet_fp32.tflite").unlink()
    code = ("import sys, time; t=time.perf_counter(); from edgepipe.pipeline.cli import main; "
            f"rc = main({args!r}); sys.stderr.write('RESULT %s %d %.3f\\n' % ('tensorflow' in sys.modules, rc, time.perf_counter()-t))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    tf_loaded, rc, secs = res.stderr.strip().splitlines()[-1].split()[1:]
    assert rc == "0" and tf_loaded == "False", res.stderr[-2000:]
    assert float(secs) <= 2.0
    m2 = json.loads(res.stdout)
    assert m2["extra"]["cache"]["hit"] is True
    # the cache hit converted nothing: its log says so and keeps the original export's log
    hit_log = log.read_text()
    assert "served from the export cache" in hit_log and original_log in hit_log
    assert [a["sha256"] for a in m2["artifacts"]] == [a["sha256"] for a in m1["artifacts"]]
    assert (tmp_path / "o" / "mobilenet" / "mobilenet_fp32.tflite").exists()
    # the seed is recorded and a different seed is a different model (no cache hit)
    assert m1["model"]["seed"] == 0
    other = run_cli(*args, "--seed", "1", env=env)
    assert json.loads(other.stdout)["artifacts"][0]["sha256"] != m1["artifacts"][0]["sha256"]


def test_one_failing_format_does_not_stop_the_others(tmp_path):
    """tf2onnx and coremltools cannot convert Lgamma; TFLite can: the TFLite artifact is written,
    the other two fail with the converter's reason, and the command exits 1."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.Lambda(lambda t: tf.math.lgamma(tf.abs(t) * 0.1 + 0.5))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3)(x)
    m = keras.Model(inp, out)
    m.save(tmp_path / "lambda.keras")
    untrusted = run_cli("export", str(tmp_path / "lambda.keras"), "--formats", "tflite", "--out", str(tmp_path / "o"))
    assert "--trust-model" in _one_line_error(untrusted)
    path = tmp_path / "lgamma"  # a SavedModel keeps the graph: no Python code to trust
    m.export(str(path), verbose=False)
    res = run_cli("export", str(path), "--formats", "tflite,onnx,coreml", "--precisions", "fp32",
                  "--out", str(tmp_path / "o"), "--no-cache", "--json", "--verify-samples", "2")
    assert res.returncode == 1, res.stderr[-2000:]
    m = json.loads(res.stdout)
    arts = {a["id"]: a for a in m["artifacts"]}
    assert arts["tflite-fp32"]["status"] == "ok"
    assert arts["tflite-fp32"]["verification"]["status"] == "passed"
    for failed in ("onnx-fp32", "coreml-fp32"):
        assert arts[failed]["status"] == "failed" and arts[failed]["error"] and arts[failed]["path"] is None
    assert "Lgamma" in arts["coreml-fp32"]["error"]
    folder = tmp_path / "o" / "lgamma"
    assert (folder / "lgamma_fp32.tflite").exists()
    assert not (folder / "lgamma_fp32.onnx").exists() and not (folder / "lgamma_fp32.mlpackage").exists()
    assert not list(folder.glob(".tmp-*"))
    assert "2 of 3 artifacts failed" in res.stderr


def test_killed_export_leaves_no_partial_file(tmp_path):
    out = tmp_path / "o"
    log = open(tmp_path / "export.out", "w")  # a file, not a pipe nobody reads (it could fill and block)
    p = subprocess.Popen([sys.executable, "-m", "edgepipe.pipeline", "export", "vgg16", "--weights", "none",
                          "--input-size", "32", "--formats", "onnx,tflite", "--precisions", "fp32,fp16",
                          "--out", str(out), "--no-cache"], stdout=log, stderr=subprocess.STDOUT)
    folder = out / "vgg16"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(folder.glob(".tmp-*")):
        time.sleep(0.01)
    assert list(folder.glob(".tmp-*")), f"conversion never started: {(tmp_path / 'export.out').read_text()[-2000:]}"
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    log.close()
    assert p.returncode == 130, (tmp_path / "export.out").read_text()[-2000:]
    assert "interrupted" in (tmp_path / "export.out").read_text()
    assert not list(folder.glob(".tmp-*"))
    if (folder / "manifest.json").exists():
        m = json.loads((folder / "manifest.json").read_text())
        listed = {a["path"] for a in m["artifacts"] if a["path"]}
    else:
        listed = set()
    for f in folder.iterdir():
        if f.suffix in (".tflite", ".onnx"):
            assert f.name in listed, f"{f.name} is not a complete, recorded artifact"


def test_labels_and_preprocessing_travel_with_the_artifacts(tiny_keras_files, tmp_path):
    import onnx

    from edgepipe.devices.runtimes.coreml_ref import describe

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(["cat", "dog", "fox", "owl", "elk"]) + "\n")
    res = run_cli("export", str(tiny_keras_files["keras"]), "--formats", "onnx,coreml", "--preprocess", "caffe",
                  "--labels", str(labels), "--out", str(tmp_path / "o"), "--no-cache", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads(res.stdout)
    folder = tmp_path / "o" / "tiny"
    arts = {a["id"]: a for a in m["artifacts"]}
    props = {p.key: p.value for p in onnx.load(str(folder / arts["onnx-fp32"]["path"])).metadata_props}
    pp = json.loads(props["edgepipe.preprocessing"])
    assert pp["mode"] == "caffe" and pp["channel_order"] == "BGR"
    assert json.loads(props["edgepipe.labels"])[1] == "dog"
    ml = describe(folder / arts["coreml-fp16"]["path"])
    assert list(ml.classes) == ["cat", "dog", "fox", "owl", "elk"]
    assert arts["coreml-fp16"]["options"]["input_kind"] == "image"
    assert arts["coreml-fp16"]["verification"]["status"] == "passed", arts["coreml-fp16"]["verification"]
    side = json.loads((folder / "preprocessing.json").read_text())
    assert side["preprocessing"]["mean"] == [103.939, 116.779, 123.68]
    assert all(a["metadata_path"] == "preprocessing.json" for a in m["artifacts"])


def test_worker_conversions_record_their_real_time(tiny_keras_files, tmp_path):
    """TFLite converts in the worker process while ONNX converts here: its time is the worker's."""
    res = run_cli("export", str(tiny_keras_files["keras"]), "--formats", "tflite,onnx", "--precisions", "fp32,fp16",
                  "--out", str(tmp_path), "--no-cache", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    arts = {a["id"]: a for a in json.loads(res.stdout)["artifacts"]}
    for aid in ("tflite-fp32", "tflite-fp16"):
        assert arts[aid]["timings"]["convert_s"] >= 0.05, arts[aid]["timings"]
    log = (tmp_path / "tiny" / "export.log").read_text()
    assert "output of the conversion worker process" in log  # the worker's chatter is in the export log


def test_progress_never_shows_an_unknown_total():
    import io

    from rich.console import Console

    from edgepipe.pipeline.cli.export import _Progress

    buf = io.StringIO()
    with _Progress(Console(file=buf, force_terminal=True, width=100)) as prog:
        for event, info in [("stage", {"name": "load", "detail": "m.keras"}), ("stage", {"name": "trace"}),
                            ("note", {"message": "skipped onnx palettized: [no] such variant"}),
                            ("artifacts", {"total": 2}), ("convert", {"id": "tflite-fp32"}),
                            ("done", {"id": "tflite-fp32"}), ("convert", {"id": "onnx-fp32"}), ("done", {"id": "x"})]:
            prog(event, info)
            prog.p.refresh()
    out = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())  # without terminal control codes
    assert "None" not in out and "0/2" in out and "1/2" in out and "[no] such variant" in out


def test_piped_table_keeps_names_and_reasons_whole(capsys, tmp_path):
    from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel, Verification
    from edgepipe.pipeline.base.records import ExportOutcome
    from edgepipe.pipeline.cli.export import _console, print_outcome

    reason = "not verified: " + "the reference interpreter has no kernel for this op, " * 4 + "[see export.log]"
    m = Manifest(model=SourceModel(name="a_model_with_a_rather_long_name_that_a_pipe_would_cut", kind="keras"),
                 artifacts=[Artifact(id="coreml-palettized", format="coreml", precision="palettized", path="x",
                                     status="ok", size_bytes=123456,
                                     verification=Verification(status="not_verified", reason=reason)),
                            Artifact(id="onnx-int8", format="onnx", precision="int8", status="failed",
                                     error="ConversionError: " + "tf2onnx cannot convert Lgamma; " * 5)])
    print_outcome(ExportOutcome(m, tmp_path / "a_model_with_a_rather_long_name_that_a_pipe_would_cut"), _console())
    out = capsys.readouterr().out
    assert "coreml-palettized" in out and "…" not in out
    assert reason in out.splitlines()[-2] and m.artifacts[1].error in out
    assert str(tmp_path / "a_model_with_a_rather_long_name_that_a_pipe_would_cut") in out


def test_onnxruntime_warnings_go_to_the_log_under_a_terminal(tiny_keras_files, tmp_path):
    """onnxruntime's quantizer warns through Python logging; under a TTY the progress display used to
    redirect stderr to the terminal, so the warning showed there (twice) instead of in export.log."""
    import shlex
    import shutil

    if shutil.which("script") is None:
        pytest.skip("needs util-linux `script` to run the export under a pseudo-terminal")
    cmd = [sys.executable, "-m", "edgepipe.pipeline", "export", str(tiny_keras_files["keras"]), "--formats", "onnx",
           "--int8", "--calib", "random", "--calib-samples", "8", "--out", str(tmp_path / "o"), "--no-cache"]
    res = subprocess.run(["script", "-qec", shlex.join(cmd), "/dev/null"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "onnx-int8" in res.stdout and "pre-processing" not in res.stdout
    assert "pre-processing before quantization" in (tmp_path / "o" / "tiny" / "export.log").read_text()
