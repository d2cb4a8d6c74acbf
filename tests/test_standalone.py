"""bench and eval of a standalone .tflite/.onnx file (no export folder, no manifest).

The files are the shared tiny export's real artifacts (conftest ``tiny_export``), copied to a
bare folder so that nothing beside them describes them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgepipe.pipeline import api, standalone
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.base.evaluation import read_eval
from edgepipe.pipeline.cli.main import main


@pytest.fixture()
def files(tiny_export, tmp_path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    for name in ("tiny_fp32.tflite", "tiny_int8.tflite", "tiny_fp32.onnx"):
        shutil.copy(tiny_export / name, d / name)
    (d / "notes.txt").write_text("not a model")
    return d


def _err(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err and err[-1].startswith("edgepipe: error:") and not any("Traceback" in ln for ln in err), err
    return err[-1]


def test_file_manifest_reads_the_file(files):
    m = standalone.file_manifest(files / "tiny_int8.tflite")
    (a,) = m.artifacts
    assert (a.id, a.format, a.precision, a.status) == ("tflite-int8", "tflite", "int8", "ok")
    assert m.model.input_shape == [1, 32, 32, 3] and m.model.num_classes == 10
    assert a.inputs[0].dtype == "int8" and a.inputs[0].quantization["scale"]
    assert Path(a.path).is_absolute() and m.model.preprocessing == {}
    o = standalone.file_manifest(files / "tiny_fp32.onnx", preprocess="unit")
    assert o.artifacts[0].id == "onnx-fp32" and o.model.preprocessing["mode"] == "unit"
    assert o.artifacts[0].inputs[0].dtype == "float32"


@pytest.mark.parametrize("name,needle", [
    ("missing.tflite", "does not exist"),
    ("notes.txt", "is not a .tflite or .onnx file, nor an export folder"),
])
@pytest.mark.parametrize("cmd", ["bench", "eval"])
def test_wrong_path_or_type_is_one_line_exit_2(files, capsys, cmd, name, needle):
    extra = ["--data", "digits"] if cmd == "eval" else []
    assert main([cmd, str(files / name), *extra]) == 2
    assert needle in _err(capsys)


def test_bench_a_file_writes_edgepipe_out_stem(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny_int8.tflite", "tiny_fp32.onnx"):
        rc = main(["bench", str(files / name), "--runs", "3", "--min-seconds", "0", "--warmup", "1", "--json"])
        out = capsys.readouterr().out
        assert rc == 0, out
        rep = json.loads(out)
        stem = Path(name).stem
        assert rep["written"]["json"] == str(Path("edgepipe-out") / stem / "bench.json")
        (row,) = [r for r in rep["rows"] if r["target"] == "cpu"]
        assert row["status"] == "ok" and row["latency_ms"]["p50"] > 0, row
        assert rep["manifest"] == str((files / name).resolve())
        assert (tmp_path / "edgepipe-out" / stem / "bench.md").is_file()
    assert api.results_dir(files / "tiny_fp32.onnx") == Path("edgepipe-out/tiny_fp32")


def test_eval_a_file_reports_absolute_accuracy(files, tmp_path, capsys):
    f = files / "tiny_fp32.tflite"
    assert main(["eval", str(f), "--data", "digits", "--limit", "100"]) == 2
    line = _err(capsys)
    assert "records no preprocessing" in line and "--preprocess" in line
    out = tmp_path / "res"
    assert main(["eval", str(f), "--data", "digits", "--limit", "100", "--preprocess", "unit", "--targets", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement" not in printed and "Δ top-1" not in printed and "source model" not in printed
    ev = read_eval(out / "eval.json")
    assert ev.source is None and ev.manifest is None and ev.extra["file"] == str(f.resolve())
    (row,) = ev.results
    assert row.status == "ok" and row.samples == 100 and row.target == "cpu"
    assert 0.0 <= row.top1 <= 100.0 and row.top1 == pytest.approx(100.0 * row.correct / 100)
    assert row.drop is None and row.agreement is None and row.lost is None
    d = json.loads((out / "eval.json").read_text())
    assert "drop" not in d["results"][0] and "agreement" not in d["results"][0]


def test_eval_a_file_preprocessing_from_a_sidecar_and_refusals(files, tmp_path):
    (files / "preprocessing.json").write_text(json.dumps({"preprocessing": {"mode": "unit", "scale": 1 / 255}}))
    res = api.evaluate(files / "tiny_fp32.onnx", "digits", limit=100, targets="cpu", out=tmp_path / "o", log=False)
    assert res.results[0].status == "ok" and res.results[0].runtime == "onnxruntime"
    with pytest.raises(UserError, match="--preprocess applies to a standalone"):
        api.evaluate(files.parent, "digits", preprocess="unit")
    with pytest.raises(UserError, match="unknown --preprocess 'imagenet'"):
        api.evaluate(files / "tiny_fp32.onnx", "digits", preprocess="imagenet")


def test_eval_progress_counts_every_image(files, tmp_path):
    events = []
    api.evaluate(files / "tiny_int8.tflite", "digits", limit=100, targets="cpu", preprocess="unit",
                 out=tmp_path / "o", progress=lambda e, info: events.append((e, info)), log=False)
    names = [e for e, _ in events]
    assert names.index("plan") < names.index("start") < names.index("done")
    plan = dict(events)["plan"]
    assert plan == {"jobs": 1, "images": 100}
    assert sum(info["count"] for e, info in events if e == "images") == 100


def test_runtime_logs_go_to_eval_log_unless_debug(files, tmp_path):
    from conftest import run_cli

    args = ["eval", str(files / "tiny_fp32.tflite"), "--data", "digits", "--limit", "100", "--preprocess", "unit",
            "--targets", "cpu", "--out", str(tmp_path / "o")]
    res = run_cli(*args, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "XNNPACK" not in res.stderr + res.stdout
    assert "XNNPACK" in (tmp_path / "o" / "eval.log").read_text()
    assert f"runtime logs in {tmp_path / 'o' / 'eval.log'}" in res.stdout
    res = run_cli("--debug", *args, "--json", timeout=300)
    assert res.returncode == 0 and "XNNPACK" in res.stderr
    assert json.loads(res.stdout)["results"][0]["status"] == "ok"  # stdout stays clean JSON
