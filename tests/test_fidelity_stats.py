"""The gate's statistics (edgepipe.pipeline.fidelity.stats) on synthetic paired predictions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgepipe.pipeline.fidelity import stats as S


def draw(rng, n: int, p_lost: float, p_gained: float, p_both_wrong: float = 0.05):
    """Paired predictions with known flip rates: labels 0; source/artifact wrong = predicts 1."""
    u = rng.random(n)
    lost = u < p_lost
    gained = (u >= p_lost) & (u < p_lost + p_gained)
    both = (u >= 1 - p_both_wrong)
    src = np.where(gained | both, 1, 0)
    art = np.where(lost | both, 1, 0)
    return src, art, np.zeros(n, int)


@pytest.mark.parametrize("n,p_lost,p_gained", [(500, 0.03, 0.01), (200, 0.05, 0.05), (100, 0.02, 0.0),
                                                 (1000, 0.004, 0.001)])
def test_interval_covers_the_true_drop(n, p_lost, p_gained):
    rng = np.random.default_rng(7)
    true = 100 * (p_lost - p_gained)
    reps = 600
    hits, widths = 0, []
    for _ in range(reps):
        res = S.paired_drop(*draw(rng, n, p_lost, p_gained))
        hits += res.low <= true <= res.high
        widths.append(res.high - res.low)
    coverage = hits / reps
    # nominal 95%: a score interval stays close (not the 58-85% a percentile bootstrap gives with rare flips)
    assert 0.925 <= coverage <= 0.995, coverage
    assert np.median(widths) < 100 * 6 * math.sqrt((p_lost + p_gained + 1e-3) / n) + 2  # and is not trivially wide


def test_bootstrap_under_covers_when_flips_are_rare():
    """Why the score interval is the default: with ~1 flip per set, resampling cannot see the unseen."""
    rng = np.random.default_rng(3)
    score = boot = 0
    for r in range(200):
        src, art, lab = draw(rng, 100, 0.01, 0.0)
        score += S.paired_drop(src, art, lab).low <= 1.0 <= S.paired_drop(src, art, lab).high
        b = S.paired_drop(src, art, lab, method="bootstrap", seed=r)
        boot += b.low <= 1.0 <= b.high
    assert score / 200 >= 0.93 and boot / 200 < 0.8


@pytest.mark.parametrize("n,p", [(100, 0.02), (500, 0.01), (300, 0.1)])
def test_agreement_interval_covers(n, p):
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(800):
        src = np.zeros(n, int)
        art = (rng.random(n) < p).astype(int)
        res = S.paired_drop(src, art)  # no labels: agreement
        assert res.metric == "agreement" and res.mcnemar_p is None
        hits += res.low <= 100 * p <= res.high
    assert 0.93 <= hits / 800 <= 0.995


def test_twenty_images_are_inconclusive_and_say_how_many_are_needed():
    z = np.zeros(20, int)
    res = S.paired_drop(z, z, z, budget=1.0)
    assert res.drop == 0 and res.lost == res.gained == 0
    assert res.verdict == "inconclusive"
    assert res.high > 10  # 0 flips in 20 images bounds the drop only by ~16 points
    assert 300 < res.needed < 500
    assert "381 images" in res.reason or f"{res.needed} images" in res.reason
    # and the same rates on that many images do clear the budget
    big = np.zeros(res.needed, int)
    assert S.paired_drop(big, big, big, budget=1.0).verdict == "pass"
    unlabelled = S.paired_drop(z, z, budget=1.0)
    assert unlabelled.verdict == "inconclusive" and unlabelled.needed == res.needed


def test_pass_and_fail_are_decided_by_the_interval():
    rng = np.random.default_rng(0)
    small = S.paired_drop(*draw(rng, 4000, 0.002, 0.001), budget=1.0)
    assert small.verdict == "pass" and small.high <= 1.0
    big = S.paired_drop(*draw(rng, 2000, 0.06, 0.0), budget=1.0)
    assert big.verdict == "fail" and big.low > 1.0 and "over the budget" in big.reason
    lab = np.zeros(300, int)
    art = lab.copy()
    art[:2] = 1  # 2 of 300 lost: 0.67 points, under the budget but not shown to be
    near = S.paired_drop(lab, art, lab, budget=1.0)
    assert near.verdict == "inconclusive" and near.needed > 300
    assert "under the budget" in near.reason
    on = S.paired_drop(lab, np.r_[np.ones(3, int), lab[3:]], lab, budget=1.0)  # exactly 1 point
    assert on.verdict == "inconclusive" and on.needed is None and "sits on the budget" in on.reason


def test_a_collapsed_class_is_found_under_a_good_average():
    labels = np.repeat(np.arange(10), 100)
    src = labels.copy()
    art = labels.copy()
    art[labels == 3] = 5  # the artifact never says 3
    res = S.paired_drop(src, art, labels, budget=15.0, class_budget=20.0)
    assert res.drop == pytest.approx(10.0)
    assert res.worst_class.cls == 3 and res.worst_class.drop == pytest.approx(100.0)
    assert res.verdict == "fail" and "class 3" in res.reason
    unlabelled = S.paired_drop(src, art)
    assert unlabelled.worst_class.cls == 3 and unlabelled.worst_class.drop == pytest.approx(100.0)


def test_mcnemar_exact():
    assert S.mcnemar_exact_p(0, 0) == 1.0
    assert S.mcnemar_exact_p(5, 5) == 1.0
    assert S.mcnemar_exact_p(10, 0) == pytest.approx(2 / 2 ** 10)
    assert S.mcnemar_exact_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2 ** 10)


def test_tango_restricted_mle_matches_brute_force():
    lost, gained, n, d = 7, 3, 100, 0.02
    qs = np.linspace(max(0, -d) + 1e-9, (1 - d) / 2 - 1e-9, 400001)
    ll = lost * np.log(qs + d) + gained * np.log(qs) + (n - lost - gained) * np.log(1 - 2 * qs - d)
    assert S._tango_q(lost, gained, n, d) == pytest.approx(qs[ll.argmax()], abs=1e-5)
    assert S.tango_score(lost, gained, n, (lost - gained) / n) == pytest.approx(0.0)


def test_scores_and_bad_input():
    scores = np.eye(3)[[0, 1, 2, 2]]
    res = S.paired_drop(scores, scores[[0, 1, 2, 0]], np.array([0, 1, 2, 2]))
    assert res.lost == 1 and res.gained == 0 and res.drop == pytest.approx(25.0)
    assert res.to_dict()["worst_class"]["cls"] == 2
    with pytest.raises(ValueError, match="differ"):
        S.paired_drop([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="method"):
        S.paired_drop([0], [0], method="wald")
    with pytest.raises(ValueError, match="confidence"):
        S.paired_drop([0], [0], confidence=1.5)
    wide = S.paired_drop(np.zeros(50, int), np.zeros(50, int), np.zeros(50, int), confidence=0.99)
    narrow = S.paired_drop(np.zeros(50, int), np.zeros(50, int), np.zeros(50, int), confidence=0.9)
    assert wide.high > narrow.high


def test_counts_give_the_same_result_as_predictions():
    rng = np.random.default_rng(5)
    src, art, lab = draw(rng, 400, 0.03, 0.01)
    lab = lab + (rng.random(400) < 0.5)  # two classes
    a = S.paired_drop(src, art, lab, budget=1.0, class_budget=5.0)
    b = S.drop_from_counts(400, a.lost, a.gained, source_correct=int((src == lab).sum()),
                           per_class=S.class_counts(src, art, lab), budget=1.0, class_budget=5.0)
    assert (a.drop, a.low, a.high, a.verdict, a.needed, a.mcnemar_p) == (b.drop, b.low, b.high, b.verdict, b.needed,
                                                                        b.mcnemar_p)
    assert a.artifact_value == pytest.approx(b.artifact_value) and a.worst_class == b.worst_class
    c = S.drop_from_counts(450, 3, metric="agreement", budget=1.0)  # eval.json: samples, agreement 99.33%
    assert c.artifact_value == pytest.approx(100 * 447 / 450) and c.verdict == "inconclusive"
    with pytest.raises(ValueError, match="metric"):
        S.drop_from_counts(10, 1, metric="top5")
