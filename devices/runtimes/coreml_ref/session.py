"""The Core ML reference interpreter (a numpy ``MilModel``), its Session and the Core ML runtimes.

Inputs, as ``MilModel.predict`` and the session's ``run`` take them
    * Image inputs (``ct.ImageType``): raw pixels 0-255, NHWC (batch first; a single HWC image is
      accepted), float or uint8, channels in RGB order (1 channel for grayscale), whatever the model's
      declared color layout: the interpreter reorders to BGR when the spec says BGR, then feeds NCHW to
      the program, whose first ops apply the ImageType's scale and bias. Like a CVPixelBuffer, 8-bit
      images carry integers: values are rounded to the nearest integer; values outside 0-255 are
      refused (they mean the caller passed preprocessed data).
    * Tensor inputs: arrays of the declared shape (cast to the declared dtype).
    * A batch larger than the program's fixed batch of 1 runs sample by sample, outputs stacked.

Outputs
    ``predict`` returns ``{output name: np.ndarray}`` in the spec's output order. For a classifier
    (``ct.ClassifierConfig``) the probabilities output holds the probability tensor fed to the
    ``classify`` op (its own shape, class order of ``MilModel.classes``) and the label output holds
    the top class as a 0-d array.

Runtimes: ``coreml-reference`` on the ``reference`` target (any OS; bench measures it with the
worker), and Apple's Core ML through coremltools on macOS (``coreml`` on cpu and gpu).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image

try:  # BLAS threads (matmul/conv); threadpoolctl ships with scikit-learn
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

from edgepipe.pipeline.base.errors import EdgepipeError, UserError
from edgepipe.pipeline.base.util import pkg_version

from edgepipe.devices.onboard.agent import Tensor
from edgepipe.devices.runtimes.base import MeasureSpec, Runtime, Session
import edgepipe.devices.runtimes.coreml_ref.nn_ops  # noqa: F401  (importing it registers its ops in OPS)
from edgepipe.devices.runtimes.coreml_ref.ops import CONSTEXPR, OPS, Args
from edgepipe.devices.runtimes.coreml_ref.reader import (NP_DTYPES, Blobs, BlobRef, IOSpec, MilExecutionError,
                                                         MilFormatError, MilOp, MilType, UnsupportedMilOp, feature,
                                                         mapping, msg, one, parse_op, parse_type, text)

# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------

def _package_paths(path: Path) -> tuple[Path, Optional[Path]]:
    """(model.mlmodel spec file, folder weights are relative to)."""
    if path.is_dir():
        manifest = path / "Manifest.json"
        if not manifest.is_file():
            raise MilFormatError(f"{path} is not an .mlpackage (no Manifest.json)",
                                 "Give the .mlpackage folder the Core ML export wrote")
        try:
            man = json.loads(manifest.read_text())
            root = man["rootModelIdentifier"]
            rel = man["itemInfoEntries"][root]["path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MilFormatError(f"{manifest} is unreadable ({e})", "Re-export the Core ML artifact") from None
        spec = path / "Data" / rel
        if not spec.is_file():
            raise MilFormatError(f"{path} lacks its model spec {rel}", "Re-export the Core ML artifact")
        return spec, spec.parent
    if path.is_file():
        return path, path.parent
    raise UserError(f"no Core ML model at {path}", "Give the path of an .mlpackage")


class MilModel:
    """A loaded ML program, ready to ``predict``. Build it with :func:`load_program`."""

    def __init__(self, path: Path, compile: bool = True):
        self.path = path
        spec_path, model_dir = _package_paths(path)
        top = msg(memoryview(spec_path.read_bytes()))
        self.spec_version = one(top, 1, 0)
        if 502 not in top:
            kinds = {200: "pipelineClassifier", 201: "pipelineRegressor", 202: "pipeline",
                     500: "neuralNetwork", 403: "neuralNetworkClassifier", 404: "neuralNetworkRegressor"}
            kind = next((v for k, v in kinds.items() if k in top), "a non-ML-program model")
            raise MilFormatError(f"{path.name} is {kind}, not an ML program",
                                 "Convert with convert_to='mlprogram' to verify it with the reference interpreter")
        desc = msg(one(top, 2, b""))
        self.description_inputs = [feature(b) for b in desc.get(1, [])]
        self.description_outputs = [feature(b) for b in desc.get(10, [])]
        self.predicted_feature = text(one(desc, 11)) or None
        self.predicted_probabilities = text(one(desc, 12)) or None
        self.metadata = {}
        if 100 in desc:
            self.metadata = mapping(msg(one(desc, 100)), 100, text)

        blobs = Blobs(model_dir)
        try:
            prog = msg(one(top, 502))
            funcs = mapping(prog, 2, lambda b: b)
            if "main" not in funcs:
                raise MilFormatError(f"{path.name} has no 'main' function", "Re-export the Core ML artifact")
            fn = msg(funcs["main"])
            self.func_inputs = [(text(one(msg(b), 1, b"")), parse_type(one(msg(b), 2, b"")))
                                for b in fn.get(1, [])]
            self.opset = text(one(fn, 2, b""))
            blocks = mapping(fn, 3, lambda b: b)
            block_buf = blocks.get(self.opset) or next(iter(blocks.values()), None)
            if block_buf is None:
                raise MilFormatError(f"{path.name}: main has no block", "Re-export the Core ML artifact")
            block = msg(block_buf)
            self.block_outputs = [text(v) for v in block.get(2, [])]
            self.ops = [parse_op(b, blobs) for b in block.get(3, [])]
            self._scan_classify()
            self.unsupported = sorted({op.type for op in self.ops if op.type != "const" and op.type not in OPS
                                       and op.type not in CONSTEXPR})
            self.consts: dict[str, Any] = {}
            self.steps: list[tuple[MilOp, Callable, list]] = []
            self.compiled = compile
            if compile:
                self._read_weights(blobs)
                self._compile()
        finally:
            blobs.close()
        self._io()

    # -- load-time work ------------------------------------------------------------------
    def _scan_classify(self):
        self.classes: Optional[list] = None
        self._classify_vars: dict[str, str] = {}
        for op in self.ops:
            if op.type == "classify" and len(op.outputs) == 2:
                cl = op.inputs.get("classes", [])
                if cl and cl[0][0] == "value" and isinstance(cl[0][1], list):
                    self.classes = [c.item() if isinstance(c, np.ndarray) else c for c in cl[0][1]]
                self._classify_vars = {op.outputs[0][0]: "label", op.outputs[1][0]: "probabilities"}

    def _read_weights(self, blobs: Blobs):
        def res(v):
            return blobs.read(v.file, v.offset, v.type) if isinstance(v, BlobRef) else v

        for op in self.ops:
            for binds in op.inputs.values():
                binds[:] = [(k, res(v)) for k, v in binds]
            for k, v in op.attrs.items():
                op.attrs[k] = res(v)

    def unsupported_error(self) -> Optional[UnsupportedMilOp]:
        if not self.unsupported:
            return None
        first, rest = self.unsupported[0], self.unsupported[1:]
        return UnsupportedMilOp(first, f"also: {', '.join(rest)}" if rest else None)

    def _compile(self):
        err = self.unsupported_error()
        if err:
            raise err
        for op in self.ops:
            if op.has_blocks:
                raise UnsupportedMilOp(op.type, "ops with nested blocks (control flow)")
            if op.type == "const":
                val = op.attrs.get("val")
                self.consts[op.outputs[0][0]] = self._cast_to(val, op.outputs[0][1])
                continue
            if op.type in CONSTEXPR:
                res = CONSTEXPR[op.type](Args(op, self.consts))
                res = res if isinstance(res, tuple) else (res,)
                for (name, t), v in zip(op.outputs, res):
                    self.consts[name] = self._cast_to(v, t)
                continue
            if op.type == "classify" and self.classes is None:
                cl = op.inputs.get("classes", [])
                v = self.consts.get(cl[0][1]) if cl and cl[0][0] == "name" else None
                if isinstance(v, (list, np.ndarray)):
                    self.classes = [c.item() if isinstance(c, np.ndarray) else c for c in v]
            casts = [(t.np_dtype, t.known_shape) for _, t in op.outputs]
            self.steps.append((op, OPS[op.type], casts))

    @staticmethod
    def _cast_to(v, t: MilType):
        if isinstance(v, np.ndarray) and t.np_dtype is not None and t.np_dtype is not np.object_ \
                and v.dtype != t.np_dtype:
            return v.astype(t.np_dtype)
        return v

    def _io(self):
        finputs = dict(self.func_inputs)
        self.inputs: list[IOSpec] = []
        for d in self.description_inputs:
            t = finputs.get(d["name"])
            if t is None:
                raise MilFormatError(f"input {d['name']} is not an input of main", "Re-export the Core ML artifact")
            pshape = t.shape or ()
            if d["kind"] == "image":
                nch = 1 if d["color"].startswith("GRAYSCALE") else 3
                if len(pshape) != 4:
                    raise MilFormatError(f"image input {d['name']} has program shape {pshape}",
                                         "Re-export the Core ML artifact")
                shape = [pshape[0], pshape[2], pshape[3], nch]
                dtype = "float16" if d["color"] == "GRAYSCALE_FLOAT16" else "float32"
                self.inputs.append(IOSpec(d["name"], "image", shape, dtype, d["color"], tuple(pshape), t.dtype))
            else:
                dt = np.dtype(NP_DTYPES.get(t.dtype, np.float32)).name
                self.inputs.append(IOSpec(d["name"], "tensor", list(pshape), dt, None, tuple(pshape), t.dtype))
        self.outputs: list[IOSpec] = []
        var_types = {name: t for op in self.ops for name, t in op.outputs}
        for i, d in enumerate(self.description_outputs):
            var = d["name"] if d["name"] in var_types or d["name"] in finputs else (
                self.block_outputs[i] if i < len(self.block_outputs) else d["name"])
            role = self._classify_vars.get(var)
            if role == "probabilities":
                probs_t = self._classify_probs_type()
                self.outputs.append(IOSpec(d["name"], "probabilities", list(probs_t.shape or [-1]), "float32", var=var))
            elif role == "label" or d["kind"] in ("string", "int64"):
                self.outputs.append(IOSpec(d["name"], "label", [], "object", var=var))
            else:
                t = var_types.get(var) or finputs.get(var)
                shape = d.get("shape") or list((t.shape if t else None) or [])
                dt = np.dtype(NP_DTYPES.get(t.dtype, np.float32)).name if t else "float32"
                self.outputs.append(IOSpec(d["name"], "tensor", list(shape), dt, var=var))

    def _classify_probs_type(self) -> MilType:
        for op in self.ops:
            if op.type == "classify":
                kind, v = op.inputs["probabilities"][0]
                if kind == "name":
                    for o in self.ops:
                        for name, t in o.outputs:
                            if name == v:
                                return t
                    for name, t in self.func_inputs:
                        if name == v:
                            return t
        return MilType("tensor", "fp32", None)

    @property
    def compute_precision(self) -> str:
        """``fp16`` when any op computes in fp16 (an fp16 program keeps fp32 only at its edges)."""
        kinds = {t.dtype for op in self.steps for _, t in op[0].outputs if t.dtype in ("fp16", "fp32")}
        return "fp16" if "fp16" in kinds else ("fp32" if kinds else "none")

    # -- run ---------------------------------------------------------------------------------
    def _feed(self, spec: IOSpec, x) -> np.ndarray:
        x = np.asarray(x)
        if spec.kind == "image":
            if x.ndim == 3:
                x = x[None]
            nch = spec.shape[3]
            if x.ndim != 4 or x.shape[3] != nch:
                raise UserError(f"image input {spec.name} takes NHWC pixels with {nch} channel(s), got shape "
                                f"{tuple(x.shape)}", f"Pass raw 0-255 pixels shaped {tuple(spec.shape)}")
            if spec.color_space == "GRAYSCALE_FLOAT16":
                x = x.astype(np.float32)
            else:
                x = x.astype(np.float32)
                if x.size and (np.nanmin(x) < -0.5 or np.nanmax(x) > 255.5):
                    raise UserError(f"image input {spec.name} got values in [{np.nanmin(x):.3g}, "
                                    f"{np.nanmax(x):.3g}]; Core ML images hold raw 8-bit pixels",
                                    "Pass raw 0-255 pixels; the model applies its own scale and bias")
                x = np.clip(np.rint(x), 0, 255)
            if spec.color_space == "BGR":
                x = x[..., ::-1]
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        want = spec.program_shape or ()
        if len(want) != x.ndim or any(w >= 0 and w != s for w, s in zip(want, x.shape)):
            raise UserError(f"input {spec.name} has shape {tuple(x.shape)}, the model expects {tuple(spec.shape)}",
                            "Resize the input to the model's input shape")
        return x.astype(NP_DTYPES.get(spec.program_dtype, np.float32), copy=False)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the program. ``inputs`` maps input names to arrays (see the module docstring)."""
        if not self.compiled:
            raise EdgepipeError("this model was only described, not loaded", "Use load_program() to run it")
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise UserError(f"missing input(s) {', '.join(missing)}",
                            f"The model takes {', '.join(s.name for s in self.inputs)}")
        arrays = {s.name: np.asarray(inputs[s.name]) for s in self.inputs}
        # A batch bigger than the program's fixed batch of 1 runs one sample at a time.
        batch = None
        for s in self.inputs:
            a = arrays[s.name]
            lead = a.shape[0] if a.ndim == len(s.shape) else 1
            if s.shape and s.shape[0] == 1 and a.ndim == len(s.shape) and lead > 1:
                batch = lead if batch is None else batch
                if lead != batch:
                    raise UserError("inputs have different batch sizes", "Give every input the same batch size")
        if batch is None:
            return self._predict_one(arrays)
        outs = [self._predict_one({k: v[i:i + 1] for k, v in arrays.items()}) for i in range(batch)]
        return {k: np.concatenate([o[k] if o[k].ndim else o[k][None] for o in outs], axis=0) for k in outs[0]}

    def _predict_one(self, arrays: dict) -> dict:
        env = dict(self.consts)
        for s in self.inputs:
            env[s.name] = self._feed(s, arrays[s.name])
        for op, fn, casts in self.steps:
            try:
                res = fn(Args(op, env))
            except EdgepipeError:
                raise
            except (ValueError, IndexError, TypeError, KeyError) as e:
                raise MilExecutionError(f"{op.type} op {op.name} failed: {e}",
                                        "The program may use a mode the interpreter lacks; verify on macOS") from e
            res = res if isinstance(res, tuple) else (res,)
            for (name, _), (dt, shape), v in zip(op.outputs, casts, res):
                if isinstance(v, np.ndarray) or np.isscalar(v):
                    v = np.asarray(v)
                    if dt is not None and dt is not np.object_ and v.dtype != dt:
                        v = v.astype(dt)
                    if shape is not None and v.shape != shape:
                        raise MilExecutionError(
                            f"{op.type} op {op.name} produced shape {v.shape}, the program declares {shape}",
                            "This is an interpreter bug or a malformed program")
                env[name] = v
        out = {}
        for spec in self.outputs:
            v = env.get(spec.var or spec.name)
            if v is None:
                raise MilExecutionError(f"output {spec.name} was never computed", "Re-export the Core ML artifact")
            if spec.kind in ("tensor", "probabilities") and np.asarray(v).dtype.kind == "f":
                v = np.asarray(v, np.float32)
            out[spec.name] = np.asarray(v)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.type] = counts.get(op.type, 0) + 1
        return counts


