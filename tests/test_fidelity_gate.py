"""`edgepipe check` with statistics (pipeline/gate.py on pipeline/fidelity/stats.py): each drop with its
interval from the paired counts eval.json carries, inconclusive when the set is too small to show the
budget holds, a per-class budget, and bench rows with wrong outputs failing the gate. Eval.json files
are written here with self-consistent counts (images, flips, per-class flips)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from edgepipe.pipeline.base.bench import WRONG_OUTPUT, BenchReport, BenchRow
from edgepipe.pipeline.base.evaluation import EVAL_NAME
from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel, Verification
from edgepipe.pipeline.cli.main import main
from edgepipe.pipeline.fidelity import stats as S
from edgepipe.pipeline.gate import Budget, GateConfig, run_check

ART = "tflite-int8"


def _row(n: int, src_correct: int, lost: int, gained: int, *, per_class=None, disagree=None, aid=ART) -> dict:
    """An eval.json row whose figures all follow from the counts."""
    fmt, prec = aid.split("-", 1)
    art_correct = src_correct - lost + gained
    disagree = lost + gained if disagree is None else disagree
    top1_s, top1_a = 100.0 * src_correct / n, 100.0 * art_correct / n
    return {"artifact": aid, "format": fmt, "precision": prec, "sha256": f"sha-{aid}", "target": "cpu",
            "runtime": "litert", "status": "ok", "top1": top1_a, "top5": 100.0, "agreement": 100.0 * (n - disagree) / n,
            "drop": {"top1": top1_s - top1_a, "top5": 0.0, "agreement": 100.0 * disagree / n},
            "correct": art_correct, "lost": lost, "gained": gained, "top5_lost": 0, "top5_gained": 0,
            "samples": n, "per_class": per_class or [[0, n, lost, gained]],
            "per_class_agreement": [[0, n, disagree, 0]], "device": "local"}


def _folder(tmp_path: Path, rows: list[dict], n: int, src_correct: int, bench: list[BenchRow] = ()) -> Path:
    folder = tmp_path / "m"
    ids = sorted({r["artifact"] for r in rows})
    arts = [Artifact(id=i, format=i.split("-")[0], precision=i.split("-")[1], path=f"m_{i}.bin", status="ok",
                     sha256=f"sha-{i}", size_bytes=1000, verification=Verification(status="passed")) for i in ids]
    Manifest(model=SourceModel(name="m", kind="keras", input_shape=[1, 8, 8, 1], num_classes=10),
             artifacts=arts).save(folder)
    ev = {"schema_version": 1, "kind": "edgepipe-eval", "model": "m", "unit": "percent",
          "dataset": {"source": "folder", "samples": n, "classes": 10},
          "source": {"top1": 100.0 * src_correct / n, "top5": 100.0, "correct": src_correct, "samples": n},
          "results": rows}
    (folder / EVAL_NAME).write_text(json.dumps(ev))
    if bench:
        BenchReport(rows=list(bench)).save(folder / "bench.json")
    return folder


def _cli(folder: Path, capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["check", str(folder), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one(folder: Path, **cfg) -> dict:
    res = run_check(folder, GateConfig(**cfg))
    (row,) = [r for r in res.rows if r.check == "top1"]
    return {"row": row, "res": res}


def test_the_interval_is_tangos_score_interval_of_the_paired_counts(tmp_path):
    folder = _folder(tmp_path, [_row(450, 446, 3, 1)], 450, 446)
    row = _one(folder)["row"]
    lo, hi = S.tango_interval(3, 1, 450, 0.95)
    assert row.low == pytest.approx(100 * lo) and row.high == pytest.approx(100 * hi)
    assert row.drop == pytest.approx(100 * 2 / 450) and row.samples == 450 and row.confidence == 0.95
    narrow = _one(folder, confidence=0.8)["row"]
    assert narrow.low > row.low and narrow.high < row.high  # a lower level, a narrower interval


def test_450_images_zero_flips_pass_one_lost_image_is_inconclusive(tmp_path, capsys):
    folder = _folder(tmp_path / "a", [_row(450, 446, 0, 0)], 450, 446)
    row = _one(folder)["row"]
    assert row.status == "pass" and row.verdict == "pass"
    assert row.interval_text() == "[-0.85, 0.85]"
    folder = _folder(tmp_path / "b", [_row(450, 446, 1, 0)], 450, 446)
    rc, out, err = _cli(folder, capsys, "--max-drop", "1.0")
    assert rc == 1 and "inconclusive" in out and "1 of 1 checks inconclusive" in out
    assert "interval [-0.63, 1.25]" in out and "images at these rates would show it is under the budget" in out
    rc, out, err = _cli(folder, capsys, "--max-drop", "1.0", "--allow-inconclusive")
    assert rc == 0 and "inconclusive (allowed)" in out and "--allow-inconclusive" in err


def test_20_images_are_inconclusive_and_say_how_many_would_do(tmp_path, capsys):
    folder = _folder(tmp_path, [_row(20, 19, 0, 0)], 20, 19)
    rc, out, err = _cli(folder, capsys, "--max-drop", "1.0", "--json")
    assert rc == 1
    (row,) = json.loads(out)["rows"]
    assert row["status"] == "inconclusive" and row["verdict"] == "inconclusive" and row["drop"] == 0.0
    assert row["high"] > 10 and row["needed"] > 20  # 0 of 20 flipped still allows a drop of 16 points
    assert f"about {row['needed']} images" in row["reason"]
    assert "inconclusive" in err


def test_a_drop_over_the_budget_fails_even_when_its_interval_reaches_under(tmp_path, capsys):
    folder = _folder(tmp_path, [_row(100, 95, 2, 0)], 100, 95)  # 2.0 points, interval straddles 1.0
    row = _one(folder)["row"]
    assert row.verdict == "inconclusive" and row.status == "fail" and row.low < 1.0 < row.drop
    assert "> budget 1.0 points" in row.reason and "over the budget" in row.reason
    folder = _folder(tmp_path / "c", [_row(450, 440, 30, 0)], 450, 440)
    row = _one(folder)["row"]
    assert row.verdict == "fail" and row.status == "fail" and "lies over the budget" in row.reason


def test_a_collapsed_class_fails_the_per_class_budget(tmp_path, capsys):
    per_class = [[k, 45, 0, 0] for k in range(9)] + [[9, 45, 20, 0]]
    folder = _folder(tmp_path, [_row(450, 450, 20, 0, per_class=per_class)], 450, 450)
    assert _one(folder)["row"].status == "fail"  # 4.4 points over the default budget of 1.0
    res = run_check(folder, GateConfig(budgets=[Budget("top1", 5.0)], max_class_drop=10.0))
    (row,) = res.rows
    assert row.worst_class["cls"] == 9 and row.worst_class["drop"] == pytest.approx(100 * 20 / 45)
    assert row.status == "fail" and "class 9 drops" in row.reason
    rc, out, err = _cli(folder, capsys, "--max-drop", "5", "--max-class-drop", "10")
    assert rc == 1 and "--max-class-drop 10" in out


def test_agreement_uses_the_disagreement_count(tmp_path):
    folder = _folder(tmp_path, [_row(450, 446, 1, 1, disagree=2)], 450, 446)
    res = run_check(folder, GateConfig(budgets=[Budget("agreement", 2.0)]))
    (row,) = res.rows
    lo, hi = S.wilson_interval(2, 450, 0.95)
    assert row.drop == pytest.approx(100 * 2 / 450) and row.high == pytest.approx(100 * hi) and row.status == "pass"


def test_junit_and_markdown_carry_the_interval(tmp_path, capsys):
    folder = _folder(tmp_path, [_row(450, 446, 1, 0), _row(450, 446, 0, 0, aid="onnx-int8")], 450, 446)
    rc, _, _ = _cli(folder, capsys, "--junit", str(tmp_path / "j.xml"), "--markdown", str(tmp_path / "c.md"))
    assert rc == 1
    md = (tmp_path / "c.md").read_text()
    assert "| 95% interval |" in md and "⚠️ inconclusive | [-0.63, 1.25] (450 images" in md
    assert "✅ pass | [-0.85, 0.85] (450 images) |" in md
    cases = ET.parse(tmp_path / "j.xml").getroot().findall("./testsuite/testcase")
    (bad,) = [c for c in cases if c.find("failure") is not None]
    assert bad.find("failure").get("type") == "edgepipe.inconclusive"
    assert "95% interval [-0.63, 1.25]" in bad.find("failure").text
    good = next(c for c in cases if c.find("failure") is None)
    assert "verdict pass" in good.find("system-out").text


def test_bad_confidence_or_class_budget_exit_2(tmp_path, capsys):
    folder = _folder(tmp_path, [_row(450, 446, 0, 0)], 450, 446)
    for args, needle in ((["--confidence", "1.5"], "--confidence 1.5"), (["--max-class-drop", "-1"], "--max-class-drop")):
        rc, _, err = _cli(folder, capsys, *args)
        assert rc == 2 and needle in err and "Traceback" not in err


def _bench_row(status: str, target: str = "gpu", size: int = 1000) -> BenchRow:
    check = {"status": "ok" if status == "ok" else WRONG_OUTPUT, "against": "cpu", "top1_agreement": 0.3}
    return BenchRow(artifact=ART, format="tflite", precision="int8", target=target, runtime="litert", status=status,
                    size_bytes=size, agreement={"against": "cpu", "check": check},
                    reason=None if status == "ok" else "outputs disagree with cpu on 32 inputs (top-1 30% < 90%)")


def test_bench_rows_with_wrong_outputs_fail_the_gate(tmp_path, capsys):
    folder = _folder(tmp_path / "a", [_row(450, 446, 0, 0)], 450, 446, bench=[_bench_row(WRONG_OUTPUT)])
    rc, out, err = _cli(folder, capsys, "--json")
    rows = {r["check"]: r for r in json.loads(out)["rows"]}
    assert rc == 1 and rows["top1"]["status"] == "pass"
    assert rows["outputs"]["status"] == "fail" and rows["outputs"]["target"] == "gpu"
    assert "outputs disagree with cpu" in rows["outputs"]["reason"]
    folder = _folder(tmp_path / "b", [_row(450, 446, 0, 0)], 450, 446, bench=[_bench_row("ok")])
    rc, out, _ = _cli(folder, capsys, "--json")
    assert rc == 0 and [r["status"] for r in json.loads(out)["rows"] if r["check"] == "outputs"] == ["pass"]
    stale = _folder(tmp_path / "c", [_row(450, 446, 0, 0)], 450, 446, bench=[_bench_row(WRONG_OUTPUT, size=5)])
    rc, _, err = _cli(stale, capsys)
    assert rc == 0 and "bench.json is stale" in err


def test_rows_without_counts_are_judged_as_before_with_a_note(tmp_path, capsys):
    row = _row(450, 446, 1, 0)
    for k in ("samples", "per_class", "per_class_agreement", "top5_lost", "top5_gained"):
        row.pop(k)
    folder = _folder(tmp_path, [row], 450, 446)
    rc, out, err = _cli(folder, capsys, "--max-drop", "1.0")
    assert rc == 0 and "judged by the point estimate alone" in out and not err.strip()
