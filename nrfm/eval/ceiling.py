"""How close each model comes to what the images allow: the ceiling fraction, with a patient bootstrap CI.

``ceiling_fraction = mean over binary markers of (AUC - 0.5) / (bound - 0.5)`` on the pooled test set, where
the bound is the AUC of the synthetic cohort's oracle probabilities on the same test subjects (a latent bound:
see ``docs/synthetic-cohort.md``). 0 is chance, 1 the bound. Markers whose bound is at or below 0.5, or with a
single class among the test subjects, are left out (named in the table). The CI resamples test patients whole
(:mod:`nrfm.eval.bootstrap`), keeping both classes of every scored marker, and recomputes model and bound AUCs
on the same resample. Every fine-tuned model and every baseline of a run gets a row of ``metrics/ceiling.csv``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nrfm.eval import bootstrap
from nrfm.schema import BINARY_ENDPOINTS

CEILING_COLUMNS = ("backbone", "objective", "n_test", "markers", "ceiling_fraction", "ci_low", "ci_high",
                   "mean_auc", "mean_bound", "note")


def _wide(predictions: pd.DataFrame, oracle: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    test = predictions[(predictions["split"].astype(str) == "test")
                       & predictions["endpoint"].isin(BINARY_ENDPOINTS)].copy()
    test["subject_id"] = test["subject_id"].astype(str)
    oracle = oracle.assign(subject_id=oracle["subject_id"].astype(str))
    bound = oracle[oracle["endpoint"].isin(BINARY_ENDPOINTS)].pivot_table(
        index="subject_id", columns="endpoint", values="value", aggfunc="first")
    y = test.pivot_table(index="subject_id", columns="endpoint", values="y_true", aggfunc="first")
    score = test.pivot_table(index="subject_id", columns="endpoint", values="y_score", aggfunc="first")
    patients = test.drop_duplicates("subject_id").set_index("subject_id")
    patients = (patients["patient_id"] if "patient_id" in patients else patients.index.to_series()).astype(str)
    markers = [m for m in BINARY_ENDPOINTS if m in y.columns and m in bound.columns]
    frame = pd.concat({"y": y[markers], "score": score[markers], "bound": bound.reindex(y.index)[markers]}, axis=1)
    frame[("patient", "")] = patients.reindex(frame.index).to_numpy()
    return frame, markers


def _scored_markers(frame: pd.DataFrame, markers: list[str]) -> tuple[list[str], list[str]]:
    """(markers kept, notes on those left out): both classes among the test subjects and a bound above 0.5."""
    kept, notes = [], []
    for m in markers:
        y = frame[("y", m)].to_numpy(float)
        bound_auc = bootstrap.auc(y, frame[("bound", m)].to_numpy(float), np.ones((1, len(y))))[0]
        if not ((y == 1).any() and (y == 0).any()):
            notes.append(f"{m}: one class among test subjects")
        elif not bound_auc > 0.5:
            notes.append(f"{m}: bound {bound_auc:.2f} <= 0.5 (no achievable gain)")
        else:
            kept.append(m)
    return kept, notes


def _fractions(frame: pd.DataFrame, kept: list[str], counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample (row of counts): the ceiling fraction, the mean model AUC and the mean bound AUC."""
    ys = [frame[("y", m)].to_numpy(float) for m in kept]
    aucs = np.stack([bootstrap.auc(y, frame[("score", m)].to_numpy(float), counts) for y, m in zip(ys, kept)])
    bounds = np.stack([bootstrap.auc(y, frame[("bound", m)].to_numpy(float), counts) for y, m in zip(ys, kept)])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.mean((aucs - 0.5) / (bounds - 0.5), axis=0), aucs.mean(0), bounds.mean(0)


