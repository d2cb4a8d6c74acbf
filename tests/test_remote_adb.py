"""edgepipe bench over adb, against Debian's real adbd (bookworm-backports) and a real adb server.

How the module runs adbd: adbd cannot bind to loopback only (``ADBD_PORT`` makes it listen on every
interface, with no authentication), so it runs in a private network namespace of its own
(``unshare --net``, loopback brought up inside), and a small relay forwards 127.0.0.1:<free port>
here to it. ``adb connect 127.0.0.1:<port>`` then gives a real adb device: ``adb shell``,
``adb push`` and ``adb pull`` all go through adbd. The adb server is private too
(ANDROID_ADB_SERVER_PORT = a free port) and is stopped with ``adb kill-server`` at the end; adbd and
the relay are terminated. adbd must run as root; the tests skip, saying so, only where adb, adbd or
unshare is absent or the user is not root.

The "device" is this machine, so its Python is ``--python sys.executable`` (numpy, ai_edge_litert,
onnxruntime): the agent path is exercised end to end. TensorFlow Lite's native benchmark_model
cannot be downloaded or built here, so its path runs a stand-in: a script with the tool's command
line that really runs the model with LiteRT and prints its figures in the tool's log format. The
adb side (push once, reuse, flags, parsing, clean-up) is real; the format itself is tested against
hand-written logs in test_benchmark_model.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgepipe.devices import BenchSettings, Registry, bench_devices, make_device, make_runner, render_markdown
from edgepipe.devices.remote.registry import parse_url
from edgepipe.pipeline.base.errors import UserError
from local_servers import free_port

FAST = dict(runs=5, min_seconds=0.05, warmup=1, threads=1)
ARTS = ["tflite-fp32", "tflite-int8", "onnx-fp32"]

_missing = [b for b in ("adb", "adbd", "unshare") if not shutil.which(b)]
needs_adbd = pytest.mark.skipif(
    bool(_missing) or os.geteuid() != 0,
    reason=(f"{', '.join(_missing)} not installed: run .ci/remote-deps.sh (adb and adbd from bookworm-backports)"
            if _missing else "adbd must run as root (and unshare --net needs CAP_SYS_ADMIN)"))

# Brings loopback up in the new network namespace, then becomes adbd.
_LO_UP_EXEC = textwrap.dedent("""
    import fcntl, os, socket, struct, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", 0x1 | 0x8 | 0x40, b""))  # SIOCSIFFLAGS UP|LOOPBACK|RUNNING
    s.close()
    os.execvp(sys.argv[1], sys.argv[1:])
