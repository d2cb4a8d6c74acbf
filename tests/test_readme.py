"""The README's offline walk-through, run as written, so the README cannot drift from the tool.

The commands are read from the README's "Offline, start to finish" block, then its "History,
comparisons and what to ship" block, and run in order in a fresh folder with a fresh ledger, each
in its own process (`edgepipe` -> `python -m edgepipe.pipeline`).
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
LEDGER_HEADING = "## History, comparisons and what to ship"


def readme_commands(heading: str = HEADING) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    assert heading in text, f"README.md lost its '{heading}' section"
    section = text.split(heading, 1)[1]
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
    ledger = readme_commands(LEDGER_HEADING)
    assert [c[0] for c in ledger] == ["bench", "compare", "check", "history", "select"]
    assert ledger[0] == cmds[3]  # the offline bench again: two comparable runs
    assert "--baseline" in ledger[2] and "--max-slowdown" in ledger[2]


@pytest.mark.slow
def test_readme_offline_commands_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEPIPE_LEDGER", str(tmp_path / "ledger.sqlite"))  # this walk-through's runs only
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

    _ledger_walk_through(tmp_path)


def _ledger_walk_through(tmp_path: Path) -> None:
    """The ledger block, after the offline one: bench again, compare, both gates, history, select."""
    out = {}
    for argv in readme_commands(LEDGER_HEADING):
        res = run_cli(*argv, timeout=900)
        out[argv[0]] = res
        text = res.stdout + res.stderr
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]
        if argv[0] in ("check", "select"):  # verdicts (0 pass / 1 fail) are results, not errors
            assert res.returncode in (0, 1), (argv, text[-3000:])
        else:
            assert res.returncode == 0, (argv, text[-3000:])
    assert "Recorded bench run 4" in out["bench"].stdout  # bench, eval, check of the offline block, then this
    assert "95% bootstrap CI" in " ".join(out["compare"].stdout.split())
    assert "latency checks" in out["check"].stdout and "(baseline: run 1)" in " ".join(out["check"].stdout.split())
    assert "<svg" in (tmp_path / "history.html").read_text()
    sel = out["select"]
    assert ("Ship " in sel.stdout and (tmp_path / "deployment.json").is_file()) or "closest:" in sel.stderr, sel
