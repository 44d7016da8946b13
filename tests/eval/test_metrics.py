"""nrfm.eval.metrics against scikit-learn / scipy and straight-line bootstrap loops."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import balanced_accuracy_score, mean_absolute_error, roc_auc_score

from nrfm.eval import bootstrap
from nrfm.eval import metrics
from nrfm.eval.metrics import EXTRA_COLUMNS, MOLECULAR_COLUMNS, molecular_table

CUTS = {"ki67": 10.0, "tp53_ihc": 10.0}


def _random(seed, n=60, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n).astype(float)
    score = y * 0.7 + rng.normal(size=n)
    if ties:
        score = np.round(score, 1)
    return y, score


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_point_metrics_agree_with_sklearn(seed, ties):
    y, score = _random(seed, ties=ties)
    assert metrics.auc(y, score) == pytest.approx(roc_auc_score(y, score))
    assert metrics.rank_auc(y, score) == pytest.approx(roc_auc_score(y, score))
    idx = np.random.default_rng(seed).integers(0, len(y), size=(5, len(y)))
    for row, value in zip(idx, metrics.auc_resampled(y, score, idx)):
        assert value == pytest.approx(roc_auc_score(y[row], score[row]))
    for row, value in zip(idx, metrics.balanced_accuracy_resampled(y, score, 0.3, idx)):
        assert value == pytest.approx(balanced_accuracy_score(y[row], score[row] >= 0.3))
    assert metrics.balanced_accuracy(y, score, 0.3) == pytest.approx(balanced_accuracy_score(y, score >= 0.3))


def test_youden_threshold_maximises_j_by_brute_force():
    y, score = _random(3, ties=True)
    threshold = metrics.youden_threshold(y, score)

    def j(t):
        pred = score >= t
        return pred[y == 1].mean() - pred[y == 0].mean()

    best = max(j(t) for t in np.unique(score))
    assert j(threshold) == pytest.approx(best)
    assert np.isnan(metrics.youden_threshold(np.ones(5), np.arange(5.0)))


def test_single_class_gives_nan_not_error():
    assert np.isnan(metrics.auc(np.zeros(4), np.arange(4.0)))
    assert np.isnan(metrics.balanced_accuracy(np.ones(4), np.arange(4.0), 1.0))
    assert np.isnan(metrics.auc_resampled(np.zeros(4), np.arange(4.0), np.array([[0, 1, 2, 3]]))[0])


def test_continuous_metrics_agree_with_sklearn_and_scipy():
    rng = np.random.default_rng(4)
    y, pred = rng.uniform(0, 60, 40), rng.uniform(0, 60, 40)
    mae, rho = metrics.continuous_metrics(y, pred)
    assert mae == pytest.approx(mean_absolute_error(y, pred))
    assert rho == pytest.approx(spearmanr(y, pred).statistic)


def test_bootstrap_ci_covers_point_and_matches_loop():
    y, score = _random(5, n=80)
    point = metrics.auc(y, score)
    low, high, valid = metrics.bootstrap_ci(roc_auc_score, y, score, n_boot=300, seed=7, strata=y)
    assert low <= point <= high and valid == 300
    # the vectorised AUC over the same draws gives the same interval
    counts = bootstrap.draw(len(y), 300, 7, strata=y)
    low2, high2 = bootstrap.percentile_ci(bootstrap.auc(y, score, counts))
    assert (low2, high2) == pytest.approx((low, high))
    # straight-line percentile bootstrap over the explicit resamples
    values = [roc_auc_score(y[bootstrap.indices(r)], score[bootstrap.indices(r)]) for r in counts]
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])))


def test_paired_bootstrap_identical_is_zero_and_matches_loop():
    y, score = _random(6, n=50)
    same = metrics.paired_bootstrap(y, score, score.copy(), n_boot=200, seed=1)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0 and same["p_value"] == 1.0
    other = score + np.random.default_rng(0).normal(0, 1, size=len(y))
    patients = np.arange(len(y)) // 2
    result = metrics.paired_bootstrap(y, score, other, n_boot=200, seed=1, clusters=patients)
    counts = bootstrap.draw(len(y), 200, 1, clusters=patients, strata=y)
    deltas = [roc_auc_score(y[bootstrap.indices(r)], other[bootstrap.indices(r)])
              - roc_auc_score(y[bootstrap.indices(r)], score[bootstrap.indices(r)]) for r in counts]
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])))
    assert result["delta"] == pytest.approx(roc_auc_score(y, other) - roc_auc_score(y, score))
    assert result["p_value"] == pytest.approx((1 + np.sum(np.array(deltas) <= 0)) / 201)
    bacc = metrics.paired_bootstrap(y, score, score, metric="balanced_accuracy", threshold_a=0.2, threshold_b=0.2)
    assert bacc["delta"] == 0 and bacc["ci_low"] == 0


def test_nan_threshold_gives_nan_balanced_accuracy_everywhere():
    y, score = _random(8, n=40)
    assert np.isnan(metrics.balanced_accuracy(y, score, float("nan")))
    assert np.isnan(metrics.balanced_accuracy_resampled(y, score, float("nan"), np.arange(40)[None])).all()
    result = metrics.paired_bootstrap(y, score, score, metric="balanced_accuracy", threshold_a=float("nan"),
                                      threshold_b=0.2, n_boot=50)
    assert np.isnan(result["a"]) and np.isnan(result["delta"]) and np.isnan(result["ci_low"])


def _predictions(seed=0, single_class_site=None, single_class_train=None):
    """A pooled predictions table: 3 sites, train/val/test rows, idh and ki67."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in ("A", "B", "C"):
        for i in range(60):
            split = ("train", "train", "train", "val", "test", "test")[i % 6]
            y = float(rng.integers(0, 2))
            if site == single_class_site and split == "test":
                y = 0.0
            if single_class_train == "idh" and split == "train":
                y = 1.0
            rows.append({"subject_id": f"{site}{i}", "patient_id": f"{site}{i}", "site": site, "split": split,
                         "fold": "pooled", "endpoint": "idh", "y_true": y, "y_score": 0.5 * y + rng.random() * 0.8,
                         "threshold": 0.6, "seed": 0})
            k = float(rng.uniform(1, 40))
            rows.append({**rows[-1], "endpoint": "ki67", "y_true": k, "y_score": k + rng.normal(0, 8),
                         "threshold": 10.0})
    return pd.DataFrame(rows)