def ceiling_row(predictions: pd.DataFrame, oracle: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> dict:
    """Ceiling fraction of one model's pooled predictions with its bootstrap CI (see the module docstring)."""
    frame, markers = _wide(predictions, oracle)
    kept, notes = _scored_markers(frame, markers)
    row = {"n_test": len(frame), "markers": ",".join(kept), "ceiling_fraction": np.nan, "ci_low": np.nan,
           "ci_high": np.nan, "mean_auc": np.nan, "mean_bound": np.nan, "note": "; ".join(notes)}
    if not kept:
        return row
    ys = [frame[("y", m)].to_numpy(float) for m in kept]
    full = np.ones((1, len(frame)), dtype=np.int64)
    point, mean_auc, mean_bound = (float(v[0]) for v in _fractions(frame, kept, full))
    counts = bootstrap.draw(len(frame), n_boot, seed, clusters=frame[("patient", "")].to_numpy(), both_classes=ys)
    low, high = bootstrap.percentile_ci(_fractions(frame, kept, counts)[0])
    row.update(ceiling_fraction=point, ci_low=low, ci_high=high, mean_auc=mean_auc, mean_bound=mean_bound)
    return row


def paired_difference(predictions_a: pd.DataFrame, predictions_b: pd.DataFrame, oracle: pd.DataFrame,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """Ceiling fraction of model B minus model A on the same test subjects and markers, paired per resample.

    Both models are scored on the markers they share (kept as in :func:`ceiling_row`) and on the same resamples
    of test patients, so subject-level variation cancels. Returns a, b, delta, ci_low, ci_high and p_value
    (one-sided, "B > A": :func:`nrfm.eval.bootstrap.p_greater_than_zero`).
    """
    frame_a, markers_a = _wide(predictions_a, oracle)
    frame_b, markers_b = _wide(predictions_b, oracle)
    shared = frame_a.index.intersection(frame_b.index)
    frame_a, frame_b = frame_a.loc[shared], frame_b.loc[shared]
    kept, _ = _scored_markers(frame_a, [m for m in markers_a if m in markers_b])
    out = {"a": np.nan, "b": np.nan, "delta": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan,
           "n_test": len(shared), "markers": ",".join(kept)}
    if not kept:
        return out
    ys = [frame_a[("y", m)].to_numpy(float) for m in kept]

    def fraction(frame: pd.DataFrame, counts: np.ndarray) -> np.ndarray:
        return _fractions(frame, kept, counts)[0]

    full = np.ones((1, len(shared)), dtype=np.int64)
    counts = bootstrap.draw(len(shared), n_boot, seed, clusters=frame_a[("patient", "")].to_numpy(), both_classes=ys)
    deltas = fraction(frame_b, counts) - fraction(frame_a, counts)
    low, high = bootstrap.percentile_ci(deltas)
    a, b = float(fraction(frame_a, full)[0]), float(fraction(frame_b, full)[0])
    out.update(a=a, b=b, delta=b - a, ci_low=low, ci_high=high, p_value=bootstrap.p_greater_than_zero(deltas))
    return out


def baseline_comparisons(ctx, methods: list[str], objectives: list[str]) -> pd.DataFrame:
    """Each fine-tuned model against each baseline of its backbone (``scratch``, ``probe``) and the handcrafted
    model: the paired ceiling-fraction difference (fine-tuned minus baseline) with its CI, written to
    ``metrics/baseline_comparisons.csv``. ``beats`` is true when the CI lies above 0."""
    oracle = ctx.oracle
    rows = []
    if oracle is None:
        return pd.DataFrame(rows)

    def read(backbone: str, objective: str) -> pd.DataFrame | None:
        path = ctx.layout.predictions(backbone, objective, "pooled")
        return pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str}) if path.is_file() else None

    n_boot, seed = ctx.config.analyses.bootstrap, ctx.config.seed
    for method in methods:
        for objective in objectives:
            model = read(method, objective)
            if model is None:
                continue
            for base_backbone, base_objective in ((method, "scratch"), (method, "probe"), ("handcrafted", "erm")):
                base = read(base_backbone, base_objective)
                if base is None:
                    continue
                result = paired_difference(base, model, oracle, n_boot, seed)
                rows.append({"backbone": method, "objective": objective,
                             "baseline": "handcrafted" if base_backbone == "handcrafted" else base_objective,
                             "model_ceiling_fraction": result["b"], "baseline_ceiling_fraction": result["a"],
                             "delta": result["delta"], "ci_low": result["ci_low"], "ci_high": result["ci_high"],
                             "p_value": result["p_value"], "beats": bool(result["ci_low"] > 0),
                             "n_test": result["n_test"], "markers": result["markers"]})
    table = pd.DataFrame(rows)
    if len(table):
        ctx.write_metrics("baseline_comparisons", table, key_columns=["backbone", "objective", "baseline"])
    return table


def ceiling_table(ctx, models: list[tuple[str, str]], n_boot: int | None = None) -> pd.DataFrame:
    """``metrics/ceiling.csv`` rows for (backbone, objective) pairs whose pooled predictions exist in the run."""
    oracle = ctx.oracle
    rows = []
    for backbone, objective in models:
        path = ctx.layout.predictions(backbone, objective, "pooled")
        if oracle is None or not path.is_file():
            continue
        predictions = pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str})
        rows.append({"backbone": backbone, "objective": objective,
                     **ceiling_row(predictions, oracle, n_boot or ctx.config.analyses.bootstrap, ctx.config.seed)})
    return pd.DataFrame(rows, columns=list(CEILING_COLUMNS))


def run_ceiling_stage(ctx, models: list[tuple[str, str]]) -> pd.DataFrame:
    """Merge the ceiling rows of ``models`` into ``metrics/ceiling.csv`` and return them (empty off synthetic data)."""
    table = ceiling_table(ctx, models)
    if len(table):
        ctx.write_metrics("ceiling", table, key_columns=["backbone", "objective"])
    return table
