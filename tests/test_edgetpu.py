"""Edge TPU target: TFLite reader, placement prediction, compiler wiring, export format, runtime.

Models are tiny Keras graphs converted here with TFLiteConverter (full-integer int8, int8 I/O,
TFLITE_BUILTINS_INT8) unless a test needs otherwise. The compiler is never installed in CI:
its absence is the normal path; a test double on PATH checks only the subprocess wiring
(argument list, timeout, kept log, parsing) and never produces placement figures.
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgepipe.devices.graph import edgetpu as et
from edgepipe.devices.runtimes import edgetpu as etr
from edgepipe.export import edgetpu_compiler as etc
from edgepipe.devices.graph.tflite_graph import EDGETPU_CUSTOM_OP, TFLiteReadError, read_tflite
from edgepipe.pipeline.base.errors import ConversionError, GateFailure, UserError

FIXTURES = Path(__file__).parent / "fixtures" / "edgetpu"

# The Coral supported-operations table, written out independently of devices/edgetpu.py
# (TFLite builtin names), to check predictions against.
PUBLISHED_OPS = {
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM", "LSTM", "MAXIMUM",
    "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN",
    "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT",
    "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE", "STRIDED_SLICE", "SQUARED_DIFFERENCE", "SUB",
    "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
}


# ------------------------------------------------------------------------------------------
# model building (TensorFlow only in tests)
# ------------------------------------------------------------------------------------------
def convert(model, path: Path, mode: str = "int8", io: str = "int8", samples: int = 4) -> Path:
    """mode: int8 (TFLITE_BUILTINS_INT8, int8/uint8 I/O) | mixed (int8 where kernels exist) | float."""
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float":
        shape = [1] + [int(d) for d in model.input_shape[1:]]
        rng = np.random.default_rng(0)

        def rep():
            for _ in range(samples):
                yield [rng.random(shape, dtype=np.float32)]

        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = rep
        if mode == "int8":
            c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if io != "float32":
                c.inference_input_type = getattr(tf, io)
                c.inference_output_type = getattr(tf, io)
    path.write_bytes(c.convert())
    return path


def _models():
    import keras

    L = keras.layers

    def m(shape, f, batch=1):
        i = keras.Input(shape, batch_size=batch)
        return keras.Model(i, f(i))

    class Sin(L.Layer):  # no int8 kernel: stays float between DEQUANTIZE/QUANTIZE
        def call(self, x):
            return keras.ops.sin(x)

    def shuffle(shape5, perm):  # channel-shuffle style 5-D reshape + transpose
        return lambda i: L.Conv2D(8, 1)(L.Reshape((4, 4, 8))(keras.ops.transpose(
            L.Reshape(shape5)(L.Conv2D(8, 1)(i)), perm)))

    return {
        "int8": (m((16, 16, 3), lambda i: L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(
            L.MaxPooling2D()(L.DepthwiseConv2D(3, padding="same")(L.Conv2D(8, 3, activation="relu")(i)))))), {}),
        "uint8": (m((8, 8, 3), lambda i: L.Conv2D(4, 3, activation="relu6")(i)), {"io": "uint8"}),
        "float_io": (m((16, 16, 3), lambda i: L.Dense(10, activation="softmax")(L.GlobalAveragePooling2D()(
            L.Conv2D(8, 3, activation="relu")(i)))), {"io": "float32"}),
        "float": (m((8, 8, 3), lambda i: L.Dense(3)(L.Flatten()(L.Conv2D(4, 3)(i)))), {"mode": "float"}),
        "sin": (m((8, 8, 3), lambda i: L.Conv2D(4, 1)(Sin()(L.Conv2D(4, 3)(i)))), {"mode": "mixed"}),
        "leaky": (m((8, 8, 3), lambda i: L.Conv2D(4, 1)(L.LeakyReLU(0.1)(L.Conv2D(4, 3)(i)))), {}),
        "hswish": (m((8, 8, 4), lambda i: L.Conv2D(4, 1)(L.Activation("hard_swish")(L.Conv2D(4, 1)(i)))), {}),
        "dynamic": (m((8, 8, 3), lambda i: L.Conv2D(4, 3)(i), batch=None), {}),
        "shuffle5d": (m((4, 4, 8), shuffle((2, 2, 4, 8), (0, 2, 1, 3, 4))), {}),
        "rank5": (m((4, 4, 8), shuffle((1, 4, 4, 8), (0, 1, 3, 2, 4))), {}),
        "dilation": (m((16, 16, 3), lambda i: L.Conv2D(4, 3, dilation_rate=(2, 1))(i)), {}),
        "dilation_same": (m((16, 16, 3), lambda i: L.Conv2D(4, 3, dilation_rate=2)(i)), {}),
        "mean_z": (m((8, 8, 6), lambda i: L.Conv2D(4, 1)(keras.ops.mean(L.Conv2D(6, 1)(i), axis=-1,
                                                                          keepdims=True))), {}),
        "softmax_big": (m((8,), lambda i: L.Softmax()(L.Dense(20000)(i))), {}),
        "softmax_4d": (m((4, 4, 8), lambda i: L.Softmax()(L.Conv2D(8, 1)(i))), {}),
        "strided": (m((8, 8, 4), lambda i: L.Conv2D(4, 1)(L.Conv2D(4, 1)(i)[:, ::2, ::2, :])), {}),
        "fc_2d": (m((4, 8), lambda i: L.Dense(6)(i)), {}),
        "prelu": (m((8, 8, 4), lambda i: L.PReLU()(L.Conv2D(4, 1)(i))), {}),
        "prelu_shared": (m((8, 8, 4), lambda i: L.PReLU(shared_axes=[1, 2])(L.Conv2D(4, 1)(i))), {}),
        "resize": (m((8, 8, 4), lambda i: L.UpSampling2D(interpolation="bilinear")(L.Conv2D(4, 1)(i))), {}),
        "concat": (m((8, 8, 4), lambda i: L.Concatenate()([L.Conv2D(4, 1)(i), L.Conv2D(4, 3, padding="same")(i)])), {}),
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """name -> converted .tflite path, converted on first use and cached for the session."""
    folder = tmp_path_factory.mktemp("edgetpu_tiny")
    specs = _models()
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            model, kw = specs[name]
            done[name] = convert(model, folder / f"{name}.tflite", **kw)
        return done[name]

    return get


def types_and_placement(report):
    return [(o.type, o.placement) for o in report.ops]


# ------------------------------------------------------------------------------------------
# reader
# ------------------------------------------------------------------------------------------
def test_reader_extracts_ops_tensors_quantization_and_options(tiny):
    g = read_tflite(tiny("int8"))
    ops = g.main.operators
    assert [o.opcode for o in ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "MEAN",
                                      "FULLY_CONNECTED", "SOFTMAX"]
    assert all(o.version >= 1 for o in ops)
    conv = ops[0]
    x, w, b = g.op_inputs(conv)
    y = g.op_outputs(conv)[0]
    assert (x.dtype, x.shape, x.shape_signature, x.is_constant) == ("int8", [1, 16, 16, 3], [1, 16, 16, 3], False)
    assert x.quantization["scale"][0] > 0 and len(x.quantization["zero_point"]) == 1
    # per-channel weights: one scale per output channel along dimension 0
    assert w.is_constant and w.dtype == "int8" and w.shape == [8, 3, 3, 3] and w.nbytes == 8 * 3 * 3 * 3
    assert len(w.quantization["scale"]) == 8 and w.quantization["quantized_dimension"] == 0
    assert b.dtype == "int32" and b.is_constant
    assert y.shape == [1, 14, 14, 8] and not y.is_constant
    assert conv.options["padding"] == "VALID" and conv.options["fused_activation_function"] == "RELU"
    assert (conv.options["stride_w"], conv.options["stride_h"]) == (1, 1)
    assert (conv.options["dilation_w_factor"], conv.options["dilation_h_factor"]) == (1, 1)
    assert ops[1].options["padding"] == "SAME" and ops[1].options["depth_multiplier"] == 1
    assert ops[2].options["filter_width"] == 2 and ops[2].options["stride_w"] == 2
    assert ops[4].options["weights_format"] == "DEFAULT"
    # constant data is readable: the MEAN axes of a global average pooling
    axes = g.constant_value(g.op_inputs(ops[3])[1])
    assert sorted(np.asarray(axes).tolist()) == [1, 2]
    assert g.tensor(g.main.inputs[0]).dtype == "int8" and not g.is_edgetpu_compiled


def test_reader_dynamic_dimension_in_shape_signature(tiny):
    g = read_tflite(tiny("dynamic"))
    t = g.tensor(g.main.inputs[0])
    assert t.shape_signature[0] == -1 and t.shape[0] == 1 and t.is_dynamic


def test_reader_rejects_missing_empty_garbage_and_truncated(tiny, tmp_path):
    with pytest.raises(TFLiteReadError, match="does not exist"):
        read_tflite(tmp_path / "nope.tflite")
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(TFLiteReadError, match="not a TFLite flatbuffer"):
        read_tflite(tmp_path / "empty.tflite")
    (tmp_path / "junk.tflite").write_bytes(os.urandom(256))
    with pytest.raises(UserError):
        read_tflite(tmp_path / "junk.tflite")
    data = tiny("int8").read_bytes()
    (tmp_path / "cut.tflite").write_bytes(data[:200])
    with pytest.raises(TFLiteReadError, match="corrupt"):
        read_tflite(tmp_path / "cut.tflite")


# ------------------------------------------------------------------------------------------
# placement prediction
# ------------------------------------------------------------------------------------------
def test_full_int8_model_maps_entirely(tiny):
    for name in ("int8", "uint8"):
        r = et.analyze_tflite(tiny(name))
        assert r.kind == "prediction"
        assert r.fully_mapped and r.counts["cpu"] == 0 and r.counts["edgetpu"] == len(r.ops) > 0
        assert r.first_cpu_op is None and r.leading_cpu_ops == 0
        assert all(o.reason == "supported" for o in r.ops)
        assert r.parameter_bytes > 0
    assert et.analyze_tflite(tiny("uint8")).ops[0].inputs[0]["dtype"] == "uint8"


def test_float_io_leaves_quantize_and_dequantize_on_cpu(tiny):
    r = et.analyze_tflite(tiny("float_io"))
    first, last = r.ops[0], r.ops[-1]
    assert (first.type, first.placement, first.reason) == ("QUANTIZE", "cpu", "float32 tensor")
    assert (last.type, last.placement, last.reason) == ("DEQUANTIZE", "cpu", "float32 tensor")
    assert all(o.placement == "edgetpu" for o in r.ops[1:-1])
    assert r.leading_cpu_ops == 1 and r.first_cpu_op["type"] == "DEQUANTIZE"
    assert any("before the Edge TPU segment" in n for n in r.notes)


def test_float_model_runs_on_cpu(tiny):
    r = et.analyze_tflite(tiny("float"))
    assert r.counts["edgetpu"] == 0 and len(r.ops) == 3
    assert {o.reason for o in r.ops} == {"float32 tensor"}


def test_float_op_sends_it_and_everything_after_to_cpu(tiny):
    r = et.analyze_tflite(tiny("sin"))
    seq = types_and_placement(r)
    # the first CONV_2D (after the input QUANTIZE) is the Edge TPU segment
    i_sin = [t for t, _ in seq].index("SIN")
    assert seq[1] == ("CONV_2D", "edgetpu")
    assert all(p == "cpu" for _, p in seq[2:])
    assert r.ops[i_sin].reason == "float32 tensor"
    later_conv = [o for o in r.ops[i_sin:] if o.type == "CONV_2D"]
    assert later_conv and all(o.reason == et.R_AFTER for o in later_conv)
    assert r.first_cpu_op["index"] == 2 and r.first_cpu_op["type"] == "DEQUANTIZE"


@pytest.mark.parametrize("name,op", [("leaky", "LEAKY_RELU"), ("hswish", "HARD_SWISH")])
def test_unsupported_op_sends_it_and_everything_after_to_cpu(tiny, name, op):
    r = et.analyze_tflite(tiny(name))
    assert types_and_placement(r) == [("CONV_2D", "edgetpu"), (op, "cpu"), ("CONV_2D", "cpu")]
    assert r.ops[1].reason == "op not supported" and op in r.ops[1].detail
    assert r.ops[2].reason == "after first CPU op (single partition)"
    assert r.first_cpu_op == {"index": 1, "type": op, "reason": "op not supported", "detail": r.ops[1].detail}
    assert not r.fully_mapped


def test_dynamic_shape_runs_on_cpu(tiny):
    r = et.analyze_tflite(tiny("dynamic"))
    assert [(o.placement, o.reason) for o in r.ops] == [("cpu", "dynamic shape")]


def test_five_d_tensors_run_on_cpu(tiny):
    r = et.analyze_tflite(tiny("shuffle5d"))  # reshape to 1x2x2x4x8: 4 dimensions > 1
    assert types_and_placement(r) == [("CONV_2D", "edgetpu"), ("RESHAPE", "cpu"), ("TRANSPOSE", "cpu"),
                                      ("RESHAPE", "cpu"), ("CONV_2D", "cpu")]
    assert [o.reason for o in r.ops[1:4]] == ["more than 3 dimensions > 1"] * 3
    assert r.ops[4].reason == et.R_AFTER
    r = et.analyze_tflite(tiny("rank5"))  # 1x1x4x4x8: passes the innermost-3 rule, rank 5
    assert [o.reason for o in r.ops[1:4]] == ["tensor rank > 4"] * 3


@pytest.mark.parametrize("name,op,reason", [
    ("dilation", "CONV_2D", "dilation differs in x and y"),
    ("mean_z", "MEAN", "z-reduction depth not multiple of 4"),
    ("softmax_big", "SOFTMAX", "softmax > 16000 elements"),
    ("softmax_4d", "SOFTMAX", "softmax input not 1-D"),
    ("strided", "STRIDED_SLICE", "strides != 1"),
    ("fc_2d", "FULLY_CONNECTED", "output not one-dimensional"),
    ("prelu", "PRELU", "alpha not 1-D"),
])
def test_published_per_op_limits(tiny, name, op, reason):
    r = et.analyze_tflite(tiny(name))
    hit = [o for o in r.ops if o.type == op]
    assert hit and hit[0].placement == "cpu" and hit[0].reason == reason, r.table()
    # nothing after the offending op reaches the Edge TPU
    assert all(o.placement == "cpu" for o in r.ops if o.index >= hit[0].index)


@pytest.mark.parametrize("name", ["dilation_same", "prelu_shared", "resize", "concat"])
def test_ops_within_published_limits_map(tiny, name):
    r = et.analyze_tflite(tiny(name))
    assert r.fully_mapped, r.table()


def test_resize_is_noted_as_size_dependent(tiny):
    r = et.analyze_tflite(tiny("resize"))
    assert [n for n in r.notes if "may not be mapped" in n] == [
        "RESIZE_BILINEAR (op 1): the supported-ops table says it may not be mapped depending on tensor sizes"]


def test_summary_by_type_and_dict(tiny):
    r = et.analyze_tflite(tiny("shuffle5d"))
    rows = r.by_type()
    assert sum(x["count"] for x in rows) == len(r.ops)
    assert {"type": "RESHAPE", "count": 2, "placement": "cpu", "reason": "more than 3 dimensions > 1"} in rows
    assert {"type": "CONV_2D", "count": 1, "placement": "edgetpu", "reason": "supported"} in rows
    d = json.loads(json.dumps(r.to_dict()))
    assert d["kind"] == "prediction" and d["counts"] == {"edgetpu": 1, "cpu": 4, "total": 5}
    assert d["ops"][1] == {"index": 1, "type": "RESHAPE", "placement": "cpu",
                           "reason": "more than 3 dimensions > 1", "detail": r.ops[1].detail}


def test_require_full_edgetpu(tiny):
    et.require_full_edgetpu(et.analyze_tflite(tiny("int8")))  # no error
    r = et.analyze_tflite(tiny("leaky"))
    for form in (r, r.to_dict(), etc.report_from_prediction(r.to_dict(), "no compiler")):
        with pytest.raises(GateFailure) as e:
            et.require_full_edgetpu(form)
        msg = e.value.message
        assert msg.startswith("2 of 3 ops run on the CPU") and "predicted" in msg
        assert "LEAKY_RELU" in msg and "op not supported" in msg and "after first CPU op" in msg
        assert e.value.exit_code == 1


def test_require_full_edgetpu_from_compiler_report():
    log = etc.parse_compiler_log((FIXTURES / "partial_v16.txt").read_text())
    res = etc.CompileResult(ok=True, command=["edgetpu_compiler"], log_path=Path("x.log"), log=log)
    with pytest.raises(GateFailure) as e:
        et.require_full_edgetpu(etc.report_from_compile(res))
    msg = e.value.message
    assert msg.startswith("12 of 42 ops run on the CPU") and "according to edgetpu_compiler" in msg
    assert "LEAKY_RELU" in msg and "Operation not supported" in msg
    full = etc.parse_compiler_log((FIXTURES / "full_v16.txt").read_text())
    et.require_full_edgetpu(etc.report_from_compile(
        etc.CompileResult(ok=True, command=[], log_path=Path("y.log"), log=full)))


def _fake_compiled(src: Path, dest: Path, opcode: str = "CONV_2D") -> Path:
    """Rewrite one opcode of a real model into edgetpu-custom-op, as the compiler's output has."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model(str(src))
    code = getattr(schema.BuiltinOperator, opcode)
    for oc in model.operatorCodes:
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
            oc.builtinCode = oc.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
            oc.customCode = EDGETPU_CUSTOM_OP
    dest.write_bytes(bytes(fu.convert_object_to_bytearray(model)))
    return dest


