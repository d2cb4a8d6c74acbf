"""The Core ML reference interpreter (devices/runtimes/coreml_ref/) against independent references.

Op level: MIL programs built with coremltools' Builder, converted with ``ct.convert`` and
saved as real .mlpackage folders, then run by the interpreter and compared with TensorFlow
or plain numpy implementations of the same attributes. Op-level programs are converted in
fp32 so the comparison checks semantics to float32 rounding; one program is also run in
fp16 to check that fp16 programs compute in fp16.

Model level (slow): small Keras models converted with an ImageType in fp16, then int8
weights and 6-bit palettized; the interpreter's logits are compared with Keras. Also the
seven seed applications at their smallest sizes, and artifacts that must fail (wrong
ImageType scale, tampered weight file).

Random-init networks are near-chaotic, so every Keras model here gets "calibrated"
BatchNorm statistics (gamma/beta randomised, moving mean/variance set from a batch of
inputs) and logits (no softmax) are compared: outputs then have unit-ish scale and depend
on the input, so a wrong artifact cannot hide behind a uniform softmax.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepipe.devices.runtimes import coreml_ref as cr
from edgepipe.devices.runtimes.coreml_ref import reader
from edgepipe.pipeline.base.errors import EdgepipeError, UnsupportedArtifact, UserError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct():
    import coremltools

    return coremltools


@pytest.fixture(scope="module")
def mb(ct):
    from coremltools.converters.mil import Builder

    return Builder


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def _save(ct, src, path: Path, precision="fp32", **kw) -> cr.MilModel:
    prec = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    ml = ct.convert(src, convert_to="mlprogram", compute_precision=prec, **kw)
    ml.save(str(path))
    return cr.load_program(path)


def agreement(out: np.ndarray, ref: np.ndarray) -> dict:
    """cosine similarity and max error relative to the reference's largest magnitude."""
    out = np.asarray(out, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    cos = float(out @ ref / (np.linalg.norm(out) * np.linalg.norm(ref) + 1e-30))
    rel = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
    return {"cosine": cos if np.isfinite(cos) else -1.0, "rel_max": rel if np.isfinite(rel) else np.inf}


def passes(a: dict, tol: dict) -> bool:
    return a["cosine"] >= tol["cosine"] and a["rel_max"] <= tol["rel_max"]


def nchw_to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def oihw_to_hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


# --------------------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------------------

RS = np.random.RandomState(7)
X_CONV = RS.standard_normal((1, 6, 9, 8)).astype(np.float32)  # odd height: asymmetric 'same'
W3 = RS.standard_normal((4, 6, 3, 3)).astype(np.float32)
W4 = RS.standard_normal((4, 6, 4, 4)).astype(np.float32)
WG = RS.standard_normal((6, 3, 3, 3)).astype(np.float32)
BG = RS.standard_normal(6).astype(np.float32)
WD = RS.standard_normal((6, 1, 3, 3)).astype(np.float32)
WDM = RS.standard_normal((12, 1, 3, 3)).astype(np.float32)
WT = RS.standard_normal((6, 4, 3, 3)).astype(np.float32)  # conv_transpose: (C_in, C_out, kh, kw)


@pytest.fixture(scope="module")
def conv_model(ct, mb, tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=X_CONV.shape)], opset_version=ct.target.iOS16)
    def prog(x):
        return (
            mb.conv(x=x, weight=W3, strides=[2, 2], pad_type="same", name="same_s2"),
            mb.conv(x=x, weight=W4, strides=[2, 2], pad_type="same", name="same_s2_k4"),
            mb.conv(x=x, weight=W3, strides=[2, 2], pad_type="same_lower", name="same_lower_s2"),
            mb.conv(x=x, weight=W3, dilations=[2, 2], pad_type="same", name="dilated"),
            mb.conv(x=x, weight=WG, bias=BG, groups=2, pad_type="custom", pad=[1, 0, 2, 1], name="grouped"),
            mb.conv(x=x, weight=WD, groups=6, strides=[2, 2], pad_type="valid", name="depthwise"),
            mb.conv(x=x, weight=WDM, groups=6, pad_type="same", name="depthwise_mult"),
            mb.conv_transpose(x=x, weight=WT, strides=[2, 2], pad_type="valid", name="deconv_valid"),
            mb.conv_transpose(x=x, weight=WT, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                              name="deconv_custom"),
        )

    model = _save(ct, prog, tmp_path_factory.mktemp("conv") / "conv.mlpackage",
                  minimum_deployment_target=ct.target.iOS16)
    return model, model.predict({"x": X_CONV})


def _tf_conv_refs(tf):
    x = nchw_to_nhwc(X_CONV)
    conv = lambda inp, w, **kw: tf.nn.conv2d(inp, oihw_to_hwio(w), **kw).numpy()  # noqa: E731
    # same_lower, stride 2, k 3, H 9 -> total pad 2 (even), W 8 -> total 1: extra column on the left
    refs = {
        "same_s2": conv(x, W3, strides=2, padding="SAME"),
        "same_s2_k4": conv(x, W4, strides=2, padding="SAME"),
        "same_lower_s2": conv(x, W3, strides=2, padding=[[0, 0], [1, 1], [1, 0], [0, 0]]),
        "dilated": conv(x, W3, strides=1, padding="SAME", dilations=2),
        "depthwise": tf.nn.depthwise_conv2d(x, np.transpose(WD, (2, 3, 0, 1)), [1, 2, 2, 1], "VALID").numpy(),
    }
    # groups=2: two independent convolutions on channel halves, explicit asymmetric padding
    pad = [[0, 0], [1, 0], [2, 1], [0, 0]]
    halves = [conv(x[..., 3 * g:3 * g + 3], WG[3 * g:3 * g + 3], strides=1, padding=pad) for g in range(2)]
    refs["grouped"] = np.concatenate(halves, axis=-1) + BG
    # channel multiplier 2: MIL output channel 2g+m reads input channel g with filter m
    wdm = WDM[:, 0].reshape(6, 2, 3, 3).transpose(2, 3, 0, 1)
    refs["depthwise_mult"] = tf.nn.depthwise_conv2d(x, wdm, [1, 1, 1, 1], "SAME").numpy()
    # transposed conv = gradient of conv: TF filter is (kh, kw, out, in)
    full = tf.nn.conv2d_transpose(x, np.transpose(WT, (2, 3, 1, 0)), output_shape=[1, 19, 17, 4],
                                  strides=2, padding="VALID").numpy()
    refs["deconv_valid"] = full
    refs["deconv_custom"] = full[:, 1:-1, 1:-1, :]
    return {k: nhwc_to_nchw(v) for k, v in refs.items()}


CONV_CASES = ["same_s2", "same_s2_k4", "same_lower_s2", "dilated", "grouped", "depthwise",
              "depthwise_mult", "deconv_valid", "deconv_custom"]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_matches_tensorflow(conv_model, tf, case):
    model, out = conv_model
    ref = _tf_conv_refs(tf)[case]
    assert out[case].shape == ref.shape
    np.testing.assert_allclose(out[case], ref, rtol=1e-4, atol=1e-4)


