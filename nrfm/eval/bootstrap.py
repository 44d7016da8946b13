"""The one bootstrap of the kit: seeded, cluster (patient) resampling, stratified, paired, vectorised.

Every confidence interval and every bootstrap p-value in nrfm comes from here: the per-site AUC CIs of
``metrics/molecular.csv``, notebook 02's DRO-minus-ERM table, the verdicts of notebook 06, the site-invariance
CIs and the Grad-CAM enrichment CI.

**How a resample is drawn** (:func:`draw`). Rows are exams; ``clusters`` names the unit that is drawn (the
patient: all exams of a drawn patient enter together, as often as the patient is drawn, wherever a patient can
recur). Clusters are drawn with replacement *within strata* (each stratum keeps its number of clusters), so a
stratified resample keeps, e.g., every site or both classes. A cluster's stratum is the stratum of its first
row; with class strata that row's class is present whenever the cluster is drawn, so every resample keeps both
classes. A resample is stored as a row of counts: ``counts[b, i]`` = how many times row ``i`` is in resample
``b``; every statistic below is a weighted statistic of the rows, so all resamples are computed at once
(numpy, no Python loop per resample). ``np.repeat(np.arange(n), counts[b])`` is the explicit resample.

**Keeping both classes of every scored endpoint.** One endpoint: class strata (above). Several endpoints
scored on the same subjects (a mean over markers): the subjects are drawn jointly (clusters within the
given strata) and a resample in which some scored endpoint lacks a class is *redrawn* (the bootstrap
conditional on every endpoint being evaluable; endpoints with a single class in the full sample are not
scored at all). No resample is ever scored on fewer endpoints than the point estimate: each resample estimates
the same quantity. If redrawing fails (:data:`MAX_REDRAW_ROUNDS`), the CI is NaN rather than biased.

**Paired differences** (:func:`paired_difference`): the same counts score both models, so subject-level
variation cancels in ``B - A``. The interval is the percentile interval; the one-sided p-value for
"difference > 0" is ``(1 + #{delta_b <= 0}) / (n_boot + 1)`` (Davison & Hinkley 1997, eq. 4.11 form): never
0, so the number of resamples bounds the smallest p and sets the Monte Carlo precision of the small ones that Holm
decides on (:func:`resamples_for_holm`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

MAX_REDRAW_ROUNDS = 50  # redraw rounds for resamples that miss a class of a scored endpoint


# ----------------------------------------------------------------------------------------------- drawing
def _codes(labels: Sequence | None, n: int) -> np.ndarray:
    if labels is None:
        return np.zeros(n, dtype=np.int64)
    labels = np.asarray(labels)
    if len(labels) != n:
        raise ValueError(f"labels of length {len(labels)} for {n} rows")
    _, codes = np.unique(labels.astype(str), return_inverse=True)
    return codes.astype(np.int64)


def draw(n: int, n_boot: int, seed: int, clusters: Sequence | None = None, strata: Sequence | None = None,
         both_classes: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Resample counts (n_boot, n): clusters drawn with replacement within strata, seeded.

    Args:
        n: number of rows (exams).
        n_boot: number of resamples.
        seed: seed of ``numpy.random.default_rng``; the same arguments give the same counts.
        clusters: (n,) cluster label per row (patient_id); default: every row its own cluster.
        strata: (n,) stratum label per row (site, class); a cluster's stratum is that of its first row.
        both_classes: label arrays (n,) of 0/1/NaN (one per scored endpoint): a resample in which some array has
            no 0 or no 1 among its drawn rows is redrawn (see the module docstring).

    Returns:
        int32 counts (n_boot, n); rows still missing a class after :data:`MAX_REDRAW_ROUNDS` are all -1.
    """
    if n == 0 or n_boot < 1:
        return np.zeros((max(n_boot, 0), n), dtype=np.int32)
    rng = np.random.default_rng(seed)
    cluster_of_row = _codes(clusters, n) if clusters is not None else np.arange(n, dtype=np.int64)
    n_clusters = int(cluster_of_row.max()) + 1
    first_row = np.full(n_clusters, n, dtype=np.int64)
    np.minimum.at(first_row, cluster_of_row, np.arange(n))
    stratum_of_cluster = _codes(strata, n)[first_row]
    groups = [np.flatnonzero(stratum_of_cluster == s) for s in np.unique(stratum_of_cluster)]

    def sample(size: int) -> np.ndarray:
        per_cluster = np.zeros(size * n_clusters, dtype=np.int64)
        offset = (np.arange(size) * n_clusters)[:, None]
        for members in groups:
            picked = members[rng.integers(0, len(members), size=(size, len(members)))]
            per_cluster += np.bincount((offset + picked).ravel(), minlength=size * n_clusters)
        return per_cluster.reshape(size, n_clusters).astype(np.int32)[:, cluster_of_row]

    counts = sample(n_boot)
    checks = [np.asarray(y, dtype=float) for y in both_classes]
    if not checks:
        return counts
    invalid = _missing_a_class(counts, checks)
    for _ in range(MAX_REDRAW_ROUNDS):
        if not invalid.any():
            break
        counts[invalid] = sample(int(invalid.sum()))
        invalid = _missing_a_class(counts, checks)
    counts[invalid] = -1
    return counts


