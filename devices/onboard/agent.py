#!/usr/bin/env python3
"""edgepipe measurement agent: one artifact, one target, one fresh process, one JSON object on stdout.

Standalone (stdlib, NumPy, the runtime it measures; Python 3.9): copied to a board, it runs there as here
(``python agent.py --artifact m.tflite --format tflite --target cpu --runs 100 ...``: MeasureSpec.to_argv).
It holds the one Session abstraction (TFLiteSession, CompiledModelSession, ORTSession) and the one method:
load (timed), first inference (timed apart), warm-up, timed runs (write inputs + run + read every output
back, gc off) until BOTH --runs and --min-seconds are done (--max-seconds caps it: ``truncated``), a
distribution-free 95 % CI of the median, peak RSS against the RSS before loading, op placement. Chatter goes
to stderr with ``edgepipe-agent: stage NAME`` lines. Exit 0 measured, 1 error, 3 unavailable (the JSON says
why), a signal when the runtime crashed. Test hook: EDGEPIPE_AGENT_CRASH="*" or a part of the artifact's
file name makes the agent SIGSEGV itself after loading the model.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

AGENT_VERSION = 2
EDGETPU_LIBS = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(bool)": "bool"}


class AgentError(Exception):
    """A measurement failed for a reason worth one line in the report."""


class Unavailable(AgentError):
    """The target cannot run on this host (missing library, driver, device)."""


def _binom_half_pmf_table(n):
    """P(X = i) for X ~ Binomial(n, 1/2), i = 0..n//2 (exact for n <= 3000, else log-space)."""
    if n <= 3000:
        denom = 2 ** n
        return [math.comb(n, i) / denom for i in range(n // 2 + 1)]  # int / int true division stays exact
    lg = math.lgamma
    return [math.exp(lg(n + 1) - lg(i + 1) - lg(n - i + 1) - n * math.log(2.0)) for i in range(n // 2 + 1)]


def median_ci(sorted_xs: List[float], confidence: float = 0.95) -> Optional[Tuple[float, float, float]]:
    """Distribution-free CI of the median (lo, hi, coverage): [x_(l), x_(n-l+1)] covers it with probability
    1 - 2 P(Bin(n, 1/2) <= l - 1), l the largest rank keeping that >= confidence (n < 6: [min, max])."""
    n = len(sorted_xs)
    if n == 0:
        return None
    pmf = _binom_half_pmf_table(n)
    lo_rank, cdf = 1, 0.0
    for rank in range(1, n // 2 + 1):
        cdf += pmf[rank - 1]  # P(X <= rank - 1)
        if 2.0 * cdf > 1.0 - confidence:
            break
        lo_rank = rank
    return sorted_xs[lo_rank - 1], sorted_xs[n - lo_rank], max(0.0, 1.0 - 2.0 * sum(pmf[:lo_rank]))


def summarize(samples_ms: List[float]) -> Dict[str, Any]:
    """n, p50/p90/p99 (linear interpolation), mean, std, min, max, cv, the median's 95 % CI and its coverage."""
    xs = sorted(samples_ms)
    if not xs:
        return {"n": 0}
    a, (lo, hi, cov) = np.asarray(xs, np.float64), median_ci(xs)
    mean, std = float(a.mean()), float(a.std(ddof=1)) if len(xs) > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return {"n": len(xs), "p50": p50, "p90": p90, "p99": p99, "mean": mean, "std": std, "min": xs[0], "max": xs[-1],
            "cv": std / mean if mean > 0 else None, "ci95_p50": [lo, hi], "ci_coverage": round(cov, 4)}


def memory_now() -> Dict[str, int]:
    """Resident memory so far (VmHWM: ru_maxrss survives execve, so a child reports its parent's peak)."""
    m = {}
    if resource is not None:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m["ru_maxrss_kb"] = int(r // 1024) if sys.platform == "darwin" else int(r)  # macOS reports bytes
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as fh:
            pairs = [ln.partition(":") for ln in fh]
        m.update({k.lower() + "_kb": int(v.split()[0]) for k, _, v in pairs if k in ("VmHWM", "VmRSS")})
    return m


@contextlib.contextmanager
def capture_stderr() -> Iterator[Dict[str, str]]:
    """Tee fd 2 (native runtimes log there) into ``log["text"]``: a ``tee`` child passes it on as it arrives,
    so the parent sees it even when the runtime kills this process (a thread would not: native calls hold the GIL)."""
    sys.stderr.flush()
    fd, name = tempfile.mkstemp(prefix="edgepipe-agent-log-")
    os.close(fd)
    saved, log, tee = os.dup(2), {"text": ""}, None
    try:
        tee = subprocess.Popen([shutil.which("tee") or "tee", name], stdin=subprocess.PIPE, stdout=saved,
                               stderr=subprocess.DEVNULL)
        os.dup2(tee.stdin.fileno(), 2)
    except OSError:
        pass
    try:
        yield log
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if tee is not None:
            tee.stdin.close()
            tee.wait(timeout=10)
        with open(name, "rb") as fh:
            log["text"] = fh.read().decode("utf-8", "replace")
        os.remove(name)


def stage(name: str) -> None:
    """Mark progress on stderr: if the process dies, the parent knows in which stage."""
    sys.stderr.write("edgepipe-agent: stage %s\n" % name)
    sys.stderr.flush()


def one_line(e: object) -> str:
    s = " ".join(str(e).split())
    return (s[:400] + "...") if len(s) > 400 else s


def dist_version(*names: str) -> Optional[str]:
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            pass


def histogram(names: Iterable[str]) -> Dict[str, int]:
    return dict(sorted(collections.Counter(names).items(), key=lambda kv: (-kv[1], kv[0])))


def import_tflite() -> Tuple[str, Any]:
    """(module name, interpreter module). ai_edge_litert first; tflite_runtime on old boards."""
    for name in ("ai_edge_litert", "tflite_runtime"):
        try:
            return name, importlib.import_module(name + ".interpreter")
        except Exception:  # ImportError, or a broken native library
            continue
    raise Unavailable("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on old boards)")


def need(module: str, hint: str) -> Any:
    """Import a runtime module, or say what to install (Unavailable)."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken native library
        raise Unavailable("%s (%s)" % (hint, one_line(e)))


def cuda_reason(ort: Any) -> Optional[str]:
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        return "onnxruntime has no CUDAExecutionProvider (providers: %s): install onnxruntime-gpu with CUDA and " \
               "cuDNN" % ", ".join(have)


class Tensor:
    """An input or output, duck-compatible with edgepipe's manifest TensorInfo (quantization: scale/zero_point)."""

    __slots__ = ("name", "shape", "dtype", "scale", "zero_point")

    def __init__(self, name: str, shape: Sequence[int], dtype: Any, scale: Sequence[float] = (),
                 zero_point: Sequence[int] = ()):
        self.name, self.shape, self.dtype = str(name), [int(s) for s in shape], np.dtype(dtype).name
        self.scale, self.zero_point = list(scale), list(zero_point)

    @property
    def quantization(self) -> Optional[Dict[str, list]]:
        return {"scale": self.scale, "zero_point": self.zero_point} if self.scale else None

    @classmethod
    def from_tflite(cls, d: dict) -> "Tensor":
        """From an Interpreter's tensor details (shape_signature: -1 for dynamic dimensions)."""
        q, sig = d.get("quantization_parameters") or {}, d.get("shape_signature")
        return cls(d["name"], sig if sig is not None and len(sig) else d["shape"], d["dtype"],
                   np.asarray(q.get("scales", []), np.float64).ravel().tolist(),
                   np.asarray(q.get("zero_points", []), np.int64).ravel().tolist())

    @classmethod
    def from_ort(cls, x: Any) -> "Tensor":
        return cls(x.name, [d if isinstance(d, int) else -1 for d in x.shape], _ORT_TYPES.get(x.type, "object"))


def tensor_dict(t: Any) -> Dict[str, Any]:
    """Any tensor object (Tensor, TensorInfo) -> the JSON the agent prints."""
    q = getattr(t, "quantization", None) or {}
    return {"name": t.name, "shape": [int(s) for s in t.shape], "dtype": str(t.dtype),
            "scale": [float(s) for s in q.get("scale") or []],
            "zero_point": [int(z) for z in q.get("zero_point") or []]}


def quantize(x: Any, t: Any) -> np.ndarray:
    """Float samples -> the tensor's dtype (affine quantization for integer tensors)."""
    dt, x = np.dtype(t.dtype), np.asarray(x)
    if x.dtype == dt or dt.kind == "f":
        return np.ascontiguousarray(x, dtype=dt)
    q = getattr(t, "quantization", None) or {}
    scale = np.asarray(q.get("scale") or [1.0], np.float32)
    zp = np.asarray(q.get("zero_point") or [0], np.float32)
    ii = np.iinfo(dt)
    return np.ascontiguousarray(np.clip(np.round(x.astype(np.float32) / scale + zp), ii.min, ii.max).astype(dt))


def dequantize(y: Any, t: Any) -> np.ndarray:
    """An output in its dtype -> float32 (affine dequantization where the tensor is quantized)."""
    y, q = np.asarray(y), getattr(t, "quantization", None) or {}
    if y.dtype.kind == "f" or not q.get("scale"):
        return y.astype(np.float32)
    zp = np.asarray(q.get("zero_point") or [0], np.float32)
    return (y.astype(np.float32) - zp) * np.asarray(q["scale"], np.float32)


def random_input(t: Any, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Random data in a tensor's dtype (full integer range for quantized inputs, [-1, 1] for floats)."""
    rng = rng or np.random.default_rng(0)
    dt, shape = np.dtype(t.dtype), [1 if int(s) < 0 else int(s) for s in t.shape]
    if dt.kind in "iu":
        ii = np.iinfo(dt)
        lo, hi = (max(ii.min, -128), min(ii.max, 255)) if dt.itemsize > 1 else (ii.min, ii.max)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 1, size=shape, endpoint=True).astype(dt)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dt)


class Session:
    """A loaded artifact; subclasses implement ``run_native``. input_kind "image": raw 0-255 pixel inputs."""

    runtime, version, api, input_kind = "", None, "", "tensor"  # runtime: the library that runs it
    inputs, outputs, facts = [], [], {}  # filled by subclasses: Tensor-like objects, facts about the runtime

    def run_native(self, feeds: List[np.ndarray]) -> List[np.ndarray]:
        """Inputs in their native dtypes: write them, run, read every output back to host memory."""
        raise NotImplementedError

    def run(self, inputs: Any) -> List[np.ndarray]:
        """Float inputs (the model's preprocessed input) -> float outputs; quantization inside."""
        inputs = [inputs] if isinstance(inputs, np.ndarray) else inputs
        outs = self.run_native([quantize(x, t) for x, t in zip(inputs, self.inputs)])
        return [dequantize(y, t) for y, t in zip(outs, self.outputs)]

    def placement(self) -> Dict[str, Any]:
        return {}

    def profile(self, feeds: Optional[list], runs: int) -> Optional[dict]:
        return None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tflite_io(path: Any) -> Tuple[List[Tensor], List[Tensor]]:
    """(inputs, outputs) of a .tflite file as Tensors."""
    it = import_tflite()[1].Interpreter(model_path=str(path))
    return [[Tensor.from_tflite(d) for d in ds] for ds in (it.get_input_details(), it.get_output_details())]


def _edgetpu_delegate(mod, path, lib, options):
    with open(path, "rb") as fh:
        if b"edgetpu-custom-op" not in fh.read():
            raise AgentError("not compiled for the Edge TPU (no edgetpu-custom-op): run edgetpu_compiler on a "
                             "full-int8 artifact")
    lib = lib or EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")
    try:
        return mod.load_delegate(lib, options or {})
    except Exception as e:
        raise Unavailable("Edge TPU delegate %s could not be loaded (install libedgetpu1-std and plug in the Edge "
                          "TPU): %s" % (lib, one_line(e)))


class TFLiteSession(Session):
    """LiteRT / tflite_runtime Interpreter: XNNPACK on cpu, the libedgetpu delegate on edgetpu."""

    api = "interpreter"

    def __init__(self, path, target="cpu", threads=None, delegate=None, delegate_options=None):
        self.runtime, mod = import_tflite()
        self.version = dist_version("ai-edge-litert" if self.runtime == "ai_edge_litert" else "tflite-runtime")
        self.target, kw = target, ({"num_threads": int(threads)} if threads else {})
        self.delegate = _edgetpu_delegate(mod, path, delegate, delegate_options) if target == "edgetpu" else None
        kw.update({"experimental_delegates": [self.delegate]} if self.delegate is not None else {})
        self.it = mod.Interpreter(model_path=str(path), **kw)
        self.it.allocate_tensors()
        ins, outs = self.it.get_input_details(), self.it.get_output_details()
        self.inputs, self.outputs = [Tensor.from_tflite(d) for d in ins], [Tensor.from_tflite(d) for d in outs]
        self._slots = [[d["index"], tuple(d["shape"])] for d in ins]  # per-call work kept minimal (eval)
        self._out_idx = [d["index"] for d in outs]
        self.facts = {"runtime": self.runtime, "delegate": "edgetpu" if self.delegate else "xnnpack",
                      "threads": threads}

    def run_native(self, feeds):
        it = self.it
        for slot, x in zip(self._slots, feeds):
            if x.shape != slot[1]:  # a dynamic-batch model fed another batch size
                it.resize_tensor_input(slot[0], list(x.shape))
                it.allocate_tensors()
                slot[1] = tuple(x.shape)
            it.set_tensor(slot[0], x)
        it.invoke()
        return [it.get_tensor(i) for i in self._out_idx]  # get_tensor copies: the read-back

    def placement(self):
        """Which nodes XNNPACK (cpu) or the Edge TPU took: the node list holds a DELEGATE node per partition."""
        try:
            ops = self.it._get_ops_details()
        except Exception as e:
            return {"error": "op list unavailable: %s" % one_line(e)}
        originals = [o for o in ops if o["op_name"] != "DELEGATE"]
        if self.target == "edgetpu":
            on = set(o["index"] for o in originals if "edgetpu" in o["op_name"].lower())
        else:
            on = _delegated(ops, originals)
        off = [o for o in originals if o["index"] not in on]
        return {"accelerator": "edgetpu" if self.target == "edgetpu" else "xnnpack", "ops_total": len(originals),
                "ops_accelerated": len(originals) - len(off), "ops_fallback": len(off),
                "fully_accelerated": not off and bool(originals), "fallback_ops": histogram(o["op_name"] for o in off),
                "op_histogram": histogram(o["op_name"] for o in originals),
                "partitions": sum(1 for o in ops if o["op_name"] == "DELEGATE")}

    def close(self):
        self.it = self.delegate = None


def _delegated(ops, originals):
    """Indices of the original nodes a DELEGATE node took: those between its boundary tensors."""
    producer, taken = {int(t): o for o in originals for t in o["outputs"]}, set()
    for dnode in (o for o in ops if o["op_name"] == "DELEGATE"):
        boundary, stack, seen = set(int(t) for t in dnode["inputs"]), [int(t) for t in dnode["outputs"]], set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary:
                continue
            seen.add(t)
            p = producer.get(t)
            if p is not None and p["index"] not in taken:
                taken.add(p["index"])
                stack.extend(int(x) for x in p["inputs"] if int(x) >= 0)
    return taken


def check_static_shapes(path: Any) -> Optional[str]:
    """Why the GPU accelerator cannot take this model (a dynamic input shape), before it fails cryptically."""
    try:
        t = next((t for t in tflite_io(path)[0] if any(s < 0 for s in t.shape)), None)
    except Exception:  # an unreadable model fails later, in the runtime's own words
        return None
    return t and ("input '%s' has a dynamic shape %s: the GPU accelerator needs static shapes; re-export with a "
                  "static batch of 1" % (t.name, t.shape))


def parse_gpu_log(text: str) -> Dict[str, Any]:
    """Facts from the GPU delegate's log: op counts on GPU/CPU, unsupported ops, the backend."""
    out = {}
    m = re.search(r"(\d+) operations will run on the GPU, and the remaining (\d+) operations? will run on the CPU",
                  text)
    if m:
        out["ops_accelerated"], out["ops_fallback"] = int(m.group(1)), int(m.group(2))
    block = re.search(r"Following operations are not supported by GPU delegate:\n((?:.+\n)+?)\d+ operations", text)
    lines = [ln.partition(":") for ln in (block.group(1).splitlines() if block else [])]
    if any(op.strip() for op, _, _ in lines):
        out["fallback_ops"] = {op.strip(): why.strip() for op, _, why in lines if op.strip()}
    for name in ("WebGPU", "OpenCL", "Metal", "Vulkan"):
        if ("%s environment" % name) in text:
            out.setdefault("backend", name.lower())
    return out


class CompiledModelSession(Session):
    """ai_edge_litert CompiledModel: the GPU accelerator with CPU fallback, or XNNPACK on cpu."""

    api = "compiled_model"

    def __init__(self, path, target="gpu", threads=None):
        cm_mod, ha_mod, opt_mod = (need("ai_edge_litert." + m, "LiteRT CompiledModel API missing: pip install ai-edge"
                                        "-litert>=2") for m in ("compiled_model", "hardware_accelerator", "options"))
        HA = ha_mod.HardwareAccelerator
        self.runtime, self.version, self.target = "ai_edge_litert", dist_version("ai-edge-litert"), target
        why = check_static_shapes(path) if target == "gpu" else None
        if why:
            raise AgentError(why)
        opts = opt_mod.Options(hardware_accelerators=HA.GPU | HA.CPU if target == "gpu" else HA.CPU,
                               cpu_options=opt_mod.CpuOptions(num_threads=int(threads or 0)))
        err = None
        with capture_stderr() as log:
            try:
                self.cm = cm_mod.CompiledModel.from_file(str(path), options=opts)
            except Exception as e:  # noqa: BLE001 - reported below with the log's advice
                err = e
        self.log = log["text"]
        if err is not None:
            if "modify graph with delegate" in one_line(err).lower():
                raise AgentError(check_static_shapes(path) or "the GPU accelerator rejected the model (%s); artifacts "
                                 "for the GPU need static shapes with a batch of 1" % one_line(err))
            raise AgentError("LiteRT could not compile the model for %s: %s" % (target, one_line(err)))
        self._io(path)
        self.in_bufs, self.out_bufs = self.cm.create_input_buffers(0), self.cm.create_output_buffers(0)
        self._out_spec = [(int(np.prod(o.shape)), np.dtype(o.dtype), tuple(o.shape)) for o in self.outputs]
        p = self.placement()
        self.facts = {"runtime": self.runtime, "accelerator": p["accelerator"], "threads": threads,
                      "fully_accelerated": p["fully_accelerated"], "placement": p}

    def _io(self, path):
        sigs = self.cm.get_signature_list()
        sig = next(iter(sigs))
        ind, outd = self.cm.get_input_tensor_details(sig), self.cm.get_output_tensor_details(sig)
        self.inputs = [Tensor(n, ind[n]["shape"], ind[n]["dtype"]) for n in sigs[sig]["inputs"]]
        self.outputs = [Tensor(n, outd[n]["shape"], outd[n]["dtype"]) for n in sigs[sig]["outputs"]]
        # CompiledModel does not expose quantization parameters; the Interpreter reads the same flatbuffer
        for mine, theirs in zip((self.inputs, self.outputs), tflite_io(path)):
            for a, b in zip(mine, theirs if len(mine) == len(theirs) else []):
                a.scale, a.zero_point = b.scale, b.zero_point

    def run_native(self, feeds):
        for buf, x in zip(self.in_bufs, feeds):
            buf.write(np.ascontiguousarray(x))
        self.cm.run_by_index(0, self.in_bufs, self.out_bufs)
        # the read-back waits for the accelerator: without it the time is the enqueue only
        return [buf.read(n, dt).reshape(shape) for buf, (n, dt, shape) in zip(self.out_bufs, self._out_spec)]

    def placement(self):
        facts = parse_gpu_log(self.log) if self.target == "gpu" else {}
        full = bool(self.cm.is_fully_accelerated())
        facts.update({"accelerator": "gpu" if self.target == "gpu" else "xnnpack", "fully_accelerated": full})
        if full:
            facts.setdefault("ops_fallback", 0)
        return facts

    def close(self):
        self.in_bufs = self.out_bufs = self.cm = None


class ORTSession(Session):
    """onnxruntime on cpu, or CUDA on gpu (refused where onnxruntime would silently fall back to the CPU)."""

    api = "inference_session"

    def __init__(self, path, target="cpu", threads=None):
        self.ort = ort = need("onnxruntime", "onnxruntime is not installed: pip install onnxruntime")
        self.runtime, self.version, self.target = "onnxruntime", getattr(ort, "__version__", None), target
        self.path, self.threads = str(path), threads
        if target not in ("cpu", "gpu") or (target == "gpu" and cuda_reason(ort)):
            raise Unavailable(cuda_reason(ort) if target == "gpu" else "onnxruntime does not run on %s" % target)
        self.providers = (["CUDAExecutionProvider"] if target == "gpu" else []) + ["CPUExecutionProvider"]
        self.sess = self._session(None)
        got = self.sess.get_providers()
        if target == "gpu" and "CUDAExecutionProvider" not in got:
            raise Unavailable("CUDAExecutionProvider failed to initialise (session providers: %s): check the CUDA "
                              "and cuDNN libraries" % ", ".join(got))
        self.inputs = [Tensor.from_ort(x) for x in self.sess.get_inputs()]
        self.outputs = [Tensor.from_ort(x) for x in self.sess.get_outputs()]
        self._names = [t.name for t in self.inputs]
        self.facts = dict({"runtime": "onnxruntime", "providers": got, "threads": threads},
                          **({"accelerator": "cuda"} if target == "gpu" else {}))

    def _session(self, profile_prefix):
        so = self.ort.SessionOptions()
        so.log_severity_level, so.execution_mode = 3, self.ort.ExecutionMode.ORT_SEQUENTIAL
        if self.threads:
            so.intra_op_num_threads, so.inter_op_num_threads = int(self.threads), 1
        if profile_prefix:
            so.enable_profiling, so.profile_file_prefix = True, profile_prefix
        return self.ort.InferenceSession(self.path, sess_options=so, providers=self.providers)

    def run_native(self, feeds):
        return self.sess.run(None, dict(zip(self._names, feeds)))

    def placement(self):
        if self.target == "cpu":
            return {"accelerator": None, "providers": self.facts["providers"]}
        prof = self.profile(None, 5) or {}  # providers per node come from the profiler
        keys = ("ops_total", "ops_accelerated", "ops_fallback", "fallback_ops", "fully_accelerated")
        return dict({"accelerator": "cuda", "providers": self.facts["providers"]},
                    **{k: prof[k] for k in keys if k in prof})

    def profile(self, feeds, runs):
        """A separate profiled session (profiling slows every node): top ops and provider per node."""
        d = tempfile.mkdtemp(prefix="edgepipe-ortprof-")
        try:
            sess = self._session(os.path.join(d, "ort"))
            feed = dict(zip(self._names, feeds if feeds is not None else [random_input(t) for t in self.inputs]))
            for _ in range(3 + max(1, runs)):  # the first 3 runs of a fresh session allocate: skipped
                sess.run(None, feed)
            with open(sess.end_profiling()) as fh:
                events = json.load(fh)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return self.parse_profile(events, runs=max(1, runs), skip_runs=3, accelerated_provider=(
            "CUDAExecutionProvider" if self.target == "gpu" else None))

    def close(self):
        self.sess = None

    @staticmethod
    def parse_profile(events, runs=1, accelerated_provider=None, top=10, skip_runs=0):
        """onnxruntime profiler JSON -> top ops by time, time per op type, provider per node (kernel events
        of the first ``skip_runs`` runs left out)."""
        model_runs = sorted((e.get("ts", 0) + e.get("dur", 0) for e in events
                             if e.get("cat") == "Session" and e.get("name") == "model_run"))
        start = model_runs[skip_runs - 1] if 0 < skip_runs < len(model_runs) else -1
        nodes, by_type = {}, {}
        for e in events:
            if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e.get("ts", 0) >= start:
                a, name = e.get("args") or {}, e["name"][: -len("_kernel_time")]
                n = nodes.setdefault(name, {"node": name, "op": a.get("op_name"), "provider": a.get("provider")})
                n["us"] = n.get("us", 0.0) + float(e.get("dur", 0))
        if not nodes:
            return None
        for n in nodes.values():
            t = by_type.setdefault(n["op"] or "?", {"op": n["op"] or "?", "us": 0.0, "nodes": 0})
            t["us"], t["nodes"] = t["us"] + n["us"], t["nodes"] + 1
        total = sum(n["us"] for n in nodes.values())
        ms, pct = (lambda us: us / 1000.0 / runs), (lambda us: 100.0 * us / total if total else 0.0)
        out = {"source": "onnxruntime profiler", "runs": runs, "total_ms_per_run": ms(total), "ops_total": len(nodes),
               "top_ops": [{"op": t["op"], "ms": ms(t["us"]), "pct": pct(t["us"]), "nodes": t["nodes"]}
                           for t in sorted(by_type.values(), key=lambda t: -t["us"])[:top]],
               "top_nodes": [{"node": n["node"], "op": n["op"], "provider": n["provider"], "ms": ms(n["us"]),
                              "pct": pct(n["us"])} for n in sorted(nodes.values(), key=lambda n: -n["us"])[:top]],
               "providers": histogram(n["provider"] for n in nodes.values())}
        if accelerated_provider:
            off = [n for n in nodes.values() if n["provider"] != accelerated_provider]
            out.update({"ops_accelerated": len(nodes) - len(off), "ops_fallback": len(off),
                        "fallback_ops": histogram(n["op"] or "?" for n in off), "fully_accelerated": not off})
        return out


def open_session(spec: "MeasureSpec") -> Session:
    """The built-in session for ``spec.format`` on ``spec.target``."""
    fmt, target = spec.format, spec.target
    if fmt == "tflite" and (target == "gpu" or (target == "cpu" and spec.api == "compiled_model")):
        return CompiledModelSession(spec.artifact, target, spec.threads)
    if fmt == "tflite" and target in ("cpu", "edgetpu"):
        return TFLiteSession(spec.artifact, target, spec.threads, spec.delegate, spec.options.get("edgetpu_options"))
    if fmt == "onnx":
        return ORTSession(spec.artifact, target, spec.threads)
    raise Unavailable("the agent cannot run %s artifacts on %s" % (fmt, target))


def _fit(a, t, where):
    """Samples shaped for the tensor (a missing batch axis added)."""
    want = [int(s) for s in t.shape]
    a = a[None] if a.ndim == len(want) - 1 else a
    if list(a.shape[1:]) == want[1:] or not all(s > 0 for s in want[1:]):
        return a
    raise AgentError("inputs file %s: samples of shape %s do not fit input '%s' %s" % (where, list(a.shape[1:]),
                                                                                      t.name, want))


def load_inputs(session: Session, npz_path: Optional[str], max_samples: Optional[int] = 32) -> Tuple[list, str]:
    """(list of feed lists, one per sample, in native dtypes; "file" or "random")."""
    if not npz_path:
        rng = np.random.default_rng(0)
        return [[random_input(t, rng) for t in session.inputs] for _ in range(4)], "random"
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    if getattr(session, "input_kind", "tensor") == "image" and "raw" in arrays:
        arrays = {"inputs": arrays["raw"]}  # image inputs take raw 0-255 pixels, not the preprocessed tensor
    one = len(session.inputs) == 1
    per_input = []
    for k, t in enumerate(session.inputs):
        a = arrays.get(t.name, arrays.get("input_%d" % k))
        if a is None and one:
            a = next(iter(arrays.values())) if len(arrays) == 1 else arrays.get("inputs")
        if a is None:
            raise AgentError("inputs file %s has no array for input '%s' (has: %s)" % (npz_path, t.name,
                                                                                      ", ".join(sorted(arrays))))
        per_input.append(_fit(a, t, npz_path)[:max_samples])
    n = min(a.shape[0] for a in per_input)
    return [[quantize(a[i:i + 1], t) for a, t in zip(per_input, session.inputs)] for i in range(n)], "file"


@dataclasses.dataclass
class MeasureSpec:
    """How to load and measure one artifact, for local, worker and remote runs: ``to_argv()`` is the agent's
    command line, ``parse_spec`` reads it back. ``options`` (runtime-specific) stay in-process."""

    artifact: Optional[str] = None
    format: Optional[str] = None  # tflite | onnx (a worker measures any registered format)
    target: str = "cpu"
    threads: Optional[int] = None  # None: the runtime's default
    runs: int = 50  # at least this many measured runs ...
    min_seconds: float = 1.0  # ... and at least this long
    max_seconds: Optional[float] = None  # stop measuring after this long (``truncated``)
    warmup: int = 5
    profile: bool = False  # also profile ops (a separate pass)
    inputs: Optional[str] = None  # .npz of preprocessed float samples (keys: input names, input_0..., inputs)
    save_outputs: Optional[str] = None  # the dequantized outputs of up to 32 samples go to this .npz
    predict_out: Optional[str] = None  # predict mode: every --inputs sample, outputs to this .npz
    delegate: Optional[str] = None  # the Edge TPU delegate library (default libedgetpu.so.1)
    api: Optional[str] = None  # TFLite on cpu: interpreter (default) or compiled_model
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "MeasureSpec":
        return cls(**{k: v for k, v in (d or {}).items() if k in _SPEC_FIELDS})

    def to_argv(self) -> List[str]:
        argv = []
        for name in _SPEC_FIELDS:
            v = getattr(self, name)
            if name != "options" and v is not None and v is not False:
                argv += ["--" + name.replace("_", "-")] + ([] if v is True else [str(v)])
        return argv


_SPEC_FIELDS = [f.name for f in dataclasses.fields(MeasureSpec)]
_ARG_TYPES = {"threads": int, "runs": int, "warmup": int, "min_seconds": float, "max_seconds": float}
_ARG_CHOICES = {"target": ("cpu", "gpu", "edgetpu", "reference"), "api": ("interpreter", "compiled_model")}


def parse_spec(argv: Optional[List[str]] = None) -> MeasureSpec:
    """The agent's command line -> MeasureSpec (argparse exits 2 with a message on bad input)."""
    p = argparse.ArgumentParser(description="Measure one model on one target; prints one JSON object "
                                            "(see the docstring of agent.py).")
    for f in dataclasses.fields(MeasureSpec):
        if f.name == "profile":
            p.add_argument("--profile", action="store_true")
        elif f.name != "options":
            p.add_argument("--" + f.name.replace("_", "-"), type=_ARG_TYPES.get(f.name, str), default=f.default,
                           choices=_ARG_CHOICES.get(f.name))
    a = p.parse_args(argv)
    if not a.artifact or not a.format or a.runs < 1 or a.warmup < 0 or a.min_seconds < 0 or (a.threads or 0) < 0:
        p.error("--artifact and --format are required; --runs >= 1, --warmup, --min-seconds, --threads >= 0")
    return MeasureSpec(**dict(vars(a), threads=a.threads or None))


def _timed_loop(session, samples, spec):
    """(times in ms, wall seconds, truncated): runs until both spec.runs and spec.min_seconds are done."""
    clock, run, k, times = time.perf_counter, session.run_native, len(samples), []
    cap = float("inf") if spec.max_seconds is None else spec.max_seconds
    gc_was = gc.isenabled()
    gc.disable()
    start = t1 = clock()
    try:
        while (len(times) < spec.runs or t1 - start < spec.min_seconds) and (not times or t1 - start < cap):
            feeds = samples[len(times) % k]
            t0 = clock()
            run(feeds)
            t1 = clock()
            times.append((t1 - t0) * 1000.0)
    finally:
        if gc_was:
            gc.enable()
    return times, clock() - start, len(times) < spec.runs or t1 - start < spec.min_seconds


def measure(session: Session, samples: list, spec: MeasureSpec, profile_runs: int = 20) -> Tuple[dict, list]:
    """The timing method: first inference, warm-up, the timed loop, statistics (and a profile)."""
    clock = time.perf_counter
    stage("first inference")
    t0 = clock()
    first = session.run_native(samples[0])
    res = {"first_ms": (clock() - t0) * 1000.0, "warmup_ms": []}
    for i in range(max(0, int(spec.warmup))):
        t0 = clock()
        session.run_native(samples[i % len(samples)])
        res["warmup_ms"].append((clock() - t0) * 1000.0)
    stage("measure")
    times, wall, truncated = _timed_loop(session, samples, spec)
    lat = summarize(times)
    res.update({"latency_ms": lat, "samples_ms": times, "measured_s": wall, "truncated": truncated,
                "throughput_ips": 1000.0 / lat["mean"] if lat.get("mean") else None})
    if spec.profile:
        stage("profile")
        try:
            res["profile"] = session.profile(samples[0], profile_runs) or {"source": None, "note": (
                "%s has no per-op profiler in Python; placement shows what the accelerator took" % session.runtime)}
        except Exception as e:  # noqa: BLE001 - a profile is extra; the figures stand
            res["profile"] = {"error": one_line(e)}
    return res, first


def open_timed(spec: MeasureSpec, opener: Optional[Callable[[], Session]], mode: str) -> Tuple[Session, dict]:
    """(session, the JSON so far): the session opened and timed, memory before and after, the crash hook."""
    info = {"agent_version": AGENT_VERSION, "mode": mode, "artifact": str(spec.artifact), "format": spec.format,
            "target": spec.target, "python": platform.python_version(), "pid": os.getpid(),
            "memory_baseline": memory_now()}
    stage("load")
    t0 = time.perf_counter()
    session = opener() if opener is not None else open_session(spec)
    info.update(load_ms=(time.perf_counter() - t0) * 1000.0, memory_after_load=memory_now())
    stage("loaded")
    want = os.environ.get("EDGEPIPE_AGENT_CRASH")  # the test hook
    if want and (want == "*" or want in os.path.basename(str(spec.artifact))):
        sys.stderr.write("edgepipe agent: EDGEPIPE_AGENT_CRASH matched, raising SIGSEGV (test hook)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    info.update(runtime={"name": session.runtime, "version": session.version, "api": session.api},
                threads=spec.threads or None, inputs=[tensor_dict(t) for t in session.inputs],
                outputs=[tensor_dict(t) for t in session.outputs])
    return session, info


def collect_outputs(session: Session, samples: list) -> Dict[str, np.ndarray]:
    """{output_i: dequantized outputs stacked over the samples}."""
    outs = [[] for _ in session.outputs]
    for feeds in samples:
        for o_i, y in enumerate(session.run_native(feeds)):
            outs[o_i].append(np.asarray(y))
    return {"output_%d" % i: dequantize(np.concatenate(ys, axis=0), t)
            for i, (ys, t) in enumerate(zip(outs, session.outputs)) if ys}


def run_agent(spec: MeasureSpec, opener: Optional[Callable[[], Session]] = None) -> dict:
    """Measure one artifact as ``spec`` says; ``opener()`` -> Session replaces the built-in ones (the worker)."""
    session, info = open_timed(spec, opener, "measure")
    with session:
        stage("inputs")
        samples, info["input_source"] = load_inputs(session, spec.inputs)
        info["input_samples"] = len(samples)
        info.update(measure(session, samples, spec)[0])
        stage("placement")
        try:
            info["placement"] = session.placement()
        except Exception as e:  # noqa: BLE001 - placement is a fact about the figures, not a figure
            info["placement"] = {"error": one_line(e)}
        if spec.save_outputs:
            stage("save outputs")
            np.savez(spec.save_outputs, **collect_outputs(session, samples[:32]))
            info["saved_outputs"] = str(spec.save_outputs)
        info["memory"] = memory_now()
        info["loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["status"] = "ok"
    return info


def main_with(fn: Callable[[], dict]) -> int:
    """Run ``fn() -> dict`` with stdout reserved for its one JSON answer; map errors to exit codes."""
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)  # whatever runtimes print goes to stderr
    if not os.environ.get("XDG_RUNTIME_DIR"):  # GPU drivers want one: one private dir per user, reused
        xdg = os.path.join(tempfile.gettempdir(), "edgepipe-xdg-%d" % (os.getuid() if hasattr(os, "getuid") else 0))
        os.makedirs(xdg, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = xdg
    try:
        out, code = fn(), 0
    except Unavailable as e:
        out, code = {"agent_version": AGENT_VERSION, "status": "unavailable", "reason": str(e)}, 3
    except AgentError as e:
        out, code = {"agent_version": AGENT_VERSION, "status": "error", "error": str(e)}, 1
    except Exception as e:  # noqa: BLE001 - any failure is this row's, said in one line
        traceback.print_exc()
        out, code = {"agent_version": AGENT_VERSION, "status": "error",
                     "error": "%s: %s" % (type(e).__name__, one_line(e))}, 1
    sys.stdout.flush()
    data = json.dumps(out, default=lambda o: o.tolist() if isinstance(o, (np.generic, np.ndarray)) else str(o))
    os.write(json_fd, (data + "\n").encode())
    os.close(json_fd)
    return code


def main(argv: Optional[List[str]] = None, opener_for: Optional[Callable] = None) -> int:
    """The agent's command line. ``opener_for(spec)`` -> opener: edgepipe's worker measures a registered runtime."""
    spec = parse_spec(argv)
    if spec.predict_out:
        raise SystemExit("agent.py measures; --predict-out is predict.py's (the agent's predict mode)")
    opener = opener_for(spec) if opener_for is not None else None
    return main_with(lambda: run_agent(spec, opener))


if __name__ == "__main__":
    sys.exit(main())
