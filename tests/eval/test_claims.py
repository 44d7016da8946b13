"""Verdicts: the rule itself, the paired bootstrap against a direct computation, and the claim tables."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from nrfm.eval import claims as summary


@pytest.mark.parametrize("low, high, gain, n, expected", [
    (0.01, 0.10, 0.05, 100, "reproduced"),
    (-0.10, 0.02, 0.05, 100, "not reproduced"),   # CI excludes the paper's gain
    (-0.30, -0.10, 0.05, 100, "not reproduced"),  # CI entirely below zero
    (-0.05, 0.08, 0.05, 100, "inconclusive"),     # contains both 0 and the gain
    (0.01, 0.10, 0.05, 5, "inconclusive"),        # too few subjects to call anything
    (np.nan, 0.1, 0.05, 100, "inconclusive"),
])
def test_verdict_rule(low, high, gain, n, expected):
    assert summary.verdict(low, high, gain, n) == expected


def _predictions(n=120, seed=0, signal=1.0):
    rng = np.random.default_rng(seed)
    rows = []
    for endpoint in ("mgmt", "idh"):
        y = rng.integers(0, 2, n)
        score = y * signal + rng.normal(size=n)
        rows += [{"subject_id": f"s{i:03d}", "site": "A", "split": "test", "endpoint": endpoint, "y_true": float(y[i]),
                  "y_score": float(score[i]), "threshold": 0.5} for i in range(n)]
    return pd.DataFrame(rows)


def test_paired_bootstrap_point_values_match_sklearn():
    erm, dro = _predictions(seed=1, signal=0.5), _predictions(seed=1, signal=2.0)
    result = summary.paired_bootstrap(erm, dro, "auc", ("mgmt", "idh"), n_boot=200, seed=0)
    direct = lambda f: np.mean([roc_auc_score(p["y_true"], p["y_score"]) for _, p in f.groupby("endpoint")])
    assert result["erm"] == pytest.approx(direct(erm)) and result["dro"] == pytest.approx(direct(dro))
    assert result["ci_low"] > 0  # a much stronger signal: the CI of the difference is above zero
    assert result["ci_low"] <= result["delta"] <= result["ci_high"]


def test_identical_models_give_a_zero_difference():
    frame = _predictions(seed=3)
    result = summary.paired_bootstrap(frame, frame, "bacc", ("mgmt", "idh"), n_boot=100, seed=0)
    assert result["delta"] == 0 and result["ci_low"] == 0 and result["ci_high"] == 0


def test_molecular_verdicts_from_prediction_files(tmp_path):
    (tmp_path / "artifacts").mkdir()
    for objective, signal in (("erm", 0.3), ("dro", 2.5)):
        frame = _predictions(n=150, seed=5, signal=signal)
        frame["site"] = np.where(frame["subject_id"] < "s040", "Small", "Big")
        frame.to_csv(tmp_path / "artifacts" / f"predictions_byol_{objective}_pooled.csv", index=False)
    table = summary.molecular_verdicts(tmp_path, ["byol"], {}, n_boot=200)
    auc_row = table[table["claim"].str.contains("mean AUC")].iloc[0]
    assert auc_row["site"] == "Small" and auc_row["n_test"] == 40
    assert auc_row["verdict"] == "reproduced" and auc_row["paper_delta"] == pytest.approx(0.02)
    assert set(table["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}


def test_survival_and_gradcam_verdicts():
    survival = pd.DataFrame([
        {"backbone": "byol", "objective": "erm", "site": "A", "n": 60, "c_index": 0.60, "ci_low": 0.5, "ci_high": 0.7},
        {"backbone": "byol", "objective": "dro", "site": "A", "n": 60, "c_index": 0.75, "ci_low": 0.66, "ci_high": 0.8},
        {"backbone": "byol", "objective": "erm", "site": "B", "n": 8, "c_index": 0.60, "ci_low": 0.3, "ci_high": 0.9},
        {"backbone": "byol", "objective": "dro", "site": "B", "n": 8, "c_index": 0.90, "ci_low": 0.7, "ci_high": 1.0}])
    verdicts = summary.survival_verdicts(survival).set_index("site")
    assert verdicts.loc["A", "verdict"] == "reproduced" and verdicts.loc["B", "verdict"] == "inconclusive"

    def gradcam_table(cam_tumor: np.ndarray, cam_ring: np.ndarray) -> pd.DataFrame:
        from nrfm.eval.gradcam import summarise_scores

        n = len(cam_tumor)
        scores = pd.DataFrame({"site": ["A", "B"] * (n // 2), "cam_in_tumor": cam_tumor, "cam_in_peritumoral": cam_ring,
                               "tumor_volume_fraction": 0.1, "peritumoral_volume_fraction": 0.2, "note": ""})
        rows = summarise_scores(scores, ["A", "B"], n_boot=500)
        return pd.DataFrame([{"backbone": "byol", "objective": "erm", **row} for row in rows])

    rng = np.random.default_rng(0)
    enriched = summary.gradcam_verdicts(gradcam_table(np.full(20, 0.5), np.full(20, 0.2)))
    assert enriched["verdict"].tolist() == ["reproduced"] and enriched["delta"].iloc[0] == pytest.approx(0.7 / 0.3)
    assert "per site: A 2.33, B 2.33" in enriched["note"].iloc[0]
    avoided = summary.gradcam_verdicts(gradcam_table(np.full(20, 0.05), np.full(20, 0.1)))
    assert avoided["verdict"].tolist() == ["not reproduced"]
    # lesion shares scattered around their volume share (0.3): the CI contains 1
    noisy = gradcam_table(rng.uniform(0.0, 0.2, 20), rng.uniform(0.0, 0.4, 20))
    verdict = summary.gradcam_verdicts(noisy).iloc[0]
    assert verdict["ci_low"] < 1 < verdict["ci_high"] and verdict["verdict"] == "inconclusive"


def test_sweep_collection_and_spread(tmp_path):
    for seed in (0, 1, 2):
        folder = tmp_path / "runs" / f"r{seed}" / "metrics"
        folder.mkdir(parents=True)
        pd.DataFrame([{"backbone": "byol", "objective": "erm", "auc": 0.6 + 0.1 * seed}]).to_csv(
            folder / "molecular.csv", index=False)
    frame = summary.collect_metrics(tmp_path, "molecular")
    assert sorted(frame["run"]) == ["r0", "r1", "r2"]
    spread = summary.spread(frame, ["backbone", "objective"], ["auc"]).iloc[0]
    assert spread["auc_mean"] == pytest.approx(0.7) and spread["auc_sd"] == pytest.approx(0.1)
    assert spread["runs"] == 3


def test_site_invariance_verdict_reads_the_stage_table():
    table = pd.DataFrame([
        {"backbone": "byol", "stage": "erm", "pca_silhouette_site": 0.30, "pca_silhouette_ci_low": 0.25,
         "pca_silhouette_ci_high": 0.35},
        {"backbone": "byol", "stage": "dro", "pca_silhouette_site": 0.10, "pca_silhouette_ci_low": 0.05,
         "pca_silhouette_ci_high": 0.15},
        {"backbone": "byol", "stage": "pretrained", "pca_silhouette_site": 0.5, "pca_silhouette_ci_low": 0.4,
         "pca_silhouette_ci_high": 0.6}])
    verdict = summary.site_invariance_verdicts(table)
    assert verdict["verdict"].tolist() == ["reproduced"] and verdict["delta"].iloc[0] == pytest.approx(-0.2)
    table.loc[table["stage"] == "dro", ["pca_silhouette_site", "pca_silhouette_ci_low", "pca_silhouette_ci_high"]] = \
        [0.5, 0.45, 0.55]
    assert summary.site_invariance_verdicts(table)["verdict"].tolist() == ["not reproduced"]
