"""Molecular-marker metrics: thresholds, AUC, balanced accuracy, bootstrap CIs, per-site tables.

Point estimates come from scikit-learn (``roc_auc_score``, ``balanced_accuracy_score``, ``roc_curve``,
``mean_absolute_error``) and scipy (``spearmanr``). What scikit-learn lacks is written here:

* the decision threshold, chosen on the validation split by Youden's J (max TPR - FPR over the ROC curve;
  among ties the highest threshold), and used unchanged on the test split;
* percentile bootstrap 95% CIs from :mod:`nrfm.eval.bootstrap` (the kit's one bootstrap): ``n_boot`` resamples,
  seeded, patients drawn whole within class strata (every resample keeps both classes), all resamples computed
  at once (weighted Mann-Whitney AUC, identical to ``roc_auc_score`` on the explicit resample: tested);
* :func:`paired_bootstrap`, the paired difference of two models on the same resamples (DRO minus ERM), the
  procedure of notebook 02's table and of the verdicts of :mod:`nrfm.eval.claims`;
* :func:`molecular_table`, the per-site / ``all`` / ``worst`` table of ``metrics/molecular.csv``. ``worst`` is the
  site with the lowest validation AUC (test-chosen only where validation cannot choose, and then labelled so).

A NaN threshold (validation with a single class) means no decision rule: balanced accuracy is NaN, never 0.5.

Continuous endpoints (Ki-67, TP53-IHC, in percent) get MAE and Spearman's rho on the raw values and, binarized
as ``y >= cut`` (cuts from the fine-tuning config), the same AUC / balanced accuracy as binary endpoints with
the predicted percentage as the score.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, roc_auc_score, roc_curve

from nrfm.config import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS
from nrfm.eval import bootstrap

MOLECULAR_COLUMNS = ("backbone", "objective", "protocol", "seed", "site", "endpoint", "n", "n_pos",
                     "balanced_accuracy", "auc", "auc_ci_low", "auc_ci_high", "mae", "spearman")
EXTRA_COLUMNS = ("balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "threshold", "oracle_auc", "worst_site",
                 "note")


def check_endpoint(name: str) -> str:
    """Return ``name`` if it is a known endpoint, else raise ValueError listing the valid ones."""
    if name not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {name!r}; valid: {list(ENDPOINTS)}")
    return name


def binarize(endpoint: str, y: np.ndarray, cuts: Mapping[str, float]) -> np.ndarray:
    """Binary labels of an endpoint: as is for binary endpoints, ``y >= cut`` for continuous ones."""
    check_endpoint(endpoint)
    y = np.asarray(y, dtype=float)
    if endpoint in CONTINUOUS_ENDPOINTS:
        if endpoint not in cuts:
            raise ValueError(f"no binarization cut for continuous endpoint {endpoint!r}; got cuts for {list(cuts)}")
        return (y >= cuts[endpoint]).astype(float)
    return y


# --------------------------------------------------------------------------------------------- point metrics
def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (scikit-learn); NaN when ``y`` has a single class."""
    y = np.asarray(y)
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from average ranks (Mann-Whitney U / (n_pos n_neg)); equals ``roc_auc_score`` but without its
    per-call validation overhead, for the per-epoch model selection. NaN for a single class."""
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        return float("nan")
    return float(bootstrap.auc(y, score, np.ones((1, len(y)), dtype=np.int64))[0])


def balanced_accuracy(y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """Balanced accuracy of ``score >= threshold`` (scikit-learn); NaN when ``y`` has a single class."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2 or not np.isfinite(threshold):
        return float("nan")
    return float(balanced_accuracy_score(y.astype(int), (np.asarray(score) >= threshold).astype(int)))


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising Youden's J = TPR - FPR on (validation) data; NaN when ``y`` has a single class.

    Ties go to the highest threshold. The ROC curve's leading ``inf`` threshold (predict nothing positive)
    is replaced by the smallest float above the top score, which classifies the same way.
    """
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    value = float(thresholds[best])
    return float(np.nextafter(np.max(score), np.inf)) if not np.isfinite(value) else value


def continuous_metrics(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """(MAE, Spearman rho) of predicted versus true values; rho is NaN for a constant input."""
    y, pred = np.asarray(y, dtype=float), np.asarray(pred, dtype=float)
    mae = float(mean_absolute_error(y, pred)) if len(y) else float("nan")
    if len(y) < 3 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return mae, float("nan")
    return mae, float(spearmanr(y, pred).statistic)


# ----------------------------------------------------------------------------------------------- bootstrap
# Thin adapters over nrfm.eval.bootstrap (the one bootstrap of the kit); kept for callers that pass index matrices.
def auc_resampled(y: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC for each row of the index matrix ``idx`` (B, m) at once (average ranks); NaN for a single class."""
    return bootstrap.auc(y, score, bootstrap.counts_from_indices(idx, len(np.asarray(y))))


