"""Bench reports: bench.json round trip, bench.md for CI summaries, bench.html with its plots,
`--compare` against an earlier run, and `edgepipe report` re-rendering. Figures come from a real
(short) bench run of the tiny export that test_bench.py builds."""
from __future__ import annotations

import copy
import json
import re
import sys

import pytest

from edgepipe.devices import BenchReport, BenchSettings, compare, render_html, render_markdown, run_bench, write_reports
from edgepipe.pipeline.cli.main import main as cli_main



@pytest.fixture(scope="module")
def report(tiny_export) -> BenchReport:
    return run_bench(tiny_export, settings=BenchSettings(targets=["cpu", "edgetpu"], runs=8, min_seconds=0.0, warmup=1,
                                                threads=1, profile=True))


def _ok(rep):
    return [r for r in rep.rows if r.ok]


def test_reports_written_and_parsed_back(report, tmp_path):
    paths = write_reports(report, tmp_path)
    assert set(paths) == {"json", "md", "html"} and all(p.exists() for p in paths.values())
    back = BenchReport.load(paths["json"])
    assert back.to_dict() == json.loads(json.dumps(report.to_dict()))
    d = json.loads(paths["json"].read_text())
    assert d["schema_version"] == 1 and d["kind"] == "edgepipe-bench"
    assert d["host"]["cpu"]["model"] and d["settings"]["runs"] == 8
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_host_line_lists_every_isa_flag(report):
    # bench.md used to cut the list at eight, dropping avx512_vnni, which `edgepipe devices` shows
    from edgepipe.devices.measure.host import X86_FLAGS, cpu_facts

    rep = copy.deepcopy(report)
    rep.host["cpu"]["isa"] = list(X86_FLAGS)
    host_line = next(ln for ln in render_markdown(rep).splitlines() if ln.startswith("- **Host:**"))
    assert all(f in host_line for f in X86_FLAGS) and "avx512_vnni" in host_line
    here = next(ln for ln in render_markdown(report).splitlines() if ln.startswith("- **Host:**"))
    assert all(f in here for f in cpu_facts()["isa"])


def test_markdown_table(report):
    md = render_markdown(report)
    lines = md.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| Artifact |"))
    table = []
    for ln in lines[header + 2:]:
        if not ln.startswith("|"):
            break
        table.append(ln)
    assert len(table) == len(report.rows)
    cols = lines[header].count("|")
    assert all(ln.count("|") - ln.count("\\|") == cols for ln in table)
    from edgepipe.devices.measure.report import _ms

    for r in _ok(report):
        line = next(ln for ln in table if ln.startswith(f"| {r.artifact} | {r.target} |"))
        assert f"**{_ms(r.latency_ms['p50'])}**" in line and " ok " in line
    assert "### Rows that did not run" in md
    assert "Core ML runtime needs macOS" in md or sys.platform == "darwin"
    assert "onnxruntime profiler" in md  # top ops section from --profile


