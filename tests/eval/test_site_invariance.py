"""Site invariance: PCA-silhouette, site probe, the table and the views, on planted embeddings."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nrfm.config import Config
from nrfm.pipeline.context import RunContext
from nrfm.eval.site_invariance import (intensity_features, load_embeddings, pca_silhouette, run_site_invariance_stage,
                             site_invariance_row, site_probe_balanced_accuracy, stratified_bootstrap_ci)
from nrfm.errors import DataError, LeakageError, RunError

SITES = ("A", "B", "C")


def planted(n_per_site: int = 40, dim: int = 16, offset: float = 4.0, seed: int = 0):
    """Embeddings with a site-specific mean shift of size ``offset`` (0 = no site signal)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(SITES), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sites = np.repeat(SITES, n_per_site)
    emb = rng.normal(size=(len(sites), dim)) + offset * centres[np.searchsorted(SITES, sites)]
    return emb, sites


def make_ctx(tmp_path, n_per_site: int = 30, offsets=None, bootstrap: int = 50) -> RunContext:
    """A run with a manifest (half train, quarter val, quarter test per site) and embeddings artifacts."""
    cfg = Config()
    cfg = cfg.replace(analyses=cfg.analyses.__class__(bootstrap=bootstrap, embedding_pca_components=5,
                                                      site_reference_rows=False))
    rows = []
    for s in SITES:
        for i in range(n_per_site):
            split = "train" if i % 4 < 2 else ("val" if i % 4 == 2 else "test")
            rows.append({"subject_id": f"{s}{i:03d}", "patient_id": f"P{s}{i:03d}", "site": s, "split": split,
                         "idh": float(i % 2) if i % 5 else np.nan})
    manifest = pd.DataFrame(rows)
    ctx = RunContext(config=cfg, run_dir=tmp_path, manifest=manifest, cohort_dir=tmp_path)
    offsets = offsets or {"pretrained": 5.0, "erm": 2.0, "dro": 0.0}
    for stage, offset in offsets.items():
        emb, _ = planted(n_per_site, offset=offset, seed=1)
        # reverse the rows so the loader has to align them to manifest order by subject_id
        np.savez(ctx.artifacts_dir / f"embeddings_byol_{stage}.npz",
                 subject_id=manifest["subject_id"].to_numpy().astype(str)[::-1],
                 embedding=emb[::-1].astype(np.float32))
    return ctx


def test_site_probe_near_perfect_with_offset_and_chance_without():
    emb, sites = planted(offset=6.0)
    assert site_probe_balanced_accuracy(emb, sites) > 0.95
    emb, sites = planted(offset=0.0)
    assert abs(site_probe_balanced_accuracy(emb, sites) - 1 / 3) < 0.15


def test_pca_silhouette_high_with_offset_and_zero_without():
    emb, sites = planted(offset=8.0, seed=2)
    score, widths, k = pca_silhouette(emb[::2], emb[1::2], sites[1::2], n_components=10)
    assert score > 0.5 and k == 10 and widths.shape == (60,)
    emb, sites = planted(offset=0.0, seed=2)
    score, _, _ = pca_silhouette(emb[::2], emb[1::2], sites[1::2], n_components=10)
    assert abs(score) < 0.1


def test_pca_is_fitted_on_training_embeddings_only():
    # training embeddings vary only along axes 0-1; the test set's site offset lives on axis 5, which a PCA
    # fitted on the training subjects cannot see, but a PCA fitted on the test subjects would.
    rng = np.random.default_rng(0)
    train = np.zeros((60, 8))
    train[:, :2] = rng.normal(size=(60, 2)) * 5
    sites = np.repeat(["A", "B"], 30)
    test = rng.normal(size=(60, 8)) * 0.1
    test[:, 5] += np.where(sites == "A", 10.0, -10.0)
    leaky, _, _ = pca_silhouette(test, test, sites, n_components=2)
    guarded, _, _ = pca_silhouette(train, test, sites, n_components=2)
    assert leaky > 0.9 and abs(guarded) < 0.1


def test_stratified_bootstrap_ci_matches_straight_line_copy():
    x = np.random.default_rng(3).normal(size=50)
    low, high = stratified_bootstrap_ci(lambda i: float(x[i].mean()), 50, 200, seed=7)
    rng = np.random.default_rng(7)
    means = [x[rng.choice(np.arange(50), size=50, replace=True)].mean() for _ in range(200)]
    assert (low, high) == pytest.approx((np.percentile(means, 2.5), np.percentile(means, 97.5)))
    # within strata every resample keeps each stratum's size
    strata = np.repeat(["A", "B"], [10, 40])
    seen = []
    stratified_bootstrap_ci(lambda i: seen.append(np.sum(strata[i] == "A")) or 0.0, 50, 20, strata=strata)
    assert seen == [10] * 20


