"""edgepipe check (the CI gate) and export --max-drop recovery.

Unit tests drive the gate with small manifests + eval.json files written here (budgets, overrides,
reports, bad input). The slow tests use the real trained digits model: its int8 TFLite and ONNX
artifacts pass `check --max-drop 1.0`; artifacts degraded for real (calibrated on images of the
wrong range, or weights perturbed in the file) fail it, and --max-drop recovery is exercised.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_model  # noqa: E402
from conftest import run_cli  # noqa: E402

from edgepipe.pipeline import images  # noqa: E402
from edgepipe.pipeline.base.evaluation import EVAL_NAME, drops  # noqa: E402
from edgepipe.pipeline.cli.main import main  # noqa: E402
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel, Verification, load_manifest  # noqa: E402
from edgepipe.pipeline.base.util import sha256_file  # noqa: E402

SOURCE = {"top1": 98.0, "top5": 100.0}


def _row(aid: str, target: str = "cpu", top1: float = 98.0, top5: float = 100.0, agreement: float = 100.0,
         status: str = "ok", reason: str | None = None) -> dict:
    fmt, prec = aid.split("-", 1)
    r = {"artifact": aid, "format": fmt, "precision": prec, "sha256": f"sha-{aid}", "target": target,
         "runtime": "rt", "status": status}
    if status == "ok":
        m = {"top1": top1, "top5": top5, "agreement": agreement}
        r.update(m, drop=drops(SOURCE, m), lost=3, gained=1)
    else:
        r["reason"] = reason
    return r


def _setup(tmp_path: Path, rows: list[dict], ids=("tflite-int8", "onnx-int8", "tflite-fp16"), extra=None,
           verification=None, failed=()) -> Path:
    folder = tmp_path / "out" / "m"
    arts = []
    for aid in ids:
        fmt, prec = aid.split("-", 1)
        a = Artifact(id=aid, format=fmt, precision=prec, path=f"m_{prec}.{fmt}", status="ok", sha256=f"sha-{aid}",
                     verification=Verification(status=(verification or {}).get(aid, "passed")),
                     extra=(extra or {}).get(aid, {}))
        if aid in failed:
            a.status, a.path, a.sha256, a.error = "failed", None, None, "ConversionError: boom"
        arts.append(a)
    m = Manifest(model=SourceModel(name="m", kind="keras", input_shape=[1, 8, 8, 1], num_classes=10), artifacts=arts)
    folder.mkdir(parents=True)
    m.save(folder)
    ev = {"schema_version": 1, "kind": "edgepipe-eval", "model": "m", "unit": "percent",
          "dataset": {"source": "digits", "split": "test", "samples": 450}, "source": dict(SOURCE), "results": rows}
    (folder / EVAL_NAME).write_text(json.dumps(ev))
    return folder


def _check(folder: Path, capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["check", str(folder), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --------------------------------------------------------------------------- the gate
def test_passes_within_budget_and_fails_over_it(tmp_path, capsys):
    folder = _setup(tmp_path, [_row("tflite-int8", top1=97.2), _row("onnx-int8", top1=96.5), _row("tflite-fp16")])
    rc, out, err = _check(folder, capsys, "--max-drop", "1.0")
    assert rc == 1
    assert "onnx-int8 on cpu: top-1" in err and "drop 1.50 > budget 1.0 points" in err
    assert "tflite-int8 on cpu" not in err  # 0.8 points: within budget
    assert "FAIL" in out and "1 of 3 checks failed" in out
    rc, out, err = _check(folder, capsys, "--max-drop", "1.5")
    assert rc == 0 and "all 3 checks passed" in out and not err.strip()


def test_overrides_most_specific_wins(tmp_path, capsys):
    folder = _setup(tmp_path, [_row("tflite-int8", top1=96.0), _row("onnx-int8", top1=96.0), _row("tflite-fp16", top1=97.5)])
    # int8 budget 2.5 covers both int8 artifacts; the fp16 one keeps the default 0.1
    rc, out, err = _check(folder, capsys, "--max-drop", "0.1", "--max-drop-for", "int8=2.5", "--json")
    assert rc == 1
    res = json.loads(out)
    by = {r["artifact"]: r for r in res["rows"]}
    assert by["tflite-int8"]["budget"] == 2.5 and by["tflite-int8"]["budget_from"] == "int8"
    assert by["tflite-fp16"]["status"] == "fail" and by["tflite-fp16"]["budget"] == 0.1
    # artifact id beats precision beats format
    rc, out, _ = _check(folder, capsys, "--max-drop", "0.1", "--max-drop-for", "tflite=0.6,int8=2.5",
                        "--max-drop-for", "onnx-int8=1.0", "--json")
    by = {r["artifact"]: r for r in json.loads(out)["rows"]}
    assert (by["tflite-int8"]["budget"], by["onnx-int8"]["budget"], by["tflite-fp16"]["budget"]) == (2.5, 1.0, 0.6)
    assert [r["artifact"] for r in json.loads(out)["rows"] if r["status"] == "fail"] == ["onnx-int8"]
    assert rc == 1


@pytest.mark.parametrize("args,needle", [
    (["--max-drop-for", "int8"], "malformed --max-drop-for 'int8'"),
    (["--max-drop-for", "int8=lots"], "malformed --max-drop-for"),
    (["--max-drop-for", "int8=-1"], "--max-drop-for int8=-1 is negative"),
    (["--max-drop-for", "int9=1"], "'int9' matches no precision, format or artifact"),
    (["--metric", "top3"], "unknown metric 'top3'"),
    (["--max-drop", "-1"], "--max-drop -1.0 is negative: a budget is the largest drop allowed"),
    (["--max-drop", "nan"], "--max-drop nan is not a number"),
])
def test_bad_options_exit_2(tmp_path, capsys, args, needle):
    folder = _setup(tmp_path, [_row("tflite-int8"), _row("onnx-int8"), _row("tflite-fp16")])
    rc, _, err = _check(folder, capsys, *args)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_no_eval_json_tells_to_run_eval(tmp_path, capsys):
    folder = _setup(tmp_path, [])
    (folder / EVAL_NAME).unlink()
    rc, _, err = _check(folder, capsys)
    assert rc == 2 and "no eval.json" in err and "edgepipe eval" in err


def test_stale_or_incomplete_eval_exit_2(tmp_path, capsys):
    rows = [_row("tflite-int8"), _row("onnx-int8"), _row("tflite-fp16")]
    rows[0]["sha256"] = "something-else"
    folder = _setup(tmp_path, rows)
    rc, _, err = _check(folder, capsys)
    assert rc == 2 and "stale" in err and "tflite-int8 changed" in err
    folder = _setup(tmp_path / "b", rows[1:])
    rc, _, err = _check(folder, capsys)
    assert rc == 2 and "no results for artifact tflite-int8" in err


def test_metrics_agreement_and_top5(tmp_path, capsys):
    folder = _setup(tmp_path, [_row("tflite-int8", top1=98.0, top5=99.0, agreement=97.0), _row("onnx-int8"),
                               _row("tflite-fp16")])
    rc, out, _ = _check(folder, capsys, "--metric", "agreement", "--max-drop", "2", "--json")
    assert rc == 1
    (bad,) = [r for r in json.loads(out)["rows"] if r["status"] == "fail"]
    assert bad["check"] == "agreement" and bad["drop"] == pytest.approx(3.0) and bad["source_value"] == 100.0
    rc, out, _ = _check(folder, capsys, "--metric", "top1,top5", "--max-drop", "0.5", "--json")
    res = json.loads(out)
    assert rc == 1 and res["checks"] == 6
    assert [(r["artifact"], r["check"]) for r in res["rows"] if r["status"] == "fail"] == [("tflite-int8", "top5")]


def test_eval_errors_and_failed_exports_fail_skips_do_not(tmp_path, capsys):
    rows = [_row("tflite-int8"), _row("tflite-int8", target="gpu", status="skipped", reason="no GPU here"),
            _row("onnx-int8", status="error", reason="RuntimeError: kernel crashed")]
    folder = _setup(tmp_path, rows, failed=("tflite-fp16",))
    rc, out, err = _check(folder, capsys, "--json")
    res = json.loads(out)
    status = {(r["artifact"], r["target"], r["check"]): r["status"] for r in res["rows"]}
    assert status[("tflite-int8", "cpu", "top1")] == "pass"
    assert status[("tflite-int8", "gpu", "eval")] == "skipped"
    assert status[("onnx-int8", "cpu", "eval")] == "fail"
    assert status[("tflite-fp16", None, "export")] == "fail"
    assert rc == 1 and res["failed"] == 2 and res["skipped"] == 1
    assert "kernel crashed" in err and "export failed" in err


def test_junit_markdown_and_step_summary(tmp_path, capsys, monkeypatch):
    folder = _setup(tmp_path, [_row("tflite-int8", top1=95.0), _row("onnx-int8"),
                               _row("onnx-int8", target="gpu", status="skipped", reason="no CUDA"),
                               _row("tflite-fp16")])
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    rc, _, _ = _check(folder, capsys, "--junit", str(tmp_path / "r" / "junit.xml"), "--markdown",
                      str(tmp_path / "check.md"))
    assert rc == 1
    root = ET.parse(tmp_path / "r" / "junit.xml").getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1" and root.get("skipped") == "1"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == 4
    (failed,) = [c for c in cases if c.find("failure") is not None]
    assert failed.get("name") == "tflite-int8 on cpu: top-1"
    assert "drop 3.00 > budget 1.0 points" in failed.find("failure").get("message")
    assert [c.get("name") for c in cases if c.find("skipped") is not None] == ["onnx-int8 on gpu: eval"]
    md = (tmp_path / "check.md").read_text()
    assert md.startswith("### edgepipe check: m: ❌ 1 failed")
    assert "| tflite-int8 | cpu | top-1 | 98.00 | 95.00 | 3.00 | 1.0 | ❌ FAIL |" in md
    assert "| onnx-int8 | cpu | top-1 | 98.00 | 98.00 | 0.00 | 1.0 | ✅ pass |" in md
    text = summary.read_text()
    assert text.startswith("earlier step\n") and md in text


def test_require_verified(tmp_path, capsys):
    folder = _setup(tmp_path, [_row("tflite-int8"), _row("onnx-int8"), _row("tflite-fp16")],
                    verification={"onnx-int8": "not_verified"})
    assert _check(folder, capsys)[0] == 0
    rc, out, err = _check(folder, capsys, "--require-verified", "--json")
    assert rc == 1
    (bad,) = [r for r in json.loads(out)["rows"] if r["status"] == "fail"]
    assert bad["artifact"] == "onnx-int8" and bad["check"] == "verified" and "not_verified" in bad["reason"]


def test_require_full_edgetpu(tmp_path, capsys):
    full = {"compiled": False, "counts": {"edgetpu": 12, "cpu": 0, "total": 12}, "ops": []}
    partial = {"compiled": False, "counts": {"edgetpu": 10, "cpu": 2, "total": 12},
               "first_cpu_op": {"index": 10, "type": "SOFTMAX", "reason": "unsupported"},
               "ops": [{"index": 10, "type": "SOFTMAX", "placement": "cpu", "reason": "unsupported", "detail": ""},
                       {"index": 11, "type": "DEQUANTIZE", "placement": "cpu", "reason": "after", "detail": ""}]}
    rows = [_row("tflite-int8"), _row("edgetpu-int8", target="edgetpu", status="skipped", reason="no Edge TPU")]
    folder = _setup(tmp_path, rows, ids=("tflite-int8", "edgetpu-int8"), extra={"edgetpu-int8": {"edgetpu": full}})
    assert _check(folder, capsys, "--require-full-edgetpu")[0] == 0
    folder = _setup(tmp_path / "b", rows, ids=("tflite-int8", "edgetpu-int8"), extra={"edgetpu-int8": {"edgetpu": partial}})
    rc, out, err = _check(folder, capsys, "--require-full-edgetpu")
    assert rc == 1 and "2 of 12 ops run on the CPU" in err and "edgetpu-int8" in err
    folder = _setup(tmp_path / "c", [_row("tflite-int8")], ids=("tflite-int8",))
    rc, _, err = _check(folder, capsys, "--require-full-edgetpu")
    assert rc == 2 and "no artifact carries an Edge TPU analysis" in err and "--targets edgetpu" in err


def test_check_does_not_import_tensorflow(tmp_path):
    import subprocess

    folder = _setup(tmp_path, [_row("tflite-int8"), _row("onnx-int8"), _row("tflite-fp16")])
    code = ("import sys; from edgepipe.pipeline.cli import main; "
            f"rc = main(['check', {str(folder)!r}, '--require-full-edgetpu']) ; "
            "print('TF' if 'tensorflow' in sys.modules else 'noTF')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip().splitlines()[-1] == "noTF", res.stdout + res.stderr


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits_check")
    model = d / "digits.keras"
    model.write_bytes(digits_model.digits_model_path().read_bytes())
    images.write_digits_folder(d / "train_png", "train")
    return d


def _export(d: Path, out: Path, *args: str, rc: int = 0):
    res = run_cli("export", str(d / "digits.keras"), "--preprocess", "unit", "--int8", "--formats", "tflite,onnx",
                  "--out", str(out), *args)
    assert res.returncode == rc, res.stderr[-3000:]
    return out / "digits"


def _eval(folder: Path):
    res = run_cli("eval", str(folder), "--data", "digits", "--targets", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]


def _dark_folder(path: Path) -> Path:
    """Calibration images of the wrong range: noise at 0-6 (real digits reach 255)."""
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 7, (32, 32), dtype=np.uint8), "L").save(path / f"{i}.png")
    return path


def _perturb_tflite_weights(path: Path) -> None:
    """Negate the int8 weights of the largest constant tensor, in the file's bytes (written atomically)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    best = None
    for d in it.get_tensor_details():
        if d["dtype"] == np.int8 and len(d["shape"]) == 4:
            try:
                v = it.get_tensor(d["index"])
            except ValueError:
                continue
            if best is None or v.size > best.size:
                best = v
    blob = path.read_bytes()
    raw = best.tobytes()
    assert blob.count(raw) == 1
    bad = (-best.astype(np.int16)).clip(-128, 127).astype(np.int8).tobytes()
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_bytes(blob.replace(raw, bad))
    os.replace(tmp, path)  # a new file: the export cache may hard-link the old one


