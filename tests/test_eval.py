"""edgepipe eval: labelled sets, metrics, bad input (exit 2), and the real trained digits model
exported to int8 TFLite / ONNX / Core ML and evaluated without TensorFlow in the eval process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_model  # noqa: E402  (tests/ helper)
from conftest import run_cli  # noqa: E402

from edgepipe.pipeline import datasets, images  # noqa: E402
from edgepipe.pipeline.base.errors import UserError  # noqa: E402
from edgepipe.pipeline.base.evaluation import classification_metrics, drops, load_eval  # noqa: E402
from edgepipe.pipeline.base.manifest import Manifest, SourceModel  # noqa: E402
from edgepipe.pipeline.cli.main import main  # noqa: E402


def _err_line(capsys) -> str:
    err = [l for l in capsys.readouterr().err.strip().splitlines() if l.strip()]
    assert err and err[-1].startswith("edgepipe: error:"), err
    assert not any("Traceback" in l for l in err)
    return err[-1]


def _png(path: Path, value: int = 128, size: int = 8, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def _fake_manifest(folder: Path, classes: int = 10, shape=(1, 16, 16, 1), labels=None) -> Path:
    """A manifest with no artifacts: enough for eval's input validation (no TensorFlow)."""
    m = Manifest(model=SourceModel(name="m", kind="keras", input_shape=list(shape), output_shape=[1, classes],
                                   num_classes=classes, preprocessing={"mode": "unit", "scale": 1 / 255},
                                   labels=labels))
    folder.mkdir(parents=True, exist_ok=True)
    m.save(folder)
    return folder