def test_conv_program_really_uses_the_attributes(conv_model):
    model, _ = conv_model
    convs = [op for op in model.ops if op.type == "conv"]
    pad_types = {str(op.inputs["pad_type"][0][1]) for op in convs if op.inputs.get("pad_type")}
    pad_types |= {str(model.consts.get(op.inputs["pad_type"][0][1])) for op in convs
                  if op.inputs.get("pad_type") and op.inputs["pad_type"][0][0] == "name"}
    assert {"same", "same_lower", "custom", "valid"} <= pad_types
    assert model.op_counts()["conv_transpose"] == 2


# --------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------

X_POOL = RS.standard_normal((1, 3, 9, 8)).astype(np.float32)


def naive_pool(x, k, s, pads, kind, exclude=False, ceil=False):
    """Loop reference (PyTorch-style ceil_mode): pads = [(top, bottom), (left, right)]."""
    n, c, h, w = x.shape
    out_hw = []
    for i, size in enumerate((h, w)):
        span = size + pads[i][0] + pads[i][1] - k[i]
        o = (-(-span // s[i]) if ceil else span // s[i]) + 1
        if ceil and (o - 1) * s[i] >= size + pads[i][0]:
            o -= 1
        out_hw.append(o)
    y = np.zeros((n, c, *out_hw), np.float64)
    for oy in range(out_hw[0]):
        for ox in range(out_hw[1]):
            y0, x0 = oy * s[0] - pads[0][0], ox * s[1] - pads[1][0]
            y1, x1 = y0 + k[0], x0 + k[1]
            win = x[:, :, max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
            if kind == "max":
                y[:, :, oy, ox] = win.max(axis=(2, 3))
            elif exclude:
                y[:, :, oy, ox] = win.mean(axis=(2, 3))
            else:  # divisor counts padding but not the ceil-mode overhang
                cy = min(y1, h + pads[0][1]) - y0
                cx = min(x1, w + pads[1][1]) - x0
                y[:, :, oy, ox] = win.sum(axis=(2, 3)) / (cy * cx)
    return y


@pytest.fixture(scope="module")
def pool_model(ct, mb, tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=X_POOL.shape)])
    def prog(x):
        return (
            mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same", name="max_same_s2"),
            mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                        exclude_padding_from_average=True, name="avg_same_excl"),
            mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                        exclude_padding_from_average=False, name="avg_same_incl"),
            mb.avg_pool(x=x, kernel_sizes=[2, 3], strides=[1, 2], pad_type="valid", name="avg_valid"),
            mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                        ceil_mode=True, name="max_ceil"),
            mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                        ceil_mode=True, exclude_padding_from_average=False, name="avg_ceil_incl"),
        )

    model = _save(ct, prog, tmp_path_factory.mktemp("pool") / "pool.mlpackage")
    return model, model.predict({"x": X_POOL})


def _pool_refs(tf):
    x = nchw_to_nhwc(X_POOL)
    same = [(1, 1), (0, 1)]  # H 9 k3 s2: total 2; W 8: total 1, extra at the end
    return {
        "max_same_s2": nhwc_to_nchw(tf.nn.max_pool2d(x, 3, 2, "SAME").numpy()),
        "avg_same_excl": nhwc_to_nchw(tf.nn.avg_pool2d(x, 3, 2, "SAME").numpy()),  # TF excludes padding
        "avg_same_incl": naive_pool(X_POOL, (3, 3), (2, 2), same, "avg", exclude=False),
        "avg_valid": nhwc_to_nchw(tf.nn.avg_pool2d(x, [2, 3], [1, 2], "VALID").numpy()),
        "max_ceil": naive_pool(X_POOL, (2, 2), (2, 2), [(1, 1), (1, 1)], "max", ceil=True),
        "avg_ceil_incl": naive_pool(X_POOL, (3, 3), (2, 2), [(1, 1), (1, 1)], "avg", ceil=True),
    }


@pytest.mark.parametrize("case", ["max_same_s2", "avg_same_excl", "avg_same_incl", "avg_valid",
                                  "max_ceil", "avg_ceil_incl"])
def test_pool_matches_reference(pool_model, tf, case):
    _, out = pool_model
    ref = _pool_refs(tf)[case]
    assert out[case].shape == ref.shape
    np.testing.assert_allclose(out[case], ref, rtol=1e-5, atol=1e-5)


def test_avg_pool_padding_choice_matters():
    """Guard against a vacuous test: with this input the two divisors give different results."""
    incl = naive_pool(X_POOL, (3, 3), (2, 2), [(1, 1), (0, 1)], "avg", exclude=False)
    excl = naive_pool(X_POOL, (3, 3), (2, 2), [(1, 1), (0, 1)], "avg", exclude=True)
    assert np.abs(incl - excl).max() > 0.05


# --------------------------------------------------------------------------------------
# reductions, concat, matmul / linear, softmax
# --------------------------------------------------------------------------------------

X4 = RS.uniform(-2, 2, (2, 3, 4, 5)).astype(np.float32)
MM_W = RS.standard_normal((5, 6)).astype(np.float32)
MM_WT = RS.standard_normal((6, 5)).astype(np.float32)
LIN_W = RS.standard_normal((7, 60)).astype(np.float32)
LIN_B = RS.standard_normal(7).astype(np.float32)


@pytest.fixture(scope="module")
def misc_model(ct, mb, tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=X4.shape)])
    def prog(x):
        r = mb.relu(x=x)
        return (
            mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True, name="mean_hw_keep"),
            mb.reduce_mean(x=x, axes=[-2, -1], keep_dims=False, name="mean_hw"),
            mb.concat(values=[x, r], axis=1, name="concat_c"),
            mb.concat(values=[x, r], axis=-1, interleave=True, name="concat_interleave"),
            mb.matmul(x=x, y=MM_W, name="matmul"),
            mb.matmul(x=x, y=MM_WT, transpose_y=True, name="matmul_ty"),
            mb.linear(x=mb.reshape(x=x, shape=[2, 60]), weight=LIN_W, bias=LIN_B, name="linear"),
            mb.softmax(x=x, axis=1, name="softmax_c"),
            mb.softmax(x=x, axis=-1, name="softmax_last"),
        )

    model = _save(ct, prog, tmp_path_factory.mktemp("misc") / "misc.mlpackage")
    return model, model.predict({"x": X4})


def _misc_refs(tf):
    r = np.maximum(X4, 0)
    inter = np.stack([X4, r], axis=-1).reshape(2, 3, 4, 10)
    return {
        "mean_hw_keep": X4.mean(axis=(2, 3), keepdims=True),
        "mean_hw": X4.mean(axis=(2, 3)),
        "concat_c": np.concatenate([X4, r], axis=1),
        "concat_interleave": inter,
        "matmul": X4 @ MM_W,
        "matmul_ty": X4 @ MM_WT.T,
        "linear": X4.reshape(2, 60) @ LIN_W.T + LIN_B,
        "softmax_c": tf.nn.softmax(X4, axis=1).numpy(),
        "softmax_last": tf.nn.softmax(X4, axis=-1).numpy(),
    }


