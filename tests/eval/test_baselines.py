"""Baselines on planted features: signal is found, noise is chance, selection never reads test labels."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from nrfm.eval import baselines
from nrfm.eval.baselines import (PREDICTION_COLUMNS, baseline_folds, baseline_predictions, ceiling_fraction,
                            ceiling_fraction_of_predictions, fit_predict_baseline, oracle_bounds, run_baseline_stage)
from nrfm.config import AnalysesConfig, BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, Config, FinetuningConfig
from nrfm.pipeline.context import RunContext
from nrfm.eval.metrics import molecular_table


def planted(n: int, d: int = 10, signal: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column drives a binary label (``signal`` = 0: pure noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (signal * x[:, 0] + rng.normal(size=n) > 0).astype(float)
    return x, y


def auc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, s)


def test_logistic_baseline_finds_a_planted_signal_and_is_chance_on_noise():
    (xtr, ytr), (xva, yva), (xte, yte) = planted(300, seed=0), planted(150, seed=1), planted(600, seed=2)
    fit = fit_predict_baseline(xtr, ytr, xva, yva, xte, kind="binary")
    assert auc(yte, fit.test) > 0.85 and fit.penalty in baselines.C_GRID and ((fit.test > 0) & (fit.test < 1)).all()
    assert fit.val_score == pytest.approx(auc(yva, fit.val))
    (xtr, ytr), (xva, yva), (xte, yte) = (planted(300, signal=0.0, seed=s) for s in (3, 4, 5))
    noise = fit_predict_baseline(xtr, ytr, xva, yva, xte, kind="binary")
    assert abs(auc(yte, noise.test) - 0.5) < 0.07


def test_penalty_is_the_best_on_validation_and_refit_on_train_only():
    (xtr, ytr), (xva, yva), (xte, _) = planted(200, seed=0), planted(80, seed=1), planted(50, seed=2)
    fit = fit_predict_baseline(xtr, ytr, xva, yva, xte, kind="binary")
    best = max(fit.grid_scores.values())
    assert fit.grid_scores[fit.penalty] == best
    assert fit.penalty == min(c for c, s in fit.grid_scores.items() if s == best)  # ties: strongest penalty
    # the model is the one fitted on train with that C (validation rows are not added to the fit)
    again = fit_predict_baseline(xtr, ytr, xva, yva, xte, kind="binary", grid=[fit.penalty])
    np.testing.assert_allclose(again.test, fit.test)


def test_test_labels_are_never_read(tmp_path):
    ctx = fake_context(tmp_path)
    features = planted_features(ctx.manifest)
    first, _ = baseline_predictions(ctx.manifest, features, BINARY_ENDPOINTS[:3] + ("ki67",), {"ki67": 10.0}, 0)
    shuffled = ctx.manifest.copy()
    test = shuffled["split"] == "test"
    rng = np.random.default_rng(1)
    for endpoint in BINARY_ENDPOINTS[:3] + ("ki67",):
        values = shuffled.loc[test, endpoint].to_numpy()
        shuffled.loc[test, endpoint] = rng.permutation(values)
        # unknown test labels made known: no change either
        shuffled.loc[test & shuffled[endpoint].isna(), endpoint] = 1.0
    second, _ = baseline_predictions(shuffled, features, BINARY_ENDPOINTS[:3] + ("ki67",), {"ki67": 10.0}, 0)
    key = ["fold", "endpoint", "subject_id"]
    merged = first.merge(second, on=key, suffixes=("", "_shuffled"))
    assert len(merged) == len(first)
    np.testing.assert_array_equal(merged["y_score"], merged["y_score_shuffled"])
    np.testing.assert_array_equal(merged["threshold"], merged["threshold_shuffled"])


def test_ridge_baseline_predicts_percent_from_planted_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = np.exp(2.0 + 0.8 * x[:, 1] + 0.2 * rng.normal(size=400)).clip(0, 100)
    fit = fit_predict_baseline(x[:200], y[:200], x[200:300], y[200:300], x[300:], kind="continuous")
    from scipy.stats import spearmanr

    assert spearmanr(fit.test, y[300:]).statistic > 0.9 and fit.penalty in baselines.ALPHA_GRID
    assert ((fit.test >= 0) & (fit.test <= 100)).all()


def test_single_class_training_gives_nan_scores_and_unrankable_validation_the_default():
    x, _ = planted(40)
    fit = fit_predict_baseline(x[:20], np.zeros(20), x[20:30], np.r_[np.zeros(5), np.ones(5)], x[30:])
    assert np.isnan(fit.test).all() and np.isnan(fit.penalty)
    x, y = planted(60)
    fit = fit_predict_baseline(x[:40], y[:40], x[40:50], np.zeros(10), x[50:])  # one class in validation
    assert fit.penalty == baselines.DEFAULT_C and np.isfinite(fit.test).all()
    with pytest.raises(ValueError, match="unknown baseline kind 'survival'"):
        fit_predict_baseline(x, y, x, y, x, kind="survival")


# ---- the driver, in the fine-tuning predictions format ---------------------------------------------------------
def fake_context(tmp_path, n: int = 150, seed: int = 0) -> RunContext:
    """Three sites, splits 60/20/20 by patient, labels driven by one latent."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"subject_id": [f"s{i:03d}" for i in range(n)], "patient_id": [f"p{i:03d}" for i in range(n)],
                       "site": np.array(["A", "B", "C"])[np.arange(n) % 3],
                       "split": np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 2)[rng.permutation(np.arange(n) % 10)]
                       })
    df["latent"] = rng.normal(size=n)
    for endpoint in BINARY_ENDPOINTS:
        y = (2 * df["latent"] + rng.normal(size=n) > 0).astype(float)
        y[rng.random(n) < 0.2] = np.nan
        df[endpoint] = y
    for endpoint in CONTINUOUS_ENDPOINTS:
        y = np.exp(2 + df["latent"] + 0.3 * rng.normal(size=n)).clip(0, 100)
        y[rng.random(n) < 0.2] = np.nan
        df[endpoint] = y
    cfg = Config(finetuning=FinetuningConfig(), analyses=AnalysesConfig(bootstrap=20))
    return RunContext(config=cfg, run_dir=tmp_path, manifest=df, cohort_dir=tmp_path, _dataset=None)