def test_html_is_self_contained_with_three_plots(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for pid in ("plot-latency", "plot-size", "plot-scatter"):
        assert f'<svg id="{pid}"' in page
    svgs = {m.group(1): m.group(0) for m in re.finditer(r'<svg id="([\w-]+)".*?</svg>', page, re.S)}
    ok = _ok(report)
    assert len(re.findall(r'<rect class="bar"', svgs["plot-latency"])) == len(ok)
    assert len(re.findall(r'<line class="range"', svgs["plot-latency"])) == len(ok)  # p50-p90 whiskers
    sized = {r.artifact for r in report.rows if r.size_bytes}
    assert len(re.findall(r'<rect class="bar"', svgs["plot-size"])) == len(sized)
    assert len(re.findall(r'<circle class="point"', svgs["plot-scatter"])) == len(ok)
    # no network, no script
    assert "<script" not in page and "src=" not in page and "<link" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for r in report.rows:
        assert r.artifact in page


def test_compare_flags_regressions(report):
    old = copy.deepcopy(report)
    for r in _ok(old):  # tight intervals, so a doubling is clearly outside them
        r.latency_ms["ci95_p50"] = [r.latency_ms["p50"] * 0.99, r.latency_ms["p50"] * 1.01]
    new = copy.deepcopy(old)
    slow = _ok(new)[0]
    for k in ("p50", "p90", "p99", "mean", "min", "max"):
        slow.latency_ms[k] *= 2.0
    slow.latency_ms["ci95_p50"] = [x * 2.0 for x in slow.latency_ms["ci95_p50"]]
    cmp = compare(old, new, threshold=0.10)
    regs = cmp.regressions
    assert [(c.artifact, c.target) for c in regs] == [(slow.artifact, slow.target)]
    assert regs[0].ratio == pytest.approx(2.0)
    assert regs[0].significant is True
    same = [c for c in cmp.changes if c.verdict == "unchanged"]
    assert len(same) == len(_ok(report)) - 1 and all(c.ratio == pytest.approx(1.0) for c in same)
    assert cmp.same_host
    # a 1.5x median whose interval overlaps the old one is flagged, and called noise
    noisy = copy.deepcopy(old)
    nr = _ok(noisy)[0]
    p = nr.latency_ms["p50"]
    nr.latency_ms["p50"], nr.latency_ms["ci95_p50"] = 1.5 * p, [0.9 * p, 3 * p]
    c = [c for c in compare(old, noisy).changes if (c.artifact, c.target) == (nr.artifact, nr.target)][0]
    assert c.verdict == "regression" and c.significant is False and "noise" in c.note
    back = compare(new, old)
    assert [c.verdict for c in back.changes if c.artifact == slow.artifact and c.target == slow.target] == ["improvement"]
    md = render_markdown(new, cmp)
    assert "### Comparison" in md and "**regression**" in md


def test_cli_bench_compare_exit_0(tiny_export, tmp_path, report, capsys):
    old = copy.deepcopy(report)
    for r in old.rows:
        if r.ok:  # pretend the old run was 3x faster: every row is a regression now
            for k in ("p50", "p90", "p99", "mean", "min", "max"):
                r.latency_ms[k] /= 3.0
            r.latency_ms["ci95_p50"] = [x / 3.0 for x in r.latency_ms["ci95_p50"]]
    old_path = old.save(tmp_path / "old.json")
    out = tmp_path / "new"
    rc = cli_main(["bench", str(tiny_export), "--artifacts", "tflite-fp32,onnx-fp32", "--runs", "5", "--min-seconds",
                   "0", "--warmup", "0", "--threads", "1", "--out", str(out), "--compare", str(old_path), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["comparison"]["regressions"] == 2
    assert "### Comparison" in (out / "bench.md").read_text()
    assert "Comparison with the previous run" in (out / "bench.html").read_text()


def test_cli_report_rerenders(report, tmp_path, capsys):
    src = report.save(tmp_path / "bench.json")
    assert cli_main(["report", str(src)]) == 0
    assert capsys.readouterr().out.startswith("## edgepipe bench: tiny")
    out = tmp_path / "again.html"
    assert cli_main(["report", str(src), "--format", "html", "--out", str(out)]) == 0
    assert '<svg id="plot-scatter"' in out.read_text()


def test_cli_report_bad_input_exit_2(report, tmp_path, capsys):
    src = report.save(tmp_path / "bench.json")
    assert cli_main(["report", str(src), "--format", "pdf"]) == 2
    assert "unknown report format" in capsys.readouterr().err
    bad = tmp_path / "corrupt.json"
    bad.write_text("{not json")
    assert cli_main(["report", str(bad)]) == 2
    assert "cannot read bench report" in capsys.readouterr().err
    newer = tmp_path / "newer.json"
    d = json.loads(src.read_text())
    d["schema_version"] = 7
    newer.write_text(json.dumps(d))
    assert cli_main(["report", str(newer)]) == 2
    assert "newer" in capsys.readouterr().err
    other = tmp_path / "manifest.json"
    other.write_text(json.dumps({"schema_version": 1, "model": {}}))
    assert cli_main(["report", str(other)]) == 2
    assert "not an edgepipe bench report" in capsys.readouterr().err
    assert cli_main(["bench", str(tmp_path), "--compare", str(bad)]) == 2
    assert "cannot read bench report" in capsys.readouterr().err