@pytest.mark.parametrize("case", ["mean_hw_keep", "mean_hw", "concat_c", "concat_interleave", "matmul",
                                  "matmul_ty", "linear", "softmax_c", "softmax_last"])
def test_reduce_concat_matmul_softmax(misc_model, tf, case):
    _, out = misc_model
    ref = _misc_refs(tf)[case]
    assert out[case].shape == ref.shape
    np.testing.assert_allclose(out[case], ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# elementwise, activations, normalisation, shape ops (one program, many outputs)
# --------------------------------------------------------------------------------------

XE = RS.uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
ALPHA_C = RS.uniform(0.05, 0.5, 4).astype(np.float32)
BN_MEAN, BN_VAR = RS.standard_normal(4).astype(np.float32), RS.uniform(0.5, 2, 4).astype(np.float32)
BN_G, BN_B = RS.uniform(0.5, 1.5, 4).astype(np.float32), RS.standard_normal(4).astype(np.float32)
LN_G, LN_B = RS.uniform(0.5, 1.5, 6).astype(np.float32), RS.standard_normal(6).astype(np.float32)
DIV_Y = RS.uniform(0.5, 2, (1, 4, 1, 1)).astype(np.float32)


def _elementwise_ops(mb, x):
    a = mb.abs(x=x)
    return {
        "sigmoid": mb.sigmoid(x=x), "sigmoid_hard": mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5),
        "hard_swish": mb.mul(x=x, y=mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5)),
        "tanh": mb.tanh(x=x), "silu": mb.silu(x=x), "exp": mb.exp(x=x),
        "gelu_exact": mb.gelu(x=x, mode="EXACT"), "gelu_tanh": mb.gelu(x=x, mode="TANH_APPROXIMATION"),
        "gelu_sigmoid": mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
        "sqrt": mb.sqrt(x=a), "rsqrt": mb.rsqrt(x=mb.add(x=a, y=0.5)), "log": mb.log(x=mb.add(x=a, y=1.0)),
        "inverse": mb.inverse(x=mb.add(x=a, y=1.0)), "erf": mb.erf(x=x),
        "clip": mb.clip(x=x, alpha=-1.0, beta=2.0), "relu6": mb.relu6(x=x),
        "leaky_relu": mb.leaky_relu(x=x, alpha=0.1), "elu": mb.elu(x=x, alpha=1.0),
        "prelu": mb.prelu(x=x, alpha=ALPHA_C), "softplus": mb.softplus(x=x),
        "sub": mb.sub(x=x, y=a), "real_div": mb.real_div(x=x, y=mb.add(x=a, y=DIV_Y)),
        "maximum": mb.maximum(x=x, y=DIV_Y), "minimum": mb.minimum(x=x, y=DIV_Y),
        "batch_norm": mb.batch_norm(x=x, mean=BN_MEAN, variance=BN_VAR, gamma=BN_G, beta=BN_B, epsilon=1e-3),
        "instance_norm": mb.instance_norm(x=x, epsilon=1e-5),
        "layer_norm": mb.layer_norm(x=x, axes=[-1], gamma=LN_G, beta=LN_B, epsilon=1e-5),
        "l2_norm": mb.l2_norm(x=x, epsilon=1e-6),
        "squeeze": mb.squeeze(x=mb.reduce_max(x=x, axes=[1], keep_dims=True), axes=[1]),
        "expand_dims": mb.expand_dims(x=mb.reduce_sum(x=x, axes=[2]), axes=[-1]),
        "flatten2d": mb.flatten2d(x=x, axis=2),
        "slice_by_index": mb.slice_by_index(x=x, begin=[0, 1, 0, 5], end=[2, 4, 6, 0], stride=[1, 2, 2, -2],
                                            end_mask=[False, False, True, True]),
        "slice_by_size": mb.slice_by_size(x=x, begin=[1, 0, 2, 1], size=[1, -1, 3, 4]),
        "pad_reflect": mb.pad(x=x, pad=[1, 2, 2, 1], mode="reflect"),
        "pad_replicate": mb.pad(x=x, pad=[0, 2, 1, 0], mode="replicate"),
        "pad_constant": mb.pad(x=x, pad=[0, 0, 1, 1, 2, 0], mode="constant", constant_val=0.5),
        "transpose": mb.transpose(x=x, perm=[0, 2, 3, 1]),
        "split_1": mb.split(x=x, split_sizes=[1, 3], axis=1)[1],
        "stack": mb.stack(values=[x, a], axis=2), "tile": mb.tile(x=x, reps=[1, 1, 2, 1]),
        "gather": mb.gather(x=x, indices=np.array([3, 0, 2], np.int32), axis=1),
        "upsample_nn": mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
        "depth_to_space": mb.depth_to_space(x=x, block_size=2),
        "space_to_depth": mb.space_to_depth(x=x, block_size=2),
        "select": mb.select(cond=mb.greater(x=x, y=0.0), a=x, b=a),
        "reduce_min_all": mb.reduce_min(x=x, axes=[0, 1, 2, 3], keep_dims=False),
    }


def _elementwise_refs(tf, keras):
    x = XE
    a = np.abs(x)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    hs = keras.ops.hard_sigmoid(x).numpy()
    c = lambda v: v.reshape(1, -1, 1, 1)  # noqa: E731
    mu, var = x.mean(axis=(2, 3), keepdims=True), x.var(axis=(2, 3), keepdims=True)
    lmu, lvar = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
    return {
        "sigmoid": tf.sigmoid(x).numpy(), "sigmoid_hard": hs, "hard_swish": keras.ops.hard_swish(x).numpy(),
        "tanh": np.tanh(x), "silu": tf.nn.silu(x).numpy(), "exp": np.exp(x),
        "gelu_exact": tf.nn.gelu(x, approximate=False).numpy(), "gelu_tanh": tf.nn.gelu(x, approximate=True).numpy(),
        "gelu_sigmoid": x * sig(1.702 * x),
        "sqrt": np.sqrt(a), "rsqrt": 1 / np.sqrt(a + 0.5 + 1e-12), "log": np.log(a + 1.0),
        "inverse": 1 / (a + 1.0 + 1e-4), "erf": tf.math.erf(x).numpy(),
        "clip": np.clip(x, -1, 2), "relu6": np.clip(x, 0, 6),
        "leaky_relu": tf.nn.leaky_relu(x, 0.1).numpy(), "elu": tf.nn.elu(x).numpy(),
        "prelu": np.where(x > 0, x, x * c(ALPHA_C)), "softplus": tf.nn.softplus(x).numpy(),
        "sub": x - a, "real_div": x / (a + DIV_Y), "maximum": np.maximum(x, DIV_Y), "minimum": np.minimum(x, DIV_Y),
        "batch_norm": nhwc_to_nchw(tf.nn.batch_normalization(nchw_to_nhwc(x), BN_MEAN, BN_VAR, BN_B, BN_G,
                                                            1e-3).numpy()),
        "instance_norm": (x - mu) / np.sqrt(var + 1e-5),
        "layer_norm": (x - lmu) / np.sqrt(lvar + 1e-5) * LN_G + LN_B,
        "l2_norm": x / np.sqrt((x * x).reshape(2, -1).sum(axis=1).reshape(2, 1, 1, 1) + 1e-6),
        "squeeze": x.max(axis=1), "expand_dims": x.sum(axis=2)[..., None], "flatten2d": x.reshape(8, 36),
        "slice_by_index": x[0:2, 1:4:2, 0::2, 5::-2], "slice_by_size": x[1:2, :, 2:5, 1:5],
        "pad_reflect": np.pad(x, [(0, 0), (0, 0), (1, 2), (2, 1)], mode="reflect"),
        "pad_replicate": np.pad(x, [(0, 0), (0, 0), (0, 2), (1, 0)], mode="edge"),
        "pad_constant": np.pad(x, [(0, 0), (0, 0), (1, 1), (2, 0)], constant_values=0.5),
        "transpose": x.transpose(0, 2, 3, 1), "split_1": x[:, 1:], "stack": np.stack([x, a], axis=2),
        "tile": np.tile(x, (1, 1, 2, 1)), "gather": x[:, [3, 0, 2]],
        "upsample_nn": x.repeat(2, axis=2).repeat(3, axis=3),
        "depth_to_space": nhwc_to_nchw(tf.nn.depth_to_space(nchw_to_nhwc(x), 2).numpy()),
        "space_to_depth": nhwc_to_nchw(tf.nn.space_to_depth(nchw_to_nhwc(x), 2).numpy()),
        "select": np.where(x > 0, x, a), "reduce_min_all": np.array(x.min()),
    }


