"""The `edgepipe` command itself: usage errors, --version, internal errors, shared option checks,
output that pipes whole. Usage errors run in fresh processes, as a user meets them, both where
click is importable and where it is not (typer vendors click and does not install it)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from edgepipe.pipeline import api
from edgepipe.pipeline.base.manifest import Manifest, SourceModel
from edgepipe.pipeline.base.util import pkg_version
from edgepipe.pipeline.cli.common import PIPE_WIDTH, console, table
from edgepipe.pipeline.cli.main import main

USAGE_ERRORS = [
    ([], "Usage: edgepipe"),
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["export", "--bogus"], "No such option: --bogus"),
    (["export"], "Usage: edgepipe export"),
    (["bench"], "Usage: edgepipe bench"),
    (["bench", "--threads", "abc", "x"], "Invalid value for '--threads'"),
    (["eval", "x"], "Missing option '--data'"),
    (["check", "x", "--max-drop", "lots"], "Invalid value for '--max-drop'"),
]


@pytest.fixture(scope="module")
def no_click(tmp_path_factory) -> dict:
    """An environment where `import click` fails, as on a fresh install of typer 0.29."""
    shim = tmp_path_factory.mktemp("no_click")
    (shim / "click").mkdir()
    (shim / "click" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'click'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    probe = subprocess.run([sys.executable, "-c", "import click"], capture_output=True, text=True,
                           env={**os.environ, **env})
    assert probe.returncode != 0 and "No module named 'click'" in probe.stderr
    return env


@pytest.mark.parametrize("with_click", [True, False], ids=["click-installed", "no-click"])
@pytest.mark.parametrize("args,needle", USAGE_ERRORS, ids=[" ".join(a) or "no-args" for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_typers_usage_line(args, needle, with_click, no_click):
    res = run_cli(*args, env=None if with_click else no_click, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Usage: edgepipe" in res.stderr and needle in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    assert "internal error" not in res.stderr


@pytest.mark.parametrize("with_click", [True, False], ids=["click-installed", "no-click"])
def test_version(with_click, no_click):
    res = run_cli("--version", env=None if with_click else no_click, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"edgepipe {pkg_version('edgepipe')}"


def test_help_is_fast_and_lists_every_command():
    res = run_cli("--help", timeout=120)
    assert res.returncode == 0
    for cmd in ("export", "inspect", "bench", "report", "eval", "check", "devices"):
        assert f"  {cmd} " in res.stdout


def test_internal_error_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    def boom(path):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(api, "inspect", boom)
    assert main(["inspect", str(tmp_path / "x.tflite")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("edgepipe: internal error: RuntimeError: kaboom (re-run with --debug for the traceback)")
    assert main(["--debug", "inspect", str(tmp_path / "x.tflite")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaboom" in err


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    res = run_cli("bench", str(tmp_path / "nothing-here"), timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == [f"edgepipe: error: {tmp_path / 'nothing-here'} does not exist. Give the folder `edgepipe export` "
                     "wrote (e.g. edgepipe-out/mobilenet), its manifest.json, or a .tflite/.onnx file"]


# --------------------------------------------------------------------------- options bench and eval share
def _manifest(folder: Path) -> Path:
    m = Manifest(model=SourceModel(name="m", kind="keras", input_shape=[1, 16, 16, 1], output_shape=[1, 10],
                                   num_classes=10, preprocessing={"mode": "unit", "scale": 1 / 255}))
    folder.mkdir(parents=True, exist_ok=True)
    m.save(folder)
    return folder


@pytest.mark.parametrize("cmd", [["eval", "{m}", "--data", "digits"], ["bench", "{m}"]])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_threads_below_one_refused_by_bench_and_eval(tmp_path, capsys, cmd, threads):
    folder = _manifest(tmp_path / "m")
    rc = main([a.format(m=folder) for a in cmd] + ["--threads", threads])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip() == f"edgepipe: error: --threads must be at least 1 (got {threads}). Leave it out for the default"
    assert not (folder / "eval.json").exists() and not (folder / "bench.json").exists()


# --------------------------------------------------------------------------- output
def test_console_off_a_terminal_is_wide_and_tables_fold():
    buf = io.StringIO()
    con = console(stderr=False, file=buf)
    assert not con.is_terminal and con.width == PIPE_WIDTH
    name = "model/" + "block_" * 40 + "output_tensor:0"  # 256 characters, no spaces
    t = table("name", "reason")
    t.add_row(name, "a reason long enough to need wrapping " * 6 + "END")
    con.print(t)
    text = buf.getvalue()
    assert "…" not in text and "..." not in text
    joined = "".join(ln.strip("│┃ ").split("│")[0].strip() for ln in text.splitlines())
    assert name in joined
    assert "END" in text


def test_piped_check_output_keeps_long_reasons_whole(tmp_path):
    """Rows and reasons printed to a pipe are not cut at 80 columns."""
    folder = _manifest(tmp_path / "out" / "m")
    reason = "the Edge TPU runtime library libedgetpu.so.1 was not found on this host; " * 3 + "install it (END)"
    m = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
    from edgepipe.pipeline.base.manifest import Artifact, Verification

    m.artifacts = [Artifact(id="tflite-int8", format="tflite", precision="int8", path="m_int8.tflite", status="ok",
                            sha256="s", verification=Verification(status="passed"))]
    m.save(folder)
    row = {"artifact": "tflite-int8", "format": "tflite", "precision": "int8", "sha256": "s", "target": "edgetpu",
           "runtime": "litert-edgetpu", "status": "skipped", "reason": reason, "device": "local"}
    ev = {"schema_version": 1, "kind": "edgepipe-eval", "model": "m", "dataset": {"source": "digits", "samples": 450},
          "source": {"top1": 98.0, "top5": 100.0}, "results": [row]}
    (folder / "eval.json").write_text(json.dumps(ev))
    res = run_cli("check", str(folder), timeout=120, env={"COLUMNS": ""})
    assert res.returncode == 0, res.stderr
    assert reason in res.stdout
    assert "…" not in res.stdout


def test_progress_lines_in_a_log_and_a_bar_on_a_terminal():
    from rich.console import Console

    from edgepipe.pipeline.cli.common import RowProgress

    buf = io.StringIO()
    with RowProgress(console(file=buf)) as p:
        p.total(20, 2)
        p.advance(10)
        p.row_done("a on cpu: ok")
        p.advance(10)
        p.row_done("b on cpu: ok")
    assert buf.getvalue().splitlines() == ["[1/2] a on cpu: ok", "[2/2] b on cpu: ok"]
    tty = io.StringIO()
    with RowProgress(Console(file=tty, force_terminal=True, width=120)) as p:
        p.total(20, 2)
        p.describe("tflite-int8 on cpu")
        p.advance(5)
        p.bar.refresh()
    shown = tty.getvalue()
    assert "tflite-int8 on cpu" in shown and "5/20" in shown and "images" in shown and "left" in shown
    assert "[1/2]" not in shown
    quiet = io.StringIO()
    with RowProgress(console(file=quiet), quiet=True) as p:
        p.total(1, 1)
        p.row_done("x")
    assert quiet.getvalue() == ""