def balanced_accuracy_resampled(y: np.ndarray, score: np.ndarray, threshold: float, idx: np.ndarray) -> np.ndarray:
    """Balanced accuracy for each row of ``idx`` (B, m); NaN for a single class or a NaN threshold."""
    return bootstrap.balanced_accuracy(y, score, threshold, bootstrap.counts_from_indices(idx, len(np.asarray(y))))


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, int]:
    """:func:`nrfm.eval.bootstrap.percentile_ci` plus the number of finite values: (low, high, n_finite).
    The interval is NaN as soon as one resample is undefined (undefined resamples are never dropped)."""
    values = np.asarray(values, dtype=float)
    low, high = bootstrap.percentile_ci(values, alpha)
    return low, high, int(np.isfinite(values).sum())


def bootstrap_ci(metric: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05, clusters: Sequence | None = None,
                 strata: Sequence | None = None) -> tuple[float, float, int]:
    """Percentile bootstrap CI of any metric of per-row arrays resampled together (:func:`nrfm.eval.bootstrap.draw`:
    clusters within strata); for metrics that nrfm.eval.bootstrap cannot compute for all resamples at once.

    Args:
        metric: function of the resampled arrays returning a float (NaN or a ValueError = undefined resample).
        arrays: per-row arrays of equal length n.
        clusters: (n,) patient per row (all of a patient's rows are drawn together); strata: (n,) labels.

    Returns:
        (low, high, number of defined resamples); NaN, NaN if any resample is undefined.
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays of different lengths {[len(a) for a in arrays]}")
    if n == 0:
        return float("nan"), float("nan"), 0
    values = []
    for row in bootstrap.draw(n, n_boot, seed, clusters=clusters, strata=strata):
        pick = bootstrap.indices(row)
        try:
            values.append(float(metric(*(np.asarray(a)[pick] for a in arrays))))
        except ValueError:
            values.append(float("nan"))
    return percentile_ci(np.array(values), alpha)


def paired_bootstrap(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, metric: str = "auc",
                     threshold_a: float = 0.5, threshold_b: float = 0.5, n_boot: int = 1000,
                     seed: int = 0, clusters: Sequence | None = None) -> dict[str, float]:
    """Difference B minus A of a metric on the same subjects: paired, class-stratified, patient-clustered.

    Every resample (:func:`nrfm.eval.bootstrap.draw` with ``strata=y``, ``clusters``) scores both models on the same
    exams, so the between-subject variation cancels in the difference; each resample keeps both classes.
    This is the procedure of the verdicts (:mod:`nrfm.eval.claims`) too.

    Args:
        y: (n,) binary labels; score_a, score_b: (n,) scores of the two models for the same subjects.
        metric: ``auc`` or ``balanced_accuracy`` (then ``threshold_a`` / ``threshold_b`` apply; NaN = undefined).
        clusters: (n,) patient_id per exam (default: each exam its own patient).

    Returns:
        dict with ``a``, ``b``, ``delta`` (point values), ``ci_low``, ``ci_high``, ``p_value`` (one-sided, for
        B > A) and ``n_valid`` (resamples with a defined difference).
    """
    if metric not in ("auc", "balanced_accuracy"):
        raise ValueError(f"unknown metric {metric!r}; valid: ['auc', 'balanced_accuracy']")
    y = np.asarray(y, dtype=float)
    if not (len(y) == len(score_a) == len(score_b)):
        raise ValueError("paired_bootstrap: y, score_a and score_b must have the same length")
    if len(np.unique(y)) < 2:
        nan = float("nan")
        return {"a": nan, "b": nan, "delta": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, "n_valid": 0}
    counts = bootstrap.draw(len(y), n_boot, seed, clusters=clusters, strata=y)
    if metric == "auc":
        stat_a, stat_b = (lambda c: bootstrap.auc(y, score_a, c)), (lambda c: bootstrap.auc(y, score_b, c))
    else:
        stat_a = lambda c: bootstrap.balanced_accuracy(y, score_a, threshold_a, c)
        stat_b = lambda c: bootstrap.balanced_accuracy(y, score_b, threshold_b, c)
    result = bootstrap.paired_difference(stat_a, stat_b, counts, len(y))
    return {**{k: v for k, v in result.as_dict().items() if k != "n_boot"},
            "n_valid": int(np.isfinite(result.deltas).sum())}


# ----------------------------------------------------------------------------------------------- the table
def _row(y_raw: np.ndarray, score: np.ndarray, endpoint: str, threshold: float, cuts: Mapping[str, float],
         n_boot: int, seed: int, oracle_score: np.ndarray | None, decision: np.ndarray | None = None,
         clusters: np.ndarray | None = None) -> dict:
    """Metrics of one (site, endpoint) cell; NaNs always come with a note saying why.

    ``decision`` (default ``score``) is what is compared with ``threshold`` for balanced accuracy;
    ``clusters`` (patient_id per exam) are resampled whole.
    """
    y = binarize(endpoint, y_raw, cuts)
    decision = score if decision is None else decision
    notes = []
    row = {"n": len(y), "n_pos": int(np.sum(y == 1)), "threshold": threshold}
    for key in ("balanced_accuracy", "auc", "auc_ci_low", "auc_ci_high", "mae", "spearman",
                "balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "oracle_auc"):
        row[key] = float("nan")
    if endpoint in CONTINUOUS_ENDPOINTS and len(y):
        row["mae"], row["spearman"] = continuous_metrics(y_raw, score)
        if not np.isfinite(row["spearman"]):
            notes.append("spearman undefined (fewer than 3 subjects or a constant value)")
    if len(np.unique(y)) < 2:
        notes.append(f"single class in test ({row['n_pos']} positive of {row['n']}): AUC and balanced accuracy "
                     "undefined")
        return {**row, "note": "; ".join(notes)}
    # patients drawn whole, within class strata: every resample keeps both classes (nrfm.eval.bootstrap.draw)
    counts = bootstrap.draw(len(y), n_boot, seed, clusters=clusters, strata=y)
    row["auc"], row["auc_ci_low"], row["auc_ci_high"] = bootstrap.interval(
        lambda c: bootstrap.auc(y, score, c), counts, len(y))
    if np.isfinite(threshold):
        row["balanced_accuracy"], row["balanced_accuracy_ci_low"], row["balanced_accuracy_ci_high"] = \
            bootstrap.interval(lambda c: bootstrap.balanced_accuracy(y, decision, threshold, c), counts, len(y))
    else:
        notes.append("no threshold: validation had a single class, balanced accuracy undefined")
    if oracle_score is not None and endpoint in BINARY_ENDPOINTS:
        keep = np.isfinite(oracle_score)
        if len(np.unique(y[keep])) == 2:
            row["oracle_auc"] = auc(y[keep], oracle_score[keep])
    return {**row, "note": "; ".join(notes)}


def molecular_table(predictions: pd.DataFrame, backbone: str, objective: str, protocol: str, seed: int,
                    cuts: Mapping[str, float], n_boot: int = 1000, oracle: pd.DataFrame | None = None,
                    endpoints: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-site, ``all`` and ``worst`` metrics of a predictions table (the ``metrics/molecular.csv`` rows).

    Args:
        predictions: the fine-tuning predictions (columns of ``predictions_<method>_<objective>_<protocol>.csv``:
            subject_id, site, split, fold, endpoint, y_true, y_score, threshold). Rows with ``split == test``
            are evaluated (for ``loso`` the held-out site's rows the fold builder kept); train and validation rows decide
            whether an endpoint could be trained (both classes in training).
        backbone, objective, protocol, seed: key columns written into every row.
        cuts: binarization cut per continuous endpoint, in percent (e.g. ``{"ki67": 10, "tp53_ihc": 10}``).
        n_boot: bootstrap resamples for the CIs (seeded by ``seed``; the same subjects give the same draw).
        oracle: long table subject_id, endpoint, value (true probability) of a synthetic cohort, or None.
        endpoints: endpoints to report (default: all in the predictions); unknown names raise ValueError.

    Returns:
        DataFrame with :data:`MOLECULAR_COLUMNS` then :data:`EXTRA_COLUMNS`. ``site`` is each site, ``all``
        (every test subject pooled; for ``loso`` each predicted by the model fine-tuned without its site, on
        exams self-supervised pretraining never saw, see ``analyses.loso_pretrain``) and
        ``worst``: the site with the lowest AUC, named in ``worst_site``. An endpoint with a single class in
        training is skipped with a note (its metric cells empty); every other NaN has a note too.
    """
    if endpoints is None:
        endpoints = [e for e in ENDPOINTS if e in set(predictions["endpoint"])]
    for endpoint in endpoints:
        check_endpoint(endpoint)
    known = predictions.dropna(subset=["y_true"])
    oracle_map = None
    if oracle is not None:
        oracle_map = {e: part.set_index("subject_id")["value"] for e, part in oracle.groupby("endpoint")}
    rows = []
    key = {"backbone": backbone, "objective": objective, "protocol": protocol, "seed": seed}
    for endpoint in endpoints:
        part = known[known["endpoint"] == endpoint]
        train_note = _training_single_class(part, endpoint, cuts)
        test = part[part["split"] == "test"]
        site_rows = []
        for site in [*sorted(test["site"].unique()), "all"]:
            cell = test if site == "all" else test[test["site"] == site]
            if train_note:
                y = binarize(endpoint, cell["y_true"].to_numpy(), cuts)
                row = {"n": len(cell), "n_pos": int((y == 1).sum()), "note": train_note}
            else:
                thresholds = cell.groupby("fold")["threshold"].first()
                # loso "all" pools folds with different thresholds: each subject is classified at its fold's
                threshold = float(thresholds.iloc[0]) if len(thresholds) == 1 else float("nan")
                score = cell["y_score"].to_numpy(dtype=float)
                decision = None
                if len(thresholds) > 1:
                    decision = score - cell["threshold"].to_numpy(dtype=float)
                    threshold = 0.0 if cell["threshold"].notna().all() else float("nan")
                oracle_score = None
                if oracle_map is not None and endpoint in oracle_map:
                    oracle_score = cell["subject_id"].map(oracle_map[endpoint]).to_numpy(dtype=float)
                clusters = cell["patient_id" if "patient_id" in cell else "subject_id"].astype(str).to_numpy()
                row = _row(cell["y_true"].to_numpy(dtype=float), score, endpoint, threshold, cuts, n_boot, seed,
                           oracle_score, decision, clusters)
                if len(thresholds) > 1:
                    row["threshold"] = float("nan")
                    row["note"] = "; ".join(n for n in (row["note"], "folds pooled: AUC on raw scores, balanced "
                                                        "accuracy at each fold's own threshold") if n)
            site_rows.append({**key, "site": site, "endpoint": endpoint, **row})
        rows += site_rows
        rows.append({**key, **_worst(site_rows[:-1], endpoint, _validation_worst_site(part, endpoint, cuts))})
    frame = pd.DataFrame(rows)
    for column in (*MOLECULAR_COLUMNS, *EXTRA_COLUMNS):
        if column not in frame:
            frame[column] = np.nan if column != "note" else ""
    frame["note"] = frame["note"].fillna("")
    frame["worst_site"] = frame["worst_site"].fillna("")
    return frame[list(MOLECULAR_COLUMNS) + list(EXTRA_COLUMNS)]