ELEMENTWISE_CASES = [
    "sigmoid", "sigmoid_hard", "hard_swish", "tanh", "silu", "exp", "gelu_exact", "gelu_tanh", "gelu_sigmoid",
    "sqrt", "rsqrt", "log", "inverse", "erf", "clip", "relu6", "leaky_relu", "elu", "prelu", "softplus",
    "sub", "real_div", "maximum", "minimum", "batch_norm", "instance_norm", "layer_norm", "l2_norm",
    "squeeze", "expand_dims", "flatten2d", "slice_by_index", "slice_by_size", "pad_reflect",
    "pad_replicate", "pad_constant", "transpose", "split_1", "stack", "tile", "gather", "upsample_nn",
    "depth_to_space", "space_to_depth", "select", "reduce_min_all",
]


@pytest.fixture(scope="module")
def elementwise_models(ct, mb, tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=XE.shape)])
    def prog(x):
        ops = _elementwise_ops(mb, x)
        return tuple(mb.identity(x=v, name=k) for k, v in ops.items())

    d = tmp_path_factory.mktemp("elementwise")
    out = {}
    for prec in ("fp32", "fp16"):
        model = _save(ct, prog, d / f"ew_{prec}.mlpackage", precision=prec)
        out[prec] = (model, model.predict({"x": XE}))
    return out


@pytest.mark.parametrize("case", ELEMENTWISE_CASES)
def test_elementwise_fp32(elementwise_models, tf, case):
    import keras

    _, out = elementwise_models["fp32"]
    ref = _elementwise_refs(tf, keras)[case]
    assert out[case].shape == ref.shape
    np.testing.assert_allclose(out[case], ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("case", ELEMENTWISE_CASES)
def test_elementwise_fp16(elementwise_models, tf, case):
    """An fp16 program computes in fp16: results are fp16 values, within fp16 rounding of the truth."""
    import keras

    _, out = elementwise_models["fp16"]
    ref = _elementwise_refs(tf, keras)[case]
    y = out[case]
    assert np.array_equal(y, y.astype(np.float16).astype(np.float32))  # every value is an fp16 number
    # fp16 keeps 11 significant bits (relative step 2^-10 ~ 1e-3); a few chained ops at most
    np.testing.assert_allclose(y, ref, rtol=4e-3, atol=4e-3 * max(1.0, float(np.abs(ref).max())))


def test_elementwise_programs_keep_their_ops(elementwise_models):
    """The converter's passes must not have folded away what the tests above claim to test."""
    for prec in ("fp32", "fp16"):
        ops = set(elementwise_models[prec][0].op_counts())
        expected = {"sigmoid", "sigmoid_hard", "tanh", "silu", "gelu", "sqrt", "rsqrt", "log", "inverse", "erf",
                    "clip", "relu6", "leaky_relu", "elu", "prelu", "softplus", "sub", "real_div", "maximum",
                    "minimum", "batch_norm", "instance_norm", "layer_norm", "l2_norm", "squeeze", "expand_dims",
                    "flatten2d", "slice_by_index", "slice_by_size", "pad", "transpose", "split", "stack", "tile",
                    "gather", "upsample_nearest_neighbor", "depth_to_space", "space_to_depth", "select",
                    "reduce_min", "reduce_max", "reduce_sum", "mul", "abs", "greater", "exp"}
        assert expected <= ops, expected - ops
    assert elementwise_models["fp16"][0].compute_precision == "fp16"
    assert elementwise_models["fp32"][0].compute_precision == "fp32"


# --------------------------------------------------------------------------------------
# compressed weights: constexpr ops (iOS16 and iOS18 encodings)
# --------------------------------------------------------------------------------------

XC = RS.standard_normal((1, 8, 8, 8)).astype(np.float32)
WC = RS.standard_normal((16, 8, 3, 3)).astype(np.float32)
WL = RS.standard_normal((10, 256)).astype(np.float32)

COMPRESSIONS = {
    # name: (target, api, config kwargs, constexpr ops expected)
    "int8_per_channel_ios16": ("iOS16", "quant", dict(mode="linear_symmetric", granularity="per_channel"),
                               {"constexpr_affine_dequantize"}),
    "uint8_per_tensor_ios16": ("iOS16", "quant", dict(mode="linear", granularity="per_tensor"),
                               {"constexpr_affine_dequantize"}),
    "palettize_4bit_ios16": ("iOS16", "pal", dict(nbits=4, mode="kmeans"), {"constexpr_lut_to_dense"}),
    "prune_ios16": ("iOS16", "prune", dict(target_sparsity=0.5), {"constexpr_sparse_to_dense"}),
    "int4_per_block_ios18": ("iOS18", "quant", dict(mode="linear", dtype="int4", granularity="per_block",
                                                    block_size=4), {"constexpr_blockwise_shift_scale"}),
    "palettize_grouped_ios18": ("iOS18", "pal", dict(nbits=2, mode="kmeans", granularity="per_grouped_channel",
                                                     group_size=4), {"constexpr_lut_to_dense"}),
    "palettize_vector_ios18": ("iOS18", "pal", dict(nbits=2, mode="kmeans", cluster_dim=2),
                               {"constexpr_lut_to_dense"}),
    "palettize_channel_scale_ios18": ("iOS18", "pal", dict(nbits=4, mode="kmeans", enable_per_channel_scale=True),
                                      {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}),
    "prune_ios18": ("iOS18", "prune", dict(target_sparsity=0.5), {"constexpr_sparse_to_dense"}),
    "prune_then_palettize_ios18": ("iOS18", "prune+pal", dict(nbits=4, mode="kmeans"),
                                   {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}),
    "prune_then_int8_ios18": ("iOS18", "prune+quant", dict(mode="linear_symmetric"),
                              {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}),
}


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_compressed_weights_decode_like_coremltools(ct, mb, tmp_path, name):
    """The interpreter's decompression equals coremltools' own ``decompress_weights``, exactly."""
    import coremltools.optimize.coreml as cto

    tgt_name, api, kw, expected_ops = COMPRESSIONS[name]
    tgt = getattr(ct.target, tgt_name)

    @mb.program(input_specs=[mb.TensorSpec(shape=XC.shape)], opset_version=tgt)
    def prog(x):
        y = mb.relu(x=mb.conv(x=x, weight=WC, strides=[2, 2], pad_type="same"))
        return mb.linear(x=mb.reshape(x=y, shape=[1, 256]), weight=WL)

    base = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=tgt,
                      compute_precision=ct.precision.FLOAT32)
    opt = lambda cfg: cto.OptimizationConfig(global_config=cfg)  # noqa: E731
    if api == "quant":
        comp = cto.linear_quantize_weights(base, opt(cto.OpLinearQuantizerConfig(weight_threshold=0, **kw)))
    elif api == "pal":
        comp = cto.palettize_weights(base, opt(cto.OpPalettizerConfig(weight_threshold=0, **kw)))
    elif api == "prune":
        comp = cto.prune_weights(base, opt(cto.OpMagnitudePrunerConfig(weight_threshold=0, **kw)))
    else:
        pruned = cto.prune_weights(base, opt(cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0)))
        if api == "prune+pal":
            comp = cto.palettize_weights(pruned, opt(cto.OpPalettizerConfig(weight_threshold=0, **kw)),
                                         joint_compression=True)
        else:
            comp = cto.linear_quantize_weights(pruned, opt(cto.OpLinearQuantizerConfig(weight_threshold=0, **kw)),
                                               joint_compression=True)
    comp.save(str(tmp_path / "c.mlpackage"))
    cto.decompress_weights(comp).save(str(tmp_path / "d.mlpackage"))
    base.save(str(tmp_path / "base.mlpackage"))

    m_c = cr.load_program(tmp_path / "c.mlpackage")
    m_d = cr.load_program(tmp_path / "d.mlpackage")
    assert expected_ops <= set(m_c.op_counts()), m_c.op_counts()
    assert not any(k.startswith("constexpr") for k in m_d.op_counts())
    y_c = m_c.predict({"x": XC})
    y_d = m_d.predict({"x": XC})
    y_base = cr.load_program(tmp_path / "base.mlpackage").predict({"x": XC})
    (k,) = y_c
    np.testing.assert_array_equal(y_c[k], y_d[k])
    # and the compression is lossy but not garbage (2-bit and 50% sparsity are the roughest)
    assert agreement(y_c[k], y_base[k])["cosine"] > 0.6
    assert not np.array_equal(y_c[k], y_base[k])


