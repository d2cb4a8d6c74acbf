"""The per-layer report of int8 artifacts (edgepipe.pipeline.fidelity.report / layers / render)
on real trained models, converters and runtimes. The artifacts are exported without cross-layer
equalization (which would fix the deliberately broken layer) and compared with the source as loaded."""
from __future__ import annotations

import json

import pytest

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.fidelity import sources
from edgepipe.pipeline.fidelity.layers import LayerReport, write_report
from edgepipe.pipeline.fidelity.render import markdown, render_html, text_table
from edgepipe.pipeline.fidelity.report import layer_report
from fidelity_fixtures import broken50, exported, fid_models, source  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def broken_reports(broken50, tmp_path_factory):
    """Reports of the TFLite and ONNX int8 artifacts of the model with one channel scaled 50x."""
    src = source(broken50, "tf")
    arts = exported(broken50, "tf", tmp_path_factory.getbasetemp() / "fid-export-x50", equalize=False)
    calib = src.calibration()
    return {fmt: layer_report(arts[fmt], fmt, calib, traced=src.traced, calibration=calib) for fmt in ("tflite", "onnx")}


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_the_deliberately_broken_layer_is_named_worst(broken_reports, fmt):
    rep = broken_reports[fmt]
    worst = rep.worst[0]
    # entry_sep1's pointwise conv, with entry_sep1_bn folded in and entry_sep1_relu fused after it
    assert worst.layer.startswith("entry_sep1") and worst.op in ("CONV_2D", "Conv"), [r.layer for r in rep.worst[:3]]
    assert "channel 17" in worst.reason and "cross-layer equalization" in worst.reason
    # its channels are crushed where it is produced (per-channel SQNR), not downstream
    assert worst.delta_db > 15 and worst.accumulated.channel_sqnr_db < 20
    assert worst.facts["channel_span_ratio"] > 20
    # the consumer that re-quantizes the same tensor as its input is not blamed for it
    consumer = next(r for r in rep.rows if r.layer == "entry_sep2" and r.op in ("DEPTHWISE_CONV_2D", "Conv"))
    assert consumer.isolated_output is not None and consumer.own_db > worst.own_db + 3
    assert rep.isolated["layers"] >= 10 and not rep.isolated.get("errors")
    assert rep.output_agreement is not None and rep.images == 32


def test_report_renders_and_round_trips(broken_reports, tmp_path):
    rep = broken_reports["tflite"]
    txt = text_table(rep)
    assert "worst layers:" in txt and "entry_sep1" in txt and "own dB" in txt
    md = markdown(rep)
    assert md.count("\n|") >= 3 and "| 1 | entry_sep1" in md
    page = render_html(rep)
    assert "<svg" in page and "</svg>" in page and "entry_sep1" in page and "<script" not in page
    write_report(rep, tmp_path / "layers")
    d = json.loads((tmp_path / "layers" / "layers.json").read_text())
    assert d["schema"] == 1 and d["worst"][0] == rep.worst[0].tensor
    again = LayerReport.from_dict(d)
    assert [r.layer for r in again.worst[:3]] == [r.layer for r in rep.worst[:3]]
    assert (tmp_path / "layers" / "layers.html").read_text().startswith("<!doctype html>")


def test_without_the_source_model_only_accumulated_figures(broken50, tmp_path):
    src = source(broken50, "tf")
    art = exported(broken50, "tf", tmp_path.parent / "fid-export-x50", equalize=False)["tflite"]
    ref = sources.float_reference(src.traced, "tflite", tmp_path)
    rep = layer_report(art, "tflite", src.calibration(), reference=ref)
    assert "needs the source model" in rep.isolated["skipped"]
    assert all(r.isolated is None for r in rep.rows)
    # ranked by the accumulated loss alone, the broken layer still comes first
    assert rep.worst[0].layer.startswith("entry_sep1")


def test_coreml_weight_only_report(fid_models, tmp_path_factory):
    src = source(fid_models["digits_cnn"], "unit")
    art = exported(fid_models["digits_cnn"], "unit", tmp_path_factory.getbasetemp() / "fid-export-cnn-coreml",
                   formats=("coreml",), equalize=False)["coreml"]
    rep = layer_report(art, "coreml", src.calibration(), traced=src.traced)
    assert rep.format == "coreml" and rep.rows
    # Core ML int8 quantizes weights only (of layers with >= 2048 weights): rows are those layers
    assert all(r.facts.get("weight_only") and r.op == "conv" for r in rep.rows)
    assert {r.layer for r in rep.rows} <= {"pw2_bn", "pw3_bn", "pw2", "pw3"}
    assert all(r.isolated is not None and r.own_db is not None for r in rep.rows)
    assert "8-bit weight rounding" in rep.worst[0].reason
    assert rep.output_agreement == 100.0 and rep.output.sqnr_db > 30


def test_bad_input(tmp_path, broken50):
    src = source(broken50, "tf")
    with pytest.raises(UserError, match="not found"):
        layer_report(tmp_path / "missing.tflite", "tflite", src.calibration())
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(UserError, match="no per-layer report for pytorch"):
        layer_report(tmp_path / "x.bin", "pytorch", src.calibration())
    with pytest.raises(UserError, match="float reference"):
        layer_report(tmp_path / "x.bin", "tflite", src.calibration())
