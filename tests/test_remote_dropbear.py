"""A board whose ssh server has no SFTP subsystem, and no scp: a real dropbear on 127.0.0.1.

OpenSSH 9's scp speaks SFTP, which dropbear on embedded images does not serve; busybox images often
have no scp binary either. The ssh transport asks for the SFTP subsystem once per session and, where
it is missing, streams files through the ssh channel (``cat``/``wc`` on the board). These tests run
Debian's dropbear (``dropbear-bin``) as that board: it serves ~/.ssh/authorized_keys of the user it
logs in, so it runs in a private mount namespace (``unshare --mount``) where a throwaway home is
bind-mounted over the user's (the real home's directories this Python lives in bound back), and where
the SFTP server dropbear would start and ``scp`` are both
replaced by /dev/null (nothing outside that namespace changes). It listens on 127.0.0.1 only, is
started by the module fixture and stopped by its pid. Needs root (mount namespaces); skipped,
saying so, where dropbear, ssh or unshare is missing or the user is not root.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgepipe.devices import Registry, make_device, make_runner, predict_on_device
from edgepipe.devices.remote.ssh import SSHTransport
from local_servers import free_port, wait_listening

_missing = [b for b in ("dropbear", "dropbearkey", "ssh", "ssh-keygen", "unshare")
            if not shutil.which(b) and not Path("/usr/sbin", b).exists()]
needs_dropbear = pytest.mark.skipif(
    bool(_missing) or os.geteuid() != 0,
    reason=(f"{', '.join(_missing)} not installed: run .ci/remote-deps.sh (apt install dropbear-bin)" if _missing
            else "the dropbear board runs in a private mount namespace, which needs root"))
SFTP_SERVERS = ("/usr/lib/sftp-server", "/usr/libexec/sftp-server", "/usr/lib/openssh/sftp-server")
ARTS = ["tflite-fp32", "tflite-int8", "onnx-fp32"]


def _board_script(d: Path, home: str, port: int) -> Path:
    """The namespace's setup, then dropbear: a throwaway home over the user's (with the parts of the real
    one this Python lives in bound back), no SFTP server, no scp."""
    hide = [p for p in (*SFTP_SERVERS, shutil.which("scp") or "/usr/bin/scp") if os.path.exists(p)]
    keep = sorted({Path(p).relative_to(home).parts[0] for p in (os.path.realpath(sys.executable), sys.base_prefix,
                                                                 sys.prefix) if Path(p).is_relative_to(home)})
    for top in keep:
        (d / "home" / top).mkdir(exist_ok=True)
    (d / "real-home").mkdir()
    script = d / "board.sh"
    script.write_text("\n".join([
        "set -e", f"mount --bind {home} {d / 'real-home'}", f"mount --bind {d / 'home'} {home}",
        *(f"mount --bind {d / 'real-home' / top} {home}/{top}" for top in keep),
        *(f"mount --bind /dev/null {p}" for p in hide),
        f"exec {shutil.which('dropbear') or '/usr/sbin/dropbear'} -F -E -s -r {d / 'host_key'} "
        f"-p 127.0.0.1:{port} -P {d / 'dropbear.pid'}", ""]))
    return script


@pytest.fixture(scope="module")
def dropbear(tmp_path_factory):
    d = tmp_path_factory.mktemp("dropbear")
    (d / "home" / ".ssh").mkdir(parents=True, mode=0o700)
    (d / "home").chmod(0o700)
    subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(d / "host_key")], check=True, capture_output=True,
                   timeout=30)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True,
                   capture_output=True, timeout=30)
    keys = d / "home" / ".ssh" / "authorized_keys"
    keys.write_text((d / "user_key.pub").read_text())
    keys.chmod(0o600)
    port, user = free_port(), pwd.getpwuid(os.getuid())
    log = open(d / "dropbear.log", "w")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh",
                             str(_board_script(d, user.pw_dir, port))], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        wait_listening(proc, port, "dropbear", d / "dropbear.log")
        yield SimpleNamespace(port=port, key=d / "user_key", url=f"ssh://{user.pw_name}@127.0.0.1:{port}", dir=d)
    finally:
        proc.terminate()  # the pid we started: unshare exec'd sh, which exec'd dropbear
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgepipe.pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@needs_dropbear
def test_transport_streams_files_where_the_board_has_no_sftp(dropbear, tmp_path):
    dev = make_device("tiny-board", dropbear.url, key=str(dropbear.key), accept_new_host_key=True)
    t = SSHTransport(dev, known_hosts=tmp_path / "known_hosts")
    t.open()
    try:
        # the fallback was chosen, and the reason names what the board lacks
        assert t.copy["mode"] == "stream", t.copy
        assert "no SFTP server" in t.copy["reason"] and "tiny-board" in t.copy["reason"]
        # and scp would indeed fail there (what `devices add` used to die of)
        r = subprocess.run(["scp", "-q", *t.options(), "--", str(dropbear.key) + ".pub", f"127.0.0.1:{tmp_path}/x"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and not (tmp_path / "x").exists()
        blob = tmp_path / "blob.bin"
        blob.write_bytes(bytes(range(256)) * 500 + b"\n\r\n\x00end")  # binary, newlines, NULs
        remote = tmp_path / "remote"
        assert t.shell(f"mkdir {remote}", 30).rc == 0
        t.push([blob, dropbear.key.with_suffix(".pub")], str(remote), 60)
        assert (remote / "blob.bin").read_bytes() == blob.read_bytes()
        t.pull(f"{remote}/blob.bin", tmp_path / "back.bin", 60)
        assert (tmp_path / "back.bin").read_bytes() == blob.read_bytes()
        with pytest.raises(Exception, match="nope.bin"):
            t.pull(f"{remote}/nope.bin", tmp_path / "nope.bin", 60)
        assert not (tmp_path / "nope.bin").exists()
    finally:
        t.close()


@needs_dropbear
def test_devices_add_and_bench_through_dropbear(dropbear, reg, remote_tmp, tiny_export, tmp_path):
    env = {"EDGEPIPE_CONFIG": str(reg.path)}
    r = cli("devices", "add", "tiny-board", dropbear.url, "--key", str(dropbear.key), "--python", sys.executable,
            "--tmpdir", str(remote_tmp), "--accept-new-host-key", "--json", env=env)
    assert r.returncode == 0, r.stderr  # used to fail with "scp: Connection closed"
    info = json.loads(r.stdout)["device"]
    assert info["reachable"] is True and info["targets"]["cpu"] == {"tflite": True, "onnx": True}

    out = tmp_path / "report"
    r = cli("bench", str(tiny_export), "--device", "tiny-board", "--targets", "cpu", "--artifacts", ",".join(ARTS),
            "--runs", "5", "--min-seconds", "0.05", "--warmup", "1", "--threads", "1", "--out", str(out), "--json",
            env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(r.stdout)
    for x in d["rows"]:
        assert x["status"] == "ok", x["reason"]
        assert x["device"] == "tiny-board" and x["runner"] == "ssh:agent" and x["latency_ms"]["n"] >= 5
        assert x["input_source"] == "file"  # the manifest's samples went over the ssh channel too
    assert d["devices"]["tiny-board"]["copy"]["mode"] == "stream"
    assert list(remote_tmp.iterdir()) == []

    # eval's predictions come back through the same channel, equal to this host's
    x = np.random.default_rng(2).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
    np.savez(tmp_path / "x.npz", inputs=x)
    y = predict_on_device("tiny-board", tiny_export / "tiny_fp32.onnx", "onnx", tmp_path / "x.npz",
                          config=str(reg.path))
    registry = Registry(reg.path)
    with make_runner(registry.get("tiny-board"), registry) as runner:
        assert runner.error is None and runner.t.copy["mode"] == "stream"
    from edgepipe.devices import runtimes_for

    with runtimes_for("onnx", "cpu")[0].load(tiny_export / "tiny_fp32.onnx") as s:
        ref = np.concatenate([s.run([x[i:i + 1]])[0] for i in range(3)])
    assert y.shape == (3, 10) and np.allclose(y, ref, atol=1e-5)
    assert list(remote_tmp.iterdir()) == []
