"""The ceiling fraction against a straight-line computation with scikit-learn, and its CI on planted models."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from nrfm.eval.ceiling import ceiling_row


def _cohort(n=120, seed=0, skill=1.0):
    rng = np.random.default_rng(seed)
    rows, oracle = [], []
    for i in range(n):
        for marker in ("idh", "mgmt", "atrx"):
            p = rng.uniform(0.05, 0.95)
            y = float(rng.uniform() < p)
            score = skill * p + (1 - skill) * rng.uniform()
            rows.append({"subject_id": f"s{i}", "patient_id": f"p{i // 2}", "site": "A", "split": "test",
                         "endpoint": marker, "y_true": y, "y_score": score})
            oracle.append({"subject_id": f"s{i}", "endpoint": marker, "value": p})
    return pd.DataFrame(rows), pd.DataFrame(oracle)


def test_ceiling_fraction_matches_a_straight_line_computation():
    predictions, oracle = _cohort(skill=0.5)
    row = ceiling_row(predictions, oracle, n_boot=200)
    expected = []
    for marker, part in predictions.groupby("endpoint"):
        bound = oracle[oracle["endpoint"] == marker].set_index("subject_id").loc[part["subject_id"], "value"]
        model_auc = roc_auc_score(part["y_true"], part["y_score"])
        bound_auc = roc_auc_score(part["y_true"], bound)
        expected.append((model_auc - 0.5) / (bound_auc - 0.5))
    assert row["ceiling_fraction"] == pytest.approx(np.mean(expected))
    assert row["markers"] == "idh,mgmt,atrx" or set(row["markers"].split(",")) == {"idh", "mgmt", "atrx"}
    assert row["ci_low"] < row["ceiling_fraction"] < row["ci_high"]


def test_the_oracle_itself_sits_at_one_and_noise_at_zero():
    predictions, oracle = _cohort(skill=1.0, seed=1)
    assert ceiling_row(predictions, oracle, n_boot=100)["ceiling_fraction"] == pytest.approx(1.0)
    noise, oracle = _cohort(skill=0.0, seed=2, n=300)
    row = ceiling_row(noise, oracle, n_boot=300)
    assert row["ci_low"] < 0 < row["ci_high"]


def test_a_marker_without_both_classes_is_left_out_and_named():
    predictions, oracle = _cohort(seed=3)
    predictions.loc[predictions["endpoint"] == "atrx", "y_true"] = 0.0
    row = ceiling_row(predictions, oracle, n_boot=50)
    assert "atrx" not in row["markers"].split(",") and "atrx: one class" in row["note"]


def test_paired_difference_matches_two_rows_and_detects_a_better_model():
    from nrfm.eval.ceiling import paired_difference

    weak, oracle = _cohort(skill=0.0, seed=4, n=300)
    strong = weak.copy()
    strong["y_score"] = oracle.set_index(["subject_id", "endpoint"]).loc[
        list(zip(strong["subject_id"], strong["endpoint"])), "value"].to_numpy()
    result = paired_difference(weak, strong, oracle, n_boot=300)
    assert result["b"] == pytest.approx(ceiling_row(strong, oracle, n_boot=10)["ceiling_fraction"])
    assert result["a"] == pytest.approx(ceiling_row(weak, oracle, n_boot=10)["ceiling_fraction"])
    assert result["ci_low"] > 0.5 and result["p_value"] < 0.01
    same = paired_difference(weak, weak, oracle, n_boot=100)
    assert same["delta"] == 0 and same["ci_low"] == same["ci_high"] == 0