def test_activation_quantize_dequantize(ct, mb, tmp_path):
    """iOS17 quantize/dequantize (activation quantization): per-tensor and per-channel."""
    scale_c = np.array([0.02, 0.05, 0.1, 0.2], np.float32)
    zp_c = np.array([-3, 0, 5, 10], np.int8)

    @mb.program(input_specs=[mb.TensorSpec(shape=XE.shape)], opset_version=ct.target.iOS17)
    def prog(x):
        q1 = mb.quantize(input=x, scale=np.float32(0.03), zero_point=np.uint8(128), output_dtype="uint8")
        q2 = mb.quantize(input=mb.relu(x=x), scale=scale_c, zero_point=zp_c, axis=1, output_dtype="int8")
        return (mb.dequantize(input=q1, scale=np.float32(0.03), zero_point=np.uint8(128), name="per_tensor"),
                mb.dequantize(input=q2, scale=scale_c, zero_point=zp_c, axis=1, name="per_channel"))

    model = _save(ct, prog, tmp_path / "q.mlpackage", minimum_deployment_target=ct.target.iOS17)
    assert {"quantize", "dequantize"} <= set(model.op_counts())
    out = model.predict({"x": XE})
    q1 = np.clip(np.round(XE / np.float32(0.03)) + 128, 0, 255)
    np.testing.assert_allclose(out["per_tensor"], (q1 - 128) * np.float32(0.03), rtol=1e-6, atol=1e-6)
    s, z = scale_c.reshape(1, 4, 1, 1), zp_c.astype(np.float32).reshape(1, 4, 1, 1)
    q2 = np.clip(np.round(np.maximum(XE, 0) / s) + z, -128, 127)
    np.testing.assert_allclose(out["per_channel"], (q2 - z) * s, rtol=1e-6, atol=1e-6)


def test_subbyte_unpacking_is_lsb_first():
    # values 1, 2, 3 as uint2 -> bits (LSB first) 10 01 11 -> byte 0b00111001
    assert reader.unpack_bits(bytes([0b00111001]), 2, 3, False).tolist() == [1, 2, 3]
    # int4: -3 (0b1101) then 5 (0b0101) -> byte 0x5D
    assert reader.unpack_bits(bytes([0x5D]), 4, 2, True).tolist() == [-3, 5]
    # uint6 spans bytes: 63, 1 -> bits 111111 100000 -> bytes 0b01111111, 0b00000000 (+ padding)
    assert reader.unpack_bits(bytes([0b01111111, 0]), 6, 2, False).tolist() == [63, 1]


# --------------------------------------------------------------------------------------
# image inputs, classifiers
# --------------------------------------------------------------------------------------

PIX = np.random.RandomState(3).randint(0, 256, size=(1, 5, 7, 3)).astype(np.float32)


@pytest.mark.parametrize("layout", ["RGB", "BGR"])
def test_image_input_scale_bias_and_channel_order(ct, mb, tmp_path, layout):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 5, 7))])
    def prog(x):
        return mb.mul(x=x, y=2.0, name="y")

    scale, bias = 1 / 64, [-1.0, -2.0, -3.0]
    model = _save(ct, prog, tmp_path / "img.mlpackage", inputs=[ct.ImageType(
        name="x", shape=(1, 3, 5, 7), scale=scale, bias=bias, color_layout=getattr(ct.colorlayout, layout))])
    spec = model.inputs[0]
    assert (spec.kind, spec.shape, spec.color_space) == ("image", [1, 5, 7, 3], layout)
    y = model.predict({"x": PIX})["y"]
    chans = PIX[..., ::-1] if layout == "BGR" else PIX  # Core ML feeds the declared channel order
    expect = 2 * (nhwc_to_nchw(chans) * scale + np.array(bias, np.float32).reshape(1, 3, 1, 1))
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-5)
    # a single HWC image and uint8 pixels are accepted too
    np.testing.assert_allclose(model.predict({"x": PIX[0].astype(np.uint8)})["y"], expect, rtol=1e-6, atol=1e-5)


