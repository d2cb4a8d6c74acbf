"""Content-addressed export cache: a repeated export with nothing changed reuses artifacts
without importing TensorFlow.

Key = sha256 over the model's identity (file hash, or built-in name + weights + seed +
options), the export plan and options, the calibration data's identity, the converter
versions and edgepipe's own source. Location: $EDGEPIPE_CACHE_DIR or ~/.cache/edgepipe.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from edgepipe.pipeline.base.util import atomic_path, converter_versions


def cache_root() -> Path:
    env = os.environ.get("EDGEPIPE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe"


def _code_hash() -> str:
    """Hash of edgepipe's own source (every package it installs), so a code change invalidates the cache."""
    h = hashlib.sha256()
    for pkg in ("edgepipe.pipeline", "edgepipe.export", "edgepipe.devices"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:  # pragma: no cover - installed packages have an origin
            continue
        d = Path(spec.origin).parent
        for f in sorted(d.rglob("*.py")):
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(parts: dict) -> str:
    payload = {**parts, "versions": converter_versions(), "code": _code_hash()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def lookup(key: str) -> Optional[Path]:
    d = cache_root() / "exports" / key
    return d if (d / "manifest.json").is_file() else None


def store(key: str, folder: Path, files: list[str]) -> None:
    """Copy the manifest and the listed files (relative to folder) into the cache."""
    dest = cache_root() / "exports" / key
    try:
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            for rel in files + ["manifest.json"]:
                src = folder / rel
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, target)
                elif src.exists():
                    _link_or_copy(src, target)
    except OSError:
        pass  # a cache that cannot be written is not an error


def restore(cached: Path, folder: Path, files: list[str]) -> None:
    for rel in files:
        src, target = cached / rel, folder / rel
        with atomic_path(target) as tmp:
            if src.is_dir():
                shutil.copytree(src, tmp)
            else:  # a copy, so that editing an output never corrupts the cache
                shutil.copy2(src, tmp)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
