"""The layering is checked, not just described: import-linter's contracts (pyproject.toml
[tool.importlinter]), the lazy facade, and what `edgepipe` imports at start-up."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = ("top", "pipeline", "base", "independence", "devices", "acyclic")


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.is_file() else shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (import-linter is in the test extra)")
    return found


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract(contract):
    res = subprocess.run([_lint_imports(), "--contract", contract, "--no-cache"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "Contracts: " in out, out[-3000:]  # it ran (a bad configuration prints no summary)
    assert res.returncode == 0, out[-4000:]


def _modules_after(code: str) -> dict:
    probe = (f"import sys, json\n{code}\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('edgepipe', 'tensorflow', 'sklearn', 'onnx', 'click', 'keras'))))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def test_base_layer_imports_no_stage():
    mods = _modules_after("import edgepipe.pipeline.base.manifest, edgepipe.pipeline.base.evaluation, "
                          "edgepipe.pipeline.base.errors")
    stray = sorted(m for m in mods if m.startswith("edgepipe.") and not m.startswith("edgepipe.pipeline.base")
                   and m != "edgepipe.pipeline")
    assert not stray, stray


def test_cli_start_up_imports_nothing_heavy():
    mods = _modules_after("import edgepipe.pipeline.cli.main")
    heavy = sorted(m for m in mods if m.split(".")[0] in ("tensorflow", "sklearn", "onnx", "click", "keras"))
    assert not heavy, heavy


def test_public_api_names_are_the_functions():
    code = ("import edgepipe.pipeline.eval_stage, edgepipe.pipeline.inspect_stage\n"
            "from edgepipe.pipeline import api, export, bench, evaluate, check, inspect, EvalResult, CheckResult\n"
            "assert all(callable(f) and f is getattr(api, f.__name__) "
            "for f in (export, bench, evaluate, check, inspect))")
    _modules_after(code)