def planted_features(manifest: pd.DataFrame) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    x = np.c_[manifest["latent"].to_numpy(), rng.normal(size=(len(manifest), 5))]
    x[rng.random(x.shape) < 0.05] = np.nan  # undefined features (an empty sub-region) are imputed
    return pd.DataFrame(x, index=manifest["subject_id"].tolist(), columns=[f"f{j}" for j in range(6)])


def test_predictions_have_the_finetuning_format_and_molecular_rows(tmp_path):
    ctx = fake_context(tmp_path)
    features = planted_features(ctx.manifest).iloc[::-1]  # any row order: aligned by subject_id
    endpoints = ("idh", "mgmt", "ki67")
    pred, choices = baseline_predictions(ctx.manifest, features, endpoints, {"ki67": 10.0}, seed=3)
    assert tuple(pred.columns) == PREDICTION_COLUMNS and pred["y_true"].notna().all()
    assert set(pred["split"]) == {"train", "val", "test"} and set(pred["fold"]) == {"pooled"}
    assert (pred["seed"] == 3).all()
    assert len(choices) == 3 and {c["endpoint"] for c in choices} == set(endpoints)
    table = molecular_table(pred, "handcrafted", "erm", "pooled", 3, {"ki67": 10.0}, n_boot=20, endpoints=endpoints)
    overall = table[table["site"] == "all"].set_index("endpoint")
    assert (overall.loc[["idh", "mgmt", "ki67"], "auc"] > 0.8).all()
    loso, _ = baseline_predictions(ctx.manifest, features, ("idh",), {}, seed=3, protocol="loso")
    assert set(loso["fold"]) == {"A", "B", "C"}
    for fold, part in loso.groupby("fold"):
        assert set(part.loc[part["split"] == "test", "site"]) == {fold}
        assert fold not in set(part.loc[part["split"] != "test", "site"])


def test_loso_folds_are_the_fine_tuning_folds(tmp_path):
    manifest = fake_context(tmp_path).manifest
    folds = baseline_folds(manifest, "loso")
    assert [f[0] for f in folds] == ["A", "B", "C"]
    for site, train, val, test in folds:
        # the fine-tuning stage's folds: the held-out site's exams that pretraining (the train split) never saw
        unseen = (manifest["site"] == site) & (manifest["split"] != "train")
        assert (manifest.loc[test, "site"] == site).all() and sorted(test) == sorted(np.flatnonzero(unseen))
        assert not set(train) & set(val) and (manifest.loc[val, "split"] == "val").all()
    with pytest.raises(ValueError, match="unknown protocol 'kfold'"):
        baseline_folds(manifest, "kfold")


