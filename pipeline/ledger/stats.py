"""Statistics on raw latency samples: the ratio of medians with a bootstrap 95% confidence interval.

``median_ratio(baseline, current)`` -> ratio = median(current) / median(baseline) (above 1: slower)
and a percentile-bootstrap interval: each sample set is resampled with replacement, the ratio of
the resampled medians is taken ``reps`` times, and the 2.5th / 97.5th percentiles bound it.

The resampling is exact but costs O(reps), not O(reps x n): the median of a bootstrap resample of
sorted data x_(1) <= ... <= x_(n) is x_(J), where J = ceil(n U) and U is the median of n
independent uniforms (resampling an index uniformly is ceil(n u) for a uniform u, and ceil is
monotone). The k-th smallest of n uniforms is Beta(k, n - k + 1); for an even n the next one is
U_(k) + (1 - U_(k)) Beta(1, n - k). So a 45,000-sample row costs the same as a 50-sample one.

A change is *significant* when the interval excludes 1. The latency gate fails a row when the
interval's lower end exceeds 1 + budget: slower than the budget allows, with 95% confidence.
The false-alarm rates measured on pure noise are in tests/test_ledger_stats.py and docs/ledger.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

REPS = 4000
LEVEL = 0.95
MIN_SAMPLES = 5  # fewer raw samples than this: no interval, never significant


@dataclass
class RatioCI:
    ratio: Optional[float]  # median(current) / median(baseline)
    low: Optional[float]
    high: Optional[float]
    n_baseline: int
    n_current: int
    level: float = LEVEL
    note: Optional[str] = None

    @property
    def significant(self) -> bool:
        """The interval excludes 1 (no interval: not significant)."""
        return self.low is not None and (self.low > 1.0 or self.high < 1.0)

    @property
    def change_pct(self) -> Optional[float]:
        return None if self.ratio is None else (self.ratio - 1.0) * 100.0

    def exceeds(self, budget_pct: float) -> bool:
        """Slower than ``budget_pct`` percent with the interval's confidence."""
        return self.low is not None and self.low > 1.0 + budget_pct / 100.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["significant"] = self.significant
        d["change_pct"] = self.change_pct
        return d


def _clean(samples: Sequence[float]) -> np.ndarray:
    a = np.asarray(samples if samples is not None else [], dtype=np.float64).ravel()
    return np.sort(a[np.isfinite(a) & (a > 0)])


def bootstrap_medians(x_sorted: np.ndarray, reps: int, rng: np.random.Generator) -> np.ndarray:
    """``reps`` medians of bootstrap resamples of ``x_sorted`` (exact; see the module docstring)."""
    n = len(x_sorted)
    if n == 1:
        return np.full(reps, x_sorted[0])
    k = (n + 1) // 2 if n % 2 else n // 2
    u = rng.beta(k, n - k + 1, size=reps)
    lo = x_sorted[np.clip(np.ceil(n * u).astype(np.int64), 1, n) - 1]
    if n % 2:
        return lo
    u2 = u + (1.0 - u) * rng.beta(1, n - k, size=reps)
    hi = x_sorted[np.clip(np.ceil(n * u2).astype(np.int64), 1, n) - 1]
    return (lo + hi) / 2.0


def median_ratio(baseline: Sequence[float], current: Sequence[float], reps: int = REPS, level: float = LEVEL,
                 seed: int = 0) -> RatioCI:
    """Ratio of medians (current / baseline) with its percentile-bootstrap interval."""
    a, b = _clean(baseline), _clean(current)
    if len(a) == 0 or len(b) == 0:
        return RatioCI(None, None, None, len(a), len(b), level, "no raw samples")
    ratio = float(np.median(b) / np.median(a))
    if min(len(a), len(b)) < MIN_SAMPLES:
        return RatioCI(ratio, None, None, len(a), len(b), level,
                       f"fewer than {MIN_SAMPLES} samples: no confidence interval")
    rng = np.random.default_rng(seed)
    r = bootstrap_medians(b, reps, rng) / bootstrap_medians(a, reps, rng)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(r, [alpha, 1.0 - alpha])
    return RatioCI(ratio, float(low), float(high), len(a), len(b), level)


def naive_bootstrap_ratio(baseline: Sequence[float], current: Sequence[float], reps: int = 2000,
                          level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """The textbook bootstrap (resample every sample): the reference the exact method is tested against."""
    a, b = _clean(baseline), _clean(current)
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, len(a), size=(reps, len(a)))], axis=1)
    mb = np.median(b[rng.integers(0, len(b), size=(reps, len(b)))], axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(mb / ma, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def fmt_pct(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.1f}%"


def fmt_ci(ci: RatioCI) -> str:
    """'+3.1% [+1.2%, +5.0%]' (changes of the median, with the interval)."""
    if ci.ratio is None:
        return ci.note or "-"
    if ci.low is None:
        return f"{fmt_pct(ci.change_pct)} ({ci.note})"
    return f"{fmt_pct(ci.change_pct)} [{fmt_pct((ci.low - 1) * 100)}, {fmt_pct((ci.high - 1) * 100)}]"
