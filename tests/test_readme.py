"""The README's offline walk-through, run as written, so the README cannot drift from the tool.

The commands are read from the README's "Offline, start to finish" block and run in order in a
fresh folder, each in its own process (`edgepipe` -> `python -m edgepipe.pipeline`).
"""
from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli

HEADING = "### Offline, start to finish"


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    assert HEADING in text, f"README.md lost its '{HEADING}' section"
    section = text.split(HEADING, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no ```bash block after the heading"
    cmds = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            argv = shlex.split(line)
            assert argv[0] == "edgepipe", line
            cmds.append(argv[1:])
    return cmds


def test_readme_block_is_the_offline_walk_through():
    cmds = readme_commands()
    assert [c[0] for c in cmds] == ["export", "inspect", "devices", "bench", "eval", "check"]
    assert cmds[0][:2] == ["export", "mobilenet"] and "--weights" in cmds[0] and "--calib" in cmds[0]
    assert ["--data", "digits"] == cmds[4][2:4]


@pytest.mark.slow
def test_readme_offline_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    times = {}
    for argv in readme_commands():
        t0 = time.perf_counter()
        res = run_cli(*argv, timeout=900)  # in tmp_path: the README's paths are relative
        times[argv[0]] = time.perf_counter() - t0
        out = res.stdout + res.stderr
        assert "Traceback" not in out and "internal error" not in out, out[-3000:]
        if argv[0] == "check":  # a gate verdict (0 pass, 1 over budget) is a result, not an error
            assert res.returncode in (0, 1), out[-3000:]
            assert "no better than guessing" in res.stderr and "untrained" in res.stderr
        else:
            assert res.returncode == 0, (argv, out[-3000:])
    folder = tmp_path / "edgepipe-out" / "mobilenet"
    for name in ("manifest.json", "mobilenet_int8.tflite", "bench.json", "bench.md", "eval.json"):
        assert (folder / name).exists(), name
    ev = json.loads((folder / "eval.json").read_text())
    assert ev["dataset"]["samples"] == 450 and ev["targets"] == ["cpu", "gpu", "reference"]
    assert {r["artifact"] for r in ev["results"] if r["status"] == "ok"} >= {"tflite-int8", "onnx-int8"}
    assert times["eval"] < 60, times  # default targets finish in seconds, not minutes

