"""Verdicts: claim specs, paired tests from the run's artifacts, Holm, wording per scenario, sweep helpers."""
import json

import numpy as np
import pandas as pd
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import roc_auc_score

from nrfm.eval import bootstrap
from nrfm.eval import claim_rows, claims, paired, summary

SITES = {"Small": (12, 40), "Big": (60, 20)}  # site: (train patients, test patients); smallest by TRAINING


def _manifest():
    rows = []
    for site, (n_train, n_test) in SITES.items():
        for split, count in (("train", n_train), ("val", 6), ("test", n_test)):
            for i in range(count):
                patient = f"{site}-{split}-{i // 2}"  # two exams per patient
                rows.append({"subject_id": f"{site}-{split}-{i}", "patient_id": patient, "site": site,
                             "split": split})
    return pd.DataFrame(rows)


def _predictions(manifest, signal, seed=0, endpoints=("mgmt", "idh"), threshold=0.5):
    rng = np.random.default_rng(seed)
    rows = []
    labels = np.random.default_rng(99)  # the same labels for every objective
    for endpoint in endpoints:
        y = labels.integers(0, 2, len(manifest)).astype(float)
        score = y * signal + rng.normal(size=len(manifest))
        frame = manifest.assign(fold="pooled", endpoint=endpoint, y_true=y, y_score=score, threshold=threshold)
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def _run(tmp_path, objectives=(("erm", 0.2), ("dro", 2.5), ("reweighted", 0.3)), scenario="site-shift"):
    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)
    (run / "data").mkdir()
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "oracle.csv").write_text("subject_id,endpoint,value\n")
    if scenario is not None:
        (cohort / "cohort.json").write_text(json.dumps({"scenario": scenario}))
    (run / "data" / "SOURCE").write_text(f"{cohort / 'manifest.csv'}\n")
    manifest = _manifest()
    manifest.to_csv(run / "data" / "manifest.csv", index=False)
    for k, (objective, signal) in enumerate(objectives):
        _predictions(manifest, signal, seed=k).to_csv(run / "artifacts" / f"predictions_byol_{objective}_pooled.csv",
                                                      index=False)
    return run, manifest


def test_claim_specs_and_wording_are_data():
    rules = claims.rule_table()
    assert set(rules["key"]) == {c.key for c in claims.CLAIMS} and rules["test"].notna().all()
    words = claims.wording_table()
    assert {"planted gain detected", "no gain where none was planted", "gain reported where none was planted",
            "reproduced"} <= set(words["verdict"])
    assert claims.verdict_tone("gain reported where none was planted") == "bad"


def test_scenario_from_the_cohort_folder(tmp_path):
    run, _ = _run(tmp_path, scenario="no-shift")
    assert claim_rows.cohort_scenario(run) == "no-shift"
    (tmp_path / "cohort" / "cohort.json").write_text("{}")
    assert claim_rows.cohort_scenario(run) == "synthetic"  # legacy synthetic cohort: no scenario key
    (tmp_path / "cohort" / "cohort.json").unlink()
    (tmp_path / "cohort" / "oracle.csv").unlink()
    assert claim_rows.cohort_scenario(run) == "imported"


def test_paired_endpoint_mean_point_values_and_nan_threshold():
    manifest = _manifest()
    test = manifest[manifest["split"] == "test"]
    erm, dro = _predictions(test, 0.3, seed=1), _predictions(test, 2.0, seed=2)
    result = paired.paired_endpoint_mean(erm, dro, "auc", ("mgmt", "idh"), n_boot=300)
    direct = lambda f: np.mean([roc_auc_score(p["y_true"], p["y_score"]) for _, p in f.groupby("endpoint")])
    assert result["a"] == pytest.approx(direct(erm)) and result["b"] == pytest.approx(direct(dro))
    assert result["ci_low"] > 0 and result["p_value"] < 0.01
    same = paired.paired_endpoint_mean(erm, erm, "bacc", ("mgmt", "idh"), n_boot=100)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["p_value"] == 1
    # a NaN threshold (validation with one class) is no decision rule: the endpoint is not scored, never 0.5
    no_rule = erm.copy()
    no_rule.loc[no_rule["endpoint"] == "idh", "threshold"] = np.nan
    result = paired.paired_endpoint_mean(no_rule, dro, "bacc", ("mgmt", "idh"), n_boot=50)
    assert result["endpoints"] == ["mgmt"] and "idh (no validation threshold)" in result["note"]