def test_run_stage_writes_predictions_choices_and_molecular_rows(tmp_path):
    ctx = fake_context(tmp_path)
    features = planted_features(ctx.manifest)
    result = run_baseline_stage(ctx, "handcrafted", "pooled", progress=False, features=features)
    assert result.predictions_path.name == "predictions_handcrafted_erm_pooled.csv"
    saved = pd.read_csv(result.predictions_path)
    assert tuple(saved.columns) == PREDICTION_COLUMNS
    record = json.loads((ctx.artifacts_dir / "baseline_handcrafted_erm_pooled.json").read_text())
    assert record["objective"] == "erm" and len(record["choices"]) == len(ctx.config.finetuning.endpoints)
    # the probe reads the pretrained embedding the fine-tuning stage writes
    np.savez(ctx.artifacts_dir / "embeddings_dino_pretrained.npz",
             subject_id=np.asarray(ctx.manifest["subject_id"].tolist(), dtype=str),
             embedding=np.nan_to_num(features.to_numpy()).astype(np.float32))
    probe = run_baseline_stage(ctx, "dino", "pooled", progress=False)
    assert probe.predictions_path.name == "predictions_dino_probe_pooled.csv"
    molecular = pd.read_csv(ctx.metrics_dir / "molecular.csv")
    assert {("handcrafted", "erm"), ("dino", "probe")} <= set(zip(molecular["backbone"], molecular["objective"]))
    with pytest.raises(ValueError, match="unknown baseline 'radiomics'"):
        run_baseline_stage(ctx, "radiomics")


def test_handcrafted_stage_computes_and_keeps_the_feature_table(tmp_path):
    from test_handcrafted import planted_exam

    ctx = fake_context(tmp_path, n=30)
    items = []
    for i, latent in enumerate(ctx.manifest["latent"]):
        image, seg = planted_exam(radius_lesion=6 + int(round(latent)), seed=i)
        items.append({"image": image, "seg": seg[None], "brain": np.ones((1,) + seg.shape, bool)})
    ctx._dataset = items
    table = baselines.handcrafted_features_of_run(ctx, progress=False)
    assert table.index.tolist() == ctx.manifest["subject_id"].tolist()
    assert (ctx.artifacts_dir / "handcrafted_features.csv").is_file()
    ctx._dataset = None  # a second call reads the file instead of the volumes
    again = baselines.handcrafted_features_of_run(ctx, progress=False)
    pd.testing.assert_frame_equal(again, table, check_dtype=False)


# ---- ceiling fraction --------------------------------------------------------------------------------------------
def test_ceiling_fraction_is_the_mean_share_of_the_gain_over_chance():
    auc_by = {"idh": 0.70, "mgmt": 0.60, "ki67": 0.99, "egfr": 0.80}
    bound_by = {"idh": 0.90, "mgmt": 0.70, "ki67": 0.60, "egfr": 0.50}
    # idh 0.2/0.4 = 0.5, mgmt 0.1/0.2 = 0.5; ki67 is continuous, egfr's bound has no gain: both left out
    assert ceiling_fraction(auc_by, bound_by) == pytest.approx(0.5)
    assert ceiling_fraction({"idh": 0.5}, {"idh": 0.9}) == 0.0
    assert np.isnan(ceiling_fraction({}, {"idh": 0.9}))


def test_ceiling_fraction_from_predictions_and_an_oracle(tmp_path):
    ctx = fake_context(tmp_path)
    pred, _ = baseline_predictions(ctx.manifest, planted_features(ctx.manifest), ("idh", "mgmt"), {}, seed=0)
    oracle = pd.DataFrame([{"subject_id": s, "endpoint": e, "value": 1 / (1 + np.exp(-2 * z))}
                           for s, z in zip(ctx.manifest["subject_id"], ctx.manifest["latent"])
                           for e in ("idh", "mgmt")])
    bounds = oracle_bounds(pred, oracle)
    assert set(bounds) == {"idh", "mgmt"} and all(b > 0.8 for b in bounds.values())
    value = ceiling_fraction_of_predictions(pred, bounds)
    assert 0.6 < value < 1.2
    table = pd.DataFrame({"endpoint": list(bounds), "site": "all", "oracle_auc": list(bounds.values())})
    assert ceiling_fraction_of_predictions(pred, table) == pytest.approx(value)
