"""TensorFlow Lite's native ``benchmark_model`` tool: its command line and a parser for what it prints.

The tool (tensorflow/lite/tools/benchmark) is what phones without Python run. It logs, one fact per
line (with an ``INFO: `` prefix in recent releases, none in old ones):

    Initialized session in 30.1ms.
    Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if ...
    count=34 first=26425 curr=14420 min=14197 max=26425 avg=14753.6 std=2052     <- warm-up runs (us)
    Running benchmark for at least 50 iterations and at least 1 seconds but terminate if ...
    count=69 first=14523 curr=14400 min=14174 max=15018 avg=14436.4 std=130      <- measured runs (us)
    Inference timings in us: Init: 30021, First inference: 26425, Warmup (avg): 14753.6, Inference (avg): 14436.4
    Memory footprint delta from the start of the tool (MB): init=6.3 overall=7.3
    Overall peak memory footprint (MB) via periodic monitoring: 12.5

plus delegate lines ("Replacing 31 out of 31 node(s) with delegate (TfLiteGpuDelegateV2) node,
yielding 1 partitions") and, with ``--enable_op_profiling=true``, tab-separated tables ("Run Order",
"Top by Computation Time", "Summary by node type"). Older releases print "Average inference timings
in us: Warmup: .., Init: .., Inference: .." and "Peak memory footprint (MB): init=.. overall=..".

``parse(text)`` turns that into a ``BenchmarkModelResult``; ``row_fields(result)`` into the fields of
a BenchRow (``measure/bench.py``), so rows measured this way sit in the same report as the agent's.
The tool reports the mean, standard deviation, min and max of its runs, never a median or
percentiles: rows from it carry the mean in the median's column, and say so in a note.
Nothing here imports TensorFlow, or anything beyond the standard library.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|-?inf"
_KV = re.compile(r"([A-Za-z_]+)=(" + _NUM + r")")
_PREFIX = re.compile(r"^\s*(?:INFO|WARN|WARNING|ERROR|VERBOSE):\s?")
_RUNNING = re.compile(r"Running benchmark for at least (\d+) iterations and at least (" + _NUM + r") seconds")
_TIMINGS = re.compile(r"inference timings in us:\s*(.*)$", re.I)
_MEMORY = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\):\s*(.*)$")
_PEAK = re.compile(r"Overall peak memory footprint \(MB\)(?: via periodic monitoring)?:\s*(" + _NUM + ")")
_REPLACING = re.compile(r"Replacing (\d+)(?: out of (\d+))? node\(s\) with delegate \(([^)]*)\) node, "
                        r"yielding (\d+) partitions")
_EXPLICIT = re.compile(r"Explicitly applied (\S+) delegate, and the model graph will be (completely|partially) "
                       r"executed by the delegate(?: w/ (\d+) delegate kernels)?")
_INIT_SESSION = re.compile(r"Initialized session in (" + _NUM + r")\s*ms")
_MODEL_SIZE = re.compile(r"The input model file size \(MB\):\s*(" + _NUM + ")")
_PARAM = re.compile(r"^([A-Za-z#][^:\[\]]*?):\s*\[(.*)\]\s*$")
_VMRSS = re.compile(r"- VmRSS\s*:\s*(" + _NUM + r")\s*MB")
_SECTION = re.compile(r"^=+\s*(.+?)\s*=+$")

#: the delegate names benchmark_model logs -> edgepipe's accelerator names
DELEGATES = {"tflitexnnpackdelegate": "xnnpack", "xnnpack": "xnnpack", "tflitegpudelegatev2": "gpu", "gpu": "gpu",
             "tflitegpudelegate": "gpu", "tflitennapidelegate": "nnapi", "nnapi": "nnapi",
             "tflitehexagondelegate": "hexagon", "hexagon": "hexagon", "edgetpu": "edgetpu"}


@dataclass
class RunStats:
    """One ``count=.. first=.. curr=.. min=.. max=.. avg=.. std=..`` line, converted to milliseconds."""

    count: int
    first_ms: Optional[float] = None
    curr_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    avg_ms: Optional[float] = None
    std_ms: Optional[float] = None
    all_same: bool = False


@dataclass
class BenchmarkModelResult:
    complete: bool = False  # the closing "Inference timings in us" line was printed
    params: dict = field(default_factory=dict)  # "Num threads": "4", "Graph": "...", as the tool echoed them
    model_size_mb: Optional[float] = None
    init_ms: Optional[float] = None
    first_ms: Optional[float] = None
    warmup_avg_ms: Optional[float] = None
    inference_avg_ms: Optional[float] = None
    warmup: Optional[RunStats] = None
    inference: Optional[RunStats] = None
    requested_runs: Optional[int] = None
    requested_min_secs: Optional[float] = None
    memory_init_mb: Optional[float] = None
    memory_overall_mb: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    vmrss_mb: Optional[float] = None
    delegates: list = field(default_factory=list)  # {delegate, accelerator, replaced, total, partitions}
    explicit: list = field(default_factory=list)  # {delegate, coverage: completely|partially, kernels}
    op_profile: Optional[dict] = None
    init_profile: Optional[dict] = None
    errors: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def error(self) -> Optional[str]:
        """One line saying why the run did not finish (None when it did)."""
        if self.complete:
            return None
        if self.errors:
            return "; ".join(self.errors[-3:])
        if self.inference is None and self.warmup is None:
            return "benchmark_model printed no timings"
        return "benchmark_model stopped before printing its summary"


def _num(s: Optional[str]) -> Optional[float]:
    if s is None:
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return None if v != v else v  # nan -> None


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\r\n"))


def parse_stats(line: str) -> Optional[RunStats]:
    """``count=50 first=.. curr=.. min=.. max=.. avg=.. std=..`` (microseconds) -> RunStats (ms)."""
    kv = dict(_KV.findall(line))
    if "count" not in kv:
        return None
    us = lambda k: None if _num(kv.get(k)) is None else _num(kv.get(k)) / 1000.0  # noqa: E731
    st = RunStats(count=int(float(kv["count"])), first_ms=us("first"), curr_ms=us("curr"), min_ms=us("min"),
                  max_ms=us("max"), avg_ms=us("avg"), std_ms=us("std"), all_same="(all same)" in line)
    if st.all_same and st.curr_ms is not None:  # "count=N curr=X(all same)": every run took X
        st.min_ms = st.max_ms = st.avg_ms = st.curr_ms
        st.std_ms = 0.0
        if st.first_ms is None:
            st.first_ms = st.curr_ms
    elif st.count == 1 and st.curr_ms is not None and st.avg_ms is None:
        st.min_ms = st.max_ms = st.avg_ms = st.first_ms = st.curr_ms
        st.std_ms = 0.0
    return st


def _pairs(s: str) -> dict:
    """'Init: 30021, First inference: 26425, Warmup (avg): 14753.6' -> {'init': .., 'first inference': ..}."""
    out = {}
    for part in s.split(","):
        k, sep, v = part.partition(":")
        if sep:
            n = _num(v.strip().split()[0]) if v.strip() else None
            out[k.strip().lower()] = n
    return out


def _split_row(line: str) -> list[str]:
    cells = [c.strip() for c in line.split("\t")] if "\t" in line else re.split(r"\s{2,}", line.strip())
    return [c for c in cells if c != ""]


def _parse_table(lines: list[str]) -> list[dict]:
    """A profiling table: a header of [bracketed] column names, then one row per line."""
    header = None
    rows = []
    for ln in lines:
        s = ln.strip()
        if not s:
            if rows:
                break
            continue
        if s.startswith("["):
            header = [h.strip("[] ").lower() for h in re.findall(r"\[[^\]]*\]", s)]
            continue
        if header is None:
            continue
        cells = _split_row(ln)
        if len(cells) < len(header) - 1:
            break
        row = {}
        for h, c in zip(header, cells):
            if h == "name":  # "[tensor name]" or "[tensor name]:node index"
                m = re.match(r"^\[(.*)\](?::(\d+))?$", c.strip())
                if m:
                    c = m.group(1)
                    if m.group(2) is not None:
                        row["node_index"] = int(m.group(2))
            row[h] = c
        rows.append(row)
    return rows


def _f(row: dict, *keys: str) -> Optional[float]:
    for k in keys:
        if k in row:
            return _num(str(row[k]).rstrip("%"))
    return None


def parse_profile(lines: list[str]) -> Optional[dict]:
    """The op-profiling tables of one phase -> the profile dict edgepipe reports use
    (``source``, ``total_ms_per_run``, ``top_ops`` by node type, ``top_nodes``)."""
    sections: dict[str, list[str]] = {}
    cur = None
    for ln in lines:
        m = _SECTION.match(ln.strip())
        if m:
            cur = m.group(1).strip().lower()
            sections[cur] = []
            continue
        if cur is not None:
            sections[cur].append(ln)
    if not sections:
        return None
    by_type = _parse_table(sections.get("summary by node type", []))
    order = _parse_table(sections.get("run order", []))
    top = _parse_table(sections.get("top by computation time", []))
    if not (by_type or order or top):
        return None
    total = sum(_f(r, "avg ms") or 0.0 for r in by_type) if by_type else \
        sum(_f(r, "avg ms") or 0.0 for r in order)
    top_ops = [{"op": r.get("node type", "?"), "ms": _f(r, "avg ms"), "pct": _f(r, "avg %", "%") or 0.0,
                "nodes": int(_f(r, "count") or 0), "calls": int(_f(r, "times called") or 0)} for r in by_type]
    top_ops.sort(key=lambda o: -(o["ms"] or 0.0))
    src = top or sorted(order, key=lambda r: -(_f(r, "avg ms") or 0.0))
    top_nodes = [{"node": r.get("name"), "op": r.get("node type"), "ms": _f(r, "avg ms"),
                  "pct": _f(r, "%") or 0.0, "first_ms": _f(r, "first"), "mem_kb": _f(r, "mem kb")}
                 for r in src[:10]]
    out = {"source": "benchmark_model op profiling", "total_ms_per_run": total, "top_ops": top_ops[:10],
           "top_nodes": top_nodes, "nodes": len(order) or None}
    for ln in lines:
        m = re.search(r"Number of nodes executed:\s*(\d+)", ln)
        if m:
            out["nodes"] = int(m.group(1))
    return out


def _is_error(orig: str, s: str) -> bool:
    o = orig.strip()
    return (o.startswith(("ERROR:", "E tflite", "F tflite")) or s.startswith(("Benchmarking failed", "Failed to"))
            or "failed to apply" in s.lower() or s.startswith("Error:"))


def _timings(res: BenchmarkModelResult, m: re.Match) -> None:
    p = _pairs(m.group(1))

    def ms(*keys: str) -> Optional[float]:
        k = next((k for k in keys if k in p), keys[-1])
        return None if p.get(k) is None else p[k] / 1000.0

    res.init_ms, res.first_ms = ms("init"), ms("first inference")
    res.warmup_avg_ms, res.inference_avg_ms = ms("warmup (avg)", "warmup"), ms("inference (avg)", "inference")
    res.complete = True


def _memory(res: BenchmarkModelResult, m: re.Match) -> None:
    kv = dict(_KV.findall(m.group(1)))
    res.memory_init_mb, res.memory_overall_mb = _num(kv.get("init")), _num(kv.get("overall"))


def _peak(res: BenchmarkModelResult, m: re.Match) -> None:
    v = _num(m.group(1))
    res.peak_memory_mb = v if v is not None and v > 0 else None


def _replacing(res: BenchmarkModelResult, m: re.Match) -> None:
    name = m.group(3)
    res.delegates.append({"delegate": name, "accelerator": DELEGATES.get(name.lower(), name),
                          "replaced": int(m.group(1)), "total": int(m.group(2)) if m.group(2) else None,
                          "partitions": int(m.group(4))})


def _explicit(res: BenchmarkModelResult, m: re.Match) -> None:
    res.explicit.append({"delegate": m.group(1), "accelerator": DELEGATES.get(m.group(1).lower(), m.group(1)),
                         "coverage": m.group(2), "kernels": int(m.group(3)) if m.group(3) else None})


def _init_session(res: BenchmarkModelResult, m: re.Match) -> None:
    if res.init_ms is None:
        res.init_ms = _num(m.group(1))


# one-line facts: the first pattern that matches a line says what it is
_FACT_LINES = [
    (_TIMINGS, _timings), (_MEMORY, _memory), (_PEAK, _peak),
    (_VMRSS, lambda res, m: setattr(res, "vmrss_mb", _num(m.group(1)))),
    (_REPLACING, _replacing), (_EXPLICIT, _explicit),
    (_MODEL_SIZE, lambda res, m: setattr(res, "model_size_mb", _num(m.group(1)))),
    (_INIT_SESSION, _init_session),
]


def _fact(res: BenchmarkModelResult, orig: str, s: str) -> None:
    for rx, fn in _FACT_LINES:
        m = rx.search(s)
        if m:
            fn(res, m)
            return
    if _is_error(orig, s):
        res.errors.append(s[6:].strip() if s.startswith("Error:") else s)
        return
    m = _PARAM.match(s)
    if m:
        res.params[m.group(1).strip()] = m.group(2)


def _scan(text: str, res: BenchmarkModelResult) -> tuple[list, dict]:
    """Fill ``res`` line by line; (the run statistics with what each run asked for, the profile lines)."""
    pending_run = None  # (iterations, min secs) of the "Running benchmark" line waiting for its stats
    runs: list[tuple[RunStats, Optional[tuple]]] = []
    prof: dict[str, list[str]] = {"init": [], "regular": [], "any": []}
    phase = None
    for orig in (text or "").splitlines():
        raw = _strip(orig)
        s, low = raw.strip(), raw.strip().lower()
        if "profiling info for benchmark initialization" in low or \
                "operator-wise profiling info for regular benchmark runs" in low:
            phase = "init" if "initialization" in low else "regular"
            continue
        if phase:
            prof[phase].append(raw)
        prof["any"].append(raw)
        m = _RUNNING.search(s) if s else None
        if m:
            pending_run = (int(m.group(1)), _num(m.group(2)))
        elif pending_run is not None and s.startswith(("count=", "curr=")):
            st = parse_stats(s)
            if st is not None:
                runs.append((st, pending_run))
                pending_run = None
        elif s:
            _fact(res, orig, s)
    return runs, prof


def parse(text: str) -> BenchmarkModelResult:
    """Everything benchmark_model printed (stdout and stderr together) -> BenchmarkModelResult."""
    res = BenchmarkModelResult()
    runs, prof = _scan(text, res)
    if runs:
        res.warmup = runs[0][0]
        if len(runs) >= 2:
            res.inference, req = runs[1]
            res.requested_runs, res.requested_min_secs = req
    if res.complete and res.inference is None:
        res.complete = False
        res.errors.append("no measured-run statistics in the output")
    if any(ln.strip() for ln in prof["regular"]):
        res.op_profile = parse_profile(prof["regular"])
        res.init_profile = parse_profile(prof["init"]) if prof["init"] else None
    else:
        res.op_profile = parse_profile(prof["any"])
    if res.op_profile is not None and res.inference is not None:
        res.op_profile["runs"] = res.inference.count
    return res


# ---------------------------------------------------------------------------------------------
# command line and BenchRow fields
# ---------------------------------------------------------------------------------------------
TARGET_FLAGS = {
    "cpu": ["--use_gpu=false", "--use_xnnpack=true"],
    "gpu": ["--use_gpu=true", "--use_xnnpack=false"],
}


def command(binary: str, graph: str, target: str, threads: int, runs: int, min_secs: float, warmup: int,
            max_secs: Optional[float] = None, profile: bool = False) -> list[str]:
    """The argv for one row (paths as the device sees them)."""
    if target not in TARGET_FLAGS:
        raise ValueError(f"benchmark_model has no {target} target here (use one of {', '.join(TARGET_FLAGS)})")
    argv = [binary, f"--graph={graph}", f"--num_threads={int(threads)}", f"--num_runs={int(runs)}",
            f"--min_secs={float(min_secs):g}", f"--warmup_runs={max(0, int(warmup))}",
            "--report_peak_memory_footprint=true"]
    if max_secs:
        argv.append(f"--max_secs={float(max_secs):g}")
    argv += TARGET_FLAGS[target]
    argv.append(f"--enable_op_profiling={'true' if profile else 'false'}")
    return argv


def placement(res: BenchmarkModelResult, target: str) -> dict:
    """Which nodes the delegate of ``target`` took, from the "Replacing N out of M node(s)" lines."""
    want = "gpu" if target == "gpu" else "xnnpack"
    ds = [d for d in res.delegates if d["accelerator"] == want]
    if not ds:
        ex = [e for e in res.explicit if e["accelerator"] == want]
        if ex:
            return {"accelerator": want, "fully_accelerated": ex[-1]["coverage"] == "completely",
                    "partitions": ex[-1]["kernels"], "source": "benchmark_model"}
        return {"accelerator": None, "note": f"benchmark_model reported no {want} delegation",
                "source": "benchmark_model"}
    d = ds[-1]
    out = {"accelerator": want, "ops_accelerated": d["replaced"], "partitions": d["partitions"],
           "source": "benchmark_model"}
    if d["total"] is not None:
        out["ops_total"] = d["total"]
        out["ops_fallback"] = d["total"] - d["replaced"]
        out["fully_accelerated"] = d["total"] == d["replaced"] and d["partitions"] == 1
    else:
        full = [e for e in res.explicit if e["accelerator"] == want]
        if full:
            out["fully_accelerated"] = full[-1]["coverage"] == "completely"
    return out


def row_fields(res: BenchmarkModelResult, target: str) -> dict:
    """BenchRow fields (``latency_ms``, ``load_ms``, ``memory``...) from a complete result."""
    inf = res.inference or RunStats(count=0)
    lat = {"n": inf.count, "mean": inf.avg_ms, "std": inf.std_ms, "min": inf.min_ms, "max": inf.max_ms,
           # the tool prints no median: the mean stands in the median's column, flagged here and in a note
           "p50": inf.avg_ms if inf.avg_ms is not None else res.inference_avg_ms, "p50_is_mean": True,
           "first": inf.first_ms, "cv": (inf.std_ms / inf.avg_ms) if inf.std_ms is not None and inf.avg_ms else None}
    mem = {}
    if res.peak_memory_mb is not None:
        mem["peak_rss_kb"] = int(round(res.peak_memory_mb * 1024))
    elif res.vmrss_mb is not None:
        mem["peak_rss_kb"] = int(round(res.vmrss_mb * 1024))
    if res.memory_init_mb is not None:
        mem["init_delta_kb"] = int(round(res.memory_init_mb * 1024))
    if res.memory_overall_mb is not None:
        mem["overall_delta_kb"] = int(round(res.memory_overall_mb * 1024))
        mem["model_peak_kb"] = mem["overall_delta_kb"]
    warm = res.warmup
    out = {
        "load_ms": res.init_ms,
        "first_ms": res.first_ms if res.first_ms is not None else (warm.first_ms if warm else None),
        "warmup_ms": [],
        "latency_ms": {k: v for k, v in lat.items() if v is not None},
        "throughput_ips": (1000.0 / inf.avg_ms) if inf.avg_ms else None,
        "memory": mem,
        "placement": placement(res, target),
        "profile": res.op_profile,
        "notes": ["benchmark_model reports mean/std/min/max only: the p50 column holds the mean, and there is "
                  "no confidence interval"],
    }
    if warm is not None:
        out["notes"].append(f"warm-up: {warm.count} runs, mean {warm.avg_ms:.3f} ms" if warm.avg_ms is not None
                            else f"warm-up: {warm.count} runs")
    if res.inference and res.requested_runs and res.inference.count < res.requested_runs:
        out["truncated"] = True
        out["notes"].append(f"stopped at --max_secs after {res.inference.count} of {res.requested_runs} runs")
    return out