def test_balanced_accuracy_claims_re_pick_thresholds_on_resampled_validation_exams():
    from sklearn.metrics import balanced_accuracy_score
    from nrfm.eval.metrics import youden_threshold
    manifest = _manifest()
    frames = [_predictions(manifest, signal, seed=k, endpoints=("mgmt",)) for k, signal in enumerate((0.8, 1.0))]
    for frame in frames:  # each model's own rule, picked on all its validation exams (as fine-tuning does)
        val = frame[frame["split"] == "val"]
        frame["threshold"] = youden_threshold(val["y_true"], val["y_score"])
    (erm_test, dro_test), (erm_val, dro_val) = ([f[f["split"] == split] for f in frames] for split in ("test", "val"))
    fixed = paired.paired_endpoint_mean(erm_test, dro_test, "bacc", ("mgmt",), n_boot=400, seed=3)
    repicked = paired.paired_endpoint_mean(erm_test, dro_test, "bacc", ("mgmt",), n_boot=400, seed=3,
                                               val_a=erm_val, val_b=dro_val)
    # the point estimate is the models' own balanced accuracies (thresholds picked on all validation exams)
    assert (repicked["a"], repicked["b"]) == pytest.approx((fixed["a"], fixed["b"]))
    assert "re-picked" in repicked["note"]
    # a loop over explicit resamples: validation patients redrawn, Youden re-picked, test exams scored with it
    test_ids = sorted(erm_test["subject_id"])
    val_ids = sorted(erm_val["subject_id"])
    patient = manifest.set_index("subject_id")["patient_id"]
    y_test = erm_test.set_index("subject_id").loc[test_ids, "y_true"].to_numpy()
    y_val = erm_val.set_index("subject_id").loc[val_ids, "y_true"].to_numpy()
    test_counts = bootstrap.draw(len(test_ids), 400, 3, clusters=patient.loc[test_ids].to_numpy(), strata=y_test)
    val_counts = bootstrap.draw(len(val_ids), 400, 4, clusters=patient.loc[val_ids].to_numpy(), strata=y_val)
    for b in range(0, 400, 40):
        t_idx, v_idx = bootstrap.indices(test_counts[b]), bootstrap.indices(val_counts[b])
        delta = []
        for test, val in ((dro_test, dro_val), (erm_test, erm_val)):
            score = test.set_index("subject_id").loc[test_ids, "y_score"].to_numpy()
            val_score = val.set_index("subject_id").loc[val_ids, "y_score"].to_numpy()
            rule = youden_threshold(y_val[v_idx], val_score[v_idx])
            delta.append(balanced_accuracy_score(y_test[t_idx], score[t_idx] >= rule))
        assert repicked["deltas"][b] == pytest.approx(delta[0] - delta[1])
    # the threshold's variability enters the interval
    assert repicked["ci_high"] - repicked["ci_low"] > fixed["ci_high"] - fixed["ci_low"]
    # prediction files without validation rows (older runs): thresholds stay fixed, and the note says so
    older = paired.paired_endpoint_mean(erm_test, dro_test, "bacc", ("mgmt",), n_boot=400, seed=3,
                                        val_a=erm_val.iloc[:0], val_b=dro_val.iloc[:0])
    assert older["deltas"] == pytest.approx(fixed["deltas"]) and "no validation predictions" in older["note"]
    # a memo shared across comparisons (DRO against ERM, then against a third model) changes no number
    memo = {}
    paired.paired_endpoint_mean(erm_test, dro_test, "bacc", ("mgmt",), n_boot=400, seed=3, val_a=erm_val,
                                    val_b=dro_val, memo=memo)
    shared = paired.paired_endpoint_mean(dro_test, erm_test, "bacc", ("mgmt",), n_boot=400, seed=3,
                                             val_a=dro_val, val_b=erm_val, memo=memo)
    assert len(memo) == 4  # two draws, two models' resampled values: nothing computed twice
    assert shared["deltas"] == pytest.approx(-repicked["deltas"])
    assert shared["ci_low"] == pytest.approx(-repicked["ci_high"])