def test_compiled_graph_is_read_not_predicted(tiny, tmp_path):
    p = _fake_compiled(tiny("leaky"), tmp_path / "leaky_edgetpu.tflite")
    assert read_tflite(p).is_edgetpu_compiled
    r = et.analyze_tflite(p)
    assert r.kind == "compiled"
    assert [(o.type, o.placement, o.reason) for o in r.ops] == [
        (EDGETPU_CUSTOM_OP, "edgetpu", et.R_COMPILED), ("LEAKY_RELU", "cpu", et.R_LEFT_BY_COMPILER),
        (EDGETPU_CUSTOM_OP, "edgetpu", et.R_COMPILED)]


# ------------------------------------------------------------------------------------------
# compiler log parsing (fixture texts written for these tests, in the compiler's format)
# ------------------------------------------------------------------------------------------
def test_parse_partial_log():
    lg = etc.parse_compiler_log((FIXTURES / "partial_v16.txt").read_text())
    assert lg.version == "16.0.384591198" and lg.succeeded and lg.error is None and lg.compile_ms == 412
    assert (lg.ops_edgetpu, lg.ops_cpu, lg.total_ops, lg.subgraphs) == (30, 12, 42, 1)
    assert lg.on_chip_bytes == round(1.21 * 2**20) and lg.off_chip_bytes == 64 * 1024
    assert lg.on_chip_remaining_bytes == round(6.52 * 2**20)
    assert lg.input_model == "detector_int8.tflite" and lg.output_model == "detector_int8_edgetpu.tflite"
    assert lg.operation_log == "detector_int8_edgetpu.log"
    assert sum(r["count"] for r in lg.operations) == 42
    cpu = {(r["op"], r["reason"]): r["count"] for r in lg.cpu_ops}
    assert cpu[("LEAKY_RELU", "Operation not supported")] == 1
    assert cpu[("CONV_2D", "More than one subgraph is not supported")] == 6
    assert cpu[("QUANTIZE", "Operation is otherwise supported, but not mapped due to some unspecified "
                            "limitation")] == 1
    assert cpu[("DEQUANTIZE", "Operation is working on an unsupported data type")] == 1
    assert not lg.fully_mapped