def _training_single_class(part: pd.DataFrame, endpoint: str, cuts: Mapping[str, float]) -> str:
    """A note if some fold's training labels of ``endpoint`` have a single class, else ''."""
    notes = []
    for fold, rows in part.groupby("fold"):
        y = binarize(endpoint, rows.loc[rows["split"] == "train", "y_true"].to_numpy(), cuts)
        if len(np.unique(y)) < 2:
            notes.append(f"skipped: fold {fold} has a single class in training ({int((y == 1).sum())} positive "
                         f"of {len(y)})")
    return "; ".join(notes)


def _validation_worst_site(part: pd.DataFrame, endpoint: str, cuts: Mapping[str, float]) -> list[str]:
    """Sites ordered by VALIDATION AUC of ``endpoint``, lowest first (pooled protocol); empty when no site has a
    validation AUC (single classes, or ``loso`` whose held-out site has no validation rows)."""
    val = part[part["split"] == "val"]
    if val.empty or val["fold"].nunique() != 1:
        return []
    aucs = {site: auc(binarize(endpoint, rows["y_true"].to_numpy(), cuts), rows["y_score"].to_numpy(dtype=float))
            for site, rows in val.groupby("site")}
    aucs = {site: value for site, value in aucs.items() if np.isfinite(value)}
    return sorted(sorted(aucs), key=lambda site: aucs[site])


