"""nrfm.eval.bootstrap against straight-line loops over explicit resamples, scikit-learn, lifelines and Holm by hand."""
from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from nrfm.eval import bootstrap


def _data(seed=0, n=60, patients=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    a = np.round(y * 0.5 + rng.normal(size=n), 1)  # rounded: ties in the scores
    b = np.round(y * 1.5 + rng.normal(size=n), 1)
    clusters = np.arange(n) // 2 if patients is None else patients
    return y, a, b, clusters


def test_paired_difference_matches_a_loop_over_resamples():
    y, a, b, clusters = _data()
    counts = bootstrap.draw(len(y), 400, seed=11, clusters=clusters, strata=y)
    result = bootstrap.paired_difference(lambda c: bootstrap.auc(y, a, c), lambda c: bootstrap.auc(y, b, c),
                                         counts, len(y))
    # the straight-line version: for each resample, the explicit exam list, scikit-learn on both models
    deltas = []
    for row in counts:
        idx = bootstrap.indices(row)
        deltas.append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
    deltas = np.array(deltas)
    assert result.delta == pytest.approx(roc_auc_score(y, b) - roc_auc_score(y, a))
    assert result.deltas == pytest.approx(deltas)
    assert (result.ci_low, result.ci_high) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])))
    assert result.p_value == pytest.approx((1 + np.sum(deltas <= 0)) / (len(deltas) + 1))
    # same seed, same numbers
    again = bootstrap.draw(len(y), 400, seed=11, clusters=clusters, strata=y)
    assert (again == counts).all()


def test_weighted_statistics_equal_explicit_resamples():
    y, a, _, clusters = _data(seed=2)
    counts = bootstrap.draw(len(y), 30, seed=3, clusters=clusters)
    bacc = bootstrap.balanced_accuracy(y, a, 0.2, counts)
    for row, value in zip(counts, bacc):
        idx = bootstrap.indices(row)
        expected = balanced_accuracy_score(y[idx], a[idx] >= 0.2) if len(np.unique(y[idx])) == 2 else np.nan
        assert value == pytest.approx(expected, nan_ok=True)
    assert np.isnan(bootstrap.balanced_accuracy(y, a, float("nan"), counts)).all()  # no threshold: undefined
    share, volume = np.abs(a) + 0.1, np.abs(y) + 0.5
    ratio = bootstrap.ratio_of_means(share, volume, counts)
    idx = bootstrap.indices(counts[0])
    assert ratio[0] == pytest.approx(share[idx].mean() / volume[idx].mean())
    sites = np.where(a > 0, "A", "B")
    predicted = np.where(y > 0, "A", "B")
    mc = bootstrap.multiclass_balanced_accuracy(sites, predicted, counts)
    assert mc[1] == pytest.approx(balanced_accuracy_score(sites[bootstrap.indices(counts[1])],
                                                          predicted[bootstrap.indices(counts[1])]))


def test_youden_thresholds_equal_the_threshold_picked_on_each_explicit_resample():
    from nrfm.eval.metrics import youden_threshold
    for seed in range(4):
        y, a, _, clusters = _data(seed=seed, n=30)  # rounded scores: ties
        y[3] = np.nan  # an unlabelled row is ignored
        counts = bootstrap.draw(len(y), 300, seed=seed, clusters=clusters)
        picked = bootstrap.youden_thresholds(y, a, counts)
        for row, value in zip(counts, picked):
            idx = bootstrap.indices(row)
            idx = idx[np.isfinite(y[idx])]
            assert value == youden_threshold(y[idx], a[idx]) or np.isnan(value) and len(np.unique(y[idx])) < 2
    # no threshold beats "nothing positive": the smallest float above the top DRAWN score, as on the sample
    y, score = np.array([1.0, 1, 0, 0]), np.array([0.0, 0.1, 0.5, 0.6])
    assert bootstrap.youden_thresholds(y, score, np.ones((1, 4), dtype=np.int64))[0] == youden_threshold(y, score)
    assert bootstrap.youden_thresholds(y, score, np.array([[1, 1, 1, 0]]))[0] == np.nextafter(0.5, 1)
    assert np.isnan(bootstrap.youden_thresholds(y, score, np.array([[1, 1, 0, 0], [-1, -1, -1, -1]]))).all()


def test_balanced_accuracy_with_one_threshold_per_resample():
    y, a, _, clusters = _data(seed=5)
    counts = bootstrap.draw(len(y), 40, seed=6, clusters=clusters, strata=y)
    thresholds = np.linspace(-1, 1, len(counts))
    thresholds[7] = np.nan  # no decision rule in that resample: undefined
    values = bootstrap.balanced_accuracy(y, a, thresholds, counts)
    for b, (row, value) in enumerate(zip(counts, values)):
        idx = bootstrap.indices(row)
        expected = np.nan if b == 7 else balanced_accuracy_score(y[idx], a[idx] >= thresholds[b])
        assert value == pytest.approx(expected, nan_ok=True)
    with pytest.raises(ValueError, match="thresholds for"):
        bootstrap.balanced_accuracy(y, a, thresholds[:3], counts)


def test_concordance_matches_lifelines():
    rng = np.random.default_rng(4)
    n = 40
    time = rng.integers(1, 15, n).astype(float)  # tied times on purpose
    event = rng.integers(0, 2, n).astype(float)
    risk = np.round(rng.normal(size=n), 1)
    full = bootstrap.concordance(time, event, risk, np.ones((1, n), dtype=int))[0]
    assert full == pytest.approx(concordance_index(time, -risk, event))
    counts = bootstrap.draw(n, 5, seed=0, strata=event)
    values = bootstrap.concordance(time, event, risk, counts)
    for row, value in zip(counts, values):
        idx = bootstrap.indices(row)
        assert value == pytest.approx(concordance_index(time[idx], -risk[idx], event[idx]))


