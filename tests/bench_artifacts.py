"""The tiny export the bench, GPU, report and remote-device tests share (built once per session).

Built from a tiny Keras model with the real converters (TFLite fp32 and full-int8, ONNX through
tf2onnx, all with a static batch of 1), plus a dynamic-batch TFLite model, a one-op flatbuffer
shaped like an edgetpu_compiler output, a Core ML mlprogram and a failed-export entry.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from edgepipe.pipeline.base.manifest import Artifact, Manifest, SourceModel
from edgepipe.pipeline.base.util import sha256_file

# --------------------------------------------------------------------------------------------- fixture
def _edgetpu_shaped_tflite() -> bytes:
    """One CUSTOM 'edgetpu-custom-op' node, the way edgetpu_compiler's output looks to a reader."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    m = s.ModelT()
    m.version = 3
    m.description = "edgetpu-shaped test model (never run: no Edge TPU here)"
    m.buffers = [s.BufferT() for _ in range(3)]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode = "edgetpu-custom-op"
    code.version = 1
    m.operatorCodes = [code]
    g = s.SubGraphT()
    g.tensors = []
    for i, (name, shape) in enumerate((("x", [1, 32, 32, 3]), ("y", [1, 10]))):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, s.TensorType.INT8, i + 1, name
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint = [0.0078125], [0]
        t.quantization = q
        g.tensors.append(t)
    g.inputs, g.outputs = [0], [1]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    g.operators = [op]
    m.subgraphs = [g]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def build_tiny_export(folder: Path) -> Path:
    """Build (once) a manifest folder with real artifacts of a tiny conv net. Returns the folder."""
    folder = Path(folder)
    if (folder / "manifest.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)

    def net(batch):
        x = inp = keras.Input(batch_shape=(batch, 32, 32, 3), name="image")
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
        x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        x = keras.layers.Conv2D(16, 1, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, keras.layers.Dense(10)(x))  # logits: outputs differ per input

    model = net(1)
    rng = np.random.default_rng(0)
    data = rng.uniform(0.0, 1.0, size=(16, 32, 32, 3)).astype(np.float32)

    (tmp / "tiny_fp32.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([data[i:i + 1]] for i in range(len(data)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    (tmp / "tiny_int8.tflite").write_bytes(conv.convert())

    dyn = net(None)
    dyn.set_weights(model.get_weights())
    (tmp / "tiny_dynbatch.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(dyn).convert())

    # CUMSUM: XNNPACK leaves it to the TFLite kernels, and LiteRT 2.3's GPU accelerator dies on it
    x = inp = keras.Input(batch_shape=(1, 32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.Lambda(lambda t: keras.ops.cumsum(t, axis=-1))(x)
    x = keras.layers.Conv2D(4, 1)(x)
    (tmp / "tiny_cumsum.tflite").write_bytes(
        tf.lite.TFLiteConverter.from_keras_model(keras.Model(inp, x)).convert())

    tf2onnx.convert.from_function(tf.function(lambda x: model(x)),
                                  input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32, name="image")],
                                  opset=17, output_path=str(tmp / "tiny_fp32.onnx"))

    (tmp / "tiny_edgetpu.tflite").write_bytes(_edgetpu_shaped_tflite())

    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 32, 32, 3))])
    def prog(x):
        return mb.relu(x=x, name="y")

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
               skip_model_load=True).save(str(tmp / "tiny_fp32.mlpackage"))

    np.savez(tmp / "reference.npz", raw=data * 255.0, data=data, outputs=model.predict(data, verbose=0))

    m = Manifest(model=SourceModel(name="tiny", kind="keras", input_shape=[1, 32, 32, 3], num_classes=10),
                 reference={"path": "reference.npz", "samples": len(data), "data": "random"})
    for aid, fmt, prec, path in (("tflite-fp32", "tflite", "fp32", "tiny_fp32.tflite"),
                                 ("tflite-int8", "tflite", "int8", "tiny_int8.tflite"),
                                 ("tflite-dynbatch", "tflite", "fp32", "tiny_dynbatch.tflite"),
                                 ("tflite-cumsum", "tflite", "fp32", "tiny_cumsum.tflite"),
                                 ("onnx-fp32", "onnx", "fp32", "tiny_fp32.onnx"),
                                 ("edgetpu-int8", "edgetpu", "int8", "tiny_edgetpu.tflite"),
                                 ("coreml-fp32", "coreml", "fp32", "tiny_fp32.mlpackage")):
        p = tmp / path
        m.artifacts.append(Artifact(id=aid, format=fmt, precision=prec, path=path, status="ok",
                                    sha256=sha256_file(p), size_bytes=sum(f.stat().st_size for f in p.rglob("*"))
                                    if p.is_dir() else p.stat().st_size))
    m.artifacts.append(Artifact(id="onnx-int8", format="onnx", precision="int8", status="failed",
                                error="quantizer raised ValueError: no calibration data"))
    m.save(tmp)
    os.replace(tmp, folder)
    return folder