def test_molecular_rows_use_the_smallest_training_site(tmp_path):
    run, _ = _run(tmp_path)
    rows = pd.DataFrame(claim_rows.molecular_rows(run, ["byol"], {}, n_boot=200))
    assert set(rows["site"]) == {"Small"}  # fewest training exams, although it has the most test exams
    unlabelled = rows[rows["claim_key"] == "auc_atrx"]  # no ATRX labels in these predictions
    assert unlabelled["p_value"].isna().all() and unlabelled["note"].str.contains("no labelled").all()
    assert set(rows["comparison"]) == {"dro-erm", "dro-reweighted"}
    auc = rows[(rows["claim_key"] == "auc_rare_site") & (rows["comparison"] == "dro-erm")].iloc[0]
    assert auc["n_test"] == 40 and auc["delta"] > 0 and auc["p_value"] < 0.01


def _decision_table():
    base = {"claim": "c", "metric": "auc", "site": "S", "paper_delta": 0.05, "ci_low": 0.0, "ci_high": 0.1,
            "note": ""}
    rows = []
    for k, (key, backbone, comparison, p) in enumerate([
            ("a", "byol", "dro-erm", 0.001), ("a", "byol", "dro-reweighted", 0.004),
            ("a", "dino", "dro-erm", 0.001), ("a", "dino", "dro-reweighted", 0.3),
            ("b", "byol", "dro-erm", 0.02), ("b", "byol", "dro-reweighted", np.nan)]):
        rows.append({**base, "claim_key": key, "backbone": backbone, "comparison": comparison, "p_value": p})
    return pd.DataFrame(rows)


def test_holm_attribution_and_wording_by_scenario():
    table = claims.decide(_decision_table(), "site-shift")
    pairwise = table[table["comparison"] != claims.ATTRIBUTION]
    expected = bootstrap.holm(_decision_table()["p_value"].to_numpy())
    assert pairwise["adjusted_p"].to_numpy() == pytest.approx(expected, nan_ok=True)
    attribution = table[table["comparison"] == claims.ATTRIBUTION].set_index(["claim_key", "backbone"])
    # DRO beats ERM and reweighted (both adjusted) only for claim a on byol
    assert attribution.loc[("a", "byol"), "verdict"] == "planted gain detected"
    assert attribution.loc[("a", "dino"), "verdict"] == "planted gain not detected"
    assert attribution.loc[("a", "byol"), "adjusted_p"] == pytest.approx(max(expected[0], expected[1]))
    assert attribution.loc[("b", "byol"), "verdict"] == "not evaluable"  # its reweighted comparison has no p
    no_shift = claims.decide(_decision_table(), "no-shift").set_index(["claim_key", "backbone", "comparison"])
    assert no_shift.loc[("a", "byol", "dro-erm"), "verdict"] == "gain reported where none was planted"
    assert no_shift.loc[("a", "byol", "dro-erm"), "control"] == "false positive"
    assert no_shift.loc[("a", "dino", "dro-reweighted"), "verdict"] == "DRO not above reweighted"
    assert no_shift.loc[("a", "byol", "dro-reweighted"), "verdict"] == "DRO above reweighted"
    assert not no_shift.xs("dro-reweighted", level="comparison")["control"].isin(claims.CONTROL.values()).any()
    imported = claims.decide(_decision_table().assign(ci_high=0.03), "imported").set_index(
        ["claim_key", "backbone", "comparison"])
    assert imported.loc[("a", "byol", "dro-erm"), "verdict"] == "reproduced"
    assert imported.loc[("b", "byol", "dro-erm"), "verdict"] == "not reproduced"  # CI below the paper's 0.05


