"""`edgepipe inspect` and pipeline.inspect on real .tflite (TFLiteConverter) and .onnx (onnx.helper) files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe.pipeline.cli.main import main
from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.inspect_stage import inspect_artifact


def _tflite(model, path: Path, io: str = "int8") -> Path:
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    shape = [1] + [int(d) for d in model.input_shape[1:]]
    rng = np.random.default_rng(0)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ([rng.random(shape, dtype=np.float32)] for _ in range(3))
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if io != "float32":
        c.inference_input_type = c.inference_output_type = getattr(tf, io)
    path.write_bytes(c.convert())
    return path


@pytest.fixture(scope="module")
def tfl(tmp_path_factory):
    import keras

    d = tmp_path_factory.mktemp("inspect_tflite")
    L = keras.layers
    i = keras.Input((12, 12, 3), batch_size=1)
    y = L.Dense(4, activation="softmax")(L.GlobalAveragePooling2D()(L.LeakyReLU(0.2)(L.Conv2D(8, 3)(i))))
    leaky = keras.Model(i, y)
    j = keras.Input((12, 12, 3), batch_size=1)
    plain = keras.Model(j, L.Dense(4)(L.GlobalAveragePooling2D()(L.Conv2D(8, 3, activation="relu")(j))))
    return {"leaky": _tflite(leaky, d / "leaky.tflite"),
            "int8": _tflite(plain, d / "int8.tflite"),
            "float_io": _tflite(plain, d / "float_io.tflite", io="float32")}


def _onnx_models(d: Path) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
                           helper.make_node("GlobalAveragePool", ["r"], ["y"])], "float", [x], [y], [w])
    fp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgepipe-test")
    onnx.checker.check_model(fp)

    def s(name, v, dt=np.float32):
        return numpy_helper.from_array(np.array(v, dtype=dt), name)

    inits = [s("xs", 0.02), s("xz", 0, np.uint8), s("ws", [0.01] * 4), s("wz", [0] * 4, np.int8),
             numpy_helper.from_array(rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "wq"),
             s("ys", 0.05), s("yz", 0, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"])]
    yq = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    xq = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    q = helper.make_model(helper.make_graph(nodes, "int8", [xq], [yq], inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(q)
    out = {"float": d / "float.onnx", "int8": d / "int8.onnx"}
    onnx.save(fp, out["float"])
    onnx.save(q, out["int8"])
    return out


@pytest.fixture(scope="module")
def onx(tmp_path_factory):
    return _onnx_models(tmp_path_factory.mktemp("inspect_onnx"))


def test_inspect_tflite_op_table_and_io(tfl):
    info = inspect_artifact(tfl["leaky"])
    assert info["format"] == "tflite" and info["quantization"] == "full-integer" and info["quantized"]
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["shape"] == [1, 12, 12, 3]
    assert info["outputs"][0]["shape"] == [1, 4]
    assert info["inputs"][0]["quantization"]["scale"][0] > 0
    rows = {(r["type"], r["placement"], r["reason"]): r["count"] for r in info["op_table"]}
    assert rows[("CONV_2D", "edgetpu", "supported")] == 1
    assert rows[("LEAKY_RELU", "cpu", "op not supported")] == 1
    assert rows[("MEAN", "cpu", "after first CPU op (single partition)")] == 1
    assert sum(rows.values()) == info["operators"]
    assert info["edgetpu"]["kind"] == "prediction" and info["edgetpu"]["counts"]["cpu"] == info["operators"] - 1
    assert info["tensor_dtypes"]["int8"] >= 4 and info["tensor_dtypes"]["int32"] >= 1
    json.dumps(info)  # JSON-ready


def test_inspect_tflite_float_io_is_labelled(tfl):
    info = inspect_artifact(tfl["float_io"])
    assert info["quantization"] == "integer, float I/O"
    assert info["inputs"][0]["dtype"] == "float32" and info["inputs"][0]["quantization"] is None
    assert inspect_artifact(tfl["int8"])["edgetpu"]["fully_mapped"] is True


def test_inspect_onnx(onx):
    f = inspect_artifact(onx["float"])
    assert f["format"] == "onnx" and not f["quantized"] and f["opsets"] == {"ai.onnx": 17}
    assert f["op_table"] == [{"type": "Conv", "count": 1}, {"type": "GlobalAveragePool", "count": 1},
                             {"type": "Relu", "count": 1}]
    assert f["inputs"] == [{"name": "x", "dtype": "float", "shape": ["N", 3, 8, 8]}]  # initializers excluded
    assert f["initializer_dtypes"] == {"float": 1}
    q = inspect_artifact(onx["int8"])
    assert q["quantized"] and q["opsets"] == {"ai.onnx": 13}
    assert q["quantization_ops"] == {"DequantizeLinear": 1, "QLinearConv": 1, "QuantizeLinear": 1}
    assert q["initializer_dtypes"]["int8"] == 2 and q["operators"] == 3


def test_inspect_bad_inputs(tmp_path, tfl):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 64)
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not a protobuf \x00\x01" * 10)
    (tmp_path / "cut.tflite").write_bytes(tfl["int8"].read_bytes()[:300])
    for p, words in [(tmp_path / "missing.onnx", "does not exist"), (tmp_path / "notes.txt", "not a .tflite or .onnx"),
                     (tmp_path / "junk.tflite", "not a TFLite flatbuffer"), (tmp_path, "is a directory"),
                     (tmp_path / "junk.onnx", "not a readable ONNX model"), (tmp_path / "cut.tflite", "corrupt")]:
        with pytest.raises(UserError, match=words):
            inspect_artifact(p)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def test_cli_inspect_table(tfl, capsys):
    assert main(["inspect", str(tfl["leaky"])]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "LEAKY_RELU" in out and "op not supported" in out
    assert "1 of " in out and "on the Edge TPU" in out and "full-integer" in out


def test_cli_inspect_per_op_and_json(tfl, onx, capsys):
    assert main(["inspect", str(tfl["leaky"]), "--ops"]) == 0
    out = capsys.readouterr().out
    assert "after first CPU op (single partition)" in out and "LEAKY_RELU is not in" in out
    assert main(["inspect", str(onx["int8"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["format"] == "onnx" and d["quantized"] is True
    assert main(["inspect", str(onx["float"])]) == 0
    out = capsys.readouterr().out
    assert "GlobalAveragePool" in out and "quantized: no" in out


def test_cli_inspect_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "model.tflite").write_bytes(b"garbage!" * 8)
    for p in (tmp_path / "missing.tflite", tmp_path / "model.tflite"):
        assert main(["inspect", str(p)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgepipe: error:") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_inspect_does_not_import_tensorflow(tfl):
    code = ("import sys; from edgepipe.pipeline.cli import main; rc = main(['inspect', sys.argv[1], '--json']); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tfl["leaky"])], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["edgetpu"]["counts"]["edgetpu"] == 1