def _rehash(folder: Path, aid: str) -> None:
    """Record the perturbed file in the manifest, as a broken converter would have written it."""
    m, _ = load_manifest(folder)
    a = m.artifact(aid)
    a.sha256, a.size_bytes = sha256_file(folder / a.path), (folder / a.path).stat().st_size
    m.save(folder)


@pytest.mark.slow
def test_good_int8_artifacts_pass_the_gate(digits, tmp_path):
    folder = _export(digits, tmp_path / "out", "--data", str(digits / "train_png"))
    _eval(folder)
    ev = json.loads((folder / EVAL_NAME).read_text())
    assert ev["source"]["top1"] >= 95.0
    summary = tmp_path / "summary.md"
    res = run_cli("check", str(folder), "--max-drop", "1.0", "--require-verified", "--junit", str(tmp_path / "j.xml"),
                  "--markdown", str(tmp_path / "c.md"), env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 4 checks passed" in res.stdout  # 2 int8 artifacts x (top-1, verified)
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("tests") == "4" and root.get("failures") == "0"
    assert "✅ passed" in (tmp_path / "c.md").read_text() and summary.read_text()


@pytest.mark.slow
def test_int8_calibrated_on_the_wrong_range_fails_the_gate(digits, tmp_path):
    # --no-verify: this test is about the accuracy gate. Whether verification (8 images) already
    # flags the dark-calibrated TFLite artifact depends on the CPU's int8 kernels.
    folder = _export(digits, tmp_path / "out", "--data", str(_dark_folder(tmp_path / "dark")), "--no-verify")
    _eval(folder)
    res = run_cli("check", str(folder), "--max-drop", "1.0", "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    out = json.loads(res.stdout)
    failed = sorted(r["artifact"] for r in out["rows"] if r["status"] == "fail")
    assert failed == ["onnx-int8", "tflite-int8"]
    assert all(r["drop"] > 20 for r in out["rows"] if r["status"] == "fail")
    assert "tflite-int8 on cpu: top-1" in res.stderr and "onnx-int8 on cpu: top-1" in res.stderr


@pytest.mark.slow
def test_perturbed_weights_fail_the_gate_then_recovery_replaces_them(digits, tmp_path):
    from edgepipe.pipeline import export_stage, recover

    folder = _export(digits, tmp_path / "out", "--data", str(digits / "train_png"))
    m, _ = load_manifest(folder)
    tfl = folder / m.artifact("tflite-int8").path
    _perturb_tflite_weights(tfl)
    # Changed behind the manifest's back: eval refuses to trust it (exit 1), and the gate fails.
    res = run_cli("eval", str(folder), "--data", "digits", "--targets", "cpu")
    assert res.returncode == 1 and "digits_int8.tflite changed since the export" in res.stderr
    res = run_cli("check", str(folder), "--max-drop", "1.0")
    assert res.returncode == 1 and "changed since the export" in res.stdout + res.stderr
    # As a broken converter would have produced it (manifest agrees with the file): a real accuracy drop.
    _rehash(folder, "tflite-int8")
    _eval(folder)
    res = run_cli("check", str(folder), "--max-drop", "1.0", "--json")
    assert res.returncode == 1
    rows = {r["artifact"]: r for r in json.loads(res.stdout)["rows"]}
    assert rows["tflite-int8"]["status"] == "fail" and rows["tflite-int8"]["drop"] > 5
    assert rows["onnx-int8"]["status"] == "pass"

    # Recovery, as `export --max-drop 1 --eval-data digits` runs it after the export, here on the
    # finished folder (recover_folder loads the model; inside an export the export's own is reused).
    req = export_stage.prepare(str(digits / "digits.keras"), preprocess="unit", formats="tflite,onnx", int8=True,
                               out=tmp_path / "out", data=str(digits / "train_png"), max_drop=1.0,
                               eval_data="digits")
    report = recover.recover_folder(req)
    report.raise_if_missed()  # raises if anything still misses the budget
    by = {r["artifact"]: r for r in report.to_dict()["artifacts"]}
    first = by["tflite-int8"]["attempts"][0]
    assert first["name"] == "as exported" and first["drop"] > 5 and not first["meets"]
    assert by["tflite-int8"]["chosen"] == "int16x8 activations" and len(by["tflite-int8"]["attempts"]) == 2
    assert by["onnx-int8"]["chosen"] == "as exported" and len(by["onnx-int8"]["attempts"]) == 1
    m, _ = load_manifest(folder)
    a = m.artifact("tflite-int8")
    assert a.precision == "int16x8" and a.path == "digits_int16x8.tflite" and not tfl.exists()
    assert a.sha256 == sha256_file(folder / a.path) and a.verification.status == "passed" and a.ok
    assert a.options["recovered_by"] == "int16x8 activations" and a.calibration["samples"] == 100
    rec = a.extra["recovery"]
    assert [t["name"] for t in rec["attempts"]] == ["as exported", "int16x8 activations"]
    assert all(t["size_bytes"] > 0 and t["drop"] is not None for t in rec["attempts"])
    assert m.extra["recovery"]["artifacts"] == {"tflite-int8": "int16x8 activations", "onnx-int8": "as exported"}
    _eval(folder)
    res = run_cli("check", str(folder), "--max-drop", "1.0")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_export_max_drop_records_attempts_and_fails_when_nothing_recovers(digits, tmp_path):
    folder = _export(digits, tmp_path / "out", "--data", str(_dark_folder(tmp_path / "dark")), "--max-drop", "1",
                     "--eval-data", "digits", rc=1)
    m, _ = load_manifest(folder)
    rec = {a.id: a.extra["recovery"] for a in m.artifacts}
    onnx_names = [t["name"] for t in rec["onnx-int8"]["attempts"]]
    assert onnx_names[:3] == ["as exported", "entropy calibration", "percentile calibration"]
    names = [t["name"] for t in rec["tflite-int8"]["attempts"]]
    assert names[:3] == ["as exported", "int16x8 activations", "1 sensitive layer(s) in float"]
    # then the per-layer report's float fallback, short of the budget too: every layer was calibrated on the
    # wrong range, so no handful of float layers brings it back
    for r, ns in ((rec["onnx-int8"], onnx_names), (rec["tflite-int8"], names)):
        fallback = [t for t in r["attempts"] if t["name"].endswith("worst layer(s) in float")]
        assert fallback and fallback[0]["float_layers"] and r["layers"].endswith("layers.json")
    for r in rec.values():
        assert r["chosen"] is None and r["budget"] == 1.0
        assert all(t["drop"] > 1.0 and t["size_bytes"] > 0 for t in r["attempts"] if not t.get("error"))
    float_attempts = [t for t in rec["tflite-int8"]["attempts"] if "sensitive layer(s)" in t["name"]]
    assert [len(t["float_nodes"]) for t in float_attempts] == [1, 2, 4, 8][:len(float_attempts)]
    assert float_attempts[-1]["size_bytes"] > rec["tflite-int8"]["attempts"][0]["size_bytes"]
    assert m.artifact("tflite-int8").path == "digits_int8.tflite"  # nothing met the budget: the export stays


@pytest.mark.slow
def test_export_max_drop_bad_input_exit_2(digits, tmp_path):
    res = run_cli("export", str(digits / "digits.keras"), "--preprocess", "unit", "--formats", "tflite",
                  "--max-drop", "1", "--eval-data", "digits", "--out", str(tmp_path))
    assert res.returncode == 2 and "--max-drop applies to int8 artifacts" in res.stderr
    res = run_cli("export", str(digits / "digits.keras"), "--preprocess", "unit", "--int8", "--calib", "random",
                  "--max-drop", "1", "--out", str(tmp_path))
    assert res.returncode == 2 and "--max-drop needs labelled images" in res.stderr


@pytest.mark.slow
def test_edgetpu_artifact_gate_follows_its_analysis(digits, tmp_path):
    folder = _export(digits, tmp_path / "out", "--data", str(digits / "train_png"), "--targets", "cpu,edgetpu")
    _eval(folder)
    m, _ = load_manifest(folder)
    (etpu,) = [a for a in m.artifacts if a.format == "edgetpu"]
    report = etpu.extra["edgetpu"]
    res = run_cli("check", str(folder), "--require-full-edgetpu", "--json")
    rows = [r for r in json.loads(res.stdout)["rows"] if r["check"] == "edgetpu"]
    assert [r["artifact"] for r in rows] == [etpu.id]
    fully = not (report.get("counts") or {}).get("cpu")
    assert (rows[0]["status"] == "pass") == fully
    assert res.returncode == (0 if fully else 1), res.stderr


# --------------------------------------------------------------------------- the baseline
def _baseline(tmp_path: Path, top1: float, trained: bool = True) -> Path:
    folder = _setup(tmp_path, [_row("tflite-int8", top1=top1), _row("onnx-int8", top1=top1),
                               _row("tflite-fp16", top1=top1)])
    ev = json.loads((folder / EVAL_NAME).read_text())
    ev["source"] = {"top1": top1, "top5": 40.0, "samples": 450}
    ev["dataset"]["classes"] = 10
    for r in ev["results"]:
        r["drop"] = drops(ev["source"], {"top1": top1, "top5": 40.0, "agreement": 100.0})
    (folder / EVAL_NAME).write_text(json.dumps(ev))
    if not trained:
        m, _ = load_manifest(folder)
        m.model.trained = False
        m.save(folder)
    return folder


def test_source_model_at_chance_level_is_refused(tmp_path, capsys):
    """A source model no better than guessing (0 % here: labels that do not match the model's
    classes) makes every drop meaningless: check says so instead of passing."""
    for top1 in (0.0, 11.0):
        folder = _baseline(tmp_path / str(top1), top1)
        rc, out, err = _check(folder, capsys, "--max-drop", "1.0")
        assert rc == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert f"scores {top1:.1f} % top-1 on 450 images, no better than guessing" in line
        assert "--labels-map" in line and "--preprocess" in line and "--allow-chance-source" in line
    folder = _baseline(tmp_path / "ok", 30.0)  # well above 10 % + 2 sigma (12.8 %)
    assert _check(folder, capsys)[0] == 0


def test_chance_level_warns_for_an_untrained_model_or_when_allowed(tmp_path, capsys):
    folder = _baseline(tmp_path / "untrained", 9.0, trained=False)
    rc, out, err = _check(folder, capsys, "--json")
    assert rc == 0
    (w,) = json.loads(out)["warnings"]
    assert "untrained (exported with --weights none)" in w and "warning:" in err
    folder = _baseline(tmp_path / "allowed", 0.0)
    rc, out, err = _check(folder, capsys, "--allow-chance-source", "--markdown", str(tmp_path / "c.md"))
    assert rc == 0 and "gating anyway" in err
    assert "**warning:**" in (tmp_path / "c.md").read_text()


def test_library_check_returns_typed_rows_and_enforce_raises(tmp_path):
    from edgepipe.pipeline import CheckResult, GateFailure, check, enforce_check

    folder = _setup(tmp_path, [_row("tflite-int8", top1=96.0), _row("onnx-int8", top1=96.0),
                               _row("tflite-fp16", top1=98.0)])
    res = check(folder, 0.5, max_drop_for={"int8": 2.5}, markdown=tmp_path / "c.md")
    assert isinstance(res, CheckResult) and res.passed and res.reports == [str(tmp_path / "c.md")]
    assert {(r.artifact, r.budget, r.budget_from) for r in res.rows} == {
        ("tflite-int8", 2.5, "int8"), ("onnx-int8", 2.5, "int8"), ("tflite-fp16", 0.5, "default")}
    res = check(folder, 0.5, metric=["top1", "agreement"], max_drop_for={"tflite-int8": 1.0})
    assert not res.passed and [r.artifact for r in res.failed] == ["tflite-int8", "onnx-int8"]
    with pytest.raises(GateFailure, match="2 of 6 checks failed"):
        enforce_check(res)