def test_dro_above_reweighted_alone_is_not_a_dro_gain():
    """Rule 4c: reweighting that falls below DRO and ERM alike is not a gain of DRO, in either scenario."""
    rows = _decision_table()
    rows.loc[(rows["claim_key"] == "a") & (rows["backbone"] == "dino"), "p_value"] = [0.4, 0.001]
    for scenario, negative in (("no-shift", "no gain where none was planted"),
                               ("site-shift", "planted gain not detected"), ("imported", "inconclusive")):
        table = claims.decide(rows, scenario).set_index(["claim_key", "backbone", "comparison"])
        component = table.loc[("a", "dino", "dro-reweighted")]
        assert component["gain_declared"] and component["verdict"] == "DRO above reweighted"
        assert component["control"] == "" and "reweighted fell behind" in component["note"]
        assert table.loc[("a", "dino", "dro-erm"), "verdict"] == negative
        assert table.loc[("a", "dino", claims.ATTRIBUTION), "verdict"] == negative
        assert not table.loc[("a", "dino", claims.ATTRIBUTION), "gain_declared"]
        # where DRO beats ERM too, the component row carries no such note
        assert "fell behind" not in str(table.loc[("a", "byol", "dro-reweighted"), "note"])
        assert claims.verdict_tone(component["verdict"]) == "neutral"


def test_runs_with_only_erm_and_dro_are_attributed_on_dro_minus_erm(tmp_path):
    run, _ = _run(tmp_path, objectives=(("erm", 0.2), ("dro", 2.5)))
    table = summary.all_verdicts(run, ["byol"], {}, n_boot=50)
    assert set(table["comparison"]) >= {"dro-erm", claims.ATTRIBUTION}
    assert "dro-reweighted" not in set(table["comparison"])
    attributed = table[(table["comparison"] == claims.ATTRIBUTION) & (table["claim_key"] == "auc_rare_site")]
    assert "no reweighted model" in attributed["note"].iloc[0]
    assert (table["scenario"] == "site-shift").all() and table["n_boot"].max() >= 50


def test_verdicts_in_worker_processes_equal_the_in_process_table(tmp_path):
    run, _ = _run(tmp_path)
    serial = summary.all_verdicts(run, ["byol"], {}, n_boot=50, workers=0)
    forked = summary.all_verdicts(run, ["byol"], {}, n_boot=50, workers=2)
    pd.testing.assert_frame_equal(serial, forked)
    assert len(serial) > 10


def _risks(manifest, objective, seed):
    rng = np.random.default_rng(0)
    test = manifest[manifest["split"] == "test"].copy()
    test["os_days"] = rng.exponential(300, len(test)).round()
    test["os_event"] = rng.integers(0, 2, len(test))
    noise = np.random.default_rng(seed).normal(size=len(test))
    strong = objective == "dro"
    test["risk"] = -test["os_days"] / 300 * (2.0 if strong else 0.2) + noise * (0.2 if strong else 1.0)
    return test[["subject_id", "patient_id", "site", "os_days", "os_event", "risk"]]


def test_survival_is_paired_when_risks_exist_and_says_so_otherwise(tmp_path):
    run, manifest = _run(tmp_path)
    pd.DataFrame([{"backbone": "byol", "objective": o, "site": s, "c_index": 0.6} for o in ("erm", "dro")
                  for s in ("Small", "Big", "all")]).to_csv(run / "metrics" / "survival.csv", index=False) \
        if (run / "metrics").mkdir() is None else None
    missing = pd.DataFrame(claim_rows.survival_rows(run, ["byol"], n_boot=50))
    assert set(missing["verdict"]) == {"no paired data"} and set(missing["site"]) == {"Small", "Big"}
    for k, objective in enumerate(("erm", "dro")):
        _risks(manifest, objective, k).to_csv(run / "artifacts" / f"survival_risk_byol_{objective}.csv", index=False)
    rows = pd.DataFrame(claim_rows.survival_rows(run, ["byol"], n_boot=200)).set_index("site")
    erm, dro = _risks(manifest, "erm", 0), _risks(manifest, "dro", 1)
    small = erm["site"] == "Small"
    expected = (concordance_index(dro["os_days"][small], -dro["risk"][small], dro["os_event"][small])
                - concordance_index(erm["os_days"][small], -erm["risk"][small], erm["os_event"][small]))
    assert rows.loc["Small", "delta"] == pytest.approx(expected)
    assert rows.loc["Small", "ci_low"] <= rows.loc["Small", "delta"] <= rows.loc["Small", "ci_high"]
    assert rows.loc["Small", "p_value"] < 0.05


