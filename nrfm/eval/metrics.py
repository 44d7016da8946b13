"""Molecular-marker metrics: thresholds, AUC, balanced accuracy, bootstrap CIs, per-site tables.

Point estimates come from scikit-learn (``roc_auc_score``, ``balanced_accuracy_score``, ``roc_curve``,
``mean_absolute_error``) and scipy (``spearmanr``). What scikit-learn lacks is written here:

* the decision threshold, chosen on the validation split by Youden's J (max TPR - FPR over the ROC curve;
  among ties the highest threshold), and used unchanged on the test split;
* percentile bootstrap 95% CIs over subjects (``n_boot`` resamples, seeded). For speed the bootstrap computes
  AUC from ranks (the Mann-Whitney form, ties averaged: identical to ``roc_auc_score``, which the tests
  check) for all resamples at once. Resamples with a single class are dropped;
* a paired bootstrap for differences between two models on the same subjects (DRO minus ERM): each resample
  draws one set of subjects and evaluates both models on it;
* :func:`molecular_table`, the per-site / ``all`` / ``worst`` table of ``metrics/molecular.csv``.

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

MOLECULAR_COLUMNS = ("backbone", "objective", "protocol", "seed", "site", "endpoint", "n", "n_pos",
                     "balanced_accuracy", "auc", "auc_ci_low", "auc_ci_high", "mae", "spearman")
EXTRA_COLUMNS = ("balanced_accuracy_ci_low", "balanced_accuracy_ci_high", "threshold", "oracle_auc", "worst_site",
                 "note")
MIN_VALID_RESAMPLES = 10  # fewer resamples with both classes: no CI (said in the note)


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
    return float(auc_resampled(y, score, np.arange(len(y))[None])[0])


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
def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) subject indices drawn with replacement; the same (n, n_boot, seed) gives the same draw."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def auc_resampled(y: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """AUC for each row of ``idx`` (B, n) at once, from average ranks; NaN where a resample has one class."""
    yb = np.asarray(y, dtype=float)[idx]
    sb = np.asarray(score, dtype=float)[idx]
    ranks = rankdata(sb, axis=1)
    n_pos = yb.sum(1)
    n_neg = yb.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * yb).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def balanced_accuracy_resampled(y: np.ndarray, score: np.ndarray, threshold: float, idx: np.ndarray) -> np.ndarray:
    """Balanced accuracy for each row of ``idx`` (B, n); NaN where a resample has one class."""
    yb = np.asarray(y, dtype=float)[idx] > 0.5
    pb = np.asarray(score, dtype=float)[idx] >= threshold
    n_pos, n_neg = yb.sum(1), (~yb).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = 0.5 * ((pb & yb).sum(1) / n_pos + (~pb & ~yb).sum(1) / n_neg)
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float, int]:
    """Percentile interval of the finite ``values``: (low, high, n_valid); NaNs if too few are finite."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < MIN_VALID_RESAMPLES:
        return float("nan"), float("nan"), len(values)
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high), len(values)


def bootstrap_ci(metric: Callable[..., float], *arrays: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, int]:
    """Percentile bootstrap CI of any metric of paired per-subject arrays (resampled together).

    Args:
        metric: function of the resampled arrays returning a float (NaN or an exception = invalid resample).
        arrays: per-subject arrays of equal length n.
        n_boot: number of resamples; seed: seed of the draw.

    Returns:
        (low, high, number of valid resamples).
    """
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays of different lengths {[len(a) for a in arrays]}")
    if n == 0:
        return float("nan"), float("nan"), 0
    values = []
    for row in bootstrap_indices(n, n_boot, seed):
        try:
            values.append(float(metric(*(np.asarray(a)[row] for a in arrays))))
        except ValueError:
            values.append(float("nan"))
    return percentile_ci(np.array(values), alpha)


