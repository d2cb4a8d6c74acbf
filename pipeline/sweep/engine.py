"""Where the sweep's jobs run: in this process (``SerialEngine``), or on Ray (``RayEngine``): an
instance started for the run and stopped after it (embedded, 127.0.0.1 only), or a cluster
joined with ``--ray ADDRESS``.

Placement on Ray, by what a job measures:
    cpu     exports and evals: 1 CPU each, spread over every node
    device  a bench on a registered device: holds ``device:<name>`` (one unit, declared by the node
            that owns the device), so it runs there and never beside another job on that device
    local   a bench on this machine's own CPU: holds every CPU of the driver's node, so no export or
            eval runs beside the timing

Faults. A job whose worker or node dies is retried by Ray on another eligible node (``RETRIES``);
a device job whose device no live node owns any more is cancelled and failed with that reason
instead of waiting forever. Ctrl-C cancels every job (running ones unwind: temp folders removed,
child processes killed) and stops the instance this engine started.
"""
from __future__ import annotations

import logging
import os
import platform
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from edgepipe.pipeline.base.errors import UserError
from edgepipe.pipeline.sweep import jobs, raynet

RETRIES = 2  # Ray re-runs a job this many more times when its worker or node dies
CANCEL_GRACE_S = 3.0
NAMESPACE = "edgepipe-sweep"
LOCAL_NODE = "local"


@dataclass
class Placement:
    kind: str  # cpu | device | local
    device: Optional[str] = None


@dataclass
class Pending:
    spec: dict
    placement: Placement
    submitted: float
    reason: Optional[str] = None  # set when the engine cancels it


def failed(spec: dict, reason: str, node: Optional[str] = None) -> dict:
    """The result record of a job that could not run (or whose worker died)."""
    now = time.time()
    return {"kind": spec["kind"], "key": spec["key"], "model": spec["model"]["name"], "device": spec.get("device"),
            "status": "failed", "reason": reason, "started": None, "ended": now,
            "where": {"node": node, "host": None, "pid": None}}


class SerialEngine:
    """Every job in this process, one after another, in submission order."""

    mode = "serial"

    def __init__(self) -> None:
        self.queue: deque = deque()
        self.devices: list[str] = []
        self._n = 0

    def start(self, devices: list[str]) -> None:
        self.devices = list(devices)

    def nodes(self) -> list[dict]:
        return [{"id": LOCAL_NODE, "name": LOCAL_NODE, "host": platform.node(), "ip": None,
                 "cpus": os.cpu_count(), "devices": self.devices, "alive": True, "driver": True}]

    def describe(self) -> dict:
        return {"mode": self.mode, "address": None}

    def put(self, value: Any) -> Any:
        return value

    def payload_of(self, handle: Any, result: dict) -> Any:
        return result

    def submit(self, spec: dict, payload: Any, placement: Placement) -> int:
        self._n += 1
        self.queue.append((self._n, spec, payload))
        return self._n

    def outstanding(self) -> int:
        return len(self.queue)

    def wait(self, timeout: float) -> list[tuple[Any, dict]]:
        if not self.queue:
            return []
        handle, spec, payload = self.queue.popleft()
        return [(handle, jobs.run_job(spec, payload, node=LOCAL_NODE))]

    def cancel_all(self) -> None:
        self.queue.clear()

    def stop(self) -> None:
        self.queue.clear()


def ray_job(spec: dict, payload: Optional[dict]) -> dict:
    """The Ray task: one job, recorded with the id of the node it ran on."""
    ray = raynet.import_ray()  # present wherever this runs (a Ray worker)
    raynet.restore_env()
    _uncap_threads()
    return jobs.run_job(spec, payload, node=ray.get_runtime_context().get_node_id())


