"""Trace a loaded model once, with a static batch of 1, for every format to reuse."""
from __future__ import annotations

import time
from typing import Any

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.records import LoadedModel, Traced


def trace(lm: LoadedModel) -> Traced:
    tf = lazy.tensorflow()
    t0 = time.perf_counter()
    src = lm.source
    spec = tf.TensorSpec(tuple(src.input_shape), tf.float32, name=src.input_name)
    if lm.is_keras:
        model = lm.model

        @tf.function(input_signature=[spec], autograph=False)
        def serve(x: Any) -> Any:
            y = model(x, training=False)
            if isinstance(y, (list, tuple)) and len(y) == 1:
                y = y[0]
            if isinstance(y, dict):
                y = [y[k] for k in sorted(y)]
                y = y[0] if len(y) == 1 else y
            return y
    else:
        sig = lm.model.signatures["serving_default"]
        in_key, in_spec = next(iter(sig.structured_input_signature[1].items()))
        out_keys = sorted(sig.structured_outputs.keys())

        @tf.function(input_signature=[spec], autograph=False)
        def serve(x: Any) -> Any:
            out = sig(**{in_key: tf.cast(x, in_spec.dtype)})
            ys = [tf.cast(out[k], tf.float32) for k in out_keys]
            return ys[0] if len(ys) == 1 else ys

    cf = serve.get_concrete_function()
    outs = cf.structured_outputs
    first = outs[0] if isinstance(outs, (list, tuple)) else outs
    out_shape = tuple(int(d) if d is not None else -1 for d in first.shape)
    src.output_shape = list(out_shape)
    if len(out_shape) == 2 and out_shape[-1] > 1:
        src.num_classes = int(out_shape[-1])
    return Traced(lm, serve, cf, tuple(src.input_shape), out_shape,
                  timings={"trace_s": round(time.perf_counter() - t0, 3)})