def test_stage_writes_table_with_cis(tmp_path):
    ctx = make_ctx(tmp_path)
    table = run_site_invariance_stage(ctx, ["byol"], progress=False)
    written = pd.read_csv(ctx.metrics_dir / "site_invariance.csv")
    assert list(written.columns[:4]) == ["backbone", "stage", "pca_silhouette_site", "site_probe_bacc"]
    assert sorted(written["stage"]) == ["dro", "erm", "pretrained"] and len(written) == 3
    by = table.set_index("stage")
    assert by.loc["pretrained", "site_probe_bacc"] > 0.9
    assert by.loc["pretrained", "pca_silhouette_site"] > by.loc["dro", "pca_silhouette_site"]
    assert abs(by.loc["dro", "pca_silhouette_site"]) < 0.15
    assert (by["n"] == 3 * 7).all()  # 7 test subjects per site (i % 4 == 3 for i < 30)
    for metric, ci in (("pca_silhouette_site", "pca_silhouette"), ("site_probe_bacc", "site_probe_bacc")):
        assert (by[f"{ci}_ci_low"] <= by[metric] + 1e-9).all() and (by[metric] <= by[f"{ci}_ci_high"] + 1e-9).all()
    assert by.loc["pretrained", "site_probe_chance"] == pytest.approx(1 / 3)


def test_embeddings_are_aligned_to_manifest_order(tmp_path):
    ctx = make_ctx(tmp_path)
    with np.load(ctx.artifacts_dir / "embeddings_byol_erm.npz") as data:
        raw = dict(zip(data["subject_id"], data["embedding"]))
    emb = load_embeddings(ctx, "byol", "erm")
    assert np.allclose(emb[0], raw[ctx.manifest["subject_id"].iloc[0]])


def test_bad_artifacts_raise_clear_errors(tmp_path):
    ctx = make_ctx(tmp_path, offsets={"pretrained": 1.0})
    with pytest.raises(RunError, match="embeddings_byol_erm.npz"):
        load_embeddings(ctx, "byol", "erm")
    np.savez(ctx.artifacts_dir / "embeddings_byol_erm.npz", subject_id=np.array(["A000"]),
             embedding=np.zeros((1, 4), np.float32))
    with pytest.raises(DataError, match="subject_id 'A001'"):
        load_embeddings(ctx, "byol", "erm")
    with pytest.raises(ValueError, match="valid"):
        load_embeddings(ctx, "byol", "reweighted")


def test_patient_in_train_and_test_is_a_leak(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.manifest.loc[ctx.manifest.index[3], "patient_id"] = ctx.manifest["patient_id"].iloc[0]
    with pytest.raises(LeakageError, match="PA000"):
        run_site_invariance_stage(ctx, ["byol"], progress=False)


def test_tiny_sites_give_a_note_not_a_crash():
    emb, sites = planted(n_per_site=1, offset=1.0)
    row = site_invariance_row(emb, emb, sites, n_components=2, n_folds=5, n_boot=20)
    assert np.isnan(row["site_probe_bacc"]) and "no site probe" in row["note"]
    assert np.isnan(row["pca_silhouette_site"]) and "no PCA-silhouette" in row["note"]


def test_views_and_summary_figure(tmp_path):
    from nrfm.plots.site_invariance import (configured_projections, embedding_projection, plot_embedding_views,
                                       plot_site_invariance)

    ctx = make_ctx(tmp_path, n_per_site=12)
    fig = plot_embedding_views(ctx, "byol", projection="pca", marker="idh")
    assert len(fig.axes) == 6 and (ctx.figures_dir / "embeddings_pca_byol.png").is_file()
    assert configured_projections(ctx) == ("pca", "umap")
    emb, _ = planted(n_per_site=5)
    assert embedding_projection(emb, emb, "tsne").shape == (15, 2)
    xy = embedding_projection(emb, emb, "umap", seed=0, n_neighbors=15)
    assert xy.shape == (15, 2) and np.allclose(xy, embedding_projection(emb, emb, "umap", seed=0))
    with pytest.raises(ValueError, match="valid"):
        embedding_projection(emb, emb, "isomap")
    table = run_site_invariance_stage(ctx, ["byol"], progress=False)
    plot_site_invariance(ctx, table)
    assert (ctx.figures_dir / "site_invariance.png").is_file()


def test_site_probe_folds_are_grouped_by_patient():
    # two identical exams per patient, random features and site labels drawn per patient: ungrouped folds put one
    # exam in training and its twin in the held-out fold, so the probe "reads" the site by memory; grouped folds
    # cannot, and stay at chance
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 2).astype(str)
    emb = np.repeat(rng.normal(size=(60, 80)), 2, axis=0)
    sites = np.repeat(rng.choice(["A", "B"], size=60), 2)
    leaky = site_probe_balanced_accuracy(emb, sites)
    grouped = site_probe_balanced_accuracy(emb, sites, groups=patients)
    assert leaky > 0.8 and abs(grouped - 0.5) < 0.2


