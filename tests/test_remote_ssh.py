"""edgepipe bench on a device over ssh, against a real OpenSSH server on 127.0.0.1.

The module starts ``/usr/sbin/sshd -D -f <generated config>`` on a free loopback port, with a
throwaway host key and user key made by ssh-keygen in a temp dir, running as the current user
(root here: PermitRootLogin prohibit-password; /run/sshd is created for privilege separation).
The "device" is this machine, so its Python is configured with ``--python sys.executable``, which
has numpy, ai_edge_litert and onnxruntime. Failure cases are real too: a closed port, a key the
server does not accept, a Python without runtimes (a venv that sees only numpy), a Python without
numpy (the system's /usr/bin/python3), a missing Python, the agent killed by SIGSEGV (its
EDGEPIPE_AGENT_CRASH hook, passed through the remote environment) and the device's own timeout.
Every test checks that the remote temp dirs are gone afterwards. Nothing listens beyond loopback.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgepipe.devices import (BenchSettings, Registry, TransportError, bench_devices, make_device, make_runner,
                              render_html, render_markdown, resolve_devices, write_reports)
from edgepipe.devices.remote.registry import parse_url
from edgepipe.pipeline.base.errors import UserError
from local_servers import free_port, keygen, wait_listening

SSHD = "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[1]
FAST = dict(runs=5, min_seconds=0.05, warmup=1, threads=1)
ARTS = ["tflite-fp32", "tflite-int8", "onnx-fp32"]

needs_openssh = pytest.mark.skipif(
    not (Path(SSHD).exists() and all(shutil.which(x) for x in ("ssh", "scp", "ssh-keygen"))),
    reason="OpenSSH server/client not installed: run .ci/remote-deps.sh (apt install openssh-server openssh-client)")


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    host_key = keygen(d / "host_ed25519")
    user_key = keygen(d / "user_ed25519")
    other_key = keygen(d / "other_ed25519")  # never authorised
    (d / "authorized_keys").write_text(Path(str(user_key) + ".pub").read_text())
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", "PidFile none",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "UsePAM no", "StrictModes no",  # the keys live in a world-readable temp dir
        "Subsystem sftp internal-sftp", "LogLevel VERBOSE", ""]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    wait_listening(proc, port, "sshd", d / "sshd.log")
    user = os.environ.get("USER") or __import__("getpass").getuser()
    try:
        yield SimpleNamespace(port=port, user=user, key=user_key, other_key=other_key, host_key=host_key, dir=d,
                              url=f"ssh://{user}@127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()



def add(reg: Registry, name: str, url: str, **kw):
    kw.setdefault("python", sys.executable)
    kw.setdefault("accept_new_host_key", True)
    dev = make_device(name, url, **kw)
    reg.add(dev, replace=True)
    reg.save()
    return dev


from conftest import rows_by  # noqa: E402


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe.pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------------------------- no daemon
def test_urls_names_and_registry_round_trip(tmp_path):
    assert parse_url("ssh://pi@raspberrypi.local") == {"kind": "ssh", "host": "raspberrypi.local", "port": None,
                                                      "user": "pi"}
    assert parse_url("ssh://10.0.0.7:2222") == {"kind": "ssh", "host": "10.0.0.7", "port": 2222, "user": None}
    assert parse_url("ssh://me@[::1]:22")["host"] == "::1"
    for bad in ("pi@host", "ssh://pi@-oProxyCommand=x", "ssh://-l@host", "ssh://pi@host:99999", "ftp://x",
                "ssh://pi@host;rm", "adb://", "adb://-s"):
        with pytest.raises(UserError):
            parse_url(bad)
    for bad_name in ("local", "all", "-x", "a b", ""):
        with pytest.raises(UserError):
            make_device(bad_name, "ssh://pi@host")
    with pytest.raises(UserError, match="does not exist"):
        make_device("pi", "ssh://pi@host", key=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="python path"):
        make_device("pi", "ssh://pi@host", python="python3; rm -rf /")
    with pytest.raises(UserError, match="NAME=VALUE|environment"):
        make_device("pi", "ssh://pi@host", env={"A B": "1"})
    with pytest.raises(UserError, match="adb"):
        make_device("pi", "ssh://pi@host", benchmark_binary=__file__)

    r = Registry(tmp_path / "d" / "devices.json")
    r.add(make_device("pi4", "ssh://pi@10.0.0.7:2222", python="/usr/bin/python3", env={"OMP_NUM_THREADS": "4"}))
    r.add(make_device("pixel", "adb://R58M123ABC"))
    with pytest.raises(UserError, match="already registered"):
        r.add(make_device("pi4", "ssh://pi@10.0.0.8"))
    r.save()
    r2 = Registry(tmp_path / "d" / "devices.json")
    assert sorted(r2.devices) == ["pi4", "pixel"]
    assert r2.get("pi4").port == 2222 and r2.get("pi4").env == {"OMP_NUM_THREADS": "4"}
    assert r2.get("pixel").kind == "adb" and r2.get("pixel").serial == "R58M123ABC"
    assert resolve_devices("all,local", r2) == ["pi4", "pixel", "local"]
    with pytest.raises(UserError, match="no device named 'nope'"):
        resolve_devices("pi4,nope", r2)
    r2.remove("pixel")
    r2.save()
    assert sorted(Registry(tmp_path / "d" / "devices.json").devices) == ["pi4"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an edgepipe device registry"):
        Registry(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------- host keys
@needs_openssh
def test_first_contact_needs_accept_new_host_key_then_strict(sshd, reg, remote_tmp):
    common = ["--key", str(sshd.key), "--python", sys.executable, "--tmpdir", str(remote_tmp)]
    r = cli("devices", "add", "loop", sshd.url, *common)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "host key" in r.stderr and "--accept-new-host-key" in r.stderr, r.stderr
    assert "loop" not in Registry(reg.path).devices  # nothing registered on a failed first contact

    r = cli("devices", "add", "loop", sshd.url, *common, "--accept-new-host-key", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["device"]["reachable"] is True and out["device"]["python"] == platform.python_version()
    kh = reg.known_hosts.read_text()
    assert f"[127.0.0.1]:{sshd.port}" in kh or "|1|" in kh  # recorded (maybe hashed) in edgepipe's own file
    assert Path(str(sshd.host_key) + ".pub").read_text().split()[1] in kh

    # from now on strict checking (no accept-new) passes against the recorded key ...
    dev = make_device("strict", sshd.url, key=str(sshd.key), python=sys.executable)
    with make_runner(dev, reg) as runner:
        assert runner.error is None
        assert runner.t.copy == {"mode": "scp", "reason": None}  # OpenSSH serves SFTP: files go by scp
    # ... and a different recorded key for the same host is refused as CHANGED, even with accept-new
    other = reg.path.parent / "other_known_hosts"
    keyline = Path(str(sshd.other_key) + ".pub").read_text().split()
    other.write_text(f"[127.0.0.1]:{sshd.port} {keyline[0]} {keyline[1]}\n")
    dev = make_device("changed", sshd.url, key=str(sshd.key), python=sys.executable, known_hosts=str(other),
                      accept_new_host_key=True)
    with make_runner(dev, reg) as runner:
        assert isinstance(runner.error, TransportError) and runner.error.kind == "hostkey"
        assert "CHANGED" in runner.error.message

    r = cli("devices", "--json")
    assert r.returncode == 0, r.stderr
    devs = {d["name"]: d for d in json.loads(r.stdout)["devices"]}
    assert devs["local"]["reachable"] is True
    loop = devs["loop"]
    assert loop["reachable"] is True and loop["runner"] == "ssh:agent"
    assert loop["cpu"]["arch"] == platform.machine() and loop["python"] == platform.python_version()
    assert loop["versions"]["onnxruntime"] and loop["versions"]["ai_edge_litert"]
    assert loop["targets"]["cpu"] == {"tflite": True, "onnx": True}
    assert isinstance(loop["targets"]["edgetpu"]["tflite"], str)  # unavailable, with the reason
    r = cli("devices")
    assert r.returncode == 0 and "loop" in r.stdout and "Registered devices" in r.stdout

    r = cli("devices", "remove", "loop")
    assert r.returncode == 0 and "Removed loop" in r.stdout
    assert "loop" not in Registry(reg.path).devices
    assert list(remote_tmp.iterdir()) == []


# --------------------------------------------------------------------------------------------- bench
@needs_openssh
def test_bench_over_ssh_merges_with_local_into_one_report(sshd, reg, remote_tmp, tiny_export, tmp_path):
    add(reg, "loop", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp))
    out = tmp_path / "report"
    r = cli("bench", str(tiny_export), "--device", "loop,local", "--targets", "cpu", "--artifacts", ",".join(ARTS),
            "--runs", "5", "--min-seconds", "0.05", "--warmup", "1", "--threads", "1", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    rows = {(x["device"], x["artifact"]): x for x in d["rows"]}
    for aid in ARTS:
        for dev in ("loop", "local"):
            x = rows[(dev, aid)]
            assert x["status"] == "ok", x["reason"]
            lat = x["latency_ms"]
            assert lat["n"] >= 5 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["max"]
            assert x["load_ms"] > 0 and x["first_ms"] > 0 and x["runtime_version"]
            assert x["memory"]["peak_rss_kb"] > 0 and x["threads"] == 1
        assert rows[("loop", aid)]["runner"] == "ssh:agent" and rows[("local", aid)]["runner"] == "agent"
        # the same model ran on the same inputs (the manifest's reference samples, copied over)
        assert rows[("loop", aid)]["input_source"] == rows[("local", aid)]["input_source"] == "file"
    assert rows[("loop", "onnx-fp32")]["runtime"] == "onnxruntime"
    assert rows[("loop", "tflite-int8")]["placement"]["accelerator"] == "xnnpack"
    loop = d["devices"]["loop"]
    assert loop["kind"] == "ssh" and loop["url"] == sshd.url
    assert loop["host"]["python"] == platform.python_version() and loop["host"]["cpu"]["arch"] == platform.machine()
    assert loop["host"]["versions"]["onnxruntime"]
    md, html = (out / "bench.md").read_text(), (out / "bench.html").read_text()
    assert "| Device | Artifact |" in md and "| loop | tflite-int8 | cpu |" in md and "| local | onnx-fp32 |" in md
    assert "**Device:** loop (ssh://" in md
    assert "<td>loop</td>" in html and "<td>local</td>" in html and "cpu @ loop" in html
    assert list(remote_tmp.iterdir()) == []


@needs_openssh
def test_gpu_rows_bring_outputs_back_for_agreement(sshd, reg, remote_tmp, tiny_export):
    dev = add(reg, "loop", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp))
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu", "gpu"], artifacts=["tflite-fp32"], **FAST), "loop")
    rows = rows_by(rep)
    assert rows[("tflite-fp32", "cpu")].status == "ok"
    g = rows[("tflite-fp32", "gpu")]
    with make_runner(dev, reg) as runner:
        gpu_ok = runner.probe("gpu").get("tflite", {}).get("available")
    if not gpu_ok:
        assert g.status == "unavailable" and g.reason.startswith("on loop:")
        pytest.skip(f"no LiteRT GPU accelerator on this machine: {g.reason}")
    assert g.status == "ok", g.reason
    # the gpu row's outputs came back over scp and were compared with the cpu row's
    assert g.agreement and g.agreement["against"] == "cpu" and g.agreement["max_abs"] < 1e-2
    assert list(remote_tmp.iterdir()) == []


@needs_openssh
def test_unreachable_host_and_wrong_key_fail_only_their_rows(sshd, reg, remote_tmp, tiny_export, tmp_path):
    add(reg, "down", f"ssh://{sshd.user}@127.0.0.1:{free_port()}", key=str(sshd.key), connect_timeout=5)
    add(reg, "badkey", sshd.url, key=str(sshd.other_key))
    add(reg, "loop", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp))
    s = BenchSettings(targets=["cpu"], artifacts=["tflite-fp32", "onnx-fp32"], **FAST)
    t0 = time.monotonic()
    rep = bench_devices(tiny_export, s, "down,badkey,loop")
    assert time.monotonic() - t0 < 120
    for aid in ("tflite-fp32", "onnx-fp32"):
        down, bad, ok = (rows_by(rep, n)[(aid, "cpu")] for n in ("down", "badkey", "loop"))
        assert down.status == "failed" and "unreachable" in down.reason and "Connection refused" in down.reason
        assert bad.status == "failed" and "refused the login" in bad.reason and "--key" in bad.reason
        assert ok.status == "ok" and ok.latency_ms["n"] >= 5
    assert rep.devices["down"]["error"] and rep.devices["badkey"]["error"]
    paths = write_reports(rep, tmp_path / "r")
    md = paths["md"].read_text()
    assert "tflite-fp32 on cpu @ down** — failed" in md and "tflite-fp32 on cpu @ badkey** — failed" in md
    assert "| loop | tflite-fp32 | cpu | litert | ok |" in md
    # the CLI exits 1 (some rows failed) but writes the report
    r = cli("bench", str(tiny_export), "--device", "down,loop", "--artifacts", "tflite-fp32", "--runs", "5",
            "--min-seconds", "0.05", "--warmup", "1", "--out", str(tmp_path / "cli"))
    assert r.returncode == 1, r.stderr
    assert "1 of 2 rows failed" in r.stderr and (tmp_path / "cli" / "bench.json").exists()
    assert list(remote_tmp.iterdir()) == []


def _numpy_only_venv(root: Path) -> Path:
    """A real venv of this Python that sees numpy and nothing else of site-packages (no runtimes)."""
    import numpy

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    only = root / "numpy-only"
    only.mkdir()
    site = Path(numpy.__file__).resolve().parents[1]
    for name in ("numpy", "numpy.libs"):
        if (site / name).exists():
            (only / name).symlink_to(site / name)
    sp = next((root / "lib").glob("python3*/site-packages"))
    (sp / "numpy_only.pth").write_text(str(only) + "\n")
    py = root / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import numpy, importlib.util as u; print(numpy.__version__, "
                                       "u.find_spec('onnxruntime'), u.find_spec('ai_edge_litert'))"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split()[1:] == ["None", "None"], r.stdout + r.stderr
    return py


@needs_openssh
def test_missing_runtime_numpy_or_python_are_unavailable_rows(sshd, reg, remote_tmp, tiny_export, tmp_path):
    add(reg, "nort", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp), python=str(_numpy_only_venv(tmp_path / "v")))
    add(reg, "nopy", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp), python="/nonexistent/bin/python3")
    names = "nort,nopy"
    sys_py = Path("/usr/bin/python3")
    nonumpy = sys_py.exists() and subprocess.run([str(sys_py), "-c", "import numpy"], capture_output=True).returncode
    if nonumpy:
        add(reg, "nonumpy", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp), python=str(sys_py))
        names += ",nonumpy"
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=["tflite-fp32", "onnx-fp32"], **FAST),
                        names)
    nort = rows_by(rep, "nort")
    assert nort[("tflite-fp32", "cpu")].status == "unavailable"
    assert "no TFLite runtime" in nort[("tflite-fp32", "cpu")].reason and "ai-edge-litert" in \
        nort[("tflite-fp32", "cpu")].reason
    assert nort[("onnx-fp32", "cpu")].status == "unavailable"
    assert "onnxruntime is not installed" in nort[("onnx-fp32", "cpu")].reason
    nopy = rows_by(rep, "nopy")[("tflite-fp32", "cpu")]
    assert nopy.status == "unavailable" and "no working Python" in nopy.reason and "--python" in nopy.reason
    if nonumpy:
        r = rows_by(rep, "nonumpy")[("onnx-fp32", "cpu")]
        assert r.status == "unavailable" and "numpy is not installed" in r.reason
    assert rep.devices["nort"]["host"]["python"] == platform.python_version()
    assert list(remote_tmp.iterdir()) == []


@needs_openssh
def test_agent_killed_mid_run_fails_its_row_only(sshd, reg, remote_tmp, tiny_export, tmp_path):
    # the agent's test hook, set in the device's remote environment: SIGSEGV right after loading *int8*
    add(reg, "loop", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp), env={"EDGEPIPE_AGENT_CRASH": "int8"})
    rep = bench_devices(tiny_export, BenchSettings(targets=["cpu"], artifacts=ARTS, **FAST), "loop")
    rows = rows_by(rep)
    crashed = rows[("tflite-int8", "cpu")]
    assert crashed.status == "failed" and crashed.signal == "SIGSEGV"
    assert "crashed with SIGSEGV" in crashed.reason and crashed.reason.endswith(" on loop")
    assert not crashed.latency_ms
    assert "EDGEPIPE_AGENT_CRASH matched" in (crashed.stderr_tail or "")
    assert rows[("tflite-fp32", "cpu")].ok and rows[("onnx-fp32", "cpu")].ok
    md = render_markdown(rep)
    assert "tflite-int8 on cpu @ loop** — failed (SIGSEGV)" in md
    assert '<span class="badge b-failed">failed</span>' in render_html(rep)
    assert list(remote_tmp.iterdir()) == []


@needs_openssh
def test_timeout_on_the_device_kills_the_agent_and_cleans_up(sshd, reg, remote_tmp, tiny_export):
    add(reg, "loop", sshd.url, key=str(sshd.key), tmpdir=str(remote_tmp))
    s = BenchSettings(targets=["cpu"], artifacts=["tflite-fp32"], runs=5, min_seconds=120, warmup=1, threads=1,
                      timeout_s=4)
    t0 = time.monotonic()
    rep = bench_devices(tiny_export, s, "loop")
    took = time.monotonic() - t0
    row = rows_by(rep)[("tflite-fp32", "cpu")]
    assert row.status == "failed" and "timed out on loop after 4 s" in row.reason, row.reason
    assert not row.latency_ms  # never a partial result reported as complete
    assert took < 60
    assert list(remote_tmp.iterdir()) == []
    # no process of the run is left on the "device": none has its working directory in the temp dirs
    left = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd).startswith(str(remote_tmp)):
                left.append(cwd.parent.name)
        except OSError:
            continue
    assert left == [], f"processes still running in the device's temp dir: {left}"