def test_molecular_table_layout_values_and_worst_site():
    pred = _predictions()
    table = molecular_table(pred, "byol", "erm", "pooled", 0, CUTS, n_boot=100)
    assert list(table.columns) == list(MOLECULAR_COLUMNS) + list(EXTRA_COLUMNS)
    assert set(table["site"]) == {"A", "B", "C", "all", "worst"}
    test = pred[pred["split"] == "test"]
    for site in ("A", "B", "all"):
        part = test[(test["endpoint"] == "idh") & ((test["site"] == site) | (site == "all"))]
        row = table[(table["site"] == site) & (table["endpoint"] == "idh")].iloc[0]
        assert row["auc"] == pytest.approx(roc_auc_score(part["y_true"], part["y_score"]))
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(part["y_true"], part["y_score"] >= 0.6))
        assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
        assert row["n"] == len(part) and row["n_pos"] == int(part["y_true"].sum())
    per_site = table[table["site"].isin(["A", "B", "C"]) & (table["endpoint"] == "idh")].set_index("site")
    worst = table[(table["site"] == "worst") & (table["endpoint"] == "idh")].iloc[0]
    val = pred[(pred["split"] == "val") & (pred["endpoint"] == "idh")]
    val_auc = {s: roc_auc_score(p["y_true"], p["y_score"]) for s, p in val.groupby("site")}
    assert min(val_auc, key=val_auc.get) != per_site["auc"].idxmin()  # the data make the two rules differ
    chosen = min(val_auc, key=val_auc.get)  # the worst site is chosen on validation, then scored on test
    assert worst["worst_site"] == chosen and worst["auc"] == per_site.loc[chosen, "auc"]
    assert "chosen on validation" in worst["note"]
    ki = table[(table["site"] == "all") & (table["endpoint"] == "ki67")].iloc[0]
    part = test[test["endpoint"] == "ki67"]
    assert ki["mae"] == pytest.approx(mean_absolute_error(part["y_true"], part["y_score"]))
    assert ki["spearman"] == pytest.approx(spearmanr(part["y_true"], part["y_score"]).statistic)
    assert ki["auc"] == pytest.approx(roc_auc_score(part["y_true"] >= 10, part["y_score"]))


def test_single_class_site_gets_a_note_not_an_unexplained_nan():
    table = molecular_table(_predictions(single_class_site="B"), "byol", "erm", "pooled", 0, CUTS, n_boot=50)
    row = table[(table["site"] == "B") & (table["endpoint"] == "idh")].iloc[0]
    assert np.isnan(row["auc"]) and "single class" in row["note"]
    worst = table[(table["site"] == "worst") & (table["endpoint"] == "idh")].iloc[0]
    assert worst["worst_site"] in ("A", "C")
    for column in ("balanced_accuracy", "auc", "auc_ci_low", "auc_ci_high"):
        unexplained = table[column].isna() & (table["note"] == "")
        assert not unexplained.any(), column


def test_single_class_in_training_is_skipped_with_note():
    table = molecular_table(_predictions(single_class_train="idh"), "byol", "erm", "pooled", 0, CUTS, n_boot=50)
    idh = table[table["endpoint"] == "idh"]
    assert idh["auc"].isna().all() and idh["note"].str.contains("single class in training").all()
    assert table[(table["endpoint"] == "ki67") & (table["site"] == "all")]["auc"].notna().all()


def test_unknown_endpoint_lists_valid_names():
    with pytest.raises(ValueError, match="valid: \\['mgmt'"):
        molecular_table(_predictions(), "byol", "erm", "pooled", 0, CUTS, endpoints=["idh1"])


def test_oracle_auc_on_the_same_subjects():
    pred = _predictions()
    subjects = pred["subject_id"].unique()
    rng = np.random.default_rng(1)
    oracle = pd.DataFrame({"subject_id": subjects, "endpoint": "idh", "value": rng.random(len(subjects))})
    table = molecular_table(pred, "byol", "erm", "pooled", 0, CUTS, n_boot=20, oracle=oracle)
    part = pred[(pred["split"] == "test") & (pred["endpoint"] == "idh") & (pred["site"] == "C")]
    truth = oracle.set_index("subject_id")["value"].loc[part["subject_id"]]
    row = table[(table["site"] == "C") & (table["endpoint"] == "idh")].iloc[0]
    assert row["oracle_auc"] == pytest.approx(roc_auc_score(part["y_true"], truth))
