"""Statistics of compare and the latency gate on synthetic samples with a known shift.

The false-alarm rate (noise called significant) is measured over repeated draws and printed; the
figures are quoted in docs/ledger.md."""
from __future__ import annotations

import numpy as np
import pytest

from edgepipe.pipeline.ledger.compare import compare_runs
from edgepipe.pipeline.ledger.latency import gate_runs
from edgepipe.pipeline.ledger.query import BenchEntry, RunData
from edgepipe.pipeline.ledger.stats import bootstrap_medians, median_ratio, naive_bootstrap_ratio

DRAWS = 400


def _draw(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Latency-like noise: lognormal (cv 5%), or a tight body with 10% outliers at 1.2-3x (heavy tail)."""
    if kind == "lognormal":
        return 2.0 * rng.lognormal(0.0, 0.05, n)
    x = 2.0 * rng.lognormal(0.0, 0.03, n)
    m = rng.random(n) < 0.10
    x[m] *= rng.uniform(1.2, 3.0, int(m.sum()))
    return x


@pytest.mark.parametrize("n", [21, 50, 200])
def test_exact_bootstrap_matches_resampling_every_sample(n):
    rng = np.random.default_rng(n)
    a, b = _draw(rng, n, "lognormal"), _draw(rng, n, "heavy") * 1.02
    exact = median_ratio(a, b, reps=8000)
    lo, hi = naive_bootstrap_ratio(a, b, reps=8000, seed=1)
    width = hi - lo
    assert abs(exact.low - lo) < 0.15 * width and abs(exact.high - hi) < 0.15 * width
    # the resampled medians themselves have the same distribution: the two empirical CDFs differ by no
    # more than sampling error (Kolmogorov-Smirnov distance; the 5% critical value here is ~0.01)
    srt = np.sort(a)
    ex = bootstrap_medians(srt, 40000, np.random.default_rng(3))
    nv = np.median(srt[np.random.default_rng(4).integers(0, n, size=(40000, n))], axis=1)
    vals = np.union1d(ex, nv)
    ks = np.max(np.abs(np.searchsorted(np.sort(ex), vals, side="right") -
                       np.searchsorted(np.sort(nv), vals, side="right"))) / len(ex)
    assert ks < 0.015


def test_tiny_and_empty_sample_sets():
    assert median_ratio([], [1.0, 2.0]).ratio is None
    few = median_ratio([1.0, 1.1], [1.2, 1.3])
    assert few.ratio == pytest.approx(1.25 / 1.05) and few.low is None and not few.significant
    assert median_ratio([1.0] * 10, [1.0] * 10).significant is False


def _entries(samples: np.ndarray, label: str) -> RunData:
    e = BenchEntry("m", "tflite-int8", "cpu", "litert", "local", "ok", device_id="local:h", cpu="c", threads=2,
                   runtime_version="2.3.0", p50=float(np.median(samples)), samples=list(samples))
    return RunData(label, [e])


@pytest.mark.parametrize("kind", ["lognormal", "heavy"])
def test_known_shifts_called_right(kind):
    rng = np.random.default_rng(7)
    base = _draw(rng, 200, kind)
    cases = {"noise": 1.0, "3% slower": 1.03, "10% slower": 1.10, "10% faster": 0.90}
    got = {}
    for name, f in cases.items():
        cur = _draw(rng, 200, kind) * f
        ci = median_ratio(base, cur)
        gate = gate_runs(_entries(base, "A"), _entries(cur, "B"), 5.0)
        got[name] = (ci.significant, ci.ratio > 1, gate.passed)
    assert got["noise"][0] is False and got["noise"][2] is True
    assert got["3% slower"] == (True, True, True)  # detected, and within a 5% budget
    assert got["10% slower"] == (True, True, False)  # detected, and over the budget
    assert got["10% faster"] == (True, False, True)


@pytest.mark.parametrize("kind", ["lognormal", "heavy"])
def test_compare_names_only_changes_beyond_the_threshold(kind):
    """A significant 3% change is "within threshold" at the default 5%; --min-change 0 calls it slower."""
    rng = np.random.default_rng(7)
    base = _draw(rng, 200, kind)

    def verdict(factor: float, min_change: float = 5.0) -> str:
        cur = _draw(np.random.default_rng(8), 200, kind) * factor
        return compare_runs(_entries(base, "A"), _entries(cur, "B"), min_change=min_change).rows[0].verdict

    assert verdict(1.0) == "no significant change"
    assert verdict(1.03) == "within threshold" and verdict(1.03, 0.0) == "slower"
    assert verdict(1.10) == "slower" and verdict(0.90) == "faster"


@pytest.mark.parametrize("kind", ["lognormal", "heavy"])
@pytest.mark.parametrize("n", [50, 200])
def test_false_alarm_rate_on_noise_and_power(kind, n, capsys):
    rng = np.random.default_rng(1000 + n)
    sig = beyond = gate_fail = gate_3 = gate_10 = 0
    for i in range(DRAWS):
        a, b = _draw(rng, n, kind), _draw(rng, n, kind)
        c = median_ratio(a, b, seed=i)
        sig += c.significant
        beyond += c.significant and abs(c.ratio - 1.0) >= 0.05  # compare's "slower"/"faster" (--min-change 5)
        gate_fail += c.exceeds(5.0)
        gate_3 += median_ratio(a, _draw(rng, n, kind) * 1.03, seed=i).exceeds(5.0)
        gate_10 += median_ratio(a, _draw(rng, n, kind) * 1.10, seed=i).exceeds(5.0)
    rates = {"compare_false_alarm": sig / DRAWS, "compare5_false_alarm": beyond / DRAWS,
             "gate5_false_alarm_noise": gate_fail / DRAWS,
             "gate5_fails_3pct": gate_3 / DRAWS, "gate5_catches_10pct": gate_10 / DRAWS}
    with capsys.disabled():
        print(f"\n[ledger stats] {kind} noise, n={n}, {DRAWS} draws: " +
              ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    assert 0.01 <= rates["compare_false_alarm"] <= 0.08  # nominal 5% for a 95% interval
    assert rates["compare5_false_alarm"] == 0.0  # sampling noise never moves these medians by 5%
    assert rates["gate5_false_alarm_noise"] == 0.0 and rates["gate5_fails_3pct"] <= 0.01
    assert rates["gate5_catches_10pct"] >= 0.9