def test_parse_fully_mapped_log_and_operation_log():
    lg = etc.parse_compiler_log((FIXTURES / "full_v16.txt").read_text())
    assert lg.succeeded and lg.operations == [] and lg.total_ops == 66
    assert (lg.ops_edgetpu, lg.ops_cpu) == (66, 0) and lg.fully_mapped
    assert lg.off_chip_bytes == 0 and lg.on_chip_bytes == round(3.88 * 2**20)
    table = etc.parse_operation_table((FIXTURES / "full_v16_oplog.log").read_text())
    assert sum(r["count"] for r in table) == 66 and all(r["placement"] == "edgetpu" for r in table)


def test_parse_old_operation_log_and_failure():
    lg = etc.parse_compiler_log((FIXTURES / "old_v14_oplog.log").read_text())
    assert lg.version == "14.1.317412892" and lg.input_model == "segmenter_int8.tflite"
    assert (lg.ops_edgetpu, lg.ops_cpu) == (16, 6)
    assert {"op": "RESIZE_BILINEAR", "count": 1, "reason": "Operation version not supported"} in lg.cpu_ops
    bad = etc.parse_compiler_log((FIXTURES / "failed_v16.txt").read_text())
    assert not bad.succeeded and bad.error == "Compilation failed due to large activation tensors in model."
    assert etc.parse_compiler_log("").version is None