def test_site_mixing_is_paired_over_test_subjects(tmp_path):
    run, manifest = _run(tmp_path)
    rng = np.random.default_rng(0)
    offset = np.where(manifest["site"] == "Small", 3.0, 0.0)[:, None]
    for objective, scale in (("erm", 1.0), ("dro", 0.1), ("reweighted", 1.0)):
        emb = rng.normal(size=(len(manifest), 6)) + scale * offset
        np.savez(run / "artifacts" / f"embeddings_byol_{objective}.npz",
                 subject_id=manifest["subject_id"].to_numpy(dtype=str), embedding=emb)
    rows = pd.DataFrame(claim_rows.site_mixing_rows(run, ["byol"], n_boot=200, pca_components=3))
    dro_erm = rows[rows["comparison"] == "dro-erm"].iloc[0]
    assert dro_erm["delta"] < 0 and dro_erm["ci_high"] < 0 and dro_erm["p_value"] < 0.01  # lower = mixes more


def _cam_scores(manifest, cam_tumor, cam_ring, shuffled=None, random_init=None):
    test = manifest[manifest["split"] == "test"].head(len(cam_tumor))
    frame = pd.DataFrame({"subject_id": test["subject_id"].to_numpy(), "site": test["site"].to_numpy(),
                          "explained_class": "positive", "cam_in_tumor": cam_tumor, "cam_in_peritumoral": cam_ring,
                          "tumor_volume_fraction": 0.1, "peritumoral_volume_fraction": 0.2, "note": ""})
    for prefix, cam in (("shuffled_mask_", shuffled), ("random_init_", random_init)):
        if cam is not None:
            frame[f"{prefix}cam_in_tumor"] = cam
            frame[f"{prefix}tumor_volume_fraction"] = 0.1
    return frame


def test_gradcam_focus_must_beat_both_controls_and_joins_holm(tmp_path):
    """A map that follows the lesion beats the shuffled-mask and random-init controls; a centre-heavy map that
    scores as high against another subject's mask does not, however far its enrichment is above 1."""
    run, manifest = _run(tmp_path)
    rng = np.random.default_rng(0)
    n = 60
    _cam_scores(manifest, rng.uniform(0.4, 0.6, n), rng.uniform(0.1, 0.3, n), shuffled=rng.uniform(0.1, 0.2, n),
                random_init=rng.uniform(0.05, 0.15, n)).to_csv(
        run / "artifacts" / "gradcam_subjects_byol_erm_idh.csv", index=False)
    centre = rng.uniform(0.3, 0.5, n)
    _cam_scores(manifest, centre, rng.uniform(0.0, 0.4, n), shuffled=centre + rng.normal(0, 0.02, n),
                random_init=rng.uniform(0.05, 0.15, n)).to_csv(
        run / "artifacts" / "gradcam_subjects_byol_dro_idh.csv", index=False)
    rows = pd.DataFrame(claim_rows.gradcam_rows(run, ["byol"], n_boot=500)).set_index("objective")
    erm = pd.read_csv(run / "artifacts" / "gradcam_subjects_byol_erm_idh.csv")
    assert rows.loc["erm", "value"] == pytest.approx(erm["cam_in_tumor"].mean() / 0.1)  # the lesion alone
    assert rows.loc["erm", "baseline"] == pytest.approx(
        max(erm["shuffled_mask_cam_in_tumor"].mean(), erm["random_init_cam_in_tumor"].mean()) / 0.1)
    assert rows.loc["erm", "p_value"] < 0.01 and rows.loc["erm", "ci_low"] > 0
    assert rows.loc["dro", "value"] > 3  # far above 1 ...
    assert rows.loc["dro", "ci_low"] < 0 < rows.loc["dro", "ci_high"]  # ... but not above its shuffled-mask control
    table = summary.all_verdicts(run, ["byol"], {}, n_boot=50)
    cam = table[table["claim_key"] == "gradcam_lesion"].set_index("objective")
    assert cam.loc["erm", "verdict"] == "lesion focus shown" and cam.loc["dro", "verdict"] == "lesion focus not shown"
    assert cam["adjusted_p"].notna().all()  # in the same Holm family as the comparisons