def _uncap_threads() -> None:
    """Ray sets OMP_NUM_THREADS to a task's CPU count in its workers. A job runs with the libraries'
    own threading instead, as `edgepipe export` and --serial do: measured here, four small exports on
    2 cores took 82 s with the cap and 66 s without (63 s serially). A value the node's own
    environment sets (its process's initial environment) is kept."""
    try:
        initial = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return
    if not any(e.startswith(b"OMP_NUM_THREADS=") for e in initial):
        os.environ.pop("OMP_NUM_THREADS", None)


class RayEngine:
    """Jobs as Ray tasks, on an embedded instance (``address`` None) or on the cluster at ``address``."""

    def __init__(self, address: Optional[str] = None, cpus: Optional[int] = None):
        self.address = raynet.normalize_address(address) if address else None
        self.mode = "cluster" if address else "embedded"
        self.cpus = cpus
        self.pending: dict[Any, Pending] = {}
        self.tmp: Optional[str] = None
        self.ray: Any = None
        self.driver: Optional[str] = None
        self._checked = 0.0
        self._seen: dict[str, dict] = {}
        self._fn: Any = None  # the Ray task (ray_job), made by start()

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, devices: list[str]) -> None:
        loop = self.address is None or raynet.is_loopback(self.address)
        if self.address is None:
            raynet.private_token()
            raynet.embedded_env()
        if loop:
            raynet.loopback_env()
        raynet.quiet_env()
        self.ray = raynet.require_ray("--ray" if self.address else "the embedded Ray engine")
        if loop:
            raynet.keep_loopback()
        common = dict(namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False)
        if self.address is None:
            self.tmp = tempfile.mkdtemp(prefix="epray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            self.ray.init(num_cpus=self.cpus or os.cpu_count() or 1, include_dashboard=False,
                          resources={raynet.resource(d): 1 for d in devices},
                          _node_ip_address=raynet.LOOPBACK, _temp_dir=self.tmp, _node_name=platform.node(),
                          **common)
        else:
            self._reachable()
            try:
                self.ray.init(address=self.address, **common)
            except Exception as e:  # noqa: BLE001 - Ray raises several types here
                raise UserError(f"cannot join the Ray cluster at {self.address}: {str(e).splitlines()[0][:300]}",
                                "Check the address `edgepipe node start --head` printed") from None
        raynet.restore_env()  # the instance's processes have theirs; this one gets the user's back
        self._fn = self.ray.remote(ray_job)
        self.driver = self.ray.get_runtime_context().get_node_id()

    def _reachable(self) -> None:
        host, port = self.address.rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as e:
            raise UserError(f"no Ray cluster answers at {self.address} ({e.strerror or e})",
                            "Start the head first: edgepipe node start --head (see docs/sweep.md)") from None

    def stop(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- the cluster -------------------------------------------------------------------------------
    def nodes(self) -> list[dict]:
        """Every node Ray knows, dead ones too (with what they offered while alive: Ray forgets it)."""
        out = []
        for n in self.ray.nodes():
            res = n.get("Resources") or {}
            seen = self._seen.setdefault(n["NodeID"], {})
            if n.get("Alive"):
                seen.update(cpus=res.get("CPU", 0), devices=raynet.devices_of(res))
            out.append({"id": n["NodeID"], "name": n.get("NodeName") or n.get("NodeManagerAddress"),
                        "host": n.get("NodeManagerHostname"), "ip": n.get("NodeManagerAddress"),
                        "cpus": seen.get("cpus", 0), "devices": seen.get("devices", []),
                        "alive": bool(n.get("Alive")), "driver": n["NodeID"] == self.driver})
        return out

    def describe(self) -> dict:
        return {"mode": self.mode, "address": self.address, "ray": self.ray.__version__,
                "driver_node": self.driver}

    def _driver_cpus(self) -> float:
        return next((n["cpus"] for n in self.nodes() if n["id"] == self.driver), 1)

    # -- jobs --------------------------------------------------------------------------------------
    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def payload_of(self, handle: Any, result: dict) -> Any:
        return handle  # the export's own object: downstream jobs fetch it from where it is

    def submit(self, spec: dict, payload: Any, placement: Placement) -> Any:
        opts: dict[str, Any] = {"max_retries": RETRIES, "retry_exceptions": False}
        if placement.kind == "device":
            opts.update(num_cpus=0, resources={raynet.resource(placement.device): 1})
        elif placement.kind == "local":
            affinity = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
            opts.update(num_cpus=self._driver_cpus(), scheduling_strategy=affinity(self.driver, soft=False))
        else:
            opts.update(num_cpus=1, scheduling_strategy="SPREAD")
        ref = self._fn.options(**opts).remote(spec, payload)
        self.pending[ref] = Pending(spec, placement, time.time())
        return ref

    def outstanding(self) -> int:
        return len(self.pending)

    def wait(self, timeout: float) -> list[tuple[Any, dict]]:
        if not self.pending:
            return []
        self._fail_orphans()
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        return [(ref, self._result(ref, self.pending.pop(ref))) for ref in ready]

    def _result(self, ref: Any, p: Pending) -> dict:
        exc = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exc.TaskCancelledError:
            return failed(p.spec, p.reason or "cancelled")
        except (exc.NodeDiedError, exc.LocalRayletDiedError) as e:
            return failed(p.spec, f"its node died, {RETRIES + 1} times ({type(e).__name__})")
        except exc.WorkerCrashedError:
            return failed(p.spec, f"the worker running it died, {RETRIES + 1} times (crashed or killed)")
        except exc.RayError as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            return failed(p.spec, f"Ray could not run it: {type(e).__name__}: {first}")

    def _fail_orphans(self) -> None:
        """Cancel device (and local) jobs that no live node can run any more, with the reason."""
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        nodes = self.nodes()
        alive = [n for n in nodes if n["alive"]]
        for ref, p in self.pending.items():
            why = self._why_unrunnable(p.placement, alive, nodes)
            if why and p.reason is None:
                p.reason = why
                self.ray.cancel(ref, force=False)

    def _why_unrunnable(self, pl: Placement, alive: list[dict], nodes: list[dict]) -> Optional[str]:
        if pl.kind == "device" and not any(pl.device in n["devices"] for n in alive):
            gone = [n["name"] for n in nodes if pl.device in n["devices"]]
            left = f" (its node {', '.join(gone)} left the cluster)" if gone else ""
            return f"no live node owns device '{pl.device}'{left}"
        if pl.kind == "local" and not any(n["id"] == self.driver for n in alive):
            return "the node running the sweep left the cluster"
        return None

    def cancel_all(self) -> None:
        """Cancel every job: running ones get KeyboardInterrupt (they unwind), then are killed."""
        for ref in list(self.pending):
            self._cancel(ref, force=False)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while self.pending and time.monotonic() < deadline:
            ready, _ = self.ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0.2)
            for ref in ready:
                self.pending.pop(ref, None)
        for ref in list(self.pending):
            self._cancel(ref, force=True)
        self.pending.clear()

    def _cancel(self, ref: Any, force: bool) -> None:
        try:
            self.ray.cancel(ref, force=force)
        except Exception:  # noqa: BLE001 - already finished, or its node is gone
            pass


def make_engine(serial: bool, address: Optional[str], cpus: Optional[int]) -> "SerialEngine | RayEngine":
    """The engine a sweep asked for: serial, a cluster, or (default) embedded Ray; serial when Ray
    is missing (the caller tells the user how to install it)."""
    if serial:
        return SerialEngine()
    if address:
        if raynet.is_loopback(address):
            raynet.loopback_env()  # before Ray is imported (it reads some of it then)
        raynet.require_ray("--ray")
        return RayEngine(address, cpus)
    raynet.private_token()  # before Ray is imported: the embedded instance gets a token of its own
    raynet.loopback_env()
    if raynet.import_ray() is None:
        raynet.restore_env()
        return SerialEngine()
    return RayEngine(None, cpus)
