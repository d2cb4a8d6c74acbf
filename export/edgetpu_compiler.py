"""The Edge TPU compiler: run ``edgetpu_compiler`` when it is installed (x86-64 Linux only) and
read what it decided (``compile_edgetpu(...) -> CompileResult``, ``parse_compiler_log(text)``).
The placement *prediction* used when no compiler is installed lives in
``edgepipe.devices.graph.edgetpu``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from edgepipe.pipeline.base.errors import ConversionError
from edgepipe.pipeline.base.util import write_text_atomic

EDGETPU = "edgetpu"
CPU = "cpu"

_SIZE_UNITS = {"B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str) -> Optional[int]:
    """'6.15MiB' -> bytes. None when unparseable."""
    m = re.match(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?i?B)\s*$", text or "", re.I)
    if not m:
        return None
    return int(round(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]))


MAPPED_STATUS = "Mapped to Edge TPU"


@dataclass
class CompilerLog:
    version: Optional[str] = None
    succeeded: bool = False
    error: Optional[str] = None
    compile_ms: Optional[int] = None
    input_model: Optional[str] = None
    output_model: Optional[str] = None
    input_bytes: Optional[int] = None
    output_bytes: Optional[int] = None
    on_chip_bytes: Optional[int] = None  # on-chip memory used for caching model parameters
    on_chip_remaining_bytes: Optional[int] = None
    off_chip_bytes: Optional[int] = None  # off-chip memory used for streaming uncached parameters
    subgraphs: Optional[int] = None  # number of Edge TPU subgraphs
    total_ops: Optional[int] = None
    ops_edgetpu: Optional[int] = None
    ops_cpu: Optional[int] = None
    operation_log: Optional[str] = None
    operations: list[dict] = field(default_factory=list)  # {"op", "count", "status", "placement"}

    @property
    def cpu_ops(self) -> list[dict]:
        """Ops the compiler left on the CPU, with the compiler's reason per op type."""
        return [{"op": r["op"], "count": r["count"], "reason": r["status"]}
                for r in self.operations if r["placement"] == CPU]

    @property
    def fully_mapped(self) -> bool:
        return self.succeeded and self.ops_cpu == 0 and (self.ops_edgetpu or 0) > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cpu_ops"] = self.cpu_ops
        d["fully_mapped"] = self.fully_mapped
        return d


def _first(pattern: str, text: str, flags: int = re.M) -> Optional[str]:
    m = re.search(pattern, text, flags)
    return m.group(1).strip() if m else None


def _int(s: Optional[str]) -> Optional[int]:
    return int(s) if s is not None and s.strip().isdigit() else None


def parse_operation_table(text: str) -> list[dict]:
    """Rows of the 'Operator  Count  Status' table (console output or the .log file)."""
    rows: list[dict] = []
    lines = text.splitlines()
    start = None
    for i, line in enumerate(lines):
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            start = i + 1
            break
    if start is None:
        return rows
    for line in lines[start:]:
        if not line.strip():
            continue
        m = re.match(r"^\s*(\S+)\s{2,}(\d+)\s{2,}(\S.*?)\s*$", line) or \
            re.match(r"^\s*([A-Za-z0-9_\-]+)\s+(\d+)\s+(\S.*?)\s*$", line)
        if not m:
            if rows:
                break
            continue
        status = m.group(3)
        rows.append({"op": m.group(1), "count": int(m.group(2)), "status": status,
                     "placement": EDGETPU if status == MAPPED_STATUS else CPU})
    return rows


def parse_compiler_log(text: str) -> CompilerLog:
    """Read edgetpu_compiler console output (or its .log file) into a CompilerLog."""
    text = text or ""
    log = CompilerLog()
    log.version = _first(r"Edge TPU Compiler version\s+(\S+)", text)
    ms = _first(r"Model compiled successfully in\s+(\d+)\s*ms", text)
    log.compile_ms = _int(ms)
    success = ms is not None or re.search(r"^Compilation succeeded", text, re.M) is not None
    log.succeeded = bool(success) and not re.search(r"^Compilation failed", text, re.M)
    if not log.succeeded:
        for pat in (r"^Compilation failed:\s*(.+)$", r"^(Internal compiler error.*)$", r"^(Invalid model.*)$",
                    r"^ERROR:\s*(.+)$", r"^(Compilation failed.*)$"):
            msg = _first(pat, text)
            if msg:
                log.error = msg
                break
    log.input_model = _first(r"^Input model:\s*(.+)$", text) or _first(r"^Input:\s*(.+)$", text)
    log.output_model = _first(r"^Output model:\s*(.+)$", text) or _first(r"^Output:\s*(.+)$", text)
    log.input_bytes = parse_size(_first(r"^Input size:\s*(.+)$", text) or "")
    log.output_bytes = parse_size(_first(r"^Output size:\s*(.+)$", text) or "")
    log.on_chip_bytes = parse_size(_first(r"^On-chip memory used for caching model parameters:\s*(.+)$", text) or "")
    log.on_chip_remaining_bytes = parse_size(
        _first(r"^On-chip memory remaining for caching model parameters:\s*(.+)$", text) or "")
    log.off_chip_bytes = parse_size(
        _first(r"^Off-chip memory used for streaming uncached model parameters:\s*(.+)$", text) or "")
    log.subgraphs = _int(_first(r"^Number of Edge TPU subgraphs:\s*(\d+)", text))
    log.total_ops = _int(_first(r"^Total number of operations:\s*(\d+)", text))
    log.operation_log = _first(r"^Operation log:\s*(.+)$", text)
    log.ops_edgetpu = _int(_first(r"^Number of operations that will run on Edge TPU:\s*(\d+)", text))
    log.ops_cpu = _int(_first(r"^Number of operations that will run on CPU:\s*(\d+)", text))
    log.operations = parse_operation_table(text)
    _derive_counts(log, text)
    return log