def test_gradcam_without_control_columns_tests_enrichment_above_one(tmp_path):
    run, manifest = _run(tmp_path)
    rng = np.random.default_rng(1)
    _cam_scores(manifest, rng.uniform(0.3, 0.6, 60), rng.uniform(0.1, 0.3, 60)).to_csv(
        run / "artifacts" / "gradcam_subjects_byol_erm_idh.csv", index=False)
    row = pd.DataFrame(claim_rows.gradcam_rows(run, ["byol"], n_boot=200)).iloc[0]
    assert row["baseline"] == 1.0 and "no control columns" in row["note"] and row["ci_low"] > 0


def test_gradcam_without_per_subject_scores_uses_the_table_ci(tmp_path):
    from nrfm.eval.gradcam import summarise_scores

    run, manifest = _run(tmp_path)
    (run / "metrics").mkdir()
    rows = []
    for objective, (tumor, ring) in (("erm", (0.5, 0.2)), ("dro", (0.05, 0.1))):
        scores = _cam_scores(manifest, np.full(20, tumor), np.full(20, ring)).assign(
            cam_in_core=tumor / 2, core_volume_fraction=0.05)
        rows += [{"backbone": "byol", "objective": objective, **row}
                 for row in summarise_scores(scores, ["Big", "Small"], n_boot=200)]
    pd.DataFrame(rows).to_csv(run / "metrics" / "gradcam.csv", index=False)
    cam = pd.DataFrame(claim_rows.gradcam_rows(run, ["byol"], n_boot=50, scenario="imported")).set_index("objective")
    assert cam.loc["erm", "verdict"] == "reproduced" and cam.loc["dro", "verdict"] == "not reproduced"
    assert cam.loc["erm", "value"] == pytest.approx(0.5 / 0.1) and "outside the Holm family" in cam.loc["erm", "note"]


def test_sweep_collection_and_spread(tmp_path):
    for seed in (0, 1, 2):
        folder = tmp_path / "runs" / f"r{seed}" / "metrics"
        folder.mkdir(parents=True)
        pd.DataFrame([{"backbone": "byol", "objective": "erm", "auc": 0.6 + 0.1 * seed}]).to_csv(
            folder / "molecular.csv", index=False)
    assert summary.find_runs(tmp_path) == [tmp_path / "runs" / f"r{s}" for s in (0, 1, 2)]
    frame = summary.collect_metrics(tmp_path, "molecular")
    assert sorted(frame["run"]) == ["r0", "r1", "r2"]
    spread = summary.spread(frame, ["backbone", "objective"], ["auc"]).iloc[0]
    assert spread["auc_mean"] == pytest.approx(0.7) and spread["auc_sd"] == pytest.approx(0.1)
    assert spread["runs"] == 3


def test_write_verdicts_replaces_the_file(tmp_path):
    run, _ = _run(tmp_path)
    scope = summary.SummaryScope(run, [run], False, None, "")
    table = summary.all_verdicts(run, ["byol"], {}, n_boot=50).assign(run="run")
    path = summary.write_verdicts(scope, table[["run", *claims.VERDICT_COLUMNS]])
    written = pd.read_csv(path)
    assert "run" not in written and {"scenario", "comparison", "objective", "adjusted_p"} <= set(written)
    assert len(written) == len(table)


