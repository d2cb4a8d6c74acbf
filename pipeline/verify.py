"""Verification: run an artifact in its runtime and compare with the source model.

`compare()` is the one comparison helper, used by export's verification stage and by
the tests. Figures per artifact: max/mean absolute error, cosine similarity, centered
cosine (Pearson correlation per sample: insensitive to the near-constant offset a
softmax output has) and top-1 agreement. Pass criteria are per precision.

The runtime that runs a format's artifacts here is the one its Format declares
(``Format.verifier_for_host()``); it also describes the artifacts' inputs and outputs
(``describe_io``). This module is the export side's one door into devices' runtimes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from edgepipe.devices import Runtime, runtimes_for, to_tensor_info
from edgepipe.export import format_class, formats
from edgepipe.pipeline.base.manifest import TensorInfo, Verification
from edgepipe.pipeline.base.records import VerificationSet

Outputs = Union[np.ndarray, list[np.ndarray]]

# Per precision: minimum mean centered cosine, maximum error relative to the
# reference's output range, minimum top-1 agreement on confidently-predicted samples.
# fp32 is near-exact (different kernels, same arithmetic); fp16 loses ~3 decimal
# digits; weight-only quantization and int16 activations stay close; full int8 is
# looser but real: a wrong scale, dropped weights or a broken layer fall far below.
# When the outputs are probabilities (softmax), the centered cosine is taken on
# log-probabilities floored at 1/256 (the int8 output step): that compares logits up
# to a constant, where quantization error is additive, instead of letting one
# saturated class dominate. The max-error bound applies to fp32/fp16 only: a
# quantized model legitimately moves single probabilities by more.
PROB_FLOOR = 1.0 / 256
#
# "input_correlation" compares only what depends on the input: each output minus its
# mean over the verification samples. A model whose outputs are dominated by biases
# matches a constant (input-independent, i.e. broken) artifact on the per-sample
# measure; it cannot on this one.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"centered_cosine": 0.9999, "input_correlation": 0.999, "rel_max_abs": 0.01, "top1": 0.99},
    "fp16": {"centered_cosine": 0.995, "input_correlation": 0.99, "rel_max_abs": 0.1, "top1": 0.9},
    "dynamic": {"centered_cosine": 0.97, "input_correlation": 0.8, "top1": 0.8},
    "int16x8": {"centered_cosine": 0.97, "input_correlation": 0.8, "top1": 0.8},
    "palettized": {"centered_cosine": 0.93, "input_correlation": 0.7, "top1": 0.7},
    "int8": {"centered_cosine": 0.80, "input_correlation": 0.5, "top1": 0.5},
}
# An untrained model (a built-in with --weights none) is chaotic: rounding its weights
# to 8 bits alone can move its output correlation to ~0.7 (InceptionV3 at 75 px), so
# its quantized artifacts are held to a structural bound only: they must still track
# the source model (a dropped weight, wrong scale or dead layer falls to ~0). fp32
# and fp16 stay strict for every model.
UNTRAINED_QUANTIZED = {"centered_cosine": 0.5}
QUANTIZED = ("dynamic", "int8", "int16x8", "palettized")


def thresholds_for(precision: str, trained: bool = True) -> dict:
    if not trained and precision in QUANTIZED:
        return dict(UNTRAINED_QUANTIZED, untrained=1.0)
    return dict(THRESHOLDS.get(precision, THRESHOLDS["int8"]))


# Full int8 is where verification and accuracy part ways: a broken int8 conversion (a
# wrong input scale, dropped weights, a mis-quantized layer) lands far below 0.8
# (tests/test_verify.py shows ~0.5 and lower), while a correct one of a trained model is
# typically above 0.95. The accuracy budget itself is `edgepipe check`'s job, on labels.


@dataclass
class Comparison:
    max_abs: float
    mean_abs: float
    cosine: float
    centered_cosine: float
    top1_agreement: Optional[float]
    rel_max_abs: float
    confident: int
    passed: bool
    failures: list[str]
    thresholds: dict
    input_correlation: Optional[float] = None


def _flat(xs: Union[Outputs, Sequence[np.ndarray]]) -> np.ndarray:
    if isinstance(xs, (list, tuple)):
        arrs = [np.asarray(x, np.float64).reshape(np.asarray(x).shape[0], -1) for x in xs]
        return np.concatenate(arrs, axis=1)
    x = np.asarray(xs, np.float64)
    return x.reshape(x.shape[0], -1)


def compare(outputs: Outputs, reference: Outputs, precision: str = "fp32",
            thresholds: Optional[dict] = None) -> Comparison:
    """Compare artifact outputs with reference outputs, both (N, ...) arrays (or lists of them)."""
    a, r = _flat(outputs), _flat(reference)
    if a.shape != r.shape:
        return Comparison(float("inf"), float("inf"), 0.0, 0.0, 0.0, float("inf"), 0, False,
                          [f"output shape {a.shape} != reference {r.shape}"], {}, 0.0)
    th = dict(thresholds or THRESHOLDS.get(precision, THRESHOLDS["int8"]))
    finite = bool(np.isfinite(a).all())
    diff = np.abs(a - r)
    max_abs = float(diff.max()) if finite else float("inf")
    mean_abs = float(diff.mean()) if finite else float("inf")
    rng = float(r.max() - r.min())
    rel = max_abs / rng if rng > 0 else (0.0 if max_abs == 0 else float("inf"))
    cos = _cos(a.ravel(), r.ravel()) if finite else 0.0
    space = "output"
    if finite and _is_probability(r):
        space = "log-probability"
        a_, r_ = np.log(np.maximum(a, PROB_FLOOR)), np.log(np.maximum(r, PROB_FLOOR))
    else:
        a_, r_ = a, r
    ac = a_ - a_.mean(axis=1, keepdims=True)
    rc = r_ - r_.mean(axis=1, keepdims=True)
    cc = float(np.mean([_cos(x, y) for x, y in zip(ac, rc)])) if finite else 0.0
    ic = None
    if finite and len(r_) > 1:
        ra, rr = a_ - a_.mean(0), r_ - r_.mean(0)
        # only meaningful when the reference itself varies with the input
        if np.abs(rr).max() > 1e-4 * max(1.0, float(np.abs(r_).max())):
            ic = _cos(ra.ravel(), rr.ravel())
    top1, confident = None, 0
    if r.shape[1] > 1:
        # Agreement counted where the reference's top-1 margin exceeds the observed
        # error: a near-tie (common in untrained models) is not a disagreement.
        srt = np.sort(r, axis=1)
        margin = srt[:, -1] - srt[:, -2]
        mask = margin > 2 * max_abs if finite else np.ones(len(r), bool)
        confident = int(mask.sum())
        if confident:
            top1 = float(np.mean(a[mask].argmax(1) == r[mask].argmax(1)))
        else:
            top1 = float(np.mean(a.argmax(1) == r.argmax(1)))
    failures = []
    if not finite:
        failures.append("non-finite outputs")
    if cc < th["centered_cosine"]:
        failures.append(f"centered cosine {cc:.4f} < {th['centered_cosine']}")
    if ic is not None and "input_correlation" in th and ic < th["input_correlation"]:
        failures.append(f"input-dependent correlation {ic:.4f} < {th['input_correlation']}")
    if "rel_max_abs" in th and rel > th["rel_max_abs"]:
        failures.append(f"max abs error {max_abs:.4g} is {rel:.3f} of the output range > {th['rel_max_abs']}")
    if top1 is not None and confident and "top1" in th and top1 < th["top1"]:
        failures.append(f"top-1 agreement {top1:.3f} < {th['top1']}")
    th["space"] = space
    return Comparison(max_abs, mean_abs, cos, cc, top1, rel, confident, not failures, failures, th, ic)


def _is_probability(r: np.ndarray) -> bool:
    return r.shape[1] > 1 and bool((r >= -1e-6).all()) and bool(np.allclose(r.sum(axis=1), 1.0, atol=1e-2))


def _cos(x: np.ndarray, y: np.ndarray) -> float:
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx == 0 and ny == 0:
        return 1.0
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.dot(x, y) / (nx * ny))


def verifier(fmt: str) -> tuple[str, Runtime]:
    """(the format name the runtime knows, the runtime) that runs ``fmt`` artifacts on this host.
    LookupError when that runtime is not registered here."""
    f = format_class(fmt)()
    name, target = f.verifier_for_host()
    runs_as = f.runs_as()
    for rt in runtimes_for(runs_as, target):
        if rt.name == name:
            return runs_as, rt
    raise LookupError(f"no {name} runtime installed")


def verifier_name(fmt: str) -> str:
    return format_class(fmt)().verifier_for_host()[0]


def describe_io(path: Path, fmt: str) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """An artifact's inputs and outputs, as its verifier runtime loads it."""
    runs_as, rt = verifier(fmt)
    why = rt.check(path, runs_as)
    if why:
        raise LookupError(why)
    with rt.load(path) as s:
        return [to_tensor_info(t) for t in s.inputs], [to_tensor_info(t) for t in s.outputs]


