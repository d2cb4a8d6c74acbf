"""edgepipe.devices: where artifacts run. Runtimes and their sessions, the benchmark method and its
reports, and the remote devices (ssh boards, adb phones) the same measurement reaches. Never imports
TensorFlow.

    onboard/   the standalone agent (sessions, MeasureSpec, the measurement), probe.py, predict.py:
               stdlib + numpy + a runtime, copied as they are to a board
    runtimes/  the Runtime registry (one module per runtime), this host's probe
    graph/     the TFLite graph reader and the Edge TPU placement predictor
    measure/   bench settings, the one planner, the local runner and worker, host facts, reports,
               TFLite's benchmark_model output
    remote/    the device registry, transports (ssh, adb), the remote runner, several devices at once

Imports point down that list (remote -> measure -> runtimes -> graph, runtimes -> onboard); no
subpackage imports this facade. The names below are the public surface.
"""
from edgepipe.pipeline.base.bench import STATUSES, BenchReport, BenchRow

from edgepipe.devices.graph.edgetpu import analyze_graph, analyze_tflite, require_full_edgetpu
from edgepipe.devices.graph.tflite_graph import read_tflite
from edgepipe.devices.measure.bench import LocalRunner, run_bench
from edgepipe.devices.measure.host import host_facts, target_table
from edgepipe.devices.measure.report import compare, render_html, render_markdown, write_reports
from edgepipe.devices.measure.settings import BenchSettings
from edgepipe.devices.onboard.agent import MeasureSpec, Session
from edgepipe.devices.remote.fleet import bench_devices, make_runner, predict_on_device, resolve_devices
from edgepipe.devices.remote.registry import Registry, check_benchmark_binary, make_device
from edgepipe.devices.remote.transport import TransportError
from edgepipe.devices.runtimes import RUNTIME_MODULES
from edgepipe.devices.runtimes.base import (TARGETS, RunOptions, Runtime, dequantize, get_runtime, parse_targets,
                                            quantize, runtime_name, runtimes_for, to_tensor_info)
from edgepipe.devices.runtimes.litert import tflite_io

__all__ = ["STATUSES", "TARGETS", "RUNTIME_MODULES", "BenchReport", "BenchRow", "BenchSettings", "LocalRunner",
           "MeasureSpec", "Registry", "RunOptions", "Runtime", "Session", "TransportError", "analyze_graph",
           "analyze_tflite", "bench_devices", "check_benchmark_binary", "compare", "dequantize", "get_runtime",
           "host_facts", "make_device", "make_runner", "parse_targets", "predict_on_device", "quantize", "read_tflite",
           "render_html", "render_markdown", "require_full_edgetpu", "resolve_devices", "run_bench", "runtime_name",
           "runtimes_for", "target_table", "tflite_io", "to_tensor_info", "write_reports"]
