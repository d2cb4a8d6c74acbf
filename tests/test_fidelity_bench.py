"""No speed figure without correct outputs, in the bench reports: a wrong-output row is listed first in
Markdown, HTML and on the terminal with its figures, never as a latency headline, is not comparable
with an earlier run, and makes `edgepipe bench` exit 1; the output check's bounds by reference."""
from __future__ import annotations

import numpy as np

from edgepipe.devices.measure.report import compare, render_html, render_markdown, wrong_output_lines
from edgepipe.pipeline.api import enforce_bench
from edgepipe.pipeline.base.bench import STATUSES, WRONG_OUTPUT, BenchReport, BenchRow
from edgepipe.pipeline.base.errors import StageFailure
from edgepipe.pipeline.base.outputs import check_outputs, thresholds_for

import pytest


def _row(artifact: str, target: str, status: str = "ok", p50: float = 1.0) -> BenchRow:
    r = BenchRow(artifact=artifact, format="tflite", precision=artifact.split("-")[1], target=target,
                 runtime="litert", status=status, size_bytes=40_000,
                 latency_ms={"n": 50, "p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2, "ci95_p50": [p50, p50]})
    if status == WRONG_OUTPUT:
        r.agreement = {"against": "cpu", "max_abs": 0.95, "top1_agreement": 0.72,
                       "check": {"status": WRONG_OUTPUT, "against": "cpu", "samples": 32, "top1_agreement": 0.72,
                                 "centered": 0.65, "max_abs": 0.95}}
        r.reason = "outputs disagree with cpu on 32 inputs (top-1 agreement with cpu 72% < 90%)"
    return r


def _report() -> BenchReport:
    return BenchReport(rows=[_row("tflite-fp32", "cpu", p50=0.02), _row("tflite-int8", "cpu", p50=0.03),
                             _row("tflite-int8", "gpu", WRONG_OUTPUT, p50=0.001)], model={"name": "m"})


def test_wrong_output_rows_come_first_with_their_figures_and_no_headline():
    rep = _report()
    assert WRONG_OUTPUT in STATUSES and rep.counts()[WRONG_OUTPUT] == 1
    (line,) = wrong_output_lines(rep)
    assert "tflite-int8 on gpu" in line and "top-1 agreement with cpu 72%" in line and "no speed figure" in line
    md = render_markdown(rep)
    assert md.index("Wrong outputs") < md.index("| Artifact |")
    table = md[md.index("| Artifact |"):]
    first = table.splitlines()[2]
    assert first.startswith("| tflite-int8 | gpu | litert | WRONG OUTPUT | - |")  # first row, no latency
    assert "**0.001**" not in md and "1 wrong output" in md
    page = render_html(rep)
    assert page.index('class="wrong"') < page.index("<h2>Latency</h2>")
    plot = page[page.index('id="plot-latency"'):page.index("</svg>", page.index('id="plot-latency"'))]
    assert "tflite-int8 · gpu" not in plot  # never drawn as a latency bar


def test_a_wrong_output_row_is_not_comparable_and_fails_the_bench(tmp_path):
    old = BenchReport(rows=[_row("tflite-int8", "gpu", p50=0.002)], model={"name": "m"})
    cmp = compare(old, _report())
    (c,) = [c for c in cmp.changes if c.target == "gpu"]
    assert c.verdict == "not comparable" and "wrong-output" in c.note
    with pytest.raises(StageFailure, match="computed wrong outputs"):
        enforce_bench(_report(), tmp_path)
    enforce_bench(BenchReport(rows=[_row("tflite-int8", "cpu")]), tmp_path)  # all ok: no error


def test_output_check_bounds_by_reference_and_training():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (32, 10))
    assert thresholds_for("int8") == {"top1": 0.9, "centered": 0.9}
    assert thresholds_for("int8", "source model") == {"top1": 0.5, "centered": 0.8}
    assert thresholds_for("int8", trained=False) == {"centered": 0.5}  # an untrained model: structural bound only
    wobbly = ref + rng.normal(0, 2.0, ref.shape)  # chaotic, but still tracks the reference
    assert not check_outputs(ref, wobbly, "int8").ok
    assert check_outputs(ref, wobbly, "int8", trained=False).ok
    assert not check_outputs(ref, -ref, "int8", trained=False).ok  # a broken computation fails even then
