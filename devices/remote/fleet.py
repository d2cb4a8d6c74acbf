"""Several devices at once: the runner for a registered device, `edgepipe bench --device ...` across
devices (each in its own session) merged into one report, and eval's predictions on one device.

    edgepipe bench OUT --device pi4 --targets cpu        # or --device pi4,pixel,local, or --device all
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from edgepipe.pipeline.base.bench import BenchReport, BenchRow
from edgepipe.pipeline.base.errors import UserError

from edgepipe.devices.measure.bench import LocalRunner, run_bench
from edgepipe.devices.measure.host import host_facts
from edgepipe.devices.measure.settings import BenchSettings
from edgepipe.devices.remote.adb import make_adb_runner
from edgepipe.devices.remote.registry import Device, Registry, check_benchmark_binary, config_path
from edgepipe.devices.remote.runner import RemoteRunner
from edgepipe.devices.remote.ssh import SSHTransport
from edgepipe.devices.remote.transport import TransportError

ProgressFn = Callable[[str, BenchRow, int, int], None]


def make_runner(dev: Device, registry: Optional[Registry] = None,
                benchmark_binary: Optional[str] = None) -> RemoteRunner:
    """The runner for a registered device (not connected yet: use it as a context manager)."""
    if dev.kind == "ssh":
        kh = None if dev.known_hosts == "user" else Path(dev.known_hosts) if dev.known_hosts else \
            (registry.known_hosts if registry else config_path().parent / "known_hosts")
        return RemoteRunner(dev, SSHTransport(dev, known_hosts=kh))
    if dev.kind == "adb":
        return make_adb_runner(dev, benchmark_binary=benchmark_binary)
    raise UserError(f"device '{dev.name}' has unknown kind '{dev.kind}'", "Remove it and add it again")


def resolve_devices(spec: str, registry: Registry) -> list[str]:
    """'pi4,pixel', 'all' (every registered device) and 'local' -> device names, validated."""
    names: list[str] = []
    for item in [x.strip() for x in (spec or "").split(",") if x.strip()]:
        if item == "all":
            if not registry.devices:
                raise UserError(f"--device all: no devices are registered in {registry.path}",
                                "Add one with `edgepipe devices add NAME ssh://user@host` or adb://SERIAL")
            add = sorted(registry.devices)
        else:
            if item != "local":
                registry.get(item)  # UserError naming the registry when unknown
            add = [item]
        names += [n for n in add if n not in names]
    if not names:
        raise UserError("--device names no device", "Use --device NAME, a comma-separated list, 'local' or 'all'")
    return names


def bench_devices(manifest_path: Union[str, os.PathLike], settings: BenchSettings, device_spec: str,
                  config: Optional[str] = None, benchmark_binary: Optional[str] = None,
                  progress: Optional[ProgressFn] = None,
                  on_device: Optional[Callable[[str], None]] = None) -> BenchReport:
    """`edgepipe bench --device ...`: run_bench once per device (each in its own session), one report."""
    registry = Registry(config)
    names = resolve_devices(device_spec, registry)
    if benchmark_binary:
        check_benchmark_binary(benchmark_binary)
    # every runner is built (and so every device's options checked) before the first measurement
    runners = [(n, LocalRunner() if n == "local" else make_runner(registry.get(n), registry, benchmark_binary))
               for n in names]
    reports = []
    for name, runner in runners:
        if on_device:
            on_device(name)
        s = copy.deepcopy(settings)
        if isinstance(runner, LocalRunner):
            reports.append(run_bench(manifest_path, settings=s, progress=progress, runner=runner))
            continue
        with runner:
            reports.append(run_bench(manifest_path, settings=s, progress=progress, runner=runner))
    return merge_reports(reports)


def merge_reports(reports: list[BenchReport]) -> BenchReport:
    """Reports of the same export from several devices -> one report with a row per device."""
    if not reports:
        raise ValueError("no reports to merge")
    if len(reports) == 1:
        return reports[0]
    base = copy.deepcopy(reports[0])
    base.rows = [r for rep in reports for r in rep.rows]
    base.devices = {name: {**ident, "host": rep.host, "targets_probe": rep.targets,
                           "threads": (rep.settings or {}).get("threads")}
                    for rep in reports for name, ident in (rep.devices or {}).items()}
    base.host = {**host_facts(), "role": "controller: the machine that ran edgepipe; see devices for each device"}
    per = {next(iter(rep.devices), "local"): (rep.settings or {}).get("threads") for rep in reports}
    base.settings = {**(base.settings or {}), "devices": list(per), "threads_per_device": per}
    if len(set(per.values())) > 1:
        base.settings["threads"] = ", ".join(f"{k} {v}" for k, v in per.items())
    base.wall_s = sum(rep.wall_s or 0.0 for rep in reports)
    return base


def predict_on_device(dev_name: str, artifact_path: Union[str, os.PathLike], fmt: str,
                      inputs_npz: Union[str, os.PathLike], config: Optional[str] = None, target: str = "cpu",
                      threads: int = 0, timeout_s: float = 600.0) -> np.ndarray:
    """Outputs (N, ...) of the artifact's first output for every sample of ``inputs_npz``, computed on
    the registered device ``dev_name`` (one session: connect, copy, run, copy back, clean up).
    Raises UserError for an unknown device, TransportError when the device cannot do it."""
    registry = Registry(config)
    runner = make_runner(registry.get(dev_name), registry)
    with runner:
        if runner.error is not None:
            raise runner.error
        why = runner.predict_reason(fmt, target)
        if why:
            raise TransportError(why, "unsupported")
        outs, _ = runner.predict(Path(artifact_path), fmt, Path(inputs_npz), target, threads, timeout_s)
    return outs["output_0"]