def run_artifact(path: Path, fmt: str, raw: np.ndarray, data: np.ndarray,
                 runtime: Optional[Runtime] = None) -> Outputs:
    """Run every sample through an artifact; image-input artifacts get raw pixels."""
    known = formats()
    f = known[fmt]() if fmt in known else None  # a runtime may run a format edgepipe does not export
    if runtime is None:
        runs_as, runtime = verifier(fmt)
    else:
        runs_as = f.runs_as() if f is not None else fmt
    reason = f.unverifiable(Path(path)) if f is not None else None
    if reason:
        raise LookupError(reason)
    why = runtime.check(path, runs_as)
    if why:
        raise LookupError(why)
    outs = []
    with runtime.load(path) as s:
        image = getattr(s, "input_kind", "tensor") == "image"
        for i in range(data.shape[0]):
            x = raw[i : i + 1] if image else data[i : i + 1]
            y = s.run([x])
            outs.append(y if len(y) > 1 else y[0])
    if isinstance(outs[0], list):
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    return np.concatenate(outs)


def _fill(v: Verification, c: Comparison) -> None:
    v.max_abs, v.mean_abs, v.cosine = c.max_abs, c.mean_abs, c.cosine
    v.centered_cosine, v.top1_agreement = c.centered_cosine, c.top1_agreement
    v.input_correlation = c.input_correlation
    v.thresholds = c.thresholds
    v.status = "passed" if c.passed else "failed"
    v.reason = None if c.passed else "; ".join(c.failures)


def verify_artifact(path: Path, fmt: str, precision: str, vset: VerificationSet,
                    trained: bool = True) -> Verification:
    """Run an artifact on the verification set and compare with the source model's outputs, with
    the thresholds of its precision (``thresholds_for(precision, trained)``)."""
    t0 = time.perf_counter()
    v = Verification(checker=verifier_name(fmt), samples=vset.n, data=vset.source)
    try:
        out = run_artifact(path, fmt, vset.raw, vset.data)
    except LookupError as e:
        v.status = "not_verified"
        v.reason = f"not verified: {e}"
        return v
    except Exception as e:  # an unsupported op in the reference interpreter, a runtime crash...
        v.status = "not_verified" if "unsupported" in str(e).lower() else "failed"
        v.reason = f"{'not verified' if v.status == 'not_verified' else 'runtime error'}: {str(e).splitlines()[0][:300]}"
        return v
    _fill(v, compare(out, vset.reference, precision, thresholds_for(precision, trained)))
    v.seconds = round(time.perf_counter() - t0, 3)
    return v