def test_casemix_columns_remove_site_separation_that_comes_from_case_mix():
    # the embedding encodes IDH only; site A is 80% IDH-mutant, site B 10%: all-subject numbers see "site",
    # IDH-wildtype-only numbers do not
    rng = np.random.default_rng(1)
    sites = np.repeat(["A", "B"], 100)
    idh = np.where(sites == "A", rng.uniform(size=200) < 0.8, rng.uniform(size=200) < 0.1).astype(float)
    emb = rng.normal(size=(200, 8))
    emb[:, 0] += 4 * idh
    row = site_invariance_row(emb, emb, sites, n_components=4, n_folds=5, n_boot=20, casemix=idh == 0,
                              casemix_label="idh=0")
    assert row["site_probe_bacc"] > 0.75 and abs(row["site_probe_bacc_casemix"] - 0.5) < 0.15
    assert row["pca_silhouette_site"] > row["pca_silhouette_site_casemix"] + 0.05
    assert row["n_casemix"] == int((idh == 0).sum()) and row["casemix"] == "idh=0"


def test_reference_rows_show_the_scale(tmp_path):
    # raw volumes with a per-site gain (removed by z-scoring) and site-specific voxel spacing: the positive control
    # reads the site, the preprocessing baseline (z-scored volumes, identical across sites) does not
    import dataclasses

    import nibabel as nib
    import torch

    ctx = make_ctx(tmp_path, n_per_site=12, bootstrap=20)
    rng = np.random.default_rng(2)
    items, paths = [], {c: [] for c in ("t1", "t1c", "t2", "flair")}
    for i, site in enumerate(ctx.manifest["site"]):
        gain, zoom = {"A": (1.0, 1.0), "B": (3.0, 1.2), "C": (9.0, 0.9)}[site]
        brain = np.zeros((8, 8, 8), bool)
        brain[1:7, 1:7, 1:7] = True
        for c in paths:
            data = np.where(brain, gain * (100 + 10 * rng.normal(size=brain.shape)), 0).astype(np.float32)
            path = tmp_path / f"{i}_{c}.nii.gz"
            nib.save(nib.Nifti1Image(data, np.diag([zoom, zoom, zoom, 1.0])), str(path))
            paths[c].append(str(path))
        image = np.where(brain, rng.normal(size=(4, 8, 8, 8)), 0).astype(np.float32)
        items.append({"image": torch.from_numpy(image), "seg": torch.zeros(1, 8, 8, 8, dtype=torch.uint8),
                      "brain": torch.from_numpy(brain[None]), "index": i})
    ctx.manifest = ctx.manifest.assign(**paths)
    ctx._dataset = items
    ctx.config = ctx.config.replace(analyses=dataclasses.replace(ctx.config.analyses, site_reference_rows=True))
    table = run_site_invariance_stage(ctx, ["byol"], progress=False)
    ref = table[table["backbone"] == "none"].set_index("stage")
    assert sorted(ref.index) == ["positive_control", "preprocessing_baseline"]
    assert ref.loc["positive_control", "site_probe_bacc"] > 0.9
    assert ref.loc["preprocessing_baseline", "site_probe_bacc"] < 0.7
    assert ref.loc["positive_control", "pca_silhouette_site"] > ref.loc["preprocessing_baseline", "pca_silhouette_site"]
    from nrfm.plots.site_invariance import plot_site_invariance

    plot_site_invariance(ctx, table)


def test_intensity_features_inside_the_mask():
    image = np.zeros((2, 4, 4, 4))
    image[:, 1:3, 1:3, 1:3] = [[[[1.0]]], [[[5.0]]]]
    feats = intensity_features(image)
    assert feats.shape == (10,) and feats[0] == 1.0 and feats[1] == 0.0 and feats[5] == 5.0


def test_site_numbers_cis_are_the_loop_over_resamples():
    """The silhouette and site-probe CIs are scored for all resamples at once; they equal the loop of
    stratified_bootstrap_ci with sklearn's balanced accuracy and a plain mean on the same resamples."""
    from sklearn.metrics import balanced_accuracy_score

    from nrfm.eval.site_invariance import _site_numbers, pca_silhouette, site_probe_predictions, stratified_bootstrap_ci

    rng = np.random.default_rng(0)
    sites = np.repeat(np.array(["A", "B", "C"]), 20)
    groups = np.array([f"p{i // 2}" for i in range(60)])  # two exams per patient
    train = rng.normal(size=(40, 6))
    test = rng.normal(size=(60, 6)) + (sites == "A")[:, None] * 0.8
    row, _ = _site_numbers(train, test, sites, groups, 3, 3, 200, 0)
    _, widths, _ = pca_silhouette(train, test, sites, 3)
    low, high = stratified_bootstrap_ci(lambda i: float(widths[i].mean()), 60, 200, 0, strata=sites, clusters=groups)
    assert (row["pca_silhouette_ci_low"], row["pca_silhouette_ci_high"]) == pytest.approx((low, high))
    pred = site_probe_predictions(test, sites, 3, 0, groups)
    low, high = stratified_bootstrap_ci(lambda i: float(balanced_accuracy_score(sites[i], pred[i])), 60, 200, 0,
                                        strata=sites, clusters=groups)
    assert (row["site_probe_bacc_ci_low"], row["site_probe_bacc_ci_high"]) == pytest.approx((low, high))
