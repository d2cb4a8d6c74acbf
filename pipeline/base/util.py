"""Small shared helpers: atomic writes, hashing, versions. No heavy imports here."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round axis ticks from ``lo`` to ``hi`` (both included when round), 1, 2 or 5 x 10^k apart,
    at most about ``n`` of them: the HTML plots' axes."""
    span = hi - lo or abs(hi) or 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12:
        out.append(round(t, 12))
        t += step
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of a directory tree (sorted relative paths + contents)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(chunk), b""):
                    h.update(block)
        return h.hexdigest()
    with open(p, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def path_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it onto ``dest``.

    On any exception (or if the process dies) ``dest`` is untouched and the
    temporary is removed (or left as a hidden ``.tmp-*`` name that readers ignore).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    tmp = tmpdir / dest.name
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced no file at {tmp}")
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json_atomic(dest: str | os.PathLike, obj: object) -> Path:
    return write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def pkg_version(*names: str) -> str | None:
    """Installed version of the first distribution found, without importing it."""
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def converter_versions() -> dict[str, str | None]:
    return {
        "edgepipe": pkg_version("edgepipe"),
        "tensorflow": pkg_version("tensorflow-cpu", "tensorflow", "tensorflow-macos"),
        "keras": pkg_version("keras"),
        "tf2onnx": pkg_version("tf2onnx"),
        "onnx": pkg_version("onnx"),
        "onnxruntime": pkg_version("onnxruntime", "onnxruntime-gpu"),
        "coremltools": pkg_version("coremltools"),
        "ai-edge-litert": pkg_version("ai-edge-litert"),
        "numpy": pkg_version("numpy"),
    }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to fd 1 (converters print freely) to fd 2 for a while,
    so that --json output on stdout stays parseable."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def quiet_tensorflow() -> None:
    """Keep TensorFlow's and absl's start-up chatter off the terminal (before TF is imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


@contextlib.contextmanager
def converter_chatter_to_log(log_path: str | os.PathLike, enabled: bool = True) -> Iterator:
    """Send everything written to fd 2 and sys.stderr (TensorFlow's C++ logs, converter
    prints, Python warnings) to a log file for a while; yields a handle on the real terminal
    for progress output. The log is moved to ``log_path`` if its folder exists by then."""
    import sys
    import tempfile

    if not enabled:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    term = os.fdopen(os.dup(saved_fd), "w", buffering=1)
    fd, tmp = tempfile.mkstemp(prefix="edgepipe-export-", suffix=".log")
    log = os.fdopen(fd, "w", buffering=1)
    saved = sys.stderr
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    try:
        yield term
    finally:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sys.stderr = saved
        log.close()
        term.close()
        dest = Path(log_path)
        try:
            if dest.parent.is_dir():
                shutil.move(tmp, dest)
            else:
                os.unlink(tmp)
        except OSError:
            pass


def _sigterm(*_: object) -> None:
    raise KeyboardInterrupt()


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (temp files removed, nothing half-written left)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)