def _worst(site_rows: list[dict], endpoint: str, validation_order: Sequence[str] = ()) -> dict:
    """The ``worst`` row: the test metrics of the site with the lowest VALIDATION AUC (chosen before looking at
    test, so its test CI is an honest CI), named in ``worst_site``. Without a validation choice it is the site
    with the lowest TEST AUC, labelled so in the note: a minimum over sites picked on test is biased low and its
    CI ignores the selection; it is descriptive only and no verdict is built on it. (A site whose test labels
    have a single class cannot be scored and is passed over: a choice by test labels, never by test scores.)"""
    by_site = {r["site"]: r for r in site_rows}
    chosen = [by_site[s] for s in validation_order if s in by_site and np.isfinite(by_site[s].get("auc", np.nan))]
    if chosen:
        note = "; ".join(n for n in (chosen[0].get("note", ""), "worst site chosen on validation AUC") if n)
        return {**chosen[0], "site": "worst", "worst_site": chosen[0]["site"], "note": note}
    finite = [r for r in site_rows if np.isfinite(r.get("auc", np.nan))]
    if not finite:
        reasons = sorted({r.get("note", "") for r in site_rows if r.get("note")})
        return {"site": "worst", "endpoint": endpoint, "n": sum(r["n"] for r in site_rows),
                "n_pos": sum(r["n_pos"] for r in site_rows), "worst_site": "",
                "note": "; ".join(["no site with an evaluable AUC", *reasons])}
    worst = min(finite, key=lambda r: r["auc"])
    note = "; ".join(n for n in (worst.get("note", ""), "worst site chosen on TEST (descriptive only: biased low, "
                                 "CI not adjusted for the selection)") if n)
    return {**worst, "site": "worst", "worst_site": worst["site"], "note": note}
