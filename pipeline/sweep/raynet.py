"""Ray as an optional extra, nodes that declare their devices, and loopback-only clusters.

Ray (``pip install "edgepipe[cluster]"``) is imported lazily, here only: without it `edgepipe sweep`
runs serially. `edgepipe node start` is a thin wrapper over `ray start` that adds one custom resource
per device the node owns (``device:<name>`` = 1), so a bench job holding that resource runs on that
node and never beside another measurement of the same device.

Loopback. Ray turns 127.0.0.1 into the machine's outward address wherever it meets it (node IP,
``--address``; ray-project/ray#59110), so a cluster cannot be kept on one machine's loopback with
``ray start`` alone. When the address is 127.0.0.1, edgepipe keeps it (``keep_loopback``): every Ray
server of the node (GCS, raylet, object manager, workers, agents) then binds 127.0.0.1, which the
tests check from /proc/net/tcp. Any other address is passed to Ray untouched.

    python -m edgepipe.pipeline.sweep.raynet start ...   # `ray start ...`, loopback kept
"""
from __future__ import annotations

import json
import os
import re
import secrets
import sys
from typing import Any, Callable, Optional

from edgepipe.pipeline.base import lazy
from edgepipe.pipeline.base.errors import UserError

LOOPBACK = "127.0.0.1"
INSTALL_HINT = 'Install the cluster extra: pip install "edgepipe[cluster]"'
DEVICE_PREFIX = "device:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Ray's own chatter that says nothing to an edgepipe user (set before Ray starts)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
# For the Ray processes of a loopback-only node: their node-address lookups answer 127.0.0.1 instead of
# probing a route to 8.8.8.8, and the request Ray's dashboard makes to cloud metadata services
# (169.254.169.254, metadata.google.internal) even with usage statistics off goes to a closed loopback
# port instead. Jobs get the user's environment back (restore_env): a download still works there.
_PROXY = "http://127.0.0.1:9"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "http_proxy": _PROXY, "HTTP_PROXY": _PROXY,
                "https_proxy": _PROXY, "HTTPS_PROXY": _PROXY, "no_proxy": "", "NO_PROXY": ""}
SAVED_ENV = "EDGEPIPE_SWEEP_SAVED_ENV"


def import_ray() -> Optional[Any]:
    """The ``ray`` module, or None when the cluster extra is not installed."""
    try:
        return lazy.load("ray")  # heavy and optional (the cluster extra)
    except ImportError:
        return None


def require_ray(what: str) -> Any:
    ray = import_ray()
    if ray is None:
        raise UserError(f"{what} needs Ray, which is not installed", INSTALL_HINT)
    return ray


def resource(device: str) -> str:
    return f"{DEVICE_PREFIX}{device}"


def devices_of(resources: dict) -> list[str]:
    return sorted(k[len(DEVICE_PREFIX):] for k in resources if k.startswith(DEVICE_PREFIX))


def host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def normalize_address(address: str) -> str:
    """HOST:PORT with 'localhost' spelled 127.0.0.1 (the only loopback name edgepipe uses)."""
    if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d{1,5}", address or ""):
        raise UserError(f"bad Ray address '{address}'", "Give HOST:PORT of the head node, e.g. 10.0.0.5:6379")
    host, port = address.rsplit(":", 1)
    return f"{LOOPBACK if host == 'localhost' else host}:{port}"


def is_loopback(address: Optional[str]) -> bool:
    return address is not None and host_of(address) in (LOOPBACK, "localhost")


def keep_loopback() -> None:
    """Make this process's Ray keep 127.0.0.1 instead of swapping in the outward address, and answer
    127.0.0.1 when it looks up its own node address (instead of probing a route to 8.8.8.8). Idempotent."""
    from ray._private import services  # the functions Ray uses for exactly these
    import ray.util

    if getattr(services.resolve_ip_for_localhost, "_edgepipe", False):
        return
    original = services.resolve_ip_for_localhost

    def resolve(host: str) -> str:
        return LOOPBACK if host in (LOOPBACK, "localhost") else original(host)

    def node_ip(address: Optional[str] = None) -> str:
        return LOOPBACK

    resolve._edgepipe = True  # type: ignore[attr-defined]
    services.resolve_ip_for_localhost = resolve
    services.get_node_ip_address = node_ip
    ray.util.get_node_ip_address = node_ip


