"""The history page in a real headless browser: every plot renders, and the page loads nothing.

Chromium is pointed at a dead local proxy and a resolver that resolves nothing, so no test here
(nor the browser's own background chatter) can reach any address; the net log still records every
request the page *tries* to make, which a control page with an external image proves."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.pipeline.ledger import record_bench
from edgepipe.pipeline.ledger.html import AREA, CSP, HEADER_PX, P50_COLOR, PLOT_PX, WIDTH

from conftest import run_cli
from ledger_helpers import bench_report, bench_row

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (sudo bash .ci/service-deps.sh)")


def _chromium(page: Path, tmp: Path, height: int) -> tuple[Image.Image, list[dict]]:
    shot, netlog = tmp / "shot.png", tmp / "net.json"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           "--disable-default-apps", "--no-default-browser-check", "--hide-scrollbars",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp / 'profile'}", f"--log-net-log={netlog}", f"--screenshot={shot}",
           f"--window-size={WIDTH},{height}", page.absolute().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert shot.exists(), r.stderr[-2000:]
    return Image.open(shot).convert("RGB"), _page_requests(json.loads(netlog.read_text()))


def _page_requests(log: dict) -> list[dict]:
    """URL requests a page started (the browser's own services carry the initiator 'not an origin')."""
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    out = []
    for e in log["events"]:
        p = e.get("params") or {}
        if types.get(e["type"]) == "URL_REQUEST_START_JOB" and p.get("url") and p.get("initiator") != "not an origin":
            out.append({"url": p.get("url"), "initiator": p.get("initiator")})
    return out


def _hex(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


def _count_color(img: Image.Image, box: tuple, color: tuple, tol: int = 60) -> int:
    px = np.asarray(img.crop(box), dtype=np.int32)
    return int((np.abs(px - np.array(color)).sum(axis=-1) <= tol).sum())


def test_history_page_renders_every_plot_and_loads_nothing(tmp_path):
    led = tmp_path / "ledger.sqlite"
    series = {"tflite-fp32": 2.0, "tflite-int8": 1.0, "onnx-fp32": 3.0}
    for run in range(5):
        rows = [bench_row(a, median_ms=m * (1 + 0.05 * run), seed=run * 10 + i) for i, (a, m) in enumerate(series.items())]
        record_bench(bench_report(rows), led)
    page = tmp_path / "history.html"
    r = run_cli("history", "--ledger", str(led), "--html", str(page), "--json")
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert "default-src 'none'" in CSP
    assert not re.search(r"[a-zA-Z][a-zA-Z0-9+.-]*://", text), "the page names an external URL"
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b|url\(|@import", text, re.I)
    n = len(json.loads(r.stdout)["series"])
    assert n == 3 and text.count('<section class="series"') == 3

    img, requests = _chromium(page, tmp_path, HEADER_PX + n * PLOT_PX)
    assert requests == [], requests
    assert img.size == (WIDTH, HEADER_PX + n * PLOT_PX)
    x0, y0, x1, y1 = AREA
    blue = _hex(P50_COLOR)
    for i in range(n):  # each plot's data area shows its p50 line and points
        top = HEADER_PX + i * PLOT_PX
        assert _count_color(img, (x0, top + y0, x1, top + y1), blue) > 400, f"plot {i} is blank"
    assert _count_color(img, (0, 0, WIDTH, HEADER_PX), blue) == 0  # the header has no plot ink


def test_the_request_detector_sees_a_page_load(tmp_path):
    """Control: a page that does load an image shows up in the net log (so an empty list means something)."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://edgepipe-control.invalid/x.png"></body></html>')
    _, requests = _chromium(page, tmp_path, 200)
    assert any("edgepipe-control.invalid" in (q["url"] or "") for q in requests), requests