def test_grayscale_image_and_pixel_rounding(ct, mb, tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 1, 4, 6))])
    def prog(x):
        return mb.add(x=x, y=0.25, name="y")

    model = _save(ct, prog, tmp_path / "gray.mlpackage", inputs=[ct.ImageType(
        name="x", shape=(1, 1, 4, 6), scale=0.5, bias=[1.0], color_layout=ct.colorlayout.GRAYSCALE)])
    assert model.inputs[0].shape == [1, 4, 6, 1]
    g = np.random.RandomState(4).uniform(0, 255, (1, 4, 6, 1)).astype(np.float32)
    y = model.predict({"x": g})["y"]
    # pixels are 8-bit in Core ML: fractional values are rounded before scale/bias
    np.testing.assert_allclose(y, nhwc_to_nchw(np.rint(g)) * 0.5 + 1.0 + 0.25, rtol=1e-6)


def test_image_input_refuses_preprocessed_values(ct, mb, tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 5, 7))])
    def prog(x):
        return mb.relu(x=x, name="y")

    model = _save(ct, prog, tmp_path / "img.mlpackage", inputs=[ct.ImageType(name="x", shape=(1, 3, 5, 7))])
    with pytest.raises(UserError, match="8-bit pixels"):
        model.predict({"x": PIX / 127.5 - 1})
    with pytest.raises(UserError, match="NHWC"):
        model.predict({"x": nhwc_to_nchw(PIX)})


def test_classifier_outputs_probabilities_and_label(ct, mb, tmp_path):
    w = RS.standard_normal((3, 4)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=w), axis=-1)

    model = _save(ct, prog, tmp_path / "cls.mlpackage",
                  classifier_config=ct.ClassifierConfig(["cat", "dog", "owl"]))
    assert model.classes == ["cat", "dog", "owl"]
    x = RS.standard_normal((1, 4)).astype(np.float32)
    out = model.predict({"x": x})
    logits = x @ w.T
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    prob_name = model.predicted_probabilities
    np.testing.assert_allclose(out[prob_name], probs, rtol=1e-5)
    assert out[model.predicted_feature].item() == ["cat", "dog", "owl"][int(np.argmax(probs))]
    # the runtime session exposes only the numeric output
    sess = cr.CoreMLReference().load(tmp_path / "cls.mlpackage")
    assert [t.name for t in sess.outputs] == [prob_name]
    np.testing.assert_allclose(sess.run([x])[0], probs, rtol=1e-5)
    # a batch of two runs sample by sample
    xb = RS.standard_normal((2, 4)).astype(np.float32)
    pb = model.predict({"x": xb})
    assert pb[prob_name].shape == (2, 3) and pb[model.predicted_feature].shape == (2,)


# --------------------------------------------------------------------------------------
# errors, runtime seam, reader
# --------------------------------------------------------------------------------------

def test_unsupported_op_is_named(ct, mb, tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 4))])
    def prog(x):
        return mb.band_part(x=mb.relu(x=x), lower=0, upper=1)

    with pytest.raises(cr.UnsupportedMilOp, match="^unsupported MIL op band_part") as e:
        _save(ct, prog, tmp_path / "u.mlpackage")
    assert isinstance(e.value, EdgepipeError) and isinstance(e.value, UnsupportedArtifact)
    assert e.value.hint
    # the runtime says so up front, from the spec alone
    desc = cr.describe(tmp_path / "u.mlpackage")
    assert desc.unsupported == ["band_part"] and not desc.compiled
    assert cr.CoreMLReference().check(tmp_path / "u.mlpackage", "coreml") == "unsupported MIL op band_part"


def test_bad_inputs_and_bad_packages(ct, mb, tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 4, 4))])
    def prog(x):
        return mb.conv(x=x, weight=RS.standard_normal((2, 3, 3, 3)).astype(np.float32), pad_type="same", name="y")

    model = _save(ct, prog, tmp_path / "ok.mlpackage")
    with pytest.raises(UserError, match="shape"):
        model.predict({"x": np.zeros((1, 3, 5, 4), np.float32)})
    with pytest.raises(UserError, match="missing input"):
        model.predict({})
    # a neuralnetwork model is refused with a fix
    nn = ct.convert(prog, convert_to="neuralnetwork")
    nn.save(str(tmp_path / "nn.mlmodel"))
    with pytest.raises(cr.MilFormatError, match="not an ML program"):
        cr.load_program(tmp_path / "nn.mlmodel")
    # a weight file whose blob header was overwritten is reported, not misread
    bad = tmp_path / "bad.mlpackage"
    shutil.copytree(tmp_path / "ok.mlpackage", bad)
    wfile = next(bad.rglob("weight.bin"))
    data = bytearray(wfile.read_bytes())
    data[64:68] = b"\0\0\0\0"  # first blob's sentinel
    wfile.write_bytes(bytes(data))
    with pytest.raises(cr.MilFormatError, match="corrupt"):
        cr.load_program(bad)
    wfile.unlink()
    with pytest.raises(cr.MilFormatError, match="missing"):
        cr.load_program(bad)
    assert [s.name for s in cr.describe(bad).inputs] == ["x"]  # describing reads no weights
    with pytest.raises(UserError):
        cr.load_program(tmp_path / "nothing.mlpackage")


def test_reader_agrees_with_coremltools_protobuf(ct, conv_model):
    """Our wire-format reader sees the same ops, names and inputs as coremltools' protobuf classes."""
    model, _ = conv_model
    spec = ct.models.MLModel(str(model.path), skip_model_load=True).get_spec()
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    assert model.opset == fn.opset
    assert [op.type for op in model.ops] == [op.type for op in block.operations]
    assert [[o[0] for o in op.outputs] for op in model.ops] == [[o.name for o in op.outputs] for op in block.operations]
    assert [sorted(op.inputs) for op in model.ops] == [sorted(op.inputs) for op in block.operations]
    assert model.block_outputs == list(block.outputs)
    assert [i.name for i in model.inputs] == [i.name for i in spec.description.input]


def test_runtime_registration_and_session(conv_model):
    from edgepipe.devices.runtimes.base import get_runtime, runtimes_for

    model, out = conv_model
    rt = get_runtime("coreml", "reference")
    assert isinstance(rt, cr.CoreMLReference) and rt.name == "coreml-reference"
    assert rt.check(model.path, "coreml") is None
    assert rt.check(model.path, "tflite") is not None
    sess = rt.load(model.path)
    assert sess.input_kind == "tensor"
    assert [(t.name, t.shape) for t in sess.inputs] == [("x", list(X_CONV.shape))]
    res = sess.run([X_CONV])
    assert len(res) == len(sess.outputs) == len(CONV_CASES)
    for t, y in zip(sess.outputs, res):
        np.testing.assert_array_equal(y, out[t.name])
    from edgepipe.devices.runtimes.base import RunOptions

    one = rt.load(model.path, RunOptions(threads=1))  # BLAS limited to one thread: same numbers
    for a, b in zip(one.run([X_CONV]), res):
        np.testing.assert_array_equal(a, b)
    native = {r.target: r for r in runtimes_for("coreml") if r.name == "coreml"}
    assert set(native) == {"cpu", "gpu"}
    if sys.platform != "darwin":
        for r in native.values():
            assert r.available() == "Core ML runtime needs macOS"
            assert r.check(model.path, "coreml") == "Core ML runtime needs macOS"


