"""mypy is clean on the base layer and the export API (the modules [tool.mypy] checks strictly)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# package-dir mapping (pyproject): edgepipe.<pkg> lives in <pkg>/
PACKAGES = ("pipeline", "export", "devices")
CHECKED = ["-p", "edgepipe.pipeline.base", "-p", "edgepipe.export"] + [
    a for m in ("export_stage", "export_plan", "export_run", "export_log", "recover", "verify", "calibration",
                "images", "trace", "cache") for a in ("-m", f"edgepipe.pipeline.{m}")]


def test_mypy_is_clean_on_the_base_layer_and_the_export_api(tmp_path):
    pytest.importorskip("mypy")
    root = tmp_path / "src"
    (root / "edgepipe").mkdir(parents=True)
    for pkg in PACKAGES:  # the installed layout, so that mypy resolves edgepipe.* imports
        (root / "edgepipe" / pkg).symlink_to(REPO / pkg, target_is_directory=True)
    res = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                          "--cache-dir", str(tmp_path / "cache"), *CHECKED],
                         cwd=root, env={"MYPYPATH": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "Success" in res.stdout