def _derive_counts(log: CompilerLog, text: str) -> None:
    if log.operations:
        n_tpu = sum(r["count"] for r in log.operations if r["placement"] == EDGETPU)
        n_cpu = sum(r["count"] for r in log.operations if r["placement"] == CPU)
        if log.ops_edgetpu is None:
            log.ops_edgetpu = n_tpu
        if log.ops_cpu is None:
            log.ops_cpu = n_cpu
        if log.total_ops is None:
            log.total_ops = n_tpu + n_cpu
    elif log.succeeded and log.total_ops is not None and "not all operations are supported" not in text:
        # a fully mapped model: the console prints no table, only the totals
        if log.ops_edgetpu is None:
            log.ops_edgetpu = log.total_ops
        if log.ops_cpu is None:
            log.ops_cpu = 0


@dataclass
class CompileResult:
    ok: bool
    command: list[str]
    log_path: Path  # the full console output, kept next to the artifact
    artifact: Optional[Path] = None  # <stem>_edgetpu.tflite
    operation_log_path: Optional[Path] = None  # the compiler's own <stem>_edgetpu.log
    returncode: Optional[int] = None
    timed_out: bool = False
    seconds: float = 0.0
    log: CompilerLog = field(default_factory=CompilerLog)
    error: Optional[str] = None

    def summary(self) -> dict:
        lg = self.log
        return {
            "ok": self.ok, "version": lg.version, "command": self.command, "returncode": self.returncode,
            "timed_out": self.timed_out, "seconds": round(self.seconds, 3), "error": self.error,
            "log_path": str(self.log_path), "operation_log_path": str(self.operation_log_path)
            if self.operation_log_path else None,
            "artifact": str(self.artifact) if self.artifact else None,
            "ops_edgetpu": lg.ops_edgetpu, "ops_cpu": lg.ops_cpu, "total_ops": lg.total_ops,
            "subgraphs": lg.subgraphs, "on_chip_bytes": lg.on_chip_bytes,
            "on_chip_remaining_bytes": lg.on_chip_remaining_bytes, "off_chip_bytes": lg.off_chip_bytes,
            "operations": lg.operations, "cpu_ops": lg.cpu_ops, "fully_mapped": lg.fully_mapped,
        }


def find_compiler(compiler: str = "edgetpu_compiler") -> Optional[str]:
    """Full path of the compiler when it is on PATH (or an executable path), else None."""
    if os.sep in compiler:
        return compiler if os.access(compiler, os.X_OK) and Path(compiler).is_file() else None
    return shutil.which(compiler)


def compiler_version(compiler: str = "edgetpu_compiler", timeout: float = 30.0) -> Optional[str]:
    exe = find_compiler(compiler)
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _first(r"Edge TPU Compiler version\s+(\S+)", r.stdout or "")


def _major(version: Optional[str]) -> int:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else 0


def _text(out: Any) -> str:
    if out is None:
        return ""
    if isinstance(out, bytes):
        return out.decode("utf-8", "replace")
    return str(out)


@dataclass
class _Run:
    """What running the compiler process gave."""

    output: str = ""
    returncode: Optional[int] = None
    timed_out: bool = False
    error: Optional[str] = None
    seconds: float = 0.0


def _run_compiler(cmd: list[str], cwd: Path, timeout: float, exe: str) -> _Run:
    run = _Run()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                           cwd=cwd, check=False)
        run.returncode, run.output = r.returncode, _text(r.stdout)
    except subprocess.TimeoutExpired as e:  # run() has killed the child
        run.timed_out, run.output = True, _text(e.stdout if e.stdout is not None else e.output)
        run.error = f"edgetpu_compiler did not finish within {timeout:g} s"
    except OSError as e:
        run.output, run.error = str(e), f"could not run {exe}: {e}"
    run.seconds = time.perf_counter() - t0
    return run


def _console_log(cmd: list[str], run: _Run, timeout: float) -> str:
    out = run.output
    return (f"$ {' '.join(cmd)}\n{out}" + ("" if out.endswith("\n") or not out else "\n")
            + (f"[edgepipe] killed after {timeout:g} s\n" if run.timed_out else "")
            + (f"[edgepipe] exit status {run.returncode}\n" if run.returncode is not None else ""))


