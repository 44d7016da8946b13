"""Paired bootstrap comparison of two models' predictions over a set of endpoints (the molecular claims' test).

:func:`paired_endpoint_mean` scores objectives A and B on the same test exams (the mean over endpoints of AUC or
balanced accuracy) and returns the paired difference B - A with its percentile CI and one-sided p-value, drawn by
the one bootstrap of the kit (:mod:`nrfm.eval.bootstrap`). Balanced-accuracy comparisons re-pick each model's
decision threshold on resampled validation exams (rule 1b of :mod:`nrfm.eval.claims`). Used by
:func:`nrfm.eval.claim_rows.molecular_rows`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nrfm.eval import bootstrap


def paired_endpoint_mean(a: pd.DataFrame, b: pd.DataFrame, metric: str, endpoints: tuple[str, ...], n_boot: int,
                         seed: int = 0, val_a: pd.DataFrame | None = None, val_b: pd.DataFrame | None = None,
                         memo: dict | None = None) -> dict:
    """Mean-over-endpoints metric of objectives A and B on the same test exams, and the paired difference B - A.

    Endpoints with a single class (or, for ``bacc``, a NaN threshold of either model: no decision rule) are not
    scored at all and are named in the note. Patients are drawn whole; one endpoint: within class strata;
    several: a resample lacking a class of a scored endpoint is redrawn (:func:`nrfm.eval.bootstrap.draw`).

    Balanced accuracy depends on a threshold each model picked on its validation exams (Youden's J). Given those
    exams (``val_a``, ``val_b``: the models' validation predictions, all sites, as the thresholds were picked),
    every resample also redraws the validation patients (independently of the test patients, the same draw for
    both models) and re-picks each model's threshold on them (:func:`nrfm.eval.bootstrap.youden_thresholds`), so
    the interval carries the threshold's variability as well as the test exams'; a difference that a lucky or
    unlucky threshold makes on these test exams is not reported as a gain. The point estimate uses the thresholds
    picked on all validation exams (the models' own, as in ``molecular.csv``). Without them the thresholds are fixed.

    ``memo`` (a dict the caller keeps across calls) shares work between comparisons: the same subjects, strata and
    seed give the same resamples, and a model's per-endpoint values on them are computed once (DRO's against ERM
    and against reweighted; keys are the data themselves, so a cached value is the value).
    """
    subjects, clusters, per_endpoint = _subject_axis(a, b, endpoints)
    scored, skipped, labels = [], [], []
    for endpoint, (y, arrays, thresholds) in per_endpoint.items():
        if np.unique(y[np.isfinite(y)]).size < 2:
            skipped.append(f"{endpoint} (single class)")
            continue
        if metric == "bacc" and not np.isfinite(thresholds).all():
            skipped.append(f"{endpoint} (no validation threshold)")
            continue
        scored.append((endpoint, y, arrays, thresholds))
        labels.append(y)
    nan = float("nan")
    out = {"a": nan, "b": nan, "delta": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, "n": len(subjects),
           "endpoints": [e for e, *_ in scored], "deltas": np.array([]),
           "note": ("not scored: " + ", ".join(skipped)) if skipped else ""}
    if not scored:
        return out
    strata = labels[0] if len(labels) == 1 else None
    out["log10_distinct"] = bootstrap.log10_distinct_resamples(len(subjects), clusters, strata)
    memo = {} if memo is None else memo
    draw_key = _key("draw", len(subjects), n_boot, seed, clusters, strata, *labels)
    both_classes = labels if len(labels) > 1 else ()
    counts = _cached(memo, draw_key, lambda: bootstrap.draw(len(subjects), n_boot, seed, clusters=clusters,
                                                            strata=strata, both_classes=both_classes))
    n = len(subjects)
    validation = None
    if metric == "bacc" and val_a is not None and val_b is not None:
        validation = _validation_scores(val_a, val_b, [e for e, *_ in scored])
    if validation is not None and validation["n"] == 0:  # older prediction files: no validation rows
        validation = None
        out["note"] = "; ".join(x for x in (out["note"], "thresholds fixed: no validation predictions") if x)
    if validation is not None:
        val_key = _key("draw", validation["n"], n_boot, seed + 1, validation["clusters"], validation["strata"],
                       *validation["both_classes"])
        val_counts = _cached(memo, val_key, lambda: bootstrap.draw(
            validation["n"], n_boot, seed + 1, clusters=validation["clusters"], strata=validation["strata"],
            both_classes=validation["both_classes"]))
        draw_key = _key(draw_key, val_key)
        counts = np.hstack([counts, val_counts])  # one resample = test patients and validation patients

    def endpoint_value(c: np.ndarray, side: int, endpoint: str, y: np.ndarray, s: np.ndarray,
                       t: float) -> np.ndarray:
        if metric == "auc":
            return bootstrap.auc(y, s, c[:, :n])
        threshold = t
        if validation is not None:
            val_y, val_s = validation["scores"][endpoint]
            threshold = bootstrap.youden_thresholds(val_y, val_s[side], c[:, n:])
        return bootstrap.balanced_accuracy(y, s, threshold, c[:, :n])

    def statistic(side: int):
        def value(c: np.ndarray) -> np.ndarray:
            per = []
            for endpoint, y, s, t in scored:
                compute = lambda: endpoint_value(c, side, endpoint, y, s[side], t[side])  # noqa: B023
                if c is counts:  # the resamples (the full sample is one cheap row)
                    val = validation["scores"][endpoint][1][side] if validation is not None else None
                    per.append(_cached(memo, _key("value", metric, draw_key, endpoint, y, s[side], t[side], val),
                                       compute))
                else:
                    per.append(compute())
            return np.mean(per, axis=0)
        return value

    result = bootstrap.paired_difference(statistic(0), statistic(1), counts, counts.shape[1])
    if validation is not None:
        out["note"] = "; ".join(x for x in (out["note"], "thresholds re-picked on resampled validation exams") if x)
    return {**out, **{k: v for k, v in result.as_dict().items() if k != "n_boot"}, "deltas": result.deltas}


def _key(*parts) -> tuple:
    """A hashable key of arrays and scalars (by content), for the memo of :func:`paired_endpoint_mean`."""
    out = []
    for part in parts:
        if isinstance(part, np.ndarray):
            out.append((part.dtype.str, part.shape, part.tobytes()))
        else:
            out.append(part)
    return tuple(out)


def _cached(memo: dict, key: tuple, compute):
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def _subject_axis(a: pd.DataFrame, b: pd.DataFrame, endpoints) -> tuple[list, np.ndarray, dict]:
    """Both models' predictions on one subject axis: (subjects, patient per subject, {endpoint: (y, [score_a,
    score_b], (threshold_a, threshold_b))}), labelled rows only; y is NaN where a subject has no label for it."""
    keys = ["subject_id", "endpoint"]
    both = a[a["endpoint"].isin(endpoints)].dropna(subset=["y_true"]).merge(
        b[keys + ["y_score", "threshold"]], on=keys, suffixes=("_a", "_b"))
    subjects = sorted(both["subject_id"].unique())
    pos = {s: i for i, s in enumerate(subjects)}
    patients = both.groupby("subject_id")["patient_id" if "patient_id" in both else "subject_id"].first()
    per_endpoint = {}
    for endpoint, part in both.groupby("endpoint"):
        rows = part["subject_id"].map(pos).to_numpy(dtype=np.int64)
        y = np.full(len(subjects), np.nan)
        y[rows] = part["y_true"].to_numpy(dtype=float)
        sides = []
        for side in ("a", "b"):
            score = np.zeros(len(subjects))
            score[rows] = part[f"y_score_{side}"].to_numpy(dtype=float)
            sides.append(score)
        per_endpoint[endpoint] = (y, sides, (float(part["threshold_a"].iloc[0]), float(part["threshold_b"].iloc[0])))
    return subjects, patients.loc[subjects].astype(str).to_numpy(), per_endpoint


def _validation_scores(val_a: pd.DataFrame, val_b: pd.DataFrame, endpoints: list[str]) -> dict:
    """Both models' validation scores per endpoint on one subject axis, for re-picking thresholds per resample."""
    subjects, clusters, per_endpoint = _subject_axis(val_a, val_b, endpoints)
    empty = (np.full(len(subjects), np.nan), [np.zeros(len(subjects))] * 2)
    scores = {endpoint: per_endpoint[endpoint][:2] if endpoint in per_endpoint else empty for endpoint in endpoints}
    labels = [y for y, _ in scores.values()]
    return {"n": len(subjects), "clusters": clusters if subjects else None,
            "strata": labels[0] if len(labels) == 1 else None,
            "both_classes": labels if len(labels) > 1 else (), "scores": scores}