def load_program(path) -> MilModel:
    """Parse an .mlpackage (or bare .mlmodel) and prepare it for :meth:`MilModel.predict`.

    Raises ``UnsupportedMilOp`` at load time when an op is not implemented, ``MilFormatError``
    (an ``UnsupportedArtifact``) when the package is not a readable ML program.
    """
    return MilModel(Path(path))


def describe(path) -> MilModel:
    """Parse the spec only (inputs, outputs, ops, classes) without reading weights; cannot predict.

    ``.unsupported`` lists the op types the interpreter lacks (empty when it can run the model).
    """
    return MilModel(Path(path), compile=False)


def run_mlpackage(path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Load and run once: ``{input name: array}`` -> ``{output name: array}``."""
    return load_program(path).predict(inputs)


# --------------------------------------------------------------------------------------
# runtimes (the devices/runtimes/base.py seam)
# --------------------------------------------------------------------------------------

def _session_io(model: MilModel):
    ins = [Tensor(s.name, s.shape, s.dtype) for s in model.inputs]
    outs = [Tensor(s.name, s.shape, "float32") for s in model.outputs if s.kind in ("tensor", "probabilities")]
    kind = "image" if any(s.kind == "image" for s in model.inputs) else "tensor"
    return ins, outs, kind


class CoreMLReferenceSession(Session):
    """Runs an ML program with the numpy interpreter.

    ``input_kind == "image"``: ``run`` takes raw 0-255 RGB pixels, NHWC (the model's ImageType applies
    its own scale/bias); ``"tensor"``: arrays of the declared shape. Outputs are the numeric outputs (a
    classifier's probabilities, not its label), float32. ``threads`` limits the BLAS threads.
    """

    runtime, api = "coreml-reference", "mil-interpreter"

    def __init__(self, path: Path, spec: MeasureSpec):
        self.version = np.__version__
        self.model = load_program(path)
        self.inputs, self.outputs, self.input_kind = _session_io(self.model)
        self.threads = spec.threads
        self.facts = {"runtime": "edgepipe coreml reference interpreter (numpy)",
                      "compute_precision": self.model.compute_precision,
                      "opset": self.model.opset, "spec_version": self.model.spec_version,
                      "input_kind": self.input_kind, "threads": spec.threads}

    def run_native(self, feeds):
        feed = {t.name: x for t, x in zip(self.inputs, feeds)}
        if self.threads and threadpool_limits is not None:
            with threadpool_limits(limits=int(self.threads)):
                res = self.model.predict(feed)
        else:
            res = self.model.predict(feed)
        return [res[t.name] for t in self.outputs]


class CoreMLReference(Runtime):
    """The numpy interpreter: runs Core ML ML programs on any OS (no Apple runtime needed)."""

    name = "coreml-reference"
    target = "reference"
    formats = ("coreml",)

    def artifact_reason(self, path, fmt) -> Optional[str]:
        why = super().artifact_reason(path, fmt)
        if why:
            return why
        try:
            err = describe(path).unsupported_error()
        except EdgepipeError as e:
            return e.message
        return err.message if err else None

    def load(self, path, spec: Optional[MeasureSpec] = None) -> Session:
        return CoreMLReferenceSession(Path(path), spec or MeasureSpec())

    def versions(self) -> dict:
        return {"numpy": np.__version__, "coremltools": pkg_version("coremltools")}


class CoreMLNativeSession(Session):
    """Apple's Core ML runtime through coremltools (macOS only)."""

    runtime, api = "coreml", "coremltools.MLModel"

    def __init__(self, path: Path, spec: MeasureSpec, compute_units: str):
        import coremltools as ct  # imports TensorFlow when installed (~6 s): the macOS-only path pays it

        self.version = pkg_version("coremltools")
        self.desc = describe(path)  # I/O, image color spaces and class order, without weights
        self.ml = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        self.inputs, self.outputs, self.input_kind = _session_io(self.desc)
        self._specs = {s.name: s for s in self.desc.inputs}
        self.facts = {"runtime": "coreml", "compute_units": compute_units, "input_kind": self.input_kind,
                      "threads": spec.threads}

    def _feed_one(self, i: int, inputs) -> dict:
        feed = {}
        for t, x in zip(self.inputs, inputs):
            s, x = self._specs[t.name], np.asarray(x)
            if s.kind != "image":
                feed[t.name] = (x[i:i + 1] if x.ndim == len(s.shape) and s.shape and s.shape[0] == 1 else x) \
                    .astype(NP_DTYPES.get(s.program_dtype, np.float32))
                continue
            img = x[i] if x.ndim == 4 else x
            if s.color_space == "GRAYSCALE_FLOAT16":
                feed[t.name] = Image.fromarray(img[..., 0].astype(np.float32), mode="F")
            else:
                px = np.clip(np.rint(img.astype(np.float32)), 0, 255).astype(np.uint8)
                # PIL images are RGB (or L); Core ML converts to BGR itself when declared
                feed[t.name] = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
        return feed

    def run_native(self, feeds):
        first, spec0 = np.asarray(feeds[0]), self._specs[self.inputs[0].name]
        n = first.shape[0] if first.ndim == len(spec0.shape) and spec0.shape and spec0.shape[0] == 1 else 1
        per_out: list[list[np.ndarray]] = [[] for _ in self.outputs]
        classes = self.desc.classes or []
        for i in range(n):
            res = self.ml.predict(self._feed_one(i, feeds))
            for j, t in enumerate(self.outputs):
                v = res[t.name]
                if isinstance(v, dict):  # classifier probabilities, in the program's class order
                    v = np.array([v[c] for c in classes], np.float32).reshape(t.shape or [-1])
                v = np.asarray(v, np.float32)
                per_out[j].append(v if n == 1 else v.reshape((1,) + v.shape[1:]) if v.ndim else v[None])
        return [p[0] if n == 1 else np.concatenate(p, axis=0) for p in per_out]


class CoreMLNative(Runtime):
    """Apple's Core ML runtime on the CPU (macOS)."""

    name = "coreml"
    target = "cpu"
    formats = ("coreml",)
    compute_units = "CPU_ONLY"

    def platform_reason(self) -> Optional[str]:
        return None if sys.platform == "darwin" else "Core ML runtime needs macOS"

    def available(self) -> Optional[str]:
        if self.platform_reason():
            return self.platform_reason()
        if importlib.util.find_spec("coremltools") is None:
            return "coremltools is not installed: pip install coremltools"
        return None

    def load(self, path, spec: Optional[MeasureSpec] = None) -> Session:
        return CoreMLNativeSession(Path(path), spec or MeasureSpec(), self.compute_units)

    def versions(self) -> dict:
        return {"coremltools": pkg_version("coremltools")}


class CoreMLNativeGPU(CoreMLNative):
    """Apple's Core ML runtime with the GPU allowed (CPU_AND_GPU, macOS)."""

    target = "gpu"
    compute_units = "CPU_AND_GPU"