def _command(exe: str, version: Optional[str], work: Path, timeout: float, extra_args: tuple[str, ...],
             src: Path) -> list[str]:
    cmd = [exe, "--show_operations", "--out_dir", str(work)]
    if _major(version) >= 16:
        cmd += ["--timeout_sec", str(max(1, int(timeout)))]
    return cmd + [*extra_args, str(src.resolve())]


def _keep_operation_log(work: Path, out: Path, stem: str, log: CompilerLog, output: str) -> Optional[Path]:
    """Move the compiler's own <stem>_edgetpu.log into ``out``; read its table if the console had none."""
    own_log = work / f"{stem}_edgetpu.log"
    if not own_log.is_file():
        return None
    op_log = out / own_log.name
    os.replace(own_log, op_log)
    if not log.operations:
        log.operations = parse_operation_table(op_log.read_text(errors="replace"))
        _derive_counts(log, output)
    return op_log


def compile_edgetpu(tflite_path: Union[str, Path], out_dir: Union[str, Path], timeout: float = 180.0,
                    compiler: str = "edgetpu_compiler", extra_args: tuple[str, ...] = ()) -> CompileResult:
    """Run edgetpu_compiler on one model; keep its console log next to the artifact.

    The compiler writes into a private temporary folder inside ``out_dir``; the compiled
    ``<stem>_edgetpu.tflite`` and the logs are moved into ``out_dir`` afterwards, so a killed or
    failed compile never leaves a half-written artifact. Raises ConversionError when the compiler
    is not installed; a failed or timed-out compile is returned with ``ok=False`` and ``error``.
    """
    src = Path(tflite_path)
    exe = find_compiler(compiler)
    if exe is None:
        raise ConversionError(f"Edge TPU compiler '{compiler}' not found on PATH",
                              "Install edgetpu-compiler (x86-64 Debian/Ubuntu) or use the placement prediction")
    if not src.is_file():
        raise ConversionError(f"{src} does not exist", "Export the int8 TFLite model first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = src.stem
    version = compiler_version(exe, timeout=min(30.0, timeout))
    work = Path(tempfile.mkdtemp(prefix=".tmp-edgetpu-", dir=out))
    try:
        cmd = _command(exe, version, work, timeout, extra_args, src)
        run = _run_compiler(cmd, work, timeout, exe)
        log_path = write_text_atomic(out / f"{stem}_edgetpu.compiler.log", _console_log(cmd, run, timeout))
        log = parse_compiler_log(run.output)
        if log.version is None:
            log.version = version
        op_log = _keep_operation_log(work, out, stem, log, run.output)
        produced = work / f"{stem}_edgetpu.tflite"
        artifact, error = None, run.error
        if not run.timed_out and run.returncode == 0 and produced.is_file():
            artifact = out / produced.name
            os.replace(produced, artifact)
        elif error is None:
            error = (log.error or f"edgetpu_compiler exited with status {run.returncode}" if run.returncode != 0
                     else f"edgetpu_compiler reported success but wrote no {produced.name}")
        return CompileResult(ok=artifact is not None and error is None, command=cmd, log_path=log_path,
                             artifact=artifact, operation_log_path=op_log, returncode=run.returncode,
                             timed_out=run.timed_out, seconds=run.seconds, log=log, error=error)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_from_compile(result: Union[CompileResult, dict], prediction: Optional[dict] = None) -> dict:
    """The Edge TPU record of an artifact after a real compile: ``result`` is a CompileResult or its
    ``summary()``; ``prediction`` the placement prediction of the same (uncompiled) model."""
    s = result.summary() if isinstance(result, CompileResult) else dict(result)
    n_tpu, n_cpu = s.get("ops_edgetpu") or 0, s.get("ops_cpu") or 0
    total = s.get("total_ops")
    d = {
        "compiled": bool(s.get("ok")),
        "kind": "compiler",
        "compiler_version": s.get("version"),
        "counts": {EDGETPU: n_tpu, CPU: n_cpu, "total": total if total is not None else n_tpu + n_cpu},
        "fully_mapped": bool(s.get("fully_mapped")),
        "subgraphs": s.get("subgraphs"),
        "on_chip_bytes": s.get("on_chip_bytes"),
        "off_chip_bytes": s.get("off_chip_bytes"),
        "compiler_ops": [{"type": r["op"], "count": r["count"], "placement": r["placement"], "reason": r["status"]}
                         for r in s.get("operations") or []],
        "log_path": s.get("log_path"),
        "operation_log_path": s.get("operation_log_path"),
        "error": s.get("error"),
    }
    if prediction is not None:
        d["prediction"] = dict(prediction)
    return d


def report_from_prediction(prediction: dict, why_not_compiled: str) -> dict:
    """The Edge TPU record of an artifact when no compiler ran: the placement prediction."""
    d = dict(prediction)
    d.update({"compiled": False, "compiler_version": None, "log_path": None, "why_not_compiled": why_not_compiled})
    return d