# --------------------------------------------------------------------------- datasets
def test_digits_split_is_fixed_stratified_and_disjoint():
    tr, te = images.digits_split()
    tr2, te2 = images.digits_split()
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert len(tr) == 1347 and len(te) == 450
    assert not set(tr) & set(te)
    from sklearn.datasets import load_digits

    y = load_digits().target
    counts = np.bincount(y[te], minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified: ~45 per class


def test_digits_set_at_model_size_and_channels():
    ds = datasets.load_labelled("digits", [1, 24, 20, 3], 10)
    assert ds.raw.shape == (450, 24, 20, 3) and ds.raw.dtype == np.float32
    assert ds.raw.min() == 0 and 200 < ds.raw.max() <= 255
    assert np.array_equal(ds.raw[..., 0], ds.raw[..., 2])  # gray repeated
    assert ds.split == "test" and ds.mapping == "sorted"
    gray = datasets.load_labelled("digits", [1, 24, 20, 1], 10)
    assert ds.hash != gray.hash and np.array_equal(ds.labels, gray.labels)


def test_imagefolder_of_digit_pngs_equals_builtin_digits(tmp_path):
    root = images.write_digits_folder(tmp_path / "digits_test", "test")
    a = datasets.load_labelled(str(root), [1, 32, 32, 1], 10)
    b = datasets.load_labelled("digits", [1, 32, 32, 1], 10)
    key = lambda ds: sorted((int(l), r.tobytes()) for l, r in zip(ds.labels, ds.raw))
    assert a.n == b.n == 450 and key(a) == key(b)
    assert a.source == "folder" and a.class_names == [str(i) for i in range(10)]


def test_labels_map_json_and_text(tmp_path):
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        for i in range(3):
            _png(root / name / f"{i}.png", 40 if name == "cat" else 200)
    (tmp_path / "map.json").write_text(json.dumps({"cat": 7, "dog": 2}))
    ds = datasets.load_labelled(str(root), [1, 8, 8, 1], 10, labels_map=tmp_path / "map.json", min_samples=1)
    assert ds.mapping == "labels-map" and sorted(set(ds.labels.tolist())) == [2, 7]
    assert all((l == 7) == (r.mean() < 100) for l, r in zip(ds.labels, ds.raw))
    (tmp_path / "map.txt").write_text("# folder index\ncat 3\ndog: 9\n")
    ds = datasets.load_labelled(str(root), [1, 8, 8, 1], 10, labels_map=tmp_path / "map.txt", min_samples=1)
    assert sorted(set(ds.labels.tolist())) == [3, 9]
    # the model's own labels map folder names when every folder is one of them
    labels = ["bird", "cat", "x", "dog"]
    ds = datasets.load_labelled(str(root), [1, 8, 8, 1], 4, model_labels=labels, min_samples=1)
    assert ds.mapping == "model-labels" and sorted(set(ds.labels.tolist())) == [1, 3]


@pytest.mark.parametrize("setup,classes,kwargs,needle", [
    ("empty", 3, {}, "no images in"),
    ("loose", 3, {}, "no class subfolders"),
    ("three_classes", 10, {}, "has 3 classes (a, b, c) but the model outputs 10"),
    ("three_classes", 10, {"labels_map": "missing"}, "no entry for 1 class"),
    ("three_classes", 10, {"labels_map": "out_of_range"}, "model has 10 outputs"),
    ("three_classes", 10, {"labels_map": "malformed"}, "is not 'folder index'"),
    ("all_broken", 3, {}, "none of the 12 images"),
    ("three_classes", 3, {"min_samples": 50}, "fewer than the minimum eval set size (50)"),
    ("three_classes", 3, {"limit": 5, "min_samples": 10}, "--limit 5 is below the minimum"),
])
def test_bad_labelled_sets(tmp_path, setup, classes, kwargs, needle):
    root = tmp_path / "data"
    root.mkdir()
    if setup == "loose":
        _png(root / "x.png")
    elif setup in ("three_classes", "all_broken"):
        for c in "abc":
            for i in range(4):
                p = root / c / f"{i}.png"
                if setup == "all_broken":
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(b"not a png")
                else:
                    _png(p, 10 * i)
    maps = {"missing": "a 0\nb 1\n", "out_of_range": "a 0\nb 1\nc 10\n", "malformed": "a 0\nb\n"}
    if "labels_map" in kwargs:
        (tmp_path / "map.txt").write_text(maps[kwargs["labels_map"]])
        kwargs = {**kwargs, "labels_map": tmp_path / "map.txt"}
    kwargs.setdefault("min_samples", 1)
    with pytest.raises(UserError) as e:
        datasets.load_labelled(str(root), [1, 8, 8, 1], classes, **kwargs)
    assert needle in e.value.one_line()


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    for c in ("0", "1"):
        for i in range(6):
            _png(root / c / f"{i}.png", 30 * i)
        (root / c / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    ds = datasets.load_labelled(str(root), [1, 8, 8, 1], 2, min_samples=10)
    assert ds.n == 12 and ds.skipped == 2 and ds.available == 14
    assert sorted(ds.skipped_files) == ["0/broken.jpg", "1/broken.jpg"]
    with pytest.raises(UserError, match="after skipping 2 that failed to decode"):
        datasets.load_labelled(str(root), [1, 8, 8, 1], 2, min_samples=13)


def test_limit_takes_a_fixed_subset(tmp_path):
    a = datasets.load_labelled("digits", [1, 16, 16, 1], 10, limit=120)
    b = datasets.load_labelled("digits", [1, 16, 16, 1], 10, limit=120)
    assert a.n == 120 and a.hash == b.hash and a.available == 450
    assert len(set(a.labels.tolist())) == 10  # the split is shuffled: every class is present


# --------------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    labels = np.array([0, 1, 2, 3])
    out = np.array([[0.9, 0.1, 0, 0, 0, 0], [0.2, 0.7, 0.1, 0, 0, 0],  # right, right
                    [0.5, 0.4, 0.1, 0, 0, 0], [0.1, 0.2, 0.3, 0.0, 0.35, 0.05]],  # wrong (top-3), wrong (not top-5)
                   np.float32)
    src_pred = np.array([0, 2, 2, 4])
    m = classification_metrics(out, labels, src_pred)
    assert m["top1"] == 50.0 and m["top5"] == 75.0 and m["correct"] == 2
    assert m["agreement"] == 50.0  # rows 0 and 3 agree
    assert m["lost"] == 1 and m["gained"] == 1  # row 2: source right, artifact wrong; row 1: the reverse
    d = drops({"top1": 75.0, "top5": 100.0}, m)
    assert d == {"top1": 25.0, "top5": 25.0, "agreement": 50.0}


# --------------------------------------------------------------------------- CLI bad input
@pytest.mark.parametrize("make,args,needle", [
    ("empty", ["--data", "{root}"], "no images in"),
    ("mismatch", ["--data", "{root}", "--min-samples", "1"], "but the model outputs 10 classes"),
    ("broken", ["--data", "{root}", "--min-samples", "1"], "could be decoded"),
    ("small", ["--data", "{root}"], "fewer than the minimum eval set size (100)"),
    ("small", ["--data", "{root}", "--min-samples", "5", "--limit", "3"], "--limit 3 is below the minimum"),
    ("none", ["--data", "/nonexistent/dir"], "not found"),
    ("none", ["--data", "digits", "--targets", "tpu"], "unknown target 'tpu'"),
    ("none", ["--data", "digits", "--artifacts", "tflite-int4"], "no artifact 'tflite-int4'"),
])
def test_eval_bad_input_exit_2(tmp_path, capsys, make, args, needle):
    folder = _fake_manifest(tmp_path / "out" / "m")
    root = tmp_path / "data"
    root.mkdir()
    if make == "mismatch":
        for c in "ab":
            _png(root / c / "0.png")
    elif make == "broken":
        for c in range(10):
            (root / str(c)).mkdir()
            (root / str(c) / "0.png").write_bytes(b"broken")
    elif make == "small":
        for c in range(10):
            _png(root / str(c) / "0.png")
    rc = main(["eval", str(folder), *[a.format(root=root) for a in args]])
    assert rc == 2
    assert needle in _err_line(capsys)
    assert not (folder / "eval.json").exists()


def test_eval_without_manifest_exit_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--data", "digits"]) == 2
    assert "no manifest" in _err_line(capsys)


def test_eval_on_a_non_classifier_exit_2(tmp_path, capsys):
    folder = _fake_manifest(tmp_path / "m", classes=1)
    assert main(["eval", str(folder), "--data", "digits"]) == 2
    assert "not a classifier" in _err_line(capsys)


# --------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """The trained digits model exported to int8 TFLite, ONNX and Core ML, calibrated on the train split."""
    d = tmp_path_factory.mktemp("digits_eval")
    model = d / "digits.keras"
    model.write_bytes(digits_model.digits_model_path().read_bytes())
    calib = images.write_digits_folder(d / "train_png", "train")
    res = run_cli("export", str(model), "--preprocess", "unit", "--int8", "--data", str(calib),
                  "--formats", "tflite,onnx,coreml", "--out", str(d / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    return d / "out" / "digits"


def _eval_json(folder: Path, *args: str) -> dict:
    res = run_cli("eval", str(folder), *args, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    recorded = out.pop("ledger")  # where it was recorded (the session's ledger): --json only, never in eval.json
    assert recorded["kind"] == "eval" and len(recorded["rows"]["eval_rows"]) == len(out["results"])
    assert out == load_eval(folder)[0].to_dict()
    return out


@pytest.mark.slow
def test_trained_digits_model_and_its_int8_artifacts(digits_export):
    info = json.loads(digits_model.digits_model_path().with_suffix(".json").read_text())
    assert info["test_accuracy"] >= 0.95
    ev = _eval_json(digits_export, "--data", "digits", "--targets", "cpu,reference")
    assert ev["schema_version"] == 1 and ev["dataset"]["samples"] == 450 and ev["dataset"]["split"] == "test"
    assert ev["source"]["top1"] >= 95.0
    assert abs(ev["source"]["top1"] - 100 * info["test_accuracy"]) < 0.5  # same images, same model
    assert not ev["tensorflow_imported"]
    ok = {(r["artifact"], r["target"]): r for r in ev["results"] if r["status"] == "ok"}
    assert ("tflite-int8", "cpu") in ok and ("onnx-int8", "cpu") in ok
    for r in ok.values():
        assert r["drop"]["top1"] <= 1.0, r
        assert r["agreement"] >= 98.0
        assert r["top1"] == pytest.approx(100.0 * r["correct"] / 450)
        # the counts check builds its intervals from: flips per class (by label, by the source's top-1)
        assert sum(c[1] for c in r["per_class"]) == 450 and sum(c[2] for c in r["per_class"]) == r["lost"]
        assert sum(c[2] for c in r["per_class_agreement"]) == round((100.0 - r["agreement"]) * 4.5)
        assert r["top5_lost"] >= 0 and r["top5_gained"] >= 0
    from edgepipe.devices.runtimes.base import Runtime, _load_all

    _load_all()
    if ("coreml-reference", "reference") in Runtime.registry:
        assert ("coreml-int8", "reference") in ok  # Core ML via the reference interpreter, raw pixels in
    skipped = [r for r in ev["results"] if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)


@pytest.mark.slow
def test_second_eval_reuses_source_predictions_without_tensorflow(digits_export):
    _eval_json(digits_export, "--data", "digits", "--targets", "cpu", "--limit", "200")
    code = ("import sys, json; from edgepipe.pipeline.cli import main; "
            f"rc = main(['eval', {str(digits_export)!r}, '--data', 'digits', '--targets', 'cpu', '--limit', '200', '--json']); "
            "print('TF' if 'tensorflow' in sys.modules else 'noTF', file=sys.stderr); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "noTF"
    ev = json.loads(res.stdout)
    assert ev["source"]["predictions"]["cached"] is True and ev["dataset"]["samples"] == 200
    assert ev["seconds"] < 20
    assert (digits_export / ev["source"]["predictions"]["path"]).is_file()


@pytest.mark.slow
def test_imagefolder_eval_matches_digits_eval(digits_export, tmp_path):
    root = images.write_digits_folder(tmp_path / "test_png", "test")
    a = _eval_json(digits_export, "--data", "digits", "--targets", "cpu")
    b = _eval_json(digits_export, "--data", str(root), "--targets", "cpu")
    assert b["dataset"]["source"] == "folder" and b["dataset"]["samples"] == 450
    assert a["source"]["top1"] == b["source"]["top1"]
    ra = {(r["artifact"], r["target"]): r.get("top1") for r in a["results"]}
    rb = {(r["artifact"], r["target"]): r.get("top1") for r in b["results"]}
    assert ra == rb


@pytest.mark.slow
def test_source_model_that_does_not_reproduce_reference_is_refused(digits_export, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(digits_export, folder)
    for p in [*folder.glob("source_predictions-*.npz"), folder / "eval.json"]:
        p.unlink(missing_ok=True)
    with np.load(folder / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    ref["outputs"] = np.roll(ref["outputs"], 1, axis=1)  # what another model would have produced
    with open(folder / "reference.npz", "wb") as fh:
        np.savez(fh, **ref)
    res = run_cli("eval", str(folder), "--data", "digits", "--targets", "cpu")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "does not reproduce reference.npz" in res.stderr
    assert not (folder / "eval.json").exists()


@pytest.mark.slow
def test_builtin_random_model_is_rebuilt_from_its_seed(tmp_path):
    """Built-ins with --weights none are rebuilt deterministically and checked against reference.npz."""
    res = run_cli("export", "mobilenet", "--weights", "none", "--input-size", "32", "--alpha", "0.25",
                  "--classes", "10", "--formats", "tflite", "--seed", "3", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    ev = _eval_json(tmp_path / "mobilenet", "--data", "digits", "--targets", "cpu", "--limit", "100")
    check = ev["source"]["predictions"]["reference_check"]
    assert check["passed"] and check["max_abs"] < 1e-4
    (row,) = [r for r in ev["results"] if r["status"] == "ok"]
    assert row["artifact"] == "tflite-fp32" and row["agreement"] >= 99.0


@pytest.mark.slow
@pytest.mark.gpu
def test_eval_on_litert_gpu(digits_export):
    from edgepipe.devices.runtimes.litert_gpu import LiteRTGPU

    why = LiteRTGPU().host_available()
    if why:
        pytest.skip(f"LiteRT GPU unavailable here: {why}")
    ev = _eval_json(digits_export, "--data", "digits", "--targets", "gpu", "--limit", "100")
    (row,) = [r for r in ev["results"] if r["artifact"] == "tflite-int8"]
    assert row["status"] == "ok", row
    assert row["target"] == "gpu" and row["drop"]["top1"] <= 1.0


# --------------------------------------------------------------------------- eval.json, typed
def test_eval_json_written_before_still_reads_and_round_trips():
    """tests/fixtures/eval/eval_v1.json was written by edgepipe 0.1.0 before eval results were typed."""
    from edgepipe.pipeline.base.evaluation import EvalResult, read_eval

    path = Path(__file__).parent / "fixtures" / "eval" / "eval_v1.json"
    old = json.loads(path.read_text())
    res = read_eval(path)
    assert isinstance(res, EvalResult) and res.source["top1"] == old["source"]["top1"]
    assert [(r.status, r.where) for r in res.results] == [("ok", "cpu"), ("ok", "gpu"), ("error", None),
                                                          ("ok", "reference")]
    assert res.results[0].drop["top1"] == old["results"][0]["drop"]["top1"]
    assert json.dumps(res.to_dict()) == json.dumps(old)  # same keys, same order, same values
    unknown = {**old, "future_key": 1, "results": [{**old["results"][0], "future_row_key": 2}]}
    assert EvalResult.from_dict(unknown).to_dict() == unknown


# --------------------------------------------------------------------------- default targets
def test_default_targets_leave_the_slow_ones_out(tiny_export, monkeypatch):
    """By default eval runs the fast targets; the software GPU and the Core ML reference
    interpreter only when named, and an artifact only they could run says how to ask."""
    from edgepipe.devices.runtimes.base import runtimes_for
    from edgepipe.pipeline import eval_artifacts as ea
    from edgepipe.pipeline.base.evaluation import EvalRow
    from edgepipe.pipeline.base.manifest import load_manifest

    software = {"tflite": {"available": True, "vulkan_adapters": [{"name": "llvmpipe", "type": "cpu"}]}}
    monkeypatch.setattr(ea, "probe_target", lambda target: software)
    (gpu,) = runtimes_for("tflite", "gpu")
    assert "software (llvmpipe" in ea.slow_reason(gpu, "tflite")
    (ref,) = runtimes_for("coreml", "reference")
    assert "interpreter" in ea.slow_reason(ref, "coreml")
    (cpu,) = runtimes_for("tflite", "cpu")
    assert ea.slow_reason(cpu, "tflite") is None

    m, folder = load_manifest(tiny_export)
    arts = [m.artifact("tflite-fp32"), m.artifact("coreml-fp32"), m.artifact("onnx-int8")]
    items = ea.plan(arts, folder, ["cpu", "gpu", "reference"], explicit=False)
    jobs = [(i.row.artifact, i.row.target) for i in items if isinstance(i, ea.Job)]
    assert jobs == [("tflite-fp32", "cpu")]
    rows = {(r.artifact, r.target): r for r in items if isinstance(r, EvalRow)}
    assert rows[("coreml-fp32", "reference")].status == "skipped"
    assert "not run by default" in rows[("coreml-fp32", "reference")].reason
    assert "--targets reference" in rows[("coreml-fp32", "reference")].reason
    assert rows[("onnx-int8", None)].status == "error" and "export failed" in rows[("onnx-int8", None)].reason
    asked = ea.plan([m.artifact("coreml-fp32")], folder, ["reference"], explicit=True)
    assert [(i.row.artifact, i.row.target) for i in asked if isinstance(i, ea.Job)] == [("coreml-fp32", "reference")]
