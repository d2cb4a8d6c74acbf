"""A gate with statistics: the accuracy drop of an artifact from paired predictions, with a
confidence interval, the worst per-class drop, and "inconclusive" when the set is too small.

Every image is seen by both the source model and the artifact, so the two predictions are
*paired*. With labels, the drop in top-1 is ``(lost - gained) / n`` where ``lost`` counts
images the source gets right and the artifact wrong and ``gained`` the reverse (the flips);
images both get right or both get wrong carry no information about the difference.
Without labels (most users have images, not labels) the drop is the disagreement rate
``100 - agreement`` with the source's top-1.

Intervals (two-sided, at ``confidence``; figures in percentage points):

* labelled drop, ``method="score"`` (default): Tango's asymptotic score interval for a
  difference of paired proportions (Tango 1998, Stat. Med. 17:891; recommended by Fagerland,
  Lydersen & Laake 2014 for paired binomial data). It needs no flips to be wide: with 0 of
  20 images flipped the 95% upper bound is 16 points, not 0. The exact McNemar p-value
  (two-sided binomial test on the flips) is reported beside it.
* agreement drop: the Wilson score interval for the disagreement rate (the one-sample form
  of the same score principle).
* ``method="bootstrap"``: paired percentile bootstrap (images resampled with both
  predictions), seeded; for comparison, it under-covers when flips are rare.

``paired_drop`` takes the predictions; ``drop_from_counts`` the same from counts alone (images,
flips, per-class flips), which is what eval.json can carry for ``edgepipe check``.

Verdict against a budget (max drop in points): ``pass`` when the whole interval lies at or
under the budget, ``fail`` when it lies wholly over it, else ``inconclusive`` with
``needed``: the number of images at which the interval, at the observed flip rates, would
clear the budget (None when no number would: the observed drop is the budget).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np

METHODS = ("score", "bootstrap")
MAX_NEEDED = 10_000_000
BOOTSTRAP_ROUNDS = 2000


@dataclass
class ClassDrop:
    """The drop within one class (by label; by the source's prediction without labels)."""

    cls: int
    n: int
    drop: float
    low: float
    high: float
    lost: int
    gained: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DropResult:
    """One artifact's drop against its source on one set of images. Figures in points."""

    metric: str  # "top1" (labels) | "agreement" (no labels)
    n: int
    drop: float
    low: float
    high: float
    confidence: float
    method: str
    source_value: Optional[float]  # source top-1 % (None for agreement)
    artifact_value: float  # artifact top-1 %, or agreement %
    lost: int  # with labels: right -> wrong; without: disagreements
    gained: int  # with labels: wrong -> right; without: 0
    mcnemar_p: Optional[float] = None
    budget: Optional[float] = None
    verdict: Optional[str] = None  # pass | fail | inconclusive (None without a budget)
    needed: Optional[int] = None
    reason: str = ""
    per_class: list[ClassDrop] = field(default_factory=list)
    worst_class: Optional[ClassDrop] = None
    class_budget: Optional[float] = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["per_class"] = [c.to_dict() for c in self.per_class]
        d["worst_class"] = self.worst_class.to_dict() if self.worst_class else None
        return d

    def interval_text(self) -> str:
        return f"{self.drop:.2f} [{self.low:.2f}, {self.high:.2f}]"


# --------------------------------------------------------------------------- intervals
def z_value(confidence: float) -> float:
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (fractions, not percent)."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / den
    low = 0.0 if k <= 0 else max(0.0, centre - half)
    high = 1.0 if k >= n else min(1.0, centre + half)
    return low, high


def _tango_q(lost: float, gained: float, n: float, delta: float) -> float:
    """Restricted MLE of P(gained) given P(lost) - P(gained) = delta (Tango 1998)."""
    w = -(lost + gained) + (2 * n - lost + gained) * delta
    disc = w * w + 8 * n * gained * delta * (1 - delta)
    q = (math.sqrt(max(disc, 0.0)) - w) / (4 * n)
    return min(max(q, max(0.0, -delta)), (1 - delta) / 2)


def tango_score(lost: float, gained: float, n: float, delta: float) -> float:
    """Tango's score statistic for H0: P(lost) - P(gained) = delta (decreasing in delta)."""
    q = _tango_q(lost, gained, n, delta)
    var = n * (2 * q + delta * (1 - delta))
    num = lost - gained - n * delta
    if var <= 0:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def _bisect(f, lo: float, hi: float, iters: int = 80) -> float:
    """The point in [lo, hi] where the decreasing f changes sign (f(lo) >= 0 > f(hi))."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) >= 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tango_interval(lost: float, gained: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Score interval for P(lost) - P(gained), fractions in [-1, 1]."""
    if n <= 0:
        return -1.0, 1.0
    z = z_value(confidence)
    est = (lost - gained) / n
    eps = 1e-12
    if tango_score(lost, gained, n, 1 - eps) - (-z) >= 0:
        high = 1.0
    else:
        high = _bisect(lambda d: tango_score(lost, gained, n, d) + z, est, 1 - eps)
    if tango_score(lost, gained, n, -1 + eps) - z <= 0:
        low = -1.0
    else:
        low = _bisect(lambda d: tango_score(lost, gained, n, d) - z, -1 + eps, est)
    return min(low, est), max(high, est)


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: binomial test of lost vs gained flips at 1/2."""
    m = lost + gained
    if m == 0:
        return 1.0
    k = min(lost, gained)
    logs = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2) for i in range(k + 1)]
    return float(min(1.0, 2.0 * sum(math.exp(v) for v in logs)))


def _interval(metric: str, lost: float, gained: float, n: float, confidence: float) -> tuple[float, float]:
    """Interval of the drop in fractions for the metric (score methods)."""
    if metric == "agreement":
        return wilson_interval(lost, n, confidence)
    return tango_interval(lost, gained, n, confidence)


def _bootstrap(src_ok: np.ndarray, art_ok: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    """Paired percentile bootstrap of mean(src_ok - art_ok), fractions."""
    n = len(src_ok)
    if n == 0:
        return -1.0, 1.0
    rng = np.random.default_rng(seed)
    diff = src_ok.astype(np.float64) - art_ok.astype(np.float64)
    idx = rng.integers(0, n, size=(BOOTSTRAP_ROUNDS, n))
    means = diff[idx].mean(axis=1)
    a = (1 - confidence) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


# --------------------------------------------------------------------------- verdicts
def images_needed(metric: str, lost_rate: float, gained_rate: float, budget_points: float,
                  confidence: float = 0.95, start: int = 1) -> Optional[int]:
    """Images at which the score interval at these flip rates would clear the budget.

    Below the budget: the smallest n whose upper bound is <= budget; above it: the smallest n
    whose lower bound is > budget. None when the rates sit on the budget or n would exceed
    MAX_NEEDED.
    """
    b = budget_points / 100.0
    drop = lost_rate - gained_rate

    if abs(drop - b) < 1e-12:
        return None

    def clears(n: int) -> bool:
        lo, hi = _interval(metric, lost_rate * n, gained_rate * n, n, confidence)
        return hi <= b + 1e-12 if drop < b else lo > b

    n = max(1, start)
    while not clears(n):
        if n >= MAX_NEEDED:
            return None
        n = min(n * 2, MAX_NEEDED)
    lo, hi = max(1, n // 2), n
    while lo < hi:
        mid = (lo + hi) // 2
        if clears(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def verdict(low: float, high: float, budget: float) -> str:
    """pass when the interval lies at or under the budget, fail when wholly over it."""
    if high <= budget + 1e-9:
        return "pass"
    if low > budget + 1e-9:
        return "fail"
    return "inconclusive"


# --------------------------------------------------------------------------- the main entry
def as_labels(pred: np.ndarray | Sequence) -> np.ndarray:
    """Class indices from class indices (N,) or scores (N, K)."""
    a = np.asarray(pred)
    if a.ndim >= 2:
        return a.reshape(a.shape[0], -1).argmax(axis=1)
    return a.astype(np.int64)


def _flips(src: np.ndarray, art: np.ndarray, labels: Optional[np.ndarray]) -> tuple[int, int]:
    if labels is None:
        return int((src != art).sum()), 0
    src_ok, art_ok = src == labels, art == labels
    return int((src_ok & ~art_ok).sum()), int((~src_ok & art_ok).sum())


def class_counts(src: np.ndarray, art: np.ndarray, labels: Optional[np.ndarray]) -> list[tuple[int, int, int, int]]:
    """(class, images, lost, gained) per class: by label, or by the source's prediction without labels."""
    groups = src if labels is None else labels
    out = []
    for k in np.unique(groups):
        m = groups == k
        lost, gained = _flips(src[m], art[m], None if labels is None else labels[m])
        out.append((int(k), int(m.sum()), lost, gained))
    return out


def _class_drops(metric: str, counts: Sequence[tuple[int, int, int, int]], confidence: float) -> list[ClassDrop]:
    out = []
    for k, n, lost, gained in counts:
        if n <= 0:
            continue
        lo, hi = _interval(metric, lost, gained, n, confidence)
        out.append(ClassDrop(int(k), int(n), 100.0 * (lost - gained) / n, 100.0 * lo, 100.0 * hi, int(lost),
                             int(gained)))
    out.sort(key=lambda c: (-c.drop, -c.high, c.cls))
    return out


def drop_from_counts(n: int, lost: int, gained: int = 0, *, metric: str = "top1",
                     source_correct: Optional[int] = None,
                     per_class: Optional[Sequence[tuple[int, int, int, int]]] = None,
                     confidence: float = 0.95, budget: Optional[float] = None,
                     class_budget: Optional[float] = None) -> DropResult:
    """The same result from counts alone, e.g. what eval.json records per row.

    top1: ``lost``/``gained`` are the flips (right -> wrong / wrong -> right) and
    ``source_correct`` the source's correct count; agreement: ``lost`` is the number of
    disagreements (``gained`` is 0). ``per_class``: (class, images, lost, gained) tuples.
    """
    if metric not in ("top1", "agreement"):
        raise ValueError("metric must be top1 or agreement")
    if n <= 0:
        raise ValueError("no predictions")
    lo, hi = _interval(metric, lost, gained, n, confidence)
    if metric == "top1":
        src_v = None if source_correct is None else 100.0 * source_correct / n
        art_v = None if source_correct is None else 100.0 * (source_correct - lost + gained) / n
    else:
        src_v, art_v = None, 100.0 * (n - lost) / n
    res = DropResult(metric=metric, n=int(n), drop=100.0 * (lost - gained) / n, low=100.0 * lo, high=100.0 * hi,
                     confidence=confidence, method="tango-score" if metric == "top1" else "wilson-score",
                     source_value=src_v, artifact_value=art_v, lost=int(lost), gained=int(gained),
                     mcnemar_p=mcnemar_exact_p(lost, gained) if metric == "top1" else None,
                     budget=budget, class_budget=class_budget)
    res.per_class = _class_drops(metric, per_class or [], confidence)
    res.worst_class = res.per_class[0] if res.per_class else None
    if budget is not None:
        _decide(res, lost / n, gained / n)
    return res


def paired_drop(source_pred, artifact_pred, labels=None, *, confidence: float = 0.95,
                budget: Optional[float] = None, class_budget: Optional[float] = None,
                method: str = "score", seed: int = 0) -> DropResult:
    """The drop of an artifact against its source from paired predictions.

    ``source_pred``/``artifact_pred``: class indices (N,) or scores (N, K); ``labels``: (N,)
    or None (then the metric is agreement with the source). ``budget``/``class_budget``: max
    drop in points overall / in any one class (the class check fails only when a class's
    interval lies wholly over it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    src, art = as_labels(source_pred), as_labels(artifact_pred)
    lab = None if labels is None else np.asarray(labels).astype(np.int64).reshape(-1)
    if src.shape != art.shape or (lab is not None and lab.shape != src.shape):
        raise ValueError(f"prediction counts differ: source {src.shape}, artifact {art.shape}"
                         + ("" if lab is None else f", labels {lab.shape}"))
    n = int(src.shape[0])
    if n == 0:
        raise ValueError("no predictions")
    lost, gained = _flips(src, art, lab)
    res = drop_from_counts(n, lost, gained, metric="agreement" if lab is None else "top1",
                           source_correct=None if lab is None else int((src == lab).sum()),
                           per_class=class_counts(src, art, lab), confidence=confidence)
    res.budget, res.class_budget = budget, class_budget
    if method == "bootstrap":
        ref = lab if lab is not None else src
        lo, hi = _bootstrap(src == ref, art == ref, confidence, seed)
        res.low, res.high, res.method = 100.0 * lo, 100.0 * hi, "paired-bootstrap"
    if budget is not None:
        _decide(res, lost / n, gained / n)
    return res


def _decide(res: DropResult, lost_rate: float, gained_rate: float) -> None:
    v = verdict(res.low, res.high, res.budget)
    pct = int(round(res.confidence * 100))
    what = "drop" if res.metric == "top1" else "disagreement"
    iv = f"{what} {res.interval_text()} points ({pct}% interval, {res.n} images)"
    if v == "pass":
        res.reason = f"{iv} is within the budget of {res.budget:g}"
    elif v == "fail":
        res.reason = f"{iv} is over the budget of {res.budget:g}"
    else:
        res.needed = images_needed(res.metric, lost_rate, gained_rate, res.budget, res.confidence, start=res.n)
        side = "under" if res.drop < res.budget else "over"
        more = (f"about {res.needed} images at these rates would show it is {side} the budget"
                if res.needed else "the observed drop sits on the budget")
        res.reason = f"{iv} straddles the budget of {res.budget:g}: {more}"
    if res.class_budget is not None and res.worst_class is not None:
        bad = [c for c in res.per_class if c.low > res.class_budget + 1e-9]
        if bad:
            c = bad[0]
            v = "fail"
            res.reason += (f"; class {c.cls} drops {c.drop:.1f} [{c.low:.1f}, {c.high:.1f}] points "
                           f"({c.n} images), over the per-class budget of {res.class_budget:g}")
    res.verdict = v