def paired_bootstrap(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, metric: str = "auc",
                     threshold_a: float = 0.5, threshold_b: float = 0.5, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Difference B minus A of a metric on the same subjects, with a paired percentile bootstrap CI.

    Every resample draws one set of subject indices and evaluates both models on it, so the between-subject
    variation cancels in the difference.

    Args:
        y: (n,) binary labels; score_a, score_b: (n,) scores of the two models for the same subjects.
        metric: ``auc`` or ``balanced_accuracy`` (then ``threshold_a`` / ``threshold_b`` apply).

    Returns:
        dict with ``a``, ``b``, ``delta`` (point values), ``ci_low``, ``ci_high`` and ``n_valid``.
    """
    if metric not in ("auc", "balanced_accuracy"):
        raise ValueError(f"unknown metric {metric!r}; valid: ['auc', 'balanced_accuracy']")
    y = np.asarray(y, dtype=float)
    if not (len(y) == len(score_a) == len(score_b)):
        raise ValueError("paired_bootstrap: y, score_a and score_b must have the same length")
    idx = bootstrap_indices(len(y), n_boot, seed) if len(y) else np.zeros((0, 0), dtype=int)
    if metric == "auc":
        a, b = auc(y, score_a), auc(y, score_b)
        deltas = auc_resampled(y, score_b, idx) - auc_resampled(y, score_a, idx) if len(y) else np.array([])
    else:
        a, b = balanced_accuracy(y, score_a, threshold_a), balanced_accuracy(y, score_b, threshold_b)
        deltas = (balanced_accuracy_resampled(y, score_b, threshold_b, idx)
                  - balanced_accuracy_resampled(y, score_a, threshold_a, idx)) if len(y) else np.array([])
    low, high, n_valid = percentile_ci(deltas)
    return {"a": a, "b": b, "delta": b - a, "ci_low": low, "ci_high": high, "n_valid": n_valid}


# ----------------------------------------------------------------------------------------------- the table
def _row(y_raw: np.ndarray, score: np.ndarray, endpoint: str, threshold: float, cuts: Mapping[str, float],
         n_boot: int, seed: int, oracle_score: np.ndarray | None, decision: np.ndarray | None = None) -> dict:
    """Metrics of one (site, endpoint) cell; NaNs always come with a note saying why.

    ``decision`` (default ``score``) is what is compared with ``threshold`` for balanced accuracy.
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
    idx = bootstrap_indices(len(y), n_boot, seed)
    row["auc"] = auc(y, score)
    row["auc_ci_low"], row["auc_ci_high"], valid = percentile_ci(auc_resampled(y, score, idx))
    if valid < MIN_VALID_RESAMPLES:
        notes.append(f"only {valid} bootstrap resamples had both classes: no CI")
    if np.isfinite(threshold):
        row["balanced_accuracy"] = balanced_accuracy(y, decision, threshold)
        low, high, _ = percentile_ci(balanced_accuracy_resampled(y, decision, threshold, idx))
        row["balanced_accuracy_ci_low"], row["balanced_accuracy_ci_high"] = low, high
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
                row = _row(cell["y_true"].to_numpy(dtype=float), score, endpoint, threshold, cuts, n_boot, seed,
                           oracle_score, decision)
                if len(thresholds) > 1:
                    row["threshold"] = float("nan")
                    row["note"] = "; ".join(n for n in (row["note"], "folds pooled: AUC on raw scores, balanced "
                                                        "accuracy at each fold's own threshold") if n)
            site_rows.append({**key, "site": site, "endpoint": endpoint, **row})
        rows += site_rows
        rows.append({**key, **_worst(site_rows[:-1], endpoint)})
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


def _worst(site_rows: list[dict], endpoint: str) -> dict:
    """The per-site row with the lowest AUC, relabelled ``worst`` with the site in ``worst_site``."""
    finite = [r for r in site_rows if np.isfinite(r.get("auc", np.nan))]
    if not finite:
        reasons = sorted({r.get("note", "") for r in site_rows if r.get("note")})
        return {"site": "worst", "endpoint": endpoint, "n": sum(r["n"] for r in site_rows),
                "n_pos": sum(r["n_pos"] for r in site_rows), "worst_site": "",
                "note": "; ".join(["no site with an evaluable AUC", *reasons])}
    worst = min(finite, key=lambda r: r["auc"])
    return {**worst, "site": "worst", "worst_site": worst["site"]}