def test_loading_and_running_imports_neither_tensorflow_nor_coremltools(conv_model):
    model, _ = conv_model
    code = (
        "import sys, numpy as np\n"
        "from edgepipe.devices.runtimes.base import get_runtime\n"
        f"s = get_runtime('coreml', 'reference').load({str(model.path)!r})\n"
        f"s.run([np.zeros({tuple(X_CONV.shape)}, np.float32)])\n"
        "bad = [m for m in ('tensorflow', 'coremltools', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------------------
# model level (slow): Keras -> Core ML fp16 / int8 / palettized, checked against Keras
# --------------------------------------------------------------------------------------

# Tolerances on logits (cosine similarity; max error / max |reference|), set from measurements:
# * fp16: weights and activations keep 11 significant bits (relative step ~1e-3); the rounding
#   noise of 10-30 stacked layers adds up to a few percent of the largest logit. Measured
#   rel_max 0.0003 (residual), 0.004 (inception), 0.032 (MobileNet), up to 0.085 on the seed
#   applications (InceptionV3); cosine >= 0.9977 everywhere.
# * int8 per-channel symmetric weights (plus fp16): up to 1/254 of each channel's range per
#   weight. Random-init nets have no learned redundancy, so MobileNet's 28 layers amplify it:
#   measured cosine 0.978 / rel_max 0.27 there, 0.9993 / 0.037 and 0.99998 / 0.005 on the others.
# * 6-bit palettized (64 k-means levels per tensor): coarser again. Measured cosine 0.937 /
#   rel_max 0.68 on MobileNet, 0.9965 / 0.084 (inception), 0.9998 / 0.014 (residual).
# What must fail lands outside even the loosest line: a 2x ImageType scale measured
# rel_max 1.4-16 (cosine -0.21..0.91); a shuffled weight tensor likewise (see the tests).
TOL = {
    "fp16": {"cosine": 0.995, "rel_max": 0.15},
    "int8": {"cosine": 0.95, "rel_max": 0.4},
    "palettized": {"cosine": 0.85, "rel_max": 0.9},
}


def calibrate_bn(model, x, seed=1):
    """Give BatchNorm layers random affine terms and statistics that fit ``x`` (momentum 0)."""
    import keras

    rs = np.random.RandomState(seed)
    into_add = set()
    for layer in model.layers:  # residual branches end small, as trained ResNets do
        if isinstance(layer, keras.layers.Add):
            for t in layer.input:
                op = t._keras_history[0]
                if isinstance(op, keras.layers.BatchNormalization):
                    into_add.add(op.name)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            lo, hi = (0.1, 0.3) if layer.name in into_add else (0.5, 1.5)
            if layer.gamma is not None:
                layer.gamma.assign(rs.uniform(lo, hi, layer.gamma.shape).astype("float32"))
            if layer.beta is not None:
                layer.beta.assign(rs.normal(0, 0.2, layer.beta.shape).astype("float32"))
            layer.momentum = 0.0
    model(x, training=True)  # Keras 3 updates moving statistics inside call()


def residual_model(size=48):
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(11)
    inp = keras.Input((size, size, 3))
    x = L.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inp)
    x = L.ReLU()(L.BatchNormalization()(x))
    for filters, stride in ((16, 1), (32, 2)):
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        y = L.ReLU()(L.BatchNormalization()(y))
        y = L.BatchNormalization()(L.Conv2D(filters, 3, padding="same", use_bias=False)(y))
        if stride != 1 or x.shape[-1] != filters:
            x = L.BatchNormalization()(L.Conv2D(filters, 1, strides=stride, use_bias=False)(x))
        x = L.ReLU()(L.Add()([x, y]))
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10)(x), name="residual")


def inception_model(size=40):
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(12)
    inp = keras.Input((size, size, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(24, 3, strides=2, use_bias=False)(inp)))
    b1 = L.Conv2D(16, 1, activation="relu")(x)
    b2 = L.Conv2D(16, 3, padding="same", activation="relu")(L.Conv2D(12, 1, activation="relu")(x))
    b3 = L.Conv2D(8, 3, padding="same", dilation_rate=2, activation="relu")(L.Conv2D(8, 1, activation="relu")(x))
    b4 = L.Conv2D(8, 1, activation="relu")(L.AveragePooling2D(3, strides=1, padding="same")(x))
    x = L.Concatenate()([b1, b2, b3, b4])
    r1 = L.Conv2D(32, 3, strides=2, activation="relu")(x)
    r2 = L.SeparableConv2D(32, 3, strides=2, activation="relu")(x)
    r3 = L.MaxPooling2D(3, strides=2)(x)
    x = L.Concatenate()([r1, r2, r3])
    x = L.BatchNormalization()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10)(x), name="inception")


def mobilenet_model(size=64):
    import keras

    keras.utils.set_random_seed(13)
    return keras.applications.MobileNet(input_shape=(size, size, 3), weights=None, classes=10,
                                        classifier_activation=None)


# name: (builder, size, ImageType kwargs, how Keras sees the raw pixels)
MODELS = {
    "mobilenet": (mobilenet_model, 64, dict(scale=1 / 127.5, bias=[-1.0, -1.0, -1.0]), lambda p: p / 127.5 - 1),
    "residual": (residual_model, 48, dict(scale=0.017, bias=[-2.1, -2.0, -1.8], color_layout="BGR"),
                 lambda p: p[..., ::-1] * 0.017 + np.array([-2.1, -2.0, -1.8], np.float32)),
    "inception": (inception_model, 40, dict(scale=1 / 255.0, bias=[0.0, 0.0, 0.0]), lambda p: p / 255.0),
}


def _image_type(ct, size, kw):
    kw = dict(kw)
    if "color_layout" in kw:
        kw["color_layout"] = getattr(ct.colorlayout, kw["color_layout"])
    return ct.ImageType(shape=(1, size, size, 3), **kw)


@pytest.fixture(scope="module")
def keras_artifacts(ct, tmp_path_factory):
    """For each small model: Keras logits and fp16 / int8 / palettized .mlpackage paths."""
    import coremltools.optimize.coreml as cto

    d = tmp_path_factory.mktemp("models")
    rs = np.random.RandomState(5)
    out = {}
    for name, (build, size, it_kw, prep) in MODELS.items():
        model = build(size)
        pixels = rs.randint(0, 256, (10, size, size, 3)).astype(np.float32)
        calibrate_bn(model, prep(pixels[2:]))
        pixels = pixels[:2]
        ref = model(prep(pixels)).numpy()
        ml = ct.convert(model, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                        inputs=[_image_type(ct, size, it_kw)])
        paths = {"fp16": d / f"{name}_fp16.mlpackage"}
        ml.save(str(paths["fp16"]))
        q = cto.linear_quantize_weights(ml, cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", granularity="per_channel", weight_threshold=0)))
        paths["int8"] = d / f"{name}_int8.mlpackage"
        q.save(str(paths["int8"]))
        p = cto.palettize_weights(ml, cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            nbits=6, mode="kmeans", weight_threshold=0)))
        paths["palettized"] = d / f"{name}_pal6.mlpackage"
        p.save(str(paths["palettized"]))
        out[name] = {"keras": model, "pixels": pixels, "ref": ref, "paths": paths, "size": size,
                     "it_kw": it_kw, "prep": prep}
    return out