def test_stratification_keeps_both_classes_and_stratum_sizes():
    y = np.r_[np.ones(3), np.zeros(57)]  # a rare class: unstratified resamples often lose it
    counts = bootstrap.draw(len(y), 2000, seed=0, strata=y)
    assert (counts @ (y == 1) == 3).all() and (counts @ (y == 0) == 57).all()
    plain = bootstrap.draw(len(y), 2000, seed=0)
    assert (plain @ (y == 1) == 0).any()  # why stratification is needed


def test_redraw_keeps_both_classes_of_every_scored_endpoint():
    rng = np.random.default_rng(1)
    n = 30
    first = np.r_[1.0, np.zeros(n - 1)]
    second = rng.integers(0, 2, n).astype(float)
    second[::3] = np.nan  # missing labels are neither class
    counts = bootstrap.draw(n, 500, seed=5, both_classes=[first, second])
    for y in (first, second):
        assert ((counts @ (y == 1)) > 0).all() and ((counts @ (y == 0)) > 0).all()


def test_cluster_resampling_keeps_patients_whole():
    patients = np.repeat(np.arange(20), np.tile([1, 2, 3], 7)[:20])  # 1 to 3 exams per patient
    sites = np.where(patients < 8, "A", "B")
    counts = bootstrap.draw(len(patients), 300, seed=2, clusters=patients, strata=sites)
    for p in np.unique(patients):
        rows = counts[:, patients == p]
        assert (rows == rows[:, :1]).all()  # every exam of a patient drawn the same number of times
    # each site keeps its number of patients
    for site, k in (("A", 8), ("B", 12)):
        first = np.r_[True, patients[1:] != patients[:-1]] & (sites == site)
        assert (counts[:, first].sum(1) == k).all()


def test_unstratified_draw_is_the_plain_integer_draw():
    counts = bootstrap.draw(50, 20, seed=7)
    idx = np.random.default_rng(7).integers(0, 50, size=(20, 50))
    assert (counts == bootstrap.counts_from_indices(idx, 50)).all()


def test_undefined_resample_gives_no_interval():
    assert np.isnan(bootstrap.percentile_ci(np.array([0.1, np.nan, 0.2]))).all()
    assert np.isnan(bootstrap.p_greater_than_zero(np.array([0.1, np.nan])))
    assert bootstrap.p_greater_than_zero(np.zeros(99)) == 1.0
    assert bootstrap.p_greater_than_zero(np.ones(99)) == pytest.approx(0.01)


def _holm_by_hand(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_holm_matches_a_straight_line_version(seed):
    p = list(np.random.default_rng(seed).uniform(0, 0.2, 12)) + [0.001, 0.001]
    assert bootstrap.holm(p) == pytest.approx(_holm_by_hand(p))
    try:
        from statsmodels.stats.multitest import multipletests
    except ImportError:
        return
    assert bootstrap.holm(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_holm_leaves_nan_out_of_the_family():
    adjusted = bootstrap.holm([0.01, np.nan, 0.02])
    assert np.isnan(adjusted[1]) and adjusted[[0, 2]] == pytest.approx([0.02, 0.02])
    assert 1 / (bootstrap.resamples_for_holm(40, 0.025) + 1) <= 0.025 / 40


def test_resamples_for_holm_estimate_p_at_holms_strictest_threshold_within_half_of_it():
    """A test whose true p sits at alpha / m: with the kit's B its bootstrap p lands within a factor of two of the
    truth +- 50 % in nearly every repetition; with the bare minimum B = 2 m / alpha in about half of them."""
    from scipy.stats import norm

    m, alpha = 80, 0.025
    true_p = alpha / m
    rng = np.random.default_rng(0)

    def share_within_half(n_boot, repeats=100):
        deltas = rng.normal(norm.isf(true_p), 1.0, size=(repeats, n_boot))  # P(delta <= 0) = true_p
        p = np.array([bootstrap.p_greater_than_zero(row) for row in deltas])
        return np.mean(np.abs(p / true_p - 1) <= 0.5)

    assert bootstrap.resamples_for_holm(m, alpha) == bootstrap.HOLM_TAIL_RESAMPLES * m / alpha
    assert share_within_half(bootstrap.resamples_for_holm(m, alpha)) >= 0.95
    assert share_within_half(bootstrap.resamples_for_holm(m, alpha, tail=2)) <= 0.7
    with pytest.raises(ValueError, match="tail"):
        bootstrap.resamples_for_holm(m, alpha, tail=1)


def test_distinct_resamples_count_multisets_per_stratum():
    from math import comb

    assert 10 ** bootstrap.log10_distinct_resamples(2, strata=[0, 1]) == pytest.approx(1)  # one patient per class
    assert 10 ** bootstrap.log10_distinct_resamples(10, strata=[0] * 5 + [1] * 5) == pytest.approx(comb(9, 5) ** 2)
    assert 10 ** bootstrap.log10_distinct_resamples(6, clusters=[0, 0, 1, 1, 2, 2]) == pytest.approx(comb(5, 3))
    # brute force: every distinct count vector seen over many draws of 3 clusters
    seen = {tuple(r) for r in bootstrap.draw(3, 3000, seed=0)}
    assert len(seen) == comb(5, 3)