def _missing_a_class(counts: np.ndarray, labels: Sequence[np.ndarray]) -> np.ndarray:
    bad = np.zeros(len(counts), dtype=bool)
    for y in labels:
        bad |= (counts[:, y == 1].sum(1) == 0) | (counts[:, y == 0].sum(1) == 0)
    return bad


def log10_distinct_resamples(n: int, clusters: Sequence | None = None, strata: Sequence | None = None) -> float:
    """log10 of the number of distinct resamples :func:`draw` can produce: the product over strata of
    C(2k - 1, k) (multisets of k clusters out of k). Few distinct resamples = a coarse, degenerate bootstrap
    distribution (1 cluster per stratum: a single possible resample, a zero-width CI whatever the data)."""
    if n == 0:
        return 0.0
    cluster_of_row = _codes(clusters, n) if clusters is not None else np.arange(n, dtype=np.int64)
    first_row = np.full(int(cluster_of_row.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first_row, cluster_of_row, np.arange(n))
    _, per_stratum = np.unique(_codes(strata, n)[first_row], return_counts=True)
    lgamma = np.vectorize(math.lgamma)
    k = per_stratum.astype(float)
    return float(np.sum(lgamma(2 * k) - lgamma(k + 1) - lgamma(k)) / math.log(10))


def counts_from_indices(idx: np.ndarray, n: int) -> np.ndarray:
    """Counts (B, n) of an index matrix (B, m) of rows drawn with replacement."""
    idx = np.atleast_2d(np.asarray(idx, dtype=np.int64))
    offset = (np.arange(idx.shape[0]) * n)[:, None]
    return np.bincount((offset + idx).ravel(), minlength=idx.shape[0] * n).reshape(idx.shape[0], n)


def indices(counts_row: np.ndarray) -> np.ndarray:
    """The explicit resample (row indices, with repeats) of one row of counts."""
    return np.repeat(np.arange(len(counts_row)), np.maximum(counts_row, 0))


# ------------------------------------------------------------------------------------ weighted statistics
def _valid(counts: np.ndarray) -> np.ndarray:
    return (counts >= 0).all(axis=1)


def _small_ints(counts: np.ndarray) -> np.ndarray:
    """Counts as int32 (exact: a resample's counts sum to about n rows) for faster integer sums."""
    return counts.astype(np.int32, copy=False) if counts.shape[1] < 2 ** 20 else counts


def auc(y: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ROC AUC (Mann-Whitney, ties counted 1/2: equals ``roc_auc_score`` on the explicit resample) per row of
    ``counts`` (B, n); NaN where a resample has a single class.

    In integers: with the rows sorted by score and ``cum`` the running count of drawn negatives, a positive whose
    group of tied scores spans sorted positions [start, end] beats ``cum[start - 1]`` negatives and ties with
    ``cum[end] - cum[start - 1]``; twice its share is ``cum[start - 1] + cum[end]``.
    """
    y, score = np.asarray(y, dtype=float), np.asarray(score, dtype=float)
    counts = np.atleast_2d(counts)
    if len(score) == 0:
        return np.full(len(counts), np.nan)
    order = np.argsort(score, kind="stable")
    s, yy = score[order], y[order]
    w = _small_ints(counts)[:, order]
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # tie group of each sorted row
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    positive = np.flatnonzero(yy == 1)
    negatives = w * (yy == 0)
    cum = np.zeros((len(counts), len(s) + 1), dtype=w.dtype)
    np.cumsum(negatives, axis=1, out=cum[:, 1:])  # cum[:, k + 1] = drawn negatives among sorted rows 0..k
    twice = cum[:, starts[group[positive]]] + cum[:, ends[group[positive]] + 1]
    w_pos = w[:, positive]
    n_pos, n_neg = w_pos.sum(1, dtype=np.int64), cum[:, -1].astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w_pos.astype(np.int64) * twice).sum(1) / (2.0 * n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0) | ~_valid(counts)] = np.nan
    return out


def balanced_accuracy(y: np.ndarray, score: np.ndarray, threshold: float | np.ndarray,
                      counts: np.ndarray) -> np.ndarray:
    """Balanced accuracy of ``score >= threshold`` per row of ``counts``; NaN for a single class or a NaN
    threshold (no threshold = no decision rule = undefined, never 0.5).

    ``threshold`` is one number, or one per row of ``counts`` (B,): the decision rule re-selected in each
    resample (:func:`youden_thresholds`)."""
    counts = np.atleast_2d(counts)
    y = np.asarray(y, dtype=float)
    pos, neg = (y == 1).astype(float), (y == 0).astype(float)
    w = counts.astype(float)
    n_pos, n_neg = w @ pos, w @ neg
    score = np.asarray(score, dtype=float)
    if np.ndim(threshold) == 0:
        if threshold is None or not np.isfinite(threshold):
            return np.full(len(counts), np.nan)
        pred = (score >= threshold).astype(float)
        true_pos, true_neg = w @ (pos * pred), w @ (neg * (1 - pred))
        undefined = np.zeros(len(counts), dtype=bool)
    else:
        threshold = np.asarray(threshold, dtype=float)
        if threshold.shape != (len(counts),):
            raise ValueError(f"{threshold.shape[0]} thresholds for {len(counts)} resamples")
        ints = _small_ints(counts)
        positive, negative = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        # each resample's own rule: called positive where score >= that resample's threshold
        true_pos = (ints[:, positive] * (score[positive][None, :] >= threshold[:, None])).sum(1, dtype=np.int64)
        true_neg = (ints[:, negative] * (score[negative][None, :] < threshold[:, None])).sum(1, dtype=np.int64)
        undefined = ~np.isfinite(threshold)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 0.5 * (true_pos / n_pos + true_neg / n_neg)
    out[(n_pos == 0) | (n_neg == 0) | undefined | ~_valid(counts)] = np.nan
    return out


def youden_thresholds(y: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The Youden threshold (maximum of TPR - FPR over ``score >= t``) of every resample in ``counts`` (B, n).

    Equals :func:`nrfm.eval.metrics.youden_threshold` on each explicit resample (candidate thresholds are the
    drawn scores; ties in J go to the highest threshold; when no threshold beats predicting nothing positive, J = 0,
    the smallest float above the resample's top score). NaN for a resample with a single class, or invalid. Rows
    with a NaN label are ignored. Used to re-select a decision rule on resampled validation exams, so that a
    balanced-accuracy comparison carries the variability of the threshold as well as that of the test exams.
    """
    y, score = np.asarray(y, dtype=float), np.asarray(score, dtype=float)
    counts = np.atleast_2d(counts)
    labelled = (y == 0) | (y == 1)  # rows without a 0/1 label (NaN) are ignored
    y, score = y[labelled], score[labelled]
    out = np.full(len(counts), np.nan)
    if len(y) == 0:
        return out
    order = np.argsort(-score, kind="stable")
    s, yy, w = score[order], y[order], _small_ints(counts)[:, np.flatnonzero(labelled)[order]]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last row of each group of tied scores
    tp = np.cumsum(w * (yy == 1), axis=1)[:, ends]
    fp = np.cumsum(w, axis=1)[:, ends] - tp  # every labelled row is 0 or 1
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        j = tp / n_pos[:, None] - fp / n_neg[:, None]
    # column 0 is "predict nothing positive" (J = 0); a score absent from a resample repeats the J of the next
    # higher drawn score (or 0), so the first maximum is always a drawn score or column 0, as on the explicit sample
    j = np.hstack([np.zeros((len(counts), 1)), j])
    best = np.argmax(j, axis=1)
    candidates = np.r_[np.nan, s[ends]]
    out = candidates[best]
    none = best == 0
    if none.any():  # the smallest float above the top DRAWN score of those resamples
        drawn_top = np.where(w[none] > 0, s[None, :], -np.inf).max(axis=1)
        out[none] = np.nextafter(drawn_top, np.inf)
    out[(n_pos == 0) | (n_neg == 0) | ~_valid(counts)] = np.nan
    return out


def multiclass_balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean per-class recall (``balanced_accuracy_score``) per row of ``counts``, over the classes present."""
    labels, predicted = np.asarray(labels).astype(str), np.asarray(predicted).astype(str)
    counts = np.atleast_2d(counts).astype(float)
    recalls = []
    for cls in np.unique(labels):
        member = (labels == cls).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(counts @ (member * (predicted == cls)) / (counts @ member))
    out = np.nanmean(np.vstack(recalls), axis=0) if recalls else np.full(len(counts), np.nan)
    out[~_valid(counts.astype(np.int64))] = np.nan
    return out


def mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of ``values`` per row of ``counts``."""
    counts = np.atleast_2d(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = counts @ np.asarray(values, dtype=float) / counts.sum(1)
    out[~_valid(counts)] = np.nan
    return out


def ratio_of_means(numerator: np.ndarray, denominator: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``mean(numerator) / mean(denominator)`` per row of ``counts`` (e.g. CAM share over volume share)."""
    counts = np.atleast_2d(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (counts @ np.asarray(numerator, dtype=float)) / (counts @ np.asarray(denominator, dtype=float))
    out[~_valid(counts)] = np.nan
    return out


def concordance(time: np.ndarray, event: np.ndarray, risk: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Harrell's c-index of ``risk`` (higher = shorter survival) per row of ``counts``.

    A pair is comparable when the shorter time ends in an event (at tied times: an event against a censored
    time); concordant when the shorter time has the higher risk, ties in risk count 1/2. On the full sample this
    equals ``lifelines.utils.concordance_index(time, -risk, event)`` (checked by the tests).
    """
    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    counts = np.atleast_2d(counts).astype(float)
    ti, tj = time[:, None], time[None, :]
    ei, ej = event[:, None] == 1, event[None, :] == 1
    comparable = (ei & (ti < tj)) | (ei & ~ej & (ti == tj))
    score = np.where(risk[:, None] > risk[None, :], 1.0, np.where(risk[:, None] == risk[None, :], 0.5, 0.0))
    comparable = comparable.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((counts @ (comparable * score)) * counts).sum(1) / ((counts @ comparable) * counts).sum(1)
    out[~_valid(counts.astype(np.int64))] = np.nan
    return out


# ------------------------------------------------------------------------------------ intervals and tests
def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the bootstrap ``values``; NaN, NaN when any value is non-finite or none exist
    (an undefined resample is never dropped: that would change the quantity estimated)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0 or not np.isfinite(values).all():
        return float("nan"), float("nan")
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def p_greater_than_zero(deltas: np.ndarray, margin: float = 0.0) -> float:
    """One-sided bootstrap p-value for "difference > margin" (0 unless a smallest effect of interest is given):
    ``(1 + #{delta_b <= margin}) / (B + 1)``; NaN if any resample is undefined."""
    deltas = np.asarray(deltas, dtype=float)
    if len(deltas) == 0 or not np.isfinite(deltas).all():
        return float("nan")
    return float((1 + np.sum(deltas <= margin)) / (len(deltas) + 1))


HOLM_TAIL_RESAMPLES = 20  # expected resamples beyond the margin at Holm's strictest threshold (Monte Carlo precision)


def resamples_for_holm(family_size: int, alpha: float, tail: int = HOLM_TAIL_RESAMPLES) -> int:
    """Resamples B so that Monte Carlo error does not decide Holm's verdicts: ``ceil(tail * m / alpha)``.

    Holm's strictest step compares a p-value with alpha / m. A bootstrap p at that level is estimated from the
    resamples that fall beyond the margin, about ``p * B`` of them, with a Monte Carlo relative standard error of
    about ``1 / sqrt(p * B)``. With B = ``tail`` m / alpha, ``tail`` resamples are expected there (20: a relative
    error of about 22 %; Davison & Hinkley 1997, chapter 4, on the power a Monte Carlo test loses to too few
    simulations). The bare minimum, B = 2 m / alpha (smallest p, 1 / (B + 1), at alpha / (2 m)), would let one or
    two resamples decide a test whose true p is several times below the threshold.
    """
    if tail < 2:
        raise ValueError(f"tail must be >= 2 (the smallest p must be able to pass Holm's first step), got {tail}")
    return int(np.ceil(int(tail) * max(family_size, 1) / alpha))


@dataclass(frozen=True)
class Difference:
    """A paired bootstrap comparison B minus A (see :func:`paired_difference`)."""

    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float  # one-sided, for delta > 0
    n_boot: int
    deltas: np.ndarray

    def as_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "delta": self.delta, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "p_value": self.p_value, "n_boot": self.n_boot}


Statistic = Callable[[np.ndarray], np.ndarray]  # counts (B, n) -> (B,)


def paired_difference(statistic_a: Statistic, statistic_b: Statistic, counts: np.ndarray, n: int,
                      alpha: float = 0.05) -> Difference:
    """``statistic_b - statistic_a`` on the full sample and on every resample (the same counts for both).

    Args:
        statistic_a, statistic_b: map counts (B, n) to values (B,), e.g. ``lambda c: auc(y, score_a, c)``.
        counts: resamples from :func:`draw`.
        n: number of rows (the full sample is counts of ones).
    """
    full = np.ones((1, n), dtype=np.int64)
    a, b = float(statistic_a(full)[0]), float(statistic_b(full)[0])
    deltas = statistic_b(counts) - statistic_a(counts) if len(counts) else np.array([])
    low, high = percentile_ci(deltas, alpha)
    return Difference(a, b, b - a, low, high, p_greater_than_zero(deltas), len(counts), deltas)


def interval(statistic: Statistic, counts: np.ndarray, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """(point, low, high) of one statistic: the full-sample value and the percentile interval over ``counts``."""
    point = float(statistic(np.ones((1, n), dtype=np.int64))[0])
    low, high = percentile_ci(statistic(counts), alpha) if len(counts) else (float("nan"), float("nan"))
    return point, low, high


# ----------------------------------------------------------------------------------------- multiplicity
def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm (1979) step-down adjusted p-values; NaN entries stay NaN and do not count in the family.

    Sorted ascending, ``p_adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; reject where ``p_adj < alpha``.
    Equals ``statsmodels.stats.multitest.multipletests(p, method="holm")[1]``.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(stepped)
    return out