def test_report_grid_shows_every_verdict_row(tmp_path):
    from nrfm.pipeline.report import _verdict_html

    run, _ = _run(tmp_path)
    (run / "metrics").mkdir()
    rows = [{"claim": "DRO raises mean AUC at the smallest site", "backbone": "byol", "comparison": c,
             "objective": "dro", "site": "Small", "metric": "auc", "scenario": "site-shift", "delta": d,
             "ci_low": d - 0.1, "ci_high": d + 0.1, "adjusted_p": p, "verdict": v, "note": ""}
            for c, d, p, v in (("dro-erm", 0.2, 0.001, "planted gain detected"),
                               ("dro-reweighted", 0.01, 0.4, "DRO not above reweighted"),
                               (claims.ATTRIBUTION, 0.2, 0.4, "planted gain not detected"))]
    rows += [{"claim": "Grad-CAM concentrates on tumour and peritumoral tissue", "backbone": "byol",
              "comparison": o, "objective": o, "site": "all", "metric": "cam lesion enrichment", "value": 2.0,
              "ci_low": 1.5, "ci_high": 2.5, "verdict": "lesion focus shown", "scenario": "site-shift"}
             for o in ("erm", "dro")]
    pd.DataFrame(rows).to_csv(run / "metrics" / "verdicts.csv", index=False)
    grid = _verdict_html(run).split("<details>")[0]
    for comparison in ("dro-erm", "dro-reweighted", claims.ATTRIBUTION, "· erm", "· dro"):
        assert comparison in grid, comparison
    assert grid.count("planted gain not detected") == 1 and grid.count("lesion focus shown") == 2
    assert grid.count("DRO not above reweighted") == 1
    assert "verdict-good" in grid and "verdict-bad" in grid and "site-shift" in grid


def test_a_degenerate_bootstrap_is_not_evaluable():
    manifest = _manifest()
    test = manifest[manifest["split"] == "test"].head(4)  # two patients, two exams each
    erm = _predictions(test, 0.0, endpoints=("idh",)).assign(y_true=[0.0, 0.0, 1.0, 1.0])
    dro = erm.assign(y_score=[0.0, 0.0, 1.0, 1.0])
    result = paired.paired_endpoint_mean(erm, dro, "auc", ("idh",), n_boot=200)
    assert result["ci_low"] == result["ci_high"]  # a single possible resample: zero width whatever the data
    claim = claims.CLAIMS[2]
    row = claim_rows._comparison_row(claim, "byol", "dro", "erm", "Small", result, 200, min_distinct=2880)
    assert np.isnan(row["p_value"]) and "distinct resamples" in row["note"]


@pytest.mark.parametrize("key", ["site_mixing", "auc_rare_site"])
def test_a_negligible_difference_is_not_a_gain(key):
    """Rule 3b: on the no-shift control a silhouette difference of 0.0003 with a CI excluding 0 was declared
    a gain; a difference below the claim's margin must not be, a difference well above it must."""
    claim = next(c for c in claims.CLAIMS if c.key == key)
    assert claim.margin > 0
    rng = np.random.default_rng(0)
    rows = []
    for backbone, gain in (("tiny", 0.03 * claim.margin), ("large", 5 * claim.margin)):
        deltas = claim.direction * (gain + rng.normal(0, 0.005 * claim.margin, 999))  # CIs exclude 0
        result = {"a": 0.5, "b": 0.5 + claim.direction * gain, "delta": claim.direction * gain,
                  "ci_low": float(np.percentile(deltas, 2.5)), "ci_high": float(np.percentile(deltas, 97.5)),
                  "n": 480, "deltas": deltas}
        assert bootstrap.p_greater_than_zero(claim.direction * deltas) < 0.01  # the margin-free test: "gain"
        for baseline in ("erm", "reweighted"):
            rows.append(claim_rows._comparison_row(claim, backbone, "dro", baseline, "all", result, 999))
    table = claims.decide(pd.DataFrame(rows), "no-shift").set_index(["backbone", "comparison"])
    assert (table["margin"] == claim.margin).all()
    assert table.loc[("tiny", "dro-erm"), "verdict"] == "no gain where none was planted"
    assert table.loc[("tiny", "dro-erm"), "p_value"] == 1.0
    assert table.loc[("large", "dro-erm"), "verdict"] == "gain reported where none was planted"
    assert table.loc[("large", claims.ATTRIBUTION), "gain_declared"]