def test_parse_size_units():
    assert etc.parse_size("0.00B") == 0
    assert etc.parse_size("5.75KiB") == round(5.75 * 1024)
    assert etc.parse_size("2GiB") == 2 * 2**30
    assert etc.parse_size("n/a") is None


# ------------------------------------------------------------------------------------------
# compiler wiring: absent (the CI case) and a test double on PATH
# ------------------------------------------------------------------------------------------
DOUBLE = r'''#!{python}
# Test double for edgetpu_compiler: checks edgepipe's subprocess wiring only.
import json, os, shutil, sys, time
env = os.environ
if env.get("EDGETPU_DOUBLE_ARGV"):
    with open(env["EDGETPU_DOUBLE_ARGV"], "a") as fh:
        fh.write(json.dumps(sys.argv) + "\n")
if "--version" in sys.argv:
    print("Edge TPU Compiler version " + env.get("EDGETPU_DOUBLE_VERSION", "16.0.384591198"))
    sys.exit(0)
time.sleep(float(env.get("EDGETPU_DOUBLE_SLEEP", "0")))
args = sys.argv[1:]
out = args[args.index("--out_dir") + 1]
model = args[-1]
sys.stdout.write(open(env["EDGETPU_DOUBLE_LOG"]).read())
rc = int(env.get("EDGETPU_DOUBLE_RC", "0"))
if rc == 0:
    stem = os.path.splitext(os.path.basename(model))[0]
    shutil.copyfile(model, os.path.join(out, stem + "_edgetpu.tflite"))
    if env.get("EDGETPU_DOUBLE_OPLOG"):
        shutil.copyfile(env["EDGETPU_DOUBLE_OPLOG"], os.path.join(out, stem + "_edgetpu.log"))
sys.exit(rc)
'''


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return empty