def _run(path, pixels):
    model = cr.load_program(path)
    (name,) = [s.name for s in model.outputs]
    return model, model.predict({model.inputs[0].name: pixels})[name]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "int8", "palettized"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keras_model_variants_match_keras(keras_artifacts, name, variant):
    art = keras_artifacts[name]
    model, y = _run(art["paths"][variant], art["pixels"])
    marker = {"fp16": None, "int8": "constexpr_affine_dequantize", "palettized": "constexpr_lut_to_dense"}[variant]
    if marker:
        assert marker in model.op_counts()
    assert model.compute_precision == "fp16"
    a = agreement(y, art["ref"])
    assert passes(a, TOL[variant]), a


@pytest.mark.slow
def test_session_runs_image_models_on_raw_pixels(keras_artifacts):
    from edgepipe.devices.runtimes.base import get_runtime

    art = keras_artifacts["residual"]
    sess = get_runtime("coreml", "reference").load(art["paths"]["fp16"])
    assert sess.input_kind == "image"
    assert sess.inputs[0].shape == [1, 48, 48, 3]
    (y,) = sess.run([art["pixels"]])  # batch of 2 through a batch-1 program
    assert y.shape == (2, 10)
    assert passes(agreement(y, art["ref"]), TOL["fp16"])


@pytest.mark.slow
def test_wrong_image_scale_is_caught(ct, keras_artifacts, tmp_path):
    art = keras_artifacts["residual"]
    kw = dict(art["it_kw"], scale=art["it_kw"]["scale"] * 2)  # e.g. 1/127.5 where 1/255 was meant
    ml = ct.convert(art["keras"], convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                    inputs=[_image_type(ct, art["size"], kw)])
    ml.save(str(tmp_path / "wrong.mlpackage"))
    _, y = _run(tmp_path / "wrong.mlpackage", art["pixels"])
    a = agreement(y, art["ref"])
    assert not passes(a, TOL["fp16"]), a
    assert not passes(a, TOL["palettized"]), a  # fails even the loosest tolerance


def _blobs(path: Path):
    """(data offset, size, dtype code) of each blob in a MIL weight file, read independently."""
    data = path.read_bytes()
    count = struct.unpack_from("<I", data, 0)[0]
    off, out = 64, []
    for _ in range(count):
        sentinel, dt, size, doff = struct.unpack_from("<IIQQ", data, off)
        assert sentinel == 0xDEADBEEF
        out.append((doff, size, dt))
        off = (doff + size + 63) // 64 * 64
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_tampered_weight_file_is_caught(keras_artifacts, tmp_path, variant):
    art = keras_artifacts["inception"]
    bad = tmp_path / "tampered.mlpackage"
    shutil.copytree(art["paths"][variant], bad)
    wfile = next(bad.rglob("weight.bin"))
    blobs = _blobs(wfile)
    doff, size, dt = max(blobs, key=lambda b: b[1])  # the largest weight tensor
    data = bytearray(wfile.read_bytes())
    item = {1: 2, 2: 4}.get(dt, 1)  # fp16 / fp32 / 8-bit
    vals = np.frombuffer(bytes(data[doff:doff + size]), np.dtype(f"u{item}")).copy()
    np.random.RandomState(0).shuffle(vals)  # same values, wrong places: still a valid tensor
    data[doff:doff + size] = vals.tobytes()
    wfile.write_bytes(bytes(data))
    _, y_ok = _run(art["paths"][variant], art["pixels"])
    _, y_bad = _run(bad, art["pixels"])
    assert passes(agreement(y_ok, art["ref"]), TOL[variant])
    a = agreement(y_bad, art["ref"])
    assert not passes(a, TOL[variant]), a


@pytest.mark.slow
def test_fp32_program_matches_keras_tightly(ct, keras_artifacts, tmp_path):
    """With fp32 compute the interpreter reproduces Keras to float32 rounding: semantics, not luck."""
    art = keras_artifacts["inception"]
    ml = ct.convert(art["keras"], convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                    inputs=[_image_type(ct, art["size"], art["it_kw"])])
    ml.save(str(tmp_path / "fp32.mlpackage"))
    model, y = _run(tmp_path / "fp32.mlpackage", art["pixels"])
    assert model.compute_precision == "fp32"
    np.testing.assert_allclose(y, art["ref"], rtol=1e-4, atol=1e-4 * np.abs(art["ref"]).max())


# --------------------------------------------------------------------------------------
# the seed applications at their smallest sizes (slow: ~2 minutes of conversion in all)
# --------------------------------------------------------------------------------------

CAFFE_MEAN = [103.939, 116.779, 123.68]
SEED_APPS = [  # (application, smallest size, preprocessing mode)
    ("VGG16", 32, "caffe"), ("ResNet50", 32, "caffe"), ("InceptionV3", 75, "tf"), ("Xception", 71, "tf"),
    ("MobileNet", 32, "tf"), ("MobileNetV2", 32, "tf"), ("MobileNetV3Small", 32, "raw"),
]


@pytest.mark.slow
@pytest.mark.parametrize("app,size,mode", SEED_APPS, ids=[a[0] for a in SEED_APPS])
def test_seed_application_runs_and_matches_keras(ct, tmp_path, app, size, mode):
    import keras

    keras.utils.set_random_seed(21)
    model = getattr(keras.applications, app)(input_shape=(size, size, 3), weights=None, classes=10,
                                              classifier_activation=None)
    pixels = np.random.RandomState(9).randint(0, 256, (10, size, size, 3)).astype(np.float32)
    if mode == "caffe":  # BGR, mean subtracted, no scaling
        it = ct.ImageType(shape=(1, size, size, 3), bias=[-m for m in CAFFE_MEAN], color_layout=ct.colorlayout.BGR)
        prep = lambda p: p[..., ::-1] - np.array(CAFFE_MEAN, np.float32)  # noqa: E731
    elif mode == "tf":
        it = ct.ImageType(shape=(1, size, size, 3), scale=1 / 127.5, bias=[-1.0, -1.0, -1.0])
        prep = lambda p: p / 127.5 - 1  # noqa: E731
    else:  # MobileNetV3 rescales inside the model
        it = ct.ImageType(shape=(1, size, size, 3))
        prep = lambda p: p  # noqa: E731
    calibrate_bn(model, prep(pixels[2:]))
    ref = model(prep(pixels[:2])).numpy()
    ct.convert(model, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
               inputs=[it]).save(str(tmp_path / "app.mlpackage"))
    _, y = _run(tmp_path / "app.mlpackage", pixels[:2])
    a = agreement(y, ref)
    assert passes(a, TOL["fp16"]), a