""")

# Listens on 127.0.0.1:<free port> here, then enters adbd's network namespace (setns) so that every
# connection it accepts is forwarded to adbd's port inside it. Prints the port it listens on.
_RELAY = textwrap.dedent("""
    import ctypes, os, socket, sys, threading
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    fd = os.open("/proc/%d/ns/net" % pid, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        sys.exit("setns failed: " + os.strerror(ctypes.get_errno()))
    print(lst.getsockname()[1], flush=True)

    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    while True:
        c, _ = lst.accept()
        try:
            u = socket.create_connection(("127.0.0.1", port), timeout=10)
            u.settimeout(None)
        except OSError:
            c.close()
            continue
        threading.Thread(target=pipe, args=(c, u), daemon=True).start()
        threading.Thread(target=pipe, args=(u, c), daemon=True).start()
""")

# A stand-in for TFLite's benchmark_model (the real binary cannot be fetched here): the same flags,
# the model really run with LiteRT, the figures printed the way the tool prints them.
_STANDIN = textwrap.dedent('''
    import math, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "argv.log"), "a") as fh:
        fh.write(" ".join(sys.argv[1:]) + "\\n")
    say = lambda s: print("INFO: " + s, flush=True)
    say("STARTING!")
    say("Num threads: [%s]" % args.get("num_threads"))
    say("Graph: [%s]" % args["graph"])
    say("Use gpu: [%d]" % (args.get("use_gpu") == "true"))
    say("Use xnnpack: [%d]" % (args.get("use_xnnpack") == "true"))
    if args.get("use_gpu") == "true":
        print("ERROR: Failed to apply GPU delegate.", flush=True)
        print("ERROR: Benchmarking failed.", flush=True)
        sys.exit(1)
    from edgepipe.devices.onboard.agent import TFLiteSession, random_input
    t0 = time.perf_counter()
    b = TFLiteSession(args["graph"], "cpu", int(args.get("num_threads", 1)))
    init_us = (time.perf_counter() - t0) * 1e6
    p = b.placement()
    say("Loaded model %s" % args["graph"])
    say("Replacing %d out of %d node(s) with delegate (TfLiteXNNPackDelegate) node, yielding %d partitions "
        "for the whole graph." % (p["ops_accelerated"], p["ops_total"], p["partitions"]))
    say("The input model file size (MB): %g" % (os.path.getsize(args["graph"]) / 1e6))
    say("Initialized session in %gms." % (init_us / 1000))
    feeds = [random_input(i) for i in b.inputs]
    def run(n, min_secs, max_secs):
        say("Running benchmark for at least %d iterations and at least %g seconds but terminate if exceeding %g "
            "seconds." % (n, min_secs, max_secs))
        xs, start = [], time.perf_counter()
        while (len(xs) < n or time.perf_counter() - start < min_secs) and time.perf_counter() - start <= max_secs:
            t = time.perf_counter()
            b.run_native(feeds)
            xs.append(int((time.perf_counter() - t) * 1e6))
        avg = sum(xs) / len(xs)
        std = int(math.sqrt(sum((x - avg) ** 2 for x in xs) / len(xs)))
        say("count=%d first=%d curr=%d min=%d max=%d avg=%g std=%d" % (len(xs), xs[0], xs[-1], min(xs), max(xs),
                                                                       avg, std))
        print("", flush=True)
        return xs
    mx = float(args.get("max_secs", 150))
    w = run(int(args.get("warmup_runs", 1)), 0.0, mx)
    r = run(int(args.get("num_runs", 50)), float(args.get("min_secs", 1)), mx)
    say("Inference timings in us: Init: %d, First inference: %d, Warmup (avg): %g, Inference (avg): %g"
        % (init_us, w[0], sum(w) / len(w), sum(r) / len(r)))
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    say("Overall peak memory footprint (MB) via periodic monitoring: %g" % (hwm / 1024.0))
''')


@pytest.fixture(scope="module")
def adbd(tmp_path_factory):
    d = tmp_path_factory.mktemp("adbd")
    saved = os.environ.get("ANDROID_ADB_SERVER_PORT")
    os.environ["ANDROID_ADB_SERVER_PORT"] = str(free_port())  # a private adb server for this module
    (d / "lo_up.py").write_text(_LO_UP_EXEC)
    (d / "relay.py").write_text(_RELAY)
    log = open(d / "adbd.log", "w")
    daemon = subprocess.Popen(["unshare", "--net", "--", sys.executable, str(d / "lo_up.py"), "adbd"],
                              env={**os.environ, "ADBD_PORT": "5555"}, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    relay = None
    try:
        deadline = time.monotonic() + 20
        while "adbd started" not in (d / "adbd.log").read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"adbd did not start (exit {daemon.poll()}): {(d / 'adbd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        relay = subprocess.Popen([sys.executable, str(d / "relay.py"), str(daemon.pid), "5555"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        line = relay.stdout.readline().strip()
        if not line.isdigit():
            pytest.fail(f"relay did not start: {line} {relay.stderr.read() if relay.poll() is not None else ''}")
        port = int(line)
        subprocess.run(["adb", "start-server"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=True)
        yield SimpleNamespace(port=port, serial=f"127.0.0.1:{port}", url=f"adb://127.0.0.1:{port}", dir=d)
    finally:
        subprocess.run(["adb", "kill-server"], capture_output=True, timeout=60)
        for p in (relay, daemon):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        log.close()
        if saved is None:
            os.environ.pop("ANDROID_ADB_SERVER_PORT", None)
        else:
            os.environ["ANDROID_ADB_SERVER_PORT"] = saved



@pytest.fixture()
def standin(tmp_path) -> Path:
    p = tmp_path / "benchmark_model"
    p.write_text(f"#!{sys.executable}\n" + _STANDIN)
    p.chmod(0o755)
    return p


def add(reg: Registry, name: str, url: str, **kw):
    kw.setdefault("python", sys.executable)
    dev = make_device(name, url, **kw)
    reg.add(dev, replace=True)
    reg.save()
    return dev


from conftest import rows_by  # noqa: E402


def only_bin_left(remote_tmp: Path) -> list[str]:
    """What a session leaves on the device: nothing but the cached benchmark_model binary."""
    return sorted(p.name for p in remote_tmp.iterdir())


# --------------------------------------------------------------------------------------------- no daemon
def test_adb_addresses_and_options(tmp_path):
    assert parse_url("adb://R58M123ABC") == {"kind": "adb", "serial": "R58M123ABC"}
    assert parse_url("adb://192.168.1.20:5555") == {"kind": "adb", "serial": "192.168.1.20:5555",
                                                    "host": "192.168.1.20", "port": 5555}
    with pytest.raises(UserError, match="ssh devices"):
        make_device("pixel", "adb://R58M", key=__file__)
    with pytest.raises(UserError, match="--via"):
        make_device("pixel", "adb://R58M", via="magic")
    with pytest.raises(UserError, match="benchmark binary .* does not exist"):
        make_device("pixel", "adb://R58M", benchmark_binary=str(tmp_path / "missing"))
    dev = make_device("pixel", "adb://R58M", via="benchmark_model")
    from edgepipe.devices.remote.adb import make_adb_runner

    with pytest.raises(UserError, match="no binary was given"):
        make_adb_runner(dev)


# --------------------------------------------------------------------------------------------- agent over adb
@needs_adbd
def test_devices_add_list_and_bench_through_adb(adbd, reg, remote_tmp, tiny_export, tmp_path):
    env = {"EDGEPIPE_CONFIG": str(reg.path)}
    r = subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "devices", "add", "board", adbd.url, "--python",
                        sys.executable, "--tmpdir", str(remote_tmp), "--json"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["device"]
    assert info["reachable"] and info["runner"] == "adb:agent" and info["kind"] == "adb"
    assert info["python"] and info["targets"]["cpu"] == {"tflite": True, "onnx": True}

    r = subprocess.run([sys.executable, "-m", "edgepipe.pipeline", "bench", str(tiny_export), "--device", "board",
                        "--targets", "cpu,gpu", "--artifacts", ",".join(ARTS), "--runs", "5", "--min-seconds",
                        "0.05", "--warmup", "1", "--threads", "1", "--out", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    d = json.loads(r.stdout)
    rows = {(x["artifact"], x["target"]): x for x in d["rows"]}
    for aid in ARTS:
        x = rows[(aid, "cpu")]
        assert x["status"] == "ok", x["reason"]
        assert x["device"] == "board" and x["runner"] == "adb:agent"
        assert x["latency_ms"]["n"] >= 5 and x["latency_ms"]["p50"] > 0 and x["runtime_version"]
    g = rows[("tflite-fp32", "gpu")]
    if g["status"] == "ok":  # lavapipe here: the outputs came back with adb pull for the agreement figures
        assert g["agreement"]["max_abs"] < 1e-2
    else:
        assert g["status"] == "unavailable" and g["reason"].startswith("on board:")
    assert rows[("onnx-fp32", "gpu")]["status"] == "unavailable"  # no CUDA provider on the device
    assert r.returncode == (1 if any(x["status"] == "failed" for x in d["rows"]) else 0), r.stderr
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| board | tflite-int8 | cpu |" in md and "**Device:** board (adb://127.0.0.1:" in md
    assert d["devices"]["board"]["kind"] == "adb"
    assert only_bin_left(remote_tmp) == []


@needs_adbd
def test_agent_crash_over_adb_fails_one_row(adbd, reg, remote_tmp, tiny_export):
    add(reg, "board", adbd.url, tmpdir=str(remote_tmp), env={"EDGEPIPE_AGENT_CRASH": "int8"})
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=ARTS, **FAST), "board")
    rows = rows_by(rep)
    assert rows[("tflite-int8", "cpu")].status == "failed" and rows[("tflite-int8", "cpu")].signal == "SIGSEGV"
    assert rows[("tflite-fp32", "cpu")].ok and rows[("onnx-fp32", "cpu")].ok
    assert only_bin_left(remote_tmp) == []


# --------------------------------------------------------------------------------------------- benchmark_model
@needs_adbd
def test_benchmark_model_is_pushed_once_and_parsed(adbd, reg, remote_tmp, tiny_export, standin):
    add(reg, "phone", adbd.url, tmpdir=str(remote_tmp), via="benchmark_model", benchmark_binary=str(standin))
    s = BenchSettings(targets=["cpu", "gpu"], artifacts=ARTS, **FAST)
    rep = bench_devices(tiny_export, s, "phone")
    rows = rows_by(rep)
    for aid in ("tflite-fp32", "tflite-int8"):
        r = rows[(aid, "cpu")]
        assert r.status == "ok", r.reason
        assert r.runner == "adb:benchmark_model" and r.runtime == "benchmark_model" and r.device == "phone"
        lat = r.latency_ms
        assert lat["n"] >= 5 and lat["p50_is_mean"] and lat["p50"] == lat["mean"]
        assert 0 < lat["min"] <= lat["mean"] <= lat["max"]
        assert r.load_ms > 0 and r.first_ms > 0 and r.memory["peak_rss_kb"] > 0
        assert r.placement["accelerator"] == "xnnpack" and r.placement["ops_total"] > 0
        assert any("holds the mean" in n for n in r.notes)
        gpu = rows[(aid, "gpu")]
        assert gpu.status == "failed" and "Failed to apply GPU delegate" in gpu.reason
    onnx = rows[("onnx-fp32", "cpu")]
    assert onnx.status == "unavailable" and "TFLite only" in onnx.reason
    # pushed once under its hash, reused by every row and by the next session
    h = hashlib.sha256(standin.read_bytes()).hexdigest()[:16]
    binary = remote_tmp / "edgepipe-bin" / f"benchmark_model-{h}"
    assert binary.is_file() and os.access(binary, os.X_OK)
    calls = (remote_tmp / "edgepipe-bin" / "argv.log").read_text().splitlines()
    assert len(calls) == 4  # 2 TFLite artifacts x (cpu, gpu)
    cpu_call = next(c for c in calls if "tiny_fp32.tflite" in c and "--use_gpu=false" in c)
    for flag in ("--num_threads=1", "--num_runs=5", "--warmup_runs=1", "--use_xnnpack=true",
                 "--enable_op_profiling=false"):
        assert flag in cpu_call, cpu_call
    assert f"--graph={remote_tmp}/edgepipe." in cpu_call
    dev = reg.get("phone")
    with make_runner(dev, reg) as runner:
        assert runner.mode == "benchmark_model"
        runner._ensure_binary()
        assert runner.binary_pushed is False
    assert only_bin_left(remote_tmp) == ["edgepipe-bin"]
    assert "on cpu @ phone" in render_markdown(rep)


@needs_adbd
def test_binary_for_another_abi_is_refused_before_running(adbd, reg, remote_tmp, tiny_export, tmp_path):
    fake = tmp_path / "benchmark_model_arm64"
    head = bytearray(64)
    head[:4], head[4], head[5], head[18:20] = b"\x7fELF", 2, 1, (183).to_bytes(2, "little")  # ELF64, EM_AARCH64
    fake.write_bytes(bytes(head))
    add(reg, "phone", adbd.url, tmpdir=str(remote_tmp), python="/nonexistent/python3", benchmark_binary=str(fake))
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], **FAST), "phone")
    r = rows_by(rep)[("tflite-fp32", "cpu")]
    assert r.status == "unavailable" and "built for aarch64" in r.reason and "x86_64" in r.reason
    assert only_bin_left(remote_tmp) == []


@needs_adbd
def test_no_python_and_no_binary_says_what_to_pass(adbd, reg, remote_tmp, tiny_export):
    add(reg, "phone", adbd.url, tmpdir=str(remote_tmp), python="/nonexistent/python3")
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], **FAST), "phone")
    r = rows_by(rep)[("tflite-fp32", "cpu")]
    assert r.status == "unavailable" and "--benchmark-binary" in r.reason and "no Python" in r.reason


@needs_adbd
def test_unconnectable_adb_device_fails_its_rows(adbd, reg, tiny_export):
    add(reg, "gone", f"adb://127.0.0.1:{free_port()}", connect_timeout=3)
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], **FAST), "gone")
    r = rows_by(rep)[("tflite-fp32", "cpu")]
    assert r.status == "failed" and "not connected" in r.reason, r.reason
    assert rep.devices["gone"]["error"]