@pytest.fixture
def compiler_double(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "edgetpu_compiler"
    exe.write_text(DOUBLE.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    argv = tmp_path / "argv.jsonl"
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.setenv("EDGETPU_DOUBLE_ARGV", str(argv))
    monkeypatch.setenv("EDGETPU_DOUBLE_LOG", str(FIXTURES / "partial_v16.txt"))
    monkeypatch.delenv("EDGETPU_DOUBLE_SLEEP", raising=False)
    monkeypatch.delenv("EDGETPU_DOUBLE_RC", raising=False)
    monkeypatch.delenv("EDGETPU_DOUBLE_OPLOG", raising=False)

    def calls() -> list[list[str]]:
        return [json.loads(x) for x in argv.read_text().splitlines()] if argv.exists() else []

    return calls


def test_compile_without_compiler_raises(tiny, tmp_path, no_compiler):
    assert etc.find_compiler() is None and etc.compiler_version() is None
    with pytest.raises(ConversionError, match="not found on PATH"):
        etc.compile_edgetpu(tiny("int8"), tmp_path / "out")


def test_compile_with_double_runs_argument_list_and_keeps_log(tiny, tmp_path, compiler_double, monkeypatch):
    monkeypatch.setenv("EDGETPU_DOUBLE_OPLOG", str(FIXTURES / "full_v16_oplog.log"))
    src = tmp_path / "we; ird $(name).tflite"  # a shell would choke on this name; an argv list does not
    src.write_bytes(tiny("int8").read_bytes())
    out = tmp_path / "out"
    res = etc.compile_edgetpu(src, out, timeout=60)
    assert res.ok and res.error is None and res.returncode == 0 and not res.timed_out
    assert res.artifact == out / "we; ird $(name)_edgetpu.tflite" and res.artifact.is_file()
    assert res.log_path.parent == out and res.log_path.is_file()
    kept = res.log_path.read_text()
    assert "Number of operations that will run on CPU: 12" in kept and "exit status 0" in kept
    assert res.operation_log_path == out / "we; ird $(name)_edgetpu.log"
    assert res.log.version == "16.0.384591198" and res.log.ops_cpu == 12
    calls = compiler_double()
    assert calls[0][1:] == ["--version"]
    argv = calls[1]
    assert argv[-1] == str(src.resolve()) and "--show_operations" in argv
    assert argv[argv.index("--timeout_sec") + 1] == "60"
    # the compiler worked in a private folder that is gone now
    assert not list(out.glob(".tmp-edgetpu-*"))
    assert res.summary()["cpu_ops"][0]["reason"] == "More than one subgraph is not supported"


def test_compile_older_compiler_gets_no_timeout_flag(tiny, tmp_path, compiler_double, monkeypatch):
    monkeypatch.setenv("EDGETPU_DOUBLE_VERSION", "15.0.340273435")
    res = etc.compile_edgetpu(tiny("int8"), tmp_path / "out", timeout=60)
    assert res.ok and "--timeout_sec" not in compiler_double()[1]


def test_compile_timeout_kills_and_keeps_partial_log(tiny, tmp_path, compiler_double, monkeypatch):
    monkeypatch.setenv("EDGETPU_DOUBLE_SLEEP", "30")
    t0 = time.perf_counter()
    res = etc.compile_edgetpu(tiny("int8"), tmp_path / "out", timeout=1.5)
    assert time.perf_counter() - t0 < 15
    assert not res.ok and res.timed_out and res.artifact is None
    assert "did not finish within 1.5 s" in res.error
    assert "killed after 1.5 s" in res.log_path.read_text()
    assert not list((tmp_path / "out").glob("*_edgetpu.tflite"))


def test_compile_failure_reports_compiler_error(tiny, tmp_path, compiler_double, monkeypatch):
    monkeypatch.setenv("EDGETPU_DOUBLE_RC", "1")
    monkeypatch.setenv("EDGETPU_DOUBLE_LOG", str(FIXTURES / "failed_v16.txt"))
    res = etc.compile_edgetpu(tiny("int8"), tmp_path / "out", timeout=60)
    assert not res.ok and res.returncode == 1 and res.artifact is None
    assert res.error == "Compilation failed due to large activation tensors in model."
    assert "exit status 1" in res.log_path.read_text()


# ------------------------------------------------------------------------------------------
# runtime
# ------------------------------------------------------------------------------------------
def test_runtime_registered_and_explains_itself(tiny, tmp_path):
    from edgepipe.devices.runtimes.base import Runtime, get_runtime

    rt = get_runtime("tflite", "edgetpu")
    assert isinstance(rt, etr.EdgeTPURuntime)
    assert Runtime.registry[("litert-edgetpu", "edgetpu")] is etr.EdgeTPURuntime
    assert rt.check(tiny("int8"), "tflite") == etr.NOT_COMPILED_REASON
    assert "onnx" in rt.check(tmp_path / "m.onnx", "onnx")
    assert "missing" in rt.check(tmp_path / "none_edgetpu.tflite", "tflite")
    compiled = _fake_compiled(tiny("int8"), tmp_path / "m_edgetpu.tflite")
    why = rt.available()
    assert rt.check(compiled, "tflite") == why  # a compiled artifact gets as far as the host check
    if why is not None:
        assert "libedgetpu" in why or "Edge TPU" in why


def test_runtime_unavailable_without_libedgetpu():
    import ctypes.util

    if ctypes.util.find_library("edgetpu") is not None:
        pytest.skip("libedgetpu is installed on this host")
    etr._availability.cache_clear()
    why = etr.EdgeTPURuntime().available()
    assert why and why.startswith("libedgetpu.so.1 cannot be loaded") and "libedgetpu1-std" in why


@pytest.mark.edgetpu
def test_runs_on_a_real_edge_tpu(tiny, tmp_path):
    why = etr.EdgeTPURuntime().available()
    if why:
        pytest.skip(f"no Edge TPU here: {why}")
    if etc.find_compiler() is None:
        pytest.skip("edgetpu_compiler is not installed, so no compiled model can be made here")
    res = etc.compile_edgetpu(tiny("int8"), tmp_path / "out")
    assert res.ok, res.error
    with etr.EdgeTPURuntime().load(res.artifact) as s:
        y = s.run([np.random.default_rng(0).random((1, 16, 16, 3), dtype=np.float32)])
        assert y[0].shape == (1, 10) and s.facts["delegate"] == "edgetpu"


# ------------------------------------------------------------------------------------------
# export format
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def traced_tiny():
    import keras

    from edgepipe.pipeline.base.manifest import SourceModel
    from edgepipe.pipeline.base.preprocessing import Preprocessing
    from edgepipe.pipeline.trace import trace
    from edgepipe.pipeline.base.records import Calibration, LoadedModel

    i = keras.Input((16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(8, 3, activation="relu")(i)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(i, keras.layers.Dense(5, activation="softmax")(x))
    src = SourceModel(name="tiny", kind="keras", input_shape=[1, 16, 16, 3])
    traced = trace(LoadedModel(src, model, Preprocessing()))
    raw = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32)
    return traced, Calibration(raw=raw, data=raw / 255.0, source="random")


def test_format_registered():
    from edgepipe.export import formats, get_format

    f = get_format("edgetpu")
    assert type(f).__name__ == "EdgeTPUFormat" and "edgetpu" in formats()
    assert f.precisions == ("int8",) and f.filename("m", "int8") == "m_int8_edgetpu.tflite"


def test_export_without_compiler_records_prediction(traced_tiny, tmp_path, no_compiler):
    from edgepipe.export import get_format
    from edgepipe.export.edgetpu import EdgeTPUOptions
    from edgepipe.pipeline.base.util import atomic_path
    from edgepipe.pipeline.export_run import describe

    traced, calib = traced_tiny
    final = tmp_path / "tiny_int8_edgetpu.tflite"
    f = get_format("edgetpu")
    with atomic_path(final) as dest:
        res = f.export(traced, "int8", calib, dest, EdgeTPUOptions())
        describe(f, res, res.described_by or dest)  # what the export stage adds: I/O and placement
    info = res.extra["edgetpu"]
    assert info["compiled"] is False and info["kind"] == "prediction" and info["log_path"] is None
    assert "not found on PATH" in info["why_not_compiled"]
    g = read_tflite(final)
    assert not g.is_edgetpu_compiled and g.tensor(g.main.inputs[0]).dtype == "int8"
    again = et.analyze_tflite(final)
    assert info["counts"] == again.counts and info["fully_mapped"] is True
    assert [r["type"] for r in info["ops"]] == [o.type for o in again.ops]
    assert res.inputs[0].dtype == "int8" and res.options["edgetpu_compiled"] is False
    et.require_full_edgetpu(info)


def test_export_with_compiler_double_keeps_logs(traced_tiny, tmp_path, compiler_double):
    from edgepipe.export import get_format
    from edgepipe.export.edgetpu import EdgeTPUOptions
    from edgepipe.pipeline.export_run import describe

    traced, calib = traced_tiny
    folder = tmp_path / "artifacts"
    folder.mkdir()
    final = folder / "tiny_int8_edgetpu.tflite"
    f = get_format("edgetpu")
    res = f.export(traced, "int8", calib, final, EdgeTPUOptions())
    describe(f, res, res.described_by or final)  # what the export stage adds: I/O and placement
    info = res.extra["edgetpu"]
    assert info["compiled"] is True and info["compiler_version"] == "16.0.384591198"
    assert info["log_path"] == "tiny_int8_edgetpu.compiler.log" and (folder / info["log_path"]).is_file()
    assert [p.name for p in res.files] == ["tiny_int8_edgetpu.compiler.log"]
    assert info["counts"]["cpu"] == 12 and info["prediction"]["kind"] == "prediction"
    assert final.is_file() and not list(folder.glob(".tmp-*"))
    assert compiler_double()[1][-1].endswith("tiny_int8.tflite")
    with pytest.raises(GateFailure):
        et.require_full_edgetpu(info)


def test_export_fails_loudly_when_the_compiler_fails(traced_tiny, tmp_path, compiler_double, monkeypatch):
    from edgepipe.export import get_format
    from edgepipe.export.edgetpu import EdgeTPUOptions

    monkeypatch.setenv("EDGETPU_DOUBLE_RC", "1")
    monkeypatch.setenv("EDGETPU_DOUBLE_LOG", str(FIXTURES / "failed_v16.txt"))
    traced, calib = traced_tiny
    with pytest.raises(ConversionError, match="large activation tensors") as e:
        get_format("edgetpu").export(traced, "int8", calib, tmp_path / "t_int8_edgetpu.tflite", EdgeTPUOptions())
    assert "t_int8_edgetpu.compiler.log" in e.value.hint
    assert (tmp_path / "t_int8_edgetpu.compiler.log").is_file()


# ------------------------------------------------------------------------------------------
# the seed models (slow)
# ------------------------------------------------------------------------------------------
SEEDS = {  # keras.applications name -> input size
    "VGG16": 32, "ResNet50": 32, "MobileNet": 32, "MobileNetV2": 32, "InceptionV3": 75, "Xception": 71,
}


@pytest.fixture(scope="session")
def seed_models(tmp_path_factory):
    import keras

    folder = tmp_path_factory.mktemp("edgetpu_seeds")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            size = SEEDS[name]
            keras.utils.set_random_seed(0)
            net = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
            # static batch 1, as the exporter traces it (keras.applications leave the batch dynamic,
            # which the Edge TPU rejects: see test_dynamic_shape_runs_on_cpu)
            inp = keras.Input(batch_shape=(1, size, size, 3))
            done[name] = convert(keras.Model(inp, net(inp)), folder / f"{name}.tflite", samples=2)
        return done[name]

    return get


def _independent_check(report, graph):
    """Each prediction against the published rules, written out without the analyzer's code."""
    started = broken = False
    for op, p in zip(graph.main.operators, report.ops):
        assert (p.index, p.type) == (op.index, op.opcode)
        acts = [t for t in graph.op_inputs(op) if t is not None and not t.is_constant] + \
               [t for t in graph.op_outputs(op) if t is not None]
        ok_alone = (op.opcode in PUBLISHED_OPS
                    and all(t.dtype in ("int8", "uint8") and t.quantized for t in acts)
                    and all(-1 not in t.shape_signature for t in acts)
                    and all(len(t.shape_signature) <= 4 and all(d == 1 for d in t.shape_signature[:-3])
                            for t in acts))
        if p.placement == "edgetpu":
            assert ok_alone and not broken, (op.index, op.opcode)  # one Edge TPU segment only
            started = True
        elif broken:
            assert p.reason == et.R_AFTER or not ok_alone, (op.index, op.opcode, p.reason)
        else:
            assert p.reason != "supported", (op.index, op.opcode)
            broken = started


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEEDS))
def test_seed_models_predictions_follow_the_rules(seed_models, name):
    path = seed_models(name)
    g = read_tflite(path)
    r = et.analyze_tflite(path)
    assert r.kind == "prediction" and len(r.ops) == len(g.main.operators) > 10
    _independent_check(r, g)
    # full-integer CNNs built from table ops: the published rules map every op
    assert r.fully_mapped, r.table(cpu_only=True)
    types = {o.type for o in r.ops}
    assert {"CONV_2D", "SOFTMAX"} <= types
    if name in ("MobileNet", "MobileNetV2", "Xception"):
        assert "DEPTHWISE_CONV_2D" in types
    if name == "ResNet50":
        assert {"ADD", "PAD", "MEAN", "FULLY_CONNECTED"} <= types
    if name == "InceptionV3":
        assert {"CONCATENATION", "AVERAGE_POOL_2D"} <= types
    assert r.parameter_bytes > 0 and sum(x["count"] for x in r.by_type()) == len(r.ops)