def test_bootstrap_p_value_against_a_margin():
    deltas = np.linspace(-0.01, 0.03, 401)
    for margin in (0.0, 0.01, 0.02):
        assert bootstrap.p_greater_than_zero(deltas, margin=margin) == pytest.approx(
            (1 + sum(d <= margin for d in deltas)) / (len(deltas) + 1))


def test_the_planted_marker_claim_is_a_control_of_synthetic_cohorts_only(tmp_path):
    """auc_planted_marker tests the plant (EGFR at the smallest site) on both synthetic scenarios, never on an
    imported cohort, where nothing was planted."""
    from nrfm.synth.scenarios import CUE_ENDPOINT

    claim = next(c for c in claims.CLAIMS if c.key == "auc_planted_marker")
    assert claim.control_only and claim.endpoints == (CUE_ENDPOINT,) and claim.site == "smallest training site"
    for scenario, expected in (("site-shift", True), ("no-shift", True), (None, True)):
        run, _ = _run(tmp_path / str(scenario), scenario=scenario)
        rows = pd.DataFrame(claim_rows.molecular_rows(run, ["byol"], {}, n_boot=50))
        assert ("auc_planted_marker" in set(rows["claim_key"])) == expected
    run, _ = _run(tmp_path / "imported")
    (run / "data" / "SOURCE").unlink()  # no synthetic cohort behind the run
    assert claim_rows.cohort_scenario(run) == "imported"
    rows = pd.DataFrame(claim_rows.molecular_rows(run, ["byol"], {}, n_boot=50))
    assert "auc_planted_marker" not in set(rows["claim_key"]) and "auc_rare_site" in set(rows["claim_key"])


def test_site_mixing_of_one_shared_embedding_is_not_tested(tmp_path):
    """A frozen backbone gives every objective the same embedding: DRO cannot mix sites more than ERM there, so
    the row is not a test (no p-value, outside Holm's family, "not evaluable") and says why."""
    run, manifest = _run(tmp_path)
    emb = np.random.default_rng(0).normal(size=(len(manifest), 6))
    for objective in ("erm", "dro", "reweighted"):
        np.savez(run / "artifacts" / f"embeddings_byol_{objective}.npz",
                 subject_id=manifest["subject_id"].to_numpy(dtype=str), embedding=emb)
    rows = pd.DataFrame(claim_rows.site_mixing_rows(run, ["byol"], n_boot=200, pca_components=3))
    assert len(rows) == 2 and rows["p_value"].isna().all() and (rows["delta"] == 0).all()
    assert rows["note"].str.contains("share one embedding").all()
    other = claim_rows._comparison_row(claims.CLAIMS[2], "byol", "dro", "erm", "Small",
                                       {"a": 0.5, "b": 0.6, "delta": 0.1, "ci_low": 0.05, "ci_high": 0.15, "n": 50,
                                        "deltas": np.full(999, 0.1)}, 999)
    table = claims.decide(pd.concat([rows, pd.DataFrame([other])], ignore_index=True), "site-shift")
    mixing = table[(table["claim_key"] == "site_mixing") & (table["comparison"] != claims.ATTRIBUTION)]
    assert (mixing["verdict"] == "not evaluable").all()
    # the untested rows do not count in the family: the one real test keeps its own p (m = 1)
    real = table[(table["claim_key"] == claims.CLAIMS[2].key) & (table["comparison"] == "dro-erm")].iloc[0]
    assert real["adjusted_p"] == pytest.approx(real["p_value"])
