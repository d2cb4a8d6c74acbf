"""The format seam: every FORMAT_MODULES entry registers one format that declares everything about
itself, options validate themselves, and a format defined outside edgepipe (here, in this module)
is converted, verified, evaluated and benched through the public API with no other file edited."""
from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

import digits_model
from edgepipe.devices.runtimes.base import Runtime, all_runtimes
from edgepipe.devices.runtimes.litert import LiteRTCPU
from edgepipe.export import FORMAT_MODULES, PRECISIONS, ExportResult, Format, FormatOptions, formats, option
from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.export_plan import format_options

REPO = Path(__file__).resolve().parent.parent


def test_every_format_module_registers_one_complete_format():
    assert len(FORMAT_MODULES) == len(set(FORMAT_MODULES))
    by_module: dict[str, list[str]] = {}
    for m in FORMAT_MODULES:
        importlib.import_module(m)
    for name, cls in Format.registry.items():
        by_module.setdefault(cls.__module__, []).append(name)
    assert all(len(by_module.get(m, [])) == 1 for m in FORMAT_MODULES), by_module
    fm = formats()
    all_runtimes()  # registers every runtime module's runtimes
    assert list(fm)[:len(FORMAT_MODULES)] == ["tflite", "onnx", "coreml", "edgetpu"]
    for name, cls in fm.items():
        assert cls.suffix and cls.precisions and set(cls.precisions) <= set(PRECISIONS), name
        assert cls.default_precision in cls.precisions and issubclass(cls.Options, FormatOptions)
        assert cls.packages and all(isinstance(p, str) for p in cls.packages)
        rt_name, target = cls().verifier_for_host()
        assert (rt_name, target) in Runtime.registry or rt_name == "coreml", (name, rt_name, target)
    with pytest.raises(RuntimeError, match="registered twice"):
        type("Again", (Format,), {"name": "onnx", "suffix": ".x", "precisions": ("fp32",)})


def test_options_validate_themselves_and_name_the_flag():
    from edgepipe.export.edgetpu import EdgeTPUOptions
    from edgepipe.export.onnx import ONNXOptions
    from edgepipe.export.tflite import TFLiteOptions

    with pytest.raises(UserError, match="unknown --int8-io 'int4'"):
        TFLiteOptions.from_values({"int8_io": "int4"})
    with pytest.raises(UserError, match="unsupported ONNX opset 9"):
        ONNXOptions.from_values({"onnx_opset": 9})
    with pytest.raises(UserError, match="--calib-method") as e:
        ONNXOptions.from_values({"calib_method": "median"})
    assert "None" not in e.value.hint
    with pytest.raises(UserError, match="--edgetpu-timeout"):
        EdgeTPUOptions.from_values({"edgetpu_timeout": 0})
    opts = format_options({"int8_io": "uint8", "onnx_int8": "u8u8", "palette_bits": 4})
    assert opts["tflite"] == TFLiteOptions(int8_io="uint8") and opts["edgetpu"].int8_io == "uint8"
    assert opts["onnx"].int8 == "u8u8" and opts["coreml"].palette_bits == 4
    assert ONNXOptions.from_values(opts["onnx"].to_dict()) == opts["onnx"]
    with pytest.raises(UserError, match="unknown export option 'int4_io'"):
        format_options({"int4_io": "x"})


def test_nothing_outside_the_format_modules_branches_on_a_format_name():
    names = "|".join(formats())
    compare = re.compile(rf"""(==|!=|\bin\b|\bnot in\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    files = ["pipeline/export_stage.py", "pipeline/export_plan.py", "pipeline/export_run.py", "pipeline/export_log.py",
             "pipeline/recover.py", "pipeline/verify.py", "pipeline/cli/export.py", "pipeline/cache.py"]
    hits = [f"{f}:{i}: {line.strip()}" for f in files
            for i, line in enumerate((REPO / f).read_text().splitlines(), 1) if compare.search(line)]
    assert not hits, "\n".join(hits)


# ----------------------------------------------------------------------------------- a toy format
@dataclasses.dataclass(frozen=True)
class ToyOptions(FormatOptions):
    toy_note: str = option("plain", flag="--toy-note", choices=("plain", "fancy"))


@pytest.fixture
def toy_format():
    """A format and its runtime defined here: the TFLite fp32 flatbuffer under its own name and suffix,
    run by a LiteRT runtime registered for it. Unregistered afterwards."""

    class ToyFormat(Format):
        name = "toy"
        suffix = "_toy.tflite"
        precisions = ("fp32",)
        default = False
        Options = ToyOptions
        packages = ("tensorflow", "numpy")
        verifier = ("toy-litert", "cpu")

        def export(self, traced, precision, calibration, dest, options):
            tf = lazy.tensorflow()
            conv = tf.lite.TFLiteConverter.from_saved_model(str(traced.saved_model_dir()))
            dest.write_bytes(conv.convert())
            return ExportResult(dest, options={"converter": "toy", "note": options.toy_note})

    class ToyRuntime(LiteRTCPU):
        name = "toy-litert"
        formats = ("toy",)

    yield ToyFormat
    Format.registry.pop("toy", None)
    Runtime.registry.pop(("toy-litert", "cpu"), None)


def test_a_format_defined_outside_edgepipe_goes_through_the_whole_pipeline(toy_format, tmp_path):
    from edgepipe.pipeline import api

    model = tmp_path / "digits.keras"
    model.write_bytes(digits_model.digits_model_path().read_bytes())
    outcome = api.export(str(model), formats="toy,tflite", preprocess="unit", out=tmp_path / "out",
                     options={"toy_note": "fancy"}, cache=False, capture_output=False)
    outcome.raise_for_status()
    a = outcome.manifest.artifact("toy-fp32")
    assert a.path == "digits_fp32_toy.tflite" and (outcome.folder / a.path).is_file()
    assert a.options["note"] == "fancy" and set(a.converter) == {"tensorflow", "numpy"}
    assert a.inputs[0].shape == [1, 32, 32, 1] and a.outputs[0].shape[-1] == 10  # described by its runtime
    v = a.verification
    assert v.status == "passed" and v.checker == "toy-litert" and v.max_abs < 1e-4
    ev = api.evaluate(outcome.folder, "digits", targets="cpu")
    (row,) = [r for r in ev.results if r.artifact == "toy-fp32"]
    assert row.status == "ok" and row.runtime == "toy-litert" and abs(row.drop["top1"]) < 0.5
    report = api.bench(outcome.folder, "cpu", runs=3, min_seconds=0.0, warmup=1, artifacts=["toy-fp32"])
    (brow,) = report.rows
    assert brow.artifact == "toy-fp32" and brow.status == "ok", brow.reason
