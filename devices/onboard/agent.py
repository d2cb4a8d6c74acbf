#!/usr/bin/env python3
"""edgepipe measurement agent: one artifact, one target, one fresh process, one JSON object.

This file is deliberately standalone: it imports only the standard library, NumPy and the
runtime it measures (ai_edge_litert, or tflite_runtime on old boards, or onnxruntime), and
keeps Python 3.9 syntax, so it can be copied to a remote board (scp/adb push) and run there:

    python agent.py --artifact model.tflite --format tflite --target cpu --threads 4 \
        --runs 100 --min-seconds 5 --warmup 10 [--inputs inputs.npz] [--profile]
    python agent.py --probe cpu,gpu,edgetpu      # what can this host run, and why not

It prints exactly one JSON object on stdout (everything the runtimes print goes to stderr, with
``edgepipe-agent: stage NAME`` lines, so a parent whose agent died knows in which stage).
Exit status: 0 measured, 1 error (the JSON says why), 3 target unavailable (the JSON says why);
killed by a signal when the runtime itself crashed.

The method
  1. load + initialise the model (timed: ``load_ms``; for the GPU this includes kernel compilation)
  2. first inference (timed separately: ``first_ms``; lazy allocations, shader compilation)
  3. ``--warmup`` runs (timed, reported, not used in the statistics)
  4. measured runs until BOTH ``--runs`` runs AND ``--min-seconds`` seconds are done
     (``--max-seconds`` caps it; ``truncated`` says so). Each timed run covers writing the
     input, running the model and reading every output back to host memory: a GPU figure
     without the read-back measures only the enqueue, not the inference.
     The garbage collector is off during the timed loop.
  5. statistics: p50/p90/p99/mean/std/min/max, a distribution-free 95 % confidence interval of
     the median (order statistics of the binomial(n, 1/2)), throughput (1 / mean, single stream)
  6. peak resident memory of the process (getrusage ru_maxrss and /proc/self/status VmHWM) and
     the resident memory before the model was loaded (imports only), so the model's share shows.
  7. placement: which ops ran on the accelerator (XNNPACK/GPU/Edge TPU/CUDA) and which fell back;
     with ``--profile`` the top ops by time where the runtime has a profiler (onnxruntime).

Inputs come from ``--inputs`` (an .npz of preprocessed float samples, e.g. calibration images;
quantized here for integer inputs) or are random in the input's dtype (full integer range for
quantized inputs, uniform [-1, 1] for float inputs).

Test-only hook: if the environment variable EDGEPIPE_AGENT_CRASH is set and the artifact's file
name contains its value (or it is "*"), the agent kills itself with SIGSEGV right after loading
the model. edgepipe's tests use it to check that a crashing runtime fails only its own row.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback

AGENT_VERSION = 1

_EDGETPU_LIBS = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


class AgentError(Exception):
    """A measurement failed for a reason worth one line in the report."""


class Unavailable(AgentError):
    """The target cannot run on this host (missing library, driver, device)."""


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def percentile(sorted_xs, q):
    """Linear-interpolated percentile (same as numpy's default) of an ascending list."""
    n = len(sorted_xs)
    if n == 0:
        return float("nan")
    k = (n - 1) * q / 100.0
    f = int(math.floor(k))
    c = min(f + 1, n - 1)
    return sorted_xs[f] + (k - f) * (sorted_xs[c] - sorted_xs[f])


def _binom_half_pmf_table(n):
    """P(X = i) for X ~ Binomial(n, 1/2), i = 0..n//2 (exact for n <= 3000, else log-space)."""
    if n <= 3000:
        denom = 2 ** n  # int / int true division stays exact for big n
        out, c = [], 1
        for i in range(n // 2 + 1):
            out.append(c / denom)
            c = c * (n - i) // (i + 1)
        return out
    lg = math.lgamma
    return [math.exp(lg(n + 1) - lg(i + 1) - lg(n - i + 1) - n * math.log(2.0)) for i in range(n // 2 + 1)]


def median_ci(sorted_xs, confidence=0.95):
    """Distribution-free CI of the median: (lo, hi, achieved coverage).

    The interval [x_(l), x_(n-l+1)] (1-based ranks) covers the population median with
    probability 1 - 2 P(Bin(n, 1/2) <= l - 1); l is the largest rank keeping that >= confidence.
    With fewer than 6 samples no 95 % interval exists: [min, max] and its coverage.
    """
    n = len(sorted_xs)
    if n == 0:
        return None
    alpha = 1.0 - confidence
    pmf = _binom_half_pmf_table(n)
    lo_rank, cdf = 1, 0.0
    for rank in range(1, n // 2 + 1):
        cdf += pmf[rank - 1]  # P(X <= rank - 1)
        if 2.0 * cdf <= alpha:
            lo_rank = rank
        else:
            break
    hi_rank = n - lo_rank + 1
    cov = max(0.0, 1.0 - 2.0 * sum(pmf[:lo_rank]))
    return sorted_xs[lo_rank - 1], sorted_xs[hi_rank - 1], cov


def summarize(samples_ms):
    xs = sorted(samples_ms)
    n = len(xs)
    if n == 0:
        return {"n": 0}
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    std = math.sqrt(var)
    ci = median_ci(xs)
    return {
        "n": n,
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "mean": mean,
        "std": std,
        "min": xs[0],
        "max": xs[-1],
        "cv": std / mean if mean > 0 else None,
        "ci95_p50": [ci[0], ci[1]],
        "ci_coverage": round(ci[2], 4),
    }


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
def _proc_status():
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "VmPeak"):
                    out[k] = int(v.split()[0])  # kB
    except OSError:
        pass
    return out


def memory_now():
    """Resident memory so far. On Linux prefer VmHWM: ru_maxrss survives execve, so a process started
    by a large parent reports the parent's peak until it exceeds it."""
    m = {}
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports kB, macOS bytes
        m["ru_maxrss_kb"] = int(r // 1024) if sys.platform == "darwin" else int(r)
    except Exception:  # pragma: no cover - Windows
        pass
    st = _proc_status()
    if "VmHWM" in st:
        m["vmhwm_kb"] = st["VmHWM"]
    if "VmRSS" in st:
        m["vmrss_kb"] = st["VmRSS"]
    return m


# ---------------------------------------------------------------------------------------------
# stderr capture (native runtimes log placement facts there)
# ---------------------------------------------------------------------------------------------
class CaptureStderr:
    """Tee fd 2 (native runtimes log there) into ``text`` while still passing it through.

    A ``tee`` child process copies the pipe to the real stderr as bytes arrive, so if the runtime
    kills this process (a delegate crash) the parent still sees what was logged; a Python thread
    would not do: native calls hold the GIL. Without ``tee`` the log goes to a file, echoed after.
    """

    def __enter__(self):
        import shutil
        import subprocess

        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.NamedTemporaryFile(prefix="edgepipe-agent-log-", delete=False)
        self._file.close()
        tee = shutil.which("tee")
        self._tee = None
        if tee:
            try:
                self._tee = subprocess.Popen([tee, self._file.name], stdin=subprocess.PIPE, stdout=self._saved,
                                             stderr=subprocess.DEVNULL)
                os.dup2(self._tee.stdin.fileno(), 2)
            except OSError:
                self._tee = None
        if self._tee is None:
            self._fh = open(self._file.name, "wb")
            os.dup2(self._fh.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(self._saved, 2)
        if self._tee is not None:
            self._tee.stdin.close()
            try:
                self._tee.wait(timeout=10)
            except Exception:
                self._tee.kill()
        else:
            self._fh.close()
        try:
            with open(self._file.name, "rb") as fh:
                self.text = fh.read().decode("utf-8", "replace")
            os.remove(self._file.name)
        except OSError:
            pass
        if self._tee is None and self.text:
            os.write(self._saved, self.text.encode())
        os.close(self._saved)
        return False


def stage(name):
    """Mark progress on stderr: if the process dies, the parent knows in which stage."""
    try:
        sys.stderr.write("edgepipe-agent: stage %s\n" % name)
        sys.stderr.flush()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# runtimes
# ---------------------------------------------------------------------------------------------
def import_tflite():
    """(module name, interpreter module). ai_edge_litert first; tflite_runtime on old boards."""
    try:
        from ai_edge_litert import interpreter as mod  # type: ignore

        return "ai_edge_litert", mod
    except Exception:
        pass
    try:
        from tflite_runtime import interpreter as mod  # type: ignore

        return "tflite_runtime", mod
    except Exception:
        raise Unavailable("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime on old boards)")


def dist_version(*names):
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return None
    for n in names:
        try:
            return metadata.version(n)
        except Exception:
            continue
    return None


def _np_dtype(d):
    import numpy as np

    if isinstance(d, str):
        return np.dtype(d)
    return np.dtype(d)


class Backend:
    """A loaded model. ``inputs``/``outputs``: list of dicts (name, shape, dtype, scale, zero_point)."""

    runtime = ""
    version = None
    api = ""
    inputs = ()
    outputs = ()

    def run(self, feeds):
        """Write inputs, run, read every output back to host memory. Returns a list of arrays."""
        raise NotImplementedError

    def placement(self):
        return {}

    def profile(self, feeds, runs):
        return None

    def close(self):
        pass


def _tflite_details(d):
    q = d.get("quantization_parameters") or {}
    import numpy as np

    scales = [float(s) for s in np.asarray(q.get("scales", [])).ravel()]
    zps = [int(z) for z in np.asarray(q.get("zero_points", [])).ravel()]
    sig = d.get("shape_signature")
    shape = [int(s) for s in (sig if sig is not None and len(sig) else d["shape"])]
    return {"name": d["name"], "index": int(d["index"]), "shape": shape,
            "dtype": np.dtype(d["dtype"]).name, "scale": scales, "zero_point": zps}


class TFLiteInterpreterBackend(Backend):
    """LiteRT / tflite_runtime Interpreter: XNNPACK on cpu, libedgetpu delegate on edgetpu."""

    api = "interpreter"

    def __init__(self, path, target, threads, delegate_lib=None):
        self.runtime, mod = import_tflite()
        self.version = dist_version("ai-edge-litert" if self.runtime == "ai_edge_litert" else "tflite-runtime")
        self.target = target
        kw = {}
        if threads:
            kw["num_threads"] = int(threads)
        self.delegate = None
        if target == "edgetpu":
            with open(path, "rb") as fh:
                if b"edgetpu-custom-op" not in fh.read():
                    raise AgentError("not compiled for the Edge TPU (no edgetpu-custom-op): "
                                     "run edgetpu_compiler on a full-int8 artifact")
            lib = delegate_lib or _EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")
            try:
                self.delegate = mod.load_delegate(lib)
            except Exception as e:
                raise Unavailable("Edge TPU delegate %s could not be loaded (install libedgetpu1-std and "
                                  "plug in the Edge TPU): %s" % (lib, _one_line(e)))
            kw["experimental_delegates"] = [self.delegate]
        self.it = mod.Interpreter(model_path=str(path), **kw)
        self.it.allocate_tensors()
        self._in = self.it.get_input_details()
        self._out = self.it.get_output_details()
        self.inputs = [_tflite_details(d) for d in self._in]
        self.outputs = [_tflite_details(d) for d in self._out]

    def run(self, feeds):
        it = self.it
        for d, x in zip(self._in, feeds):
            it.set_tensor(d["index"], x)
        it.invoke()
        return [it.get_tensor(d["index"]) for d in self._out]  # get_tensor copies

    def placement(self):
        """Which nodes the delegate (XNNPACK on cpu, Edge TPU) took, from the node list.

        After delegation the node list holds the original ops plus one DELEGATE node per
        partition; a partition's ops are those between its boundary tensors.
        """
        try:
            ops = self.it._get_ops_details()
        except Exception as e:
            return {"error": "op list unavailable: %s" % _one_line(e)}
        originals = [o for o in ops if o["op_name"] != "DELEGATE"]
        delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
        if self.target == "edgetpu":
            # the compiled model holds custom ops; everything else runs on the CPU
            on = [o for o in originals if "edgetpu" in o["op_name"].lower()]
            off = [o for o in originals if "edgetpu" not in o["op_name"].lower()]
            acc = "edgetpu"
        else:
            producer = {}
            for o in originals:
                for t in o["outputs"]:
                    producer[int(t)] = o
            taken = set()
            for dnode in (o for o in ops if o["op_name"] == "DELEGATE"):
                boundary = set(int(t) for t in dnode["inputs"])
                stack = [int(t) for t in dnode["outputs"]]
                seen = set()
                while stack:
                    t = stack.pop()
                    if t in seen or t in boundary:
                        continue
                    seen.add(t)
                    p = producer.get(t)
                    if p is None or p["index"] in taken:
                        continue
                    taken.add(p["index"])
                    stack.extend(int(x) for x in p["inputs"] if int(x) >= 0)
            on = [o for o in originals if o["index"] in taken]
            off = [o for o in originals if o["index"] not in taken]
            acc = "xnnpack"
        return {
            "accelerator": acc,
            "ops_total": len(originals),
            "ops_accelerated": len(on),
            "ops_fallback": len(off),
            "fully_accelerated": len(off) == 0 and len(originals) > 0,
            "fallback_ops": _histogram(o["op_name"] for o in off),
            "op_histogram": _histogram(o["op_name"] for o in originals),
            "partitions": len(delegates),
        }

    def close(self):
        self.it = None
        self.delegate = None


def _histogram(names):
    h = {}
    for n in names:
        h[n] = h.get(n, 0) + 1
    return dict(sorted(h.items(), key=lambda kv: (-kv[1], kv[0])))


def _check_static_shapes(path):
    """The GPU accelerator needs static shapes; say so before it fails cryptically."""
    try:
        _, mod = import_tflite()
        it = mod.Interpreter(model_path=str(path))
        for d in it.get_input_details():
            sig = d.get("shape_signature")
            if sig is not None and any(int(s) < 0 for s in sig):
                return ("input '%s' has a dynamic shape %s: the GPU accelerator needs static shapes; "
                        "re-export with a static batch of 1" % (d["name"], [int(s) for s in sig]))
    except Exception:
        return None
    return None


def _parse_gpu_log(text):
    """Facts from the GPU delegate's log: op counts on GPU/CPU and unsupported ops."""
    import re

    out = {}
    m = re.search(r"(\d+) operations will run on the GPU, and the remaining (\d+) operations? will run on the CPU",
                  text)
    if m:
        out["ops_accelerated"] = int(m.group(1))
        out["ops_fallback"] = int(m.group(2))
    unsupported = {}
    block = re.search(r"Following operations are not supported by GPU delegate:\n((?:.+\n)+?)\d+ operations", text)
    if block:
        for line in block.group(1).splitlines():
            op, _, why = line.partition(":")
            if op.strip():
                unsupported[op.strip()] = why.strip()
    if unsupported:
        out["fallback_ops"] = unsupported
    for name in ("WebGPU", "OpenCL", "Metal", "Vulkan"):
        if ("Created a %s environment" % name) in text or ("%s environment" % name) in text:
            out.setdefault("backend", name.lower())
    return out


class LiteRTCompiledBackend(Backend):
    """ai_edge_litert CompiledModel (GPU accelerator with CPU fallback, or XNNPACK CPU)."""

    api = "compiled_model"

    def __init__(self, path, target, threads):
        try:
            from ai_edge_litert.compiled_model import CompiledModel  # type: ignore
            from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # type: ignore
            from ai_edge_litert.options import CpuOptions, Options  # type: ignore
        except Exception as e:
            raise Unavailable("LiteRT CompiledModel API missing: pip install ai-edge-litert>=2 (%s)" % _one_line(e))
        self.runtime = "ai_edge_litert"
        self.version = dist_version("ai-edge-litert")
        self.target = target
        if target == "gpu":
            why = _check_static_shapes(path)
            if why:
                raise AgentError(why)
            accel = HardwareAccelerator.GPU | HardwareAccelerator.CPU
        else:
            accel = HardwareAccelerator.CPU
        opts = Options(hardware_accelerators=accel, cpu_options=CpuOptions(num_threads=int(threads or 0)))
        with CaptureStderr() as cap:
            try:
                self.cm = CompiledModel.from_file(str(path), options=opts)
                err = None
            except Exception as e:  # noqa: BLE001
                err = e
        self.log = cap.text
        if err is not None:
            msg = _one_line(err)
            if "modify graph with delegate" in msg.lower():
                why = _check_static_shapes(path)
                raise AgentError(why or ("the GPU accelerator rejected the model (%s); artifacts for the GPU need "
                                         "static shapes with a batch of 1" % msg))
            raise AgentError("LiteRT could not compile the model for %s: %s" % (target, msg))
        sigs = self.cm.get_signature_list()
        self.sig = list(sigs)[0]
        ind = self.cm.get_input_tensor_details(self.sig)
        outd = self.cm.get_output_tensor_details(self.sig)
        self.inputs = [self._info(n, ind[n]) for n in sigs[self.sig]["inputs"]]
        self.outputs = [self._info(n, outd[n]) for n in sigs[self.sig]["outputs"]]
        self._quant_from_interpreter(path)
        self.in_bufs = self.cm.create_input_buffers(0)
        self.out_bufs = self.cm.create_output_buffers(0)
        self._out_spec = [(int(_prod(o["shape"])), _np_dtype(o["dtype"]), tuple(o["shape"])) for o in self.outputs]

    @staticmethod
    def _info(name, d):
        return {"name": name, "shape": [int(s) for s in d["shape"]], "dtype": str(d["dtype"]),
                "scale": [], "zero_point": []}

    def _quant_from_interpreter(self, path):
        # CompiledModel does not expose quantization parameters; the flatbuffer is the same.
        try:
            _, mod = import_tflite()
            it = mod.Interpreter(model_path=str(path))
            by_name = {}
            for d in list(it.get_input_details()) + list(it.get_output_details()):
                by_name[d["name"]] = _tflite_details(d)
            ins = [_tflite_details(d) for d in it.get_input_details()]
            outs = [_tflite_details(d) for d in it.get_output_details()]
            for mine, theirs in ((self.inputs, ins), (self.outputs, outs)):
                if len(mine) == len(theirs):
                    for a, b in zip(mine, theirs):
                        a["scale"], a["zero_point"] = b["scale"], b["zero_point"]
        except Exception:
            pass

    def run(self, feeds):
        for buf, x in zip(self.in_bufs, feeds):
            buf.write(x)
        self.cm.run_by_index(0, self.in_bufs, self.out_bufs)
        # the read-back waits for the accelerator: without it the time is the enqueue only
        return [buf.read(n, dt).reshape(shape) for buf, (n, dt, shape) in zip(self.out_bufs, self._out_spec)]

    def placement(self):
        facts = _parse_gpu_log(self.log) if self.target == "gpu" else {}
        full = bool(self.cm.is_fully_accelerated())
        facts.update({"accelerator": "gpu" if self.target == "gpu" else "xnnpack", "fully_accelerated": full})
        if full and "ops_fallback" not in facts:
            facts["ops_fallback"] = 0
        return facts

    def close(self):
        self.in_bufs = self.out_bufs = None
        self.cm = None


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
              "tensor(int64)": "int64", "tensor(bool)": "bool"}


class ORTBackend(Backend):
    api = "inference_session"

    def __init__(self, path, target, threads, profile_dir=None):
        try:
            import onnxruntime as ort  # type: ignore
        except Exception as e:
            raise Unavailable("onnxruntime is not installed: pip install onnxruntime (%s)" % _one_line(e))
        self.ort = ort
        self.runtime = "onnxruntime"
        self.version = getattr(ort, "__version__", None)
        self.target = target
        self.path = str(path)
        self.threads = threads
        if target == "gpu":
            have = ort.get_available_providers()
            if "CUDAExecutionProvider" not in have:
                raise Unavailable("onnxruntime has no CUDAExecutionProvider (providers: %s): install onnxruntime-gpu "
                                  "with CUDA and cuDNN" % ", ".join(have))
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif target == "cpu":
            self.providers = ["CPUExecutionProvider"]
        else:
            raise Unavailable("onnxruntime does not run on %s" % target)
        self.sess = self._session(profile_prefix=None)
        got = self.sess.get_providers()
        if target == "gpu" and "CUDAExecutionProvider" not in got:
            raise Unavailable("CUDAExecutionProvider failed to initialise (session providers: %s): check the CUDA "
                              "and cuDNN libraries" % ", ".join(got))
        self.session_providers = got
        self.inputs = [self._info(x) for x in self.sess.get_inputs()]
        self.outputs = [self._info(x) for x in self.sess.get_outputs()]
        self._names = [x["name"] for x in self.inputs]

    def _session(self, profile_prefix):
        ort = self.ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return ort.InferenceSession(self.path, sess_options=so, providers=self.providers)

    @staticmethod
    def _info(x):
        shape = [d if isinstance(d, int) else -1 for d in x.shape]
        return {"name": x.name, "shape": shape, "dtype": _ORT_TYPES.get(x.type, x.type), "scale": [], "zero_point": []}

    def run(self, feeds):
        return self.sess.run(None, dict(zip(self._names, feeds)))

    def placement(self):
        if self.target == "cpu":
            return {"accelerator": None, "providers": self.session_providers}
        prof = self.profile(None, 5)  # providers per node come from the profiler
        out = {"accelerator": "cuda", "providers": self.session_providers}
        if prof:
            out.update({k: prof[k] for k in ("ops_total", "ops_accelerated", "ops_fallback", "fallback_ops",
                                             "fully_accelerated") if k in prof})
        return out

    def profile(self, feeds, runs):
        """A separate profiled session (profiling slows every node): top ops and provider per node."""
        d = tempfile.mkdtemp(prefix="edgepipe-ortprof-")
        sess = self._session(profile_prefix=os.path.join(d, "ort"))
        if feeds is None:
            feeds = [_random_input(x) for x in self.inputs]
        names = [x.name for x in sess.get_inputs()]
        skip = 3  # the first runs of a fresh session allocate; they are not the steady state
        for _ in range(skip + max(1, runs)):
            sess.run(None, dict(zip(names, feeds)))
        fn = sess.end_profiling()
        try:
            with open(fn) as fh:
                events = json.load(fh)
        finally:
            try:
                os.remove(fn)
                os.rmdir(d)
            except OSError:
                pass
        return parse_ort_profile(events, runs=max(1, runs), skip_runs=skip, accelerated_provider=(
            "CUDAExecutionProvider" if self.target == "gpu" else None))

    def close(self):
        self.sess = None


def parse_ort_profile(events, runs=1, accelerated_provider=None, top=10, skip_runs=0):
    """onnxruntime profiler JSON -> top ops by time, time per op type, provider per node.

    Node events of the first ``skip_runs`` runs (``model_run`` session events) are ignored.
    """
    start_ts = None
    model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                        key=lambda e: e.get("ts", 0))
    if skip_runs and len(model_runs) > skip_runs:
        last = model_runs[skip_runs - 1]
        start_ts = last.get("ts", 0) + last.get("dur", 0)
    nodes = {}
    by_type = {}
    total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if start_ts is not None and e.get("ts", 0) < start_ts:
            continue
        a = e.get("args") or {}
        name = e["name"][: -len("_kernel_time")]
        us = float(e.get("dur", 0))
        total += us
        n = nodes.setdefault(name, {"node": name, "op": a.get("op_name"), "provider": a.get("provider"), "us": 0.0,
                                    "calls": 0})
        n["us"] += us
        n["calls"] += 1
        t = by_type.setdefault(a.get("op_name") or "?", {"op": a.get("op_name") or "?", "us": 0.0, "nodes": set()})
        t["us"] += us
        t["nodes"].add(name)
    if not nodes:
        return None
    top_nodes = sorted(nodes.values(), key=lambda n: -n["us"])[:top]
    types = sorted(by_type.values(), key=lambda t: -t["us"])
    prov = {}
    for n in nodes.values():
        prov[n["provider"]] = prov.get(n["provider"], 0) + 1
    out = {
        "source": "onnxruntime profiler",
        "runs": runs,
        "total_ms_per_run": total / 1000.0 / runs,
        "top_ops": [{"op": t["op"], "ms": t["us"] / 1000.0 / runs, "pct": 100.0 * t["us"] / total if total else 0.0,
                     "nodes": len(t["nodes"])} for t in types[:top]],
        "top_nodes": [{"node": n["node"], "op": n["op"], "provider": n["provider"],
                       "ms": n["us"] / 1000.0 / runs, "pct": 100.0 * n["us"] / total if total else 0.0}
                      for n in top_nodes],
        "providers": prov,
        "ops_total": len(nodes),
    }
    if accelerated_provider:
        off = [n for n in nodes.values() if n["provider"] != accelerated_provider]
        out["ops_accelerated"] = len(nodes) - len(off)
        out["ops_fallback"] = len(off)
        out["fallback_ops"] = _histogram(n["op"] or "?" for n in off)
        out["fully_accelerated"] = len(off) == 0
    return out


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _one_line(e):
    s = str(e).strip().replace("\n", " ")
    s = " ".join(s.split())
    return (s[:400] + "...") if len(s) > 400 else s


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _random_input(info, rng=None):
    import numpy as np

    rng = rng or np.random.default_rng(0)
    dt = np.dtype(info["dtype"])
    shape = [1 if int(s) < 0 else int(s) for s in info["shape"]]
    if dt.kind in "iu":
        ii = np.iinfo(dt)
        lo, hi = (max(ii.min, -128), min(ii.max, 255)) if dt.itemsize > 1 else (ii.min, ii.max)
        return rng.integers(lo, hi, size=shape, endpoint=True).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 1, size=shape, endpoint=True).astype(dt)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dt)


def quantize(x, info):
    import numpy as np

    dt = np.dtype(info["dtype"])
    x = np.asarray(x)
    if x.dtype == dt:
        return np.ascontiguousarray(x)
    if dt.kind == "f":
        return np.ascontiguousarray(x, dtype=dt)
    scale = np.asarray(info.get("scale") or [1.0], np.float32)
    zp = np.asarray(info.get("zero_point") or [0], np.float32)
    ii = np.iinfo(dt)
    y = np.round(x.astype(np.float32) / scale + zp)
    return np.ascontiguousarray(np.clip(y, ii.min, ii.max).astype(dt))


def dequantize(y, info):
    import numpy as np

    y = np.asarray(y)
    if y.dtype.kind == "f" or not info.get("scale"):
        return y.astype(np.float32)
    scale = np.asarray(info["scale"], np.float32)
    zp = np.asarray(info.get("zero_point") or [0], np.float32)
    return (y.astype(np.float32) - zp) * scale


def load_inputs(backend, npz_path, max_samples=32):
    """List of feed lists (one per sample), native dtype, and where they came from."""
    import numpy as np

    if not npz_path:
        rng = np.random.default_rng(0)
        return [[_random_input(i, rng) for i in backend.inputs] for _ in range(4)], "random"
    with np.load(npz_path) as z:
        arrays = {k: z[k] for k in z.files}
    per_input = []
    for k, info in enumerate(backend.inputs):
        a = arrays.get(info["name"])
        if a is None:
            a = arrays.get("input_%d" % k)
        if a is None and len(backend.inputs) == 1 and len(arrays) == 1:
            a = next(iter(arrays.values()))
        if a is None and len(backend.inputs) == 1 and "inputs" in arrays:
            a = arrays["inputs"]
        if a is None:
            raise AgentError("inputs file %s has no array for input '%s' (has: %s)"
                             % (npz_path, info["name"], ", ".join(sorted(arrays))))
        want = [int(s) for s in info["shape"]]
        if a.ndim == len(want) - 1:
            a = a[None]
        tail = [s for s in want[1:]]
        if list(a.shape[1:]) != tail and all(s > 0 for s in tail):
            # NCHW artifact fed NHWC samples (or the reverse): transpose when that makes it fit
            if a.ndim == 4 and [a.shape[3], a.shape[1], a.shape[2]] == tail:
                a = a.transpose(0, 3, 1, 2)
            elif a.ndim == 4 and [a.shape[2], a.shape[3], a.shape[1]] == tail:
                a = a.transpose(0, 2, 3, 1)
            else:
                raise AgentError("inputs file %s: samples of shape %s do not fit input '%s' %s"
                                 % (npz_path, list(a.shape[1:]), info["name"], want))
        per_input.append(a if max_samples is None else a[:max_samples])
    n = min(a.shape[0] for a in per_input)
    samples = []
    for i in range(n):
        samples.append([quantize(a[i:i + 1], info) for a, info in zip(per_input, backend.inputs)])
    return samples, "file"


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def open_backend(artifact, fmt, target, threads, delegate_lib=None, api=None):
    if fmt == "tflite":
        if target == "gpu":
            return LiteRTCompiledBackend(artifact, "gpu", threads)
        if target == "cpu" and api == "compiled_model":
            return LiteRTCompiledBackend(artifact, "cpu", threads)
        if target in ("cpu", "edgetpu"):
            return TFLiteInterpreterBackend(artifact, target, threads, delegate_lib)
    if fmt == "onnx":
        return ORTBackend(artifact, target, threads)
    raise Unavailable("the agent cannot run %s artifacts on %s" % (fmt, target))


def _crash_hook(artifact):
    want = os.environ.get("EDGEPIPE_AGENT_CRASH")
    if want and (want == "*" or want in os.path.basename(str(artifact))):
        sys.stderr.write("edgepipe agent: EDGEPIPE_AGENT_CRASH matched, raising SIGSEGV (test hook)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)


def measure(backend, samples, runs=50, min_seconds=1.0, warmup=5, max_seconds=None, profile=False,
            profile_runs=20):
    """The timing method, shared by the agent and edgepipe's in-process worker."""
    clock = time.perf_counter
    k = len(samples)
    res = {}
    stage("first inference")
    t0 = clock()
    outs = backend.run(samples[0])
    res["first_ms"] = (clock() - t0) * 1000.0
    first_outputs = outs
    wu = []
    for i in range(max(0, int(warmup))):
        t0 = clock()
        backend.run(samples[i % k])
        wu.append((clock() - t0) * 1000.0)
    res["warmup_ms"] = wu
    stage("measure")
    times = []
    gc_was = gc.isenabled()
    gc.disable()
    truncated = False
    start = clock()
    try:
        i = 0
        while True:
            feeds = samples[i % k]
            t0 = clock()
            backend.run(feeds)
            t1 = clock()
            times.append((t1 - t0) * 1000.0)
            i += 1
            elapsed = t1 - start
            if i >= runs and elapsed >= min_seconds:
                break
            if max_seconds is not None and elapsed >= max_seconds:
                truncated = i < runs or elapsed < min_seconds
                break
    finally:
        if gc_was:
            gc.enable()
    wall = clock() - start
    res["latency_ms"] = summarize(times)
    res["samples_ms"] = times
    res["measured_s"] = wall
    res["truncated"] = truncated
    mean = res["latency_ms"].get("mean")
    res["throughput_ips"] = 1000.0 / mean if mean else None
    if profile:
        stage("profile")
        try:
            res["profile"] = backend.profile(samples[0], profile_runs) or {
                "source": None,
                "note": "%s exposes no per-op profiler through its Python API; placement shows which ops the "
                        "accelerator took" % backend.runtime}
        except Exception as e:  # noqa: BLE001
            res["profile"] = {"error": _one_line(e)}
    return res, first_outputs


def run_agent(args, opener=None):
    """Measure one artifact as ``args`` says. ``opener()`` -> Backend replaces the built-in runtimes
    (edgepipe's in-process worker uses it to measure any registered runtime the same way)."""
    info = {
        "agent_version": AGENT_VERSION,
        "artifact": str(args.artifact),
        "format": args.format,
        "target": args.target,
        "python": platform.python_version(),
        "pid": os.getpid(),
    }
    import numpy as np  # noqa: F401  (import cost is not the model's)

    info["memory_baseline"] = memory_now()
    stage("load")
    t0 = time.perf_counter()
    if opener is not None:
        backend = opener()
    else:
        backend = open_backend(args.artifact, args.format, args.target, args.threads, args.delegate, args.api)
    info["load_ms"] = (time.perf_counter() - t0) * 1000.0
    info["memory_after_load"] = memory_now()
    stage("loaded")
    _crash_hook(args.artifact)
    info["runtime"] = {"name": backend.runtime, "version": backend.version, "api": backend.api}
    info["threads"] = args.threads or None
    info["inputs"] = [{k: v for k, v in i.items() if k != "index"} for i in backend.inputs]
    info["outputs"] = [{k: v for k, v in o.items() if k != "index"} for o in backend.outputs]
    stage("inputs")
    samples, source = load_inputs(backend, args.inputs)
    info["input_source"] = source
    info["input_samples"] = len(samples)
    res, first = measure(backend, samples, runs=args.runs, min_seconds=args.min_seconds, warmup=args.warmup,
                         max_seconds=args.max_seconds, profile=args.profile)
    info.update(res)
    stage("placement")
    try:
        info["placement"] = backend.placement()
    except Exception as e:  # noqa: BLE001
        info["placement"] = {"error": _one_line(e)}
    if args.save_outputs:
        stage("save outputs")
        arrays = {}
        for s_i, feeds in enumerate(samples[:8]):
            ys = backend.run(feeds)
            for o_i, (y, o) in enumerate(zip(ys, backend.outputs)):
                arrays.setdefault("output_%d" % o_i, []).append(dequantize(y, o))
        np.savez(args.save_outputs, **{k: np.concatenate(v, axis=0) for k, v in arrays.items()})
        info["saved_outputs"] = str(args.save_outputs)
    info["memory"] = memory_now()
    info["loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    backend.close()
    info["status"] = "ok"
    return info


def run_predict(args):
    """Predict mode (``--predict-out``): every sample of ``--inputs`` through the artifact, batch of 1;
    the dequantized outputs go to an .npz (``output_0``... stacked over samples). For accuracy
    evaluation on a device (`edgepipe eval --device`)."""
    import numpy as np

    if not args.inputs:
        raise AgentError("--predict-out needs --inputs (an .npz of preprocessed samples)")
    stage("load")
    t0 = time.perf_counter()
    backend = open_backend(args.artifact, args.format, args.target, args.threads, args.delegate, args.api)
    info = {"agent_version": AGENT_VERSION, "mode": "predict", "artifact": str(args.artifact),
            "format": args.format, "target": args.target, "python": platform.python_version(),
            "load_ms": (time.perf_counter() - t0) * 1000.0,
            "runtime": {"name": backend.runtime, "version": backend.version, "api": backend.api},
            "threads": args.threads or None}
    _crash_hook(args.artifact)
    stage("inputs")
    samples, _ = load_inputs(backend, args.inputs, max_samples=None)
    stage("predict")
    outs = [[] for _ in backend.outputs]
    t1 = time.perf_counter()
    for feeds in samples:
        for o_i, y in enumerate(backend.run(feeds)):
            outs[o_i].append(np.asarray(y))
    info["predict_s"] = time.perf_counter() - t1
    info["samples"] = len(samples)
    arrays = {}
    for o_i, (ys, o) in enumerate(zip(outs, backend.outputs)):
        if ys:
            arrays["output_%d" % o_i] = dequantize(np.concatenate(ys, axis=0), o)
    tmp = args.predict_out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, args.predict_out)
    info["outputs"] = [{k: v for k, v in o.items() if k != "index"} for o in backend.outputs]
    info["predict_out"] = str(args.predict_out)
    backend.close()
    info["status"] = "ok"
    return info


# ---------------------------------------------------------------------------------------------
# probes: what this host can run
# ---------------------------------------------------------------------------------------------
def vulkan_adapters():
    """Vulkan physical devices through the loader (ctypes, no bindings). (list, error)."""
    import ctypes
    import struct

    lib = None
    for name in ("libvulkan.so.1", "libvulkan.so", "libvulkan.1.dylib", "libMoltenVK.dylib", "vulkan-1.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return [], "Vulkan loader (libvulkan.so.1) not found: install libvulkan1 and a Vulkan driver"

    class CreateInfo(ctypes.Structure):
        _fields_ = [("sType", ctypes.c_int32), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                    ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                    ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                    ("ppEnabledExtensionNames", ctypes.c_void_p)]

    ci = CreateInfo(1, None, 0, None, 0, None, 0, None)  # VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO
    inst = ctypes.c_void_p()
    lib.vkCreateInstance.restype = ctypes.c_int32
    r = lib.vkCreateInstance(ctypes.byref(ci), None, ctypes.byref(inst))
    if r != 0:
        return [], "no Vulkan driver (vkCreateInstance returned %d): install mesa-vulkan-drivers or a GPU driver" % r
    kinds = {0: "other", 1: "integrated", 2: "discrete", 3: "virtual", 4: "cpu"}
    out = []
    try:
        n = ctypes.c_uint32(0)
        lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None)
        devs = (ctypes.c_void_p * max(1, n.value))()
        lib.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), devs)
        for k in range(n.value):
            buf = ctypes.create_string_buffer(4096)  # VkPhysicalDeviceProperties is < 1 KiB
            lib.vkGetPhysicalDeviceProperties(ctypes.c_void_p(devs[k]), buf)
            api, _drv, vendor, device, typ = struct.unpack_from("<IIIIi", buf.raw, 0)
            name = buf.raw[20:276].split(b"\0", 1)[0].decode("utf-8", "replace")
            out.append({"name": name, "type": kinds.get(typ, str(typ)),
                        "vulkan": "%d.%d.%d" % (api >> 22, (api >> 12) & 0x3FF, api & 0xFFF),
                        "vendor_id": "0x%04x" % vendor, "device_id": "0x%04x" % device})
    finally:
        lib.vkDestroyInstance(inst, None)
    if not out:
        return [], "the Vulkan loader found no adapter: install mesa-vulkan-drivers (lavapipe) or a GPU driver"
    return out, None


def _tiny_add_model():
    """A one-op (ADD) TFLite flatbuffer built with the schema LiteRT ships: a GPU smoke test."""
    import flatbuffers  # type: ignore
    from ai_edge_litert import schema_py_generated as s  # type: ignore

    m = s.ModelT()
    m.version = 3
    m.description = "edgepipe gpu probe"
    m.buffers = [s.BufferT() for _ in range(3)]
    code = s.OperatorCodeT()
    code.builtinCode = s.BuiltinOperator.ADD
    code.deprecatedBuiltinCode = s.BuiltinOperator.ADD
    code.version = 1
    m.operatorCodes = [code]
    g = s.SubGraphT()
    g.tensors = []
    for i, n in enumerate(("a", "b", "y")):
        t = s.TensorT()
        t.shape = [1, 2, 2, 4]
        t.type = s.TensorType.FLOAT32
        t.buffer = i
        t.name = n
        g.tensors.append(t)
    g.inputs, g.outputs = [0, 1], [2]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType = s.BuiltinOptions.AddOptions
    op.builtinOptions = s.AddOptionsT()
    g.operators = [op]
    m.subgraphs = [g]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def probe_gpu_tflite():
    out = {"runtime": "ai_edge_litert", "version": dist_version("ai-edge-litert")}
    adapters, err = vulkan_adapters()
    out["vulkan_adapters"] = adapters
    try:
        from ai_edge_litert.compiled_model import CompiledModel  # type: ignore
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator  # type: ignore
        import numpy as np
    except Exception as e:
        out["reason"] = "LiteRT CompiledModel API missing: pip install ai-edge-litert>=2 (%s)" % _one_line(e)
        return out
    import ai_edge_litert  # type: ignore

    libdir = os.path.dirname(os.path.abspath(ai_edge_litert.__file__))
    accels = [f for f in ("libLiteRtGpuAccelerator.so", "libLiteRtWebGpuAccelerator.so",
                          "libLiteRtMetalAccelerator.dylib", "libLiteRtOpenClAccelerator.so")
              if os.path.exists(os.path.join(libdir, f))]
    out["accelerator_libraries"] = accels
    if not accels:
        out["reason"] = "this ai-edge-litert build ships no GPU accelerator library"
        return out
    if err and platform.system() != "Darwin":
        out["reason"] = err
        return out
    try:
        data = _tiny_add_model()
    except Exception as e:
        out["reason"] = "cannot build the probe model (flatbuffers missing?): %s" % _one_line(e)
        return out
    with CaptureStderr() as cap:
        try:
            cm = CompiledModel.from_buffer(data, hardware_accel=HardwareAccelerator.GPU)
            full = cm.is_fully_accelerated()
            ins, outs = cm.create_input_buffers(0), cm.create_output_buffers(0)
            a = np.arange(16, dtype=np.float32).reshape(1, 2, 2, 4)
            ins[0].write(a)
            ins[1].write(a)
            cm.run_by_index(0, ins, outs)
            y = outs[0].read(16, np.float32)
            ok = bool(np.allclose(y, 2 * a.ravel()))
            e = None
        except Exception as ex:  # noqa: BLE001
            e = ex
    log = cap.text
    facts = _parse_gpu_log(log)
    if facts.get("backend"):
        out["backend"] = facts["backend"]
    if e is not None:
        out["reason"] = "LiteRT's GPU accelerator failed on a one-op model: %s" % _one_line(e)
        if "mesa" in log.lower() or any(a.get("type") == "cpu" for a in adapters):
            out["reason"] += " (lavapipe needs Mesa >= 25: see .ci/system-deps.sh)"
        return out
    if not full or not ok:
        out["reason"] = "LiteRT's GPU accelerator did not run a one-op ADD model correctly (fully accelerated: %s, " \
                        "result correct: %s)" % (full, ok)
        return out
    out["available"] = True
    if adapters and all(a["type"] == "cpu" for a in adapters):
        out["note"] = "software Vulkan (%s): correctness only, never speed claims" % adapters[0]["name"]
    return out


def probe_target(target):
    res = {}
    if target == "cpu":
        try:
            name, _ = import_tflite()
            res["tflite"] = {"available": True, "runtime": name,
                             "version": dist_version("ai-edge-litert" if name == "ai_edge_litert" else "tflite-runtime"),
                             "delegate": "xnnpack"}
        except Unavailable as e:
            res["tflite"] = {"reason": str(e)}
        try:
            import onnxruntime as ort  # type: ignore

            res["onnx"] = {"available": True, "runtime": "onnxruntime", "version": ort.__version__,
                           "providers": ort.get_available_providers()}
        except Exception as e:
            res["onnx"] = {"reason": "onnxruntime is not installed: pip install onnxruntime (%s)" % _one_line(e)}
    elif target == "gpu":
        res["tflite"] = probe_gpu_tflite()
        try:
            import onnxruntime as ort  # type: ignore

            have = ort.get_available_providers()
            if "CUDAExecutionProvider" in have:
                res["onnx"] = {"available": True, "runtime": "onnxruntime", "version": ort.__version__,
                               "providers": have}
            else:
                res["onnx"] = {"runtime": "onnxruntime", "version": ort.__version__, "providers": have,
                               "reason": "onnxruntime has no CUDAExecutionProvider (providers: %s): install "
                                         "onnxruntime-gpu with CUDA and cuDNN" % ", ".join(have)}
        except Exception as e:
            res["onnx"] = {"reason": "onnxruntime is not installed (%s)" % _one_line(e)}
    elif target == "edgetpu":
        lib = _EDGETPU_LIBS.get(platform.system(), "libedgetpu.so.1")
        try:
            _, mod = import_tflite()
        except Unavailable as e:
            res["tflite"] = {"reason": str(e)}
            return res
        import ctypes

        try:
            ctypes.CDLL(lib)
        except OSError as e:
            res["tflite"] = {"library": lib, "reason": "%s not found (install libedgetpu1-std): %s" % (
                lib, _one_line(e))}
            return res
        try:
            mod.load_delegate(lib)
            res["tflite"] = {"available": True, "library": lib}
        except Exception as e:  # noqa: BLE001
            res["tflite"] = {"library": lib, "reason": "%s loaded but no Edge TPU answered: %s" % (lib, _one_line(e))}
    else:
        res["reason"] = "unknown target %s" % target
    return res


def probe(targets):
    out = {"agent_version": AGENT_VERSION, "python": platform.python_version(), "system": platform.system(),
           "machine": platform.machine(), "targets": {}}
    for t in targets:
        try:
            out["targets"][t] = probe_target(t)
        except Exception as e:  # noqa: BLE001
            out["targets"][t] = {"reason": "probe failed: %s" % _one_line(e)}
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Measure one model on one target; prints one JSON object.")
    p.add_argument("--artifact")
    p.add_argument("--format", choices=("tflite", "onnx"))
    p.add_argument("--target", choices=("cpu", "gpu", "edgetpu"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="0: the runtime's default")
    p.add_argument("--runs", type=int, default=50, help="at least this many measured runs")
    p.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long")
    p.add_argument("--max-seconds", type=float, default=None, help="stop measuring after this long")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--inputs", help=".npz of preprocessed float samples (keys: input names or input_0...)")
    p.add_argument("--profile", action="store_true", help="also profile ops (slower; separate pass)")
    p.add_argument("--save-outputs", help="write the outputs of up to 8 samples (dequantized) to this .npz")
    p.add_argument("--delegate", help="Edge TPU delegate library (default libedgetpu.so.1)")
    p.add_argument("--api", choices=("interpreter", "compiled_model"), default=None,
                   help="TFLite on cpu: Interpreter (default) or CompiledModel")
    p.add_argument("--probe", metavar="TARGETS", help="report what this host can run (e.g. cpu,gpu,edgetpu)")
    p.add_argument("--predict-out", help="predict mode: run every --inputs sample, write the outputs to this .npz")
    a = p.parse_args(argv)
    if not a.probe and (not a.artifact or not a.format):
        p.error("--artifact and --format are required (or --probe)")
    if a.runs < 1 or a.warmup < 0 or a.min_seconds < 0 or a.threads < 0:
        p.error("--runs >= 1, --warmup >= 0, --min-seconds >= 0, --threads >= 0")
    return a


def main_with(fn):
    """Run ``fn() -> dict`` with stdout reserved for its one JSON answer; map errors to exit codes."""
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)  # whatever runtimes print goes to stderr
    if not os.environ.get("XDG_RUNTIME_DIR"):  # one private dir per user, reused (not one per run)
        xdg = os.path.join(tempfile.gettempdir(), "edgepipe-xdg-%d" % (os.getuid() if hasattr(os, "getuid") else 0))
        os.makedirs(xdg, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = xdg
    code = 0
    try:
        out = fn()
    except Unavailable as e:
        out = {"agent_version": AGENT_VERSION, "status": "unavailable", "reason": str(e)}
        code = 3
    except AgentError as e:
        out = {"agent_version": AGENT_VERSION, "status": "error", "error": str(e)}
        code = 1
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out = {"agent_version": AGENT_VERSION, "status": "error", "error": "%s: %s" % (type(e).__name__, _one_line(e))}
        code = 1
    data = (json.dumps(out, default=_json_default) + "\n").encode()
    sys.stdout.flush()
    os.write(json_fd, data)
    os.close(json_fd)
    return code


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return main_with(lambda: probe([t.strip() for t in args.probe.split(",") if t.strip()]))
    if args.predict_out:
        return main_with(lambda: run_predict(args))
    return main_with(lambda: run_agent(args))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except Exception:
        pass
    if isinstance(o, set):
        return sorted(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