def loopback_env() -> None:
    """The environment of the Ray processes this process starts for a loopback-only node (inherited by
    them): what it replaces is saved, and ``restore_env`` gives jobs the user's own back."""
    if SAVED_ENV in os.environ:
        return
    os.environ[SAVED_ENV] = json.dumps({k: os.environ.get(k) for k in LOOPBACK_ENV})
    os.environ.update(LOOPBACK_ENV)


def restore_env() -> None:
    """Undo ``loopback_env`` in this process (a job, or the driver once Ray has started)."""
    raw = os.environ.pop(SAVED_ENV, None)
    for k, v in (json.loads(raw) if raw else {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def private_token() -> None:
    """Token authentication for an instance this process starts, with a fresh token held in the
    environment (inherited by its workers) rather than Ray's default of writing ~/.ray/auth_token.
    An explicit RAY_AUTH_MODE is respected. Ray reads the mode when it is imported: call this first
    (if Ray is already imported, its configuration is reloaded)."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    if "ray" in sys.modules:
        from ray._raylet import Config  # Ray's own refresh after a mode change

        Config.initialize("")


# the embedded instance behaves like --serial under memory pressure: Ray's memory monitor would kill
# (and re-run) its workers whenever the machine as a whole passes 95 % of memory, whoever uses it
EMBEDDED_ENV = {"RAY_memory_monitor_refresh_ms": "0"}


def embedded_env() -> None:
    for k, v in EMBEDDED_ENV.items():
        os.environ.setdefault(k, v)


def quiet_env() -> None:
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


# ------------------------------------------------------------------------------------------ edgepipe node start
def check_devices(devices: list[str], check_registered: Callable[[str], None]) -> None:
    for d in devices:
        if not _NAME.match(d) or d in ("local", "all"):
            raise UserError(f"bad device name '{d}'", "Name registered devices (see `edgepipe devices`)")
        check_registered(d)


def node_start_argv(*, head: bool, address: Optional[str], port: Optional[int], devices: list[str],
                    num_cpus: Optional[int], name: Optional[str], temp_dir: Optional[str], block: bool,
                    node_ip: Optional[str]) -> list[str]:
    """The `ray start` arguments for an edgepipe node (run through this module's main)."""
    if head == bool(address):
        raise UserError("give either --head or --address HEAD:PORT", "Start the head first, then nodes with --address")
    argv = ["start", f"--resources={json.dumps({resource(d): 1 for d in devices})}", "--disable-usage-stats"]
    node_ip = LOOPBACK if node_ip == "localhost" else node_ip
    if head:
        argv += ["--head", f"--port={port if port is not None else 6379}", "--include-dashboard=false"]
    else:
        address = normalize_address(address)
        argv.append(f"--address={address}")
        node_ip = node_ip or (LOOPBACK if is_loopback(address) else None)
    if node_ip:
        argv.append(f"--node-ip-address={node_ip}")
    if node_ip == LOOPBACK:  # workers take ports from the OS on 127.0.0.1 (the raylet would probe 0.0.0.0:PORT)
        argv += ["--min-worker-port=0", "--max-worker-port=0"]
    argv += [f"--num-cpus={num_cpus}"] if num_cpus is not None else []
    argv += [f"--node-name={name}"] if name else []
    argv += [f"--temp-dir={temp_dir}"] if temp_dir else []
    argv += ["--block"] if block else []
    return argv


def main(argv: list[str]) -> int:
    """`ray start ARGV`, keeping 127.0.0.1 when the node or head address is loopback."""
    require_ray("edgepipe node start")
    quiet_env()
    loop = any(a.split("=", 1)[-1] in (LOOPBACK, "localhost") or is_loopback(a.split("=", 1)[-1])
               for a in argv if a.startswith(("--address=", "--node-ip-address=")))
    if loop:  # after importing Ray: `ray start` itself checks the constants it read then
        keep_loopback()
        loopback_env()
    from ray.scripts.scripts import main as ray_main  # the `ray` command itself

    sys.argv = ["ray", *argv]
    return ray_main() or 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocesses
    sys.exit(main(sys.argv[1:]))
