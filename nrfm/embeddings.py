"""Site invariance of embeddings: PCA-silhouette of site labels and a cross-validated site probe.

NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416, Sec. "Site invariance") argues that group DRO fine-tuning
makes embeddings mix acquisition sites more than ERM does. Two numbers per backbone and stage (pretrained, ERM,
DRO), both on the TEST subjects:

* **PCA-silhouette** (the paper's measure): the silhouette of the site labels in the leading principal
  components. The PCA is fitted on the TRAINING subjects only (a statistic of held-out data must not shape its
  own projection); the test subjects are projected. Range [-1, 1]; lower = sites mix more, about 0 = no site
  structure.
* **Site probe**: out-of-fold predictions of a standardized multinomial logistic regression predicting site
  from the embedding (stratified K-fold, scaler fitted inside each fold); balanced accuracy, chance =
  1 / number of sites. Near chance = the embedding carries little site information a linear model can read.

Bootstrap CIs (:mod:`nrfm.bootstrap`) resample test patients within site (so every resample keeps every site):
for the silhouette the per-subject silhouette widths are resampled (the projection is fixed), for the probe the
out-of-fold predictions are resampled (the probe is not refitted). Both CIs therefore describe the evaluation sample's
variability, not that of the PCA or probe fit.

Artifacts read: ``artifacts/embeddings_{method}_{stage}.npz`` with ``subject_id`` (N,) and ``embedding``
(N, D) for every manifest row, written by :mod:`nrfm.finetune`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from nrfm.errors import DataError, LeakageError, RunError

STAGES = ("pretrained", "erm", "dro")
SITE_INVARIANCE_COLUMNS = ("backbone", "stage", "pca_silhouette_site", "site_probe_bacc")
EXTRA_COLUMNS = ("pca_silhouette_ci_low", "pca_silhouette_ci_high", "site_probe_bacc_ci_low",
                 "site_probe_bacc_ci_high", "site_probe_chance", "n", "n_sites", "pca_components", "note")


# ---- artifacts ------------------------------------------------------------------------------------------------
def embeddings_path(ctx, method: str, stage: str):
    """Path of the embeddings artifact of ``method`` at ``stage`` (pretrained, erm, dro)."""
    if stage not in STAGES:
        raise ValueError(f"unknown embedding stage {stage!r}; valid: {list(STAGES)}")
    return ctx.artifacts_dir / f"embeddings_{method}_{stage}.npz"


def load_embeddings(ctx, method: str, stage: str) -> np.ndarray:
    """Embeddings of every manifest row, in manifest order.

    Returns:
        float64 array (n_manifest_rows, D).

    Raises:
        RunError: the artifact is missing (names the stage that writes it).
        DataError: the file is unreadable, or lacks a manifest subject, or has non-finite values.
    """
    path = embeddings_path(ctx, method, stage)
    if not path.is_file():
        raise RunError(f"{path}: embeddings not found; run fine-tuning for backbone {method!r} first "
                       f"(nrfm.finetune writes the {stage} embeddings)")
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = np.asarray(data["subject_id"]).astype(str)
            emb = np.asarray(data["embedding"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as err:
        raise DataError(f"{path}: unreadable embeddings file (need arrays subject_id (str, not object) and "
                        f"embedding): {err}") from None
    if emb.ndim != 2 or emb.shape[0] != ids.shape[0]:
        raise DataError(f"{path}: embedding has shape {emb.shape}, expected ({ids.shape[0]}, D)")
    position = {sid: i for i, sid in enumerate(ids)}
    wanted = ctx.manifest["subject_id"].astype(str).tolist()
    missing = [sid for sid in wanted if sid not in position]
    if missing:
        raise DataError(f"{path}: subject_id {missing[0]!r} of the manifest is missing "
                        f"({len(missing)} missing in all)")
    out = emb[[position[sid] for sid in wanted]]
    if not np.isfinite(out).all():
        row = int(np.where(~np.isfinite(out).all(axis=1))[0][0])
        raise DataError(f"{path}: non-finite embedding for subject_id {wanted[row]!r}")
    return out


def split_indices(manifest: pd.DataFrame, fit_split: str = "train", eval_split: str = "test"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the fitting and evaluation subjects; raises LeakageError if a patient is in both."""
    fit = np.where(manifest["split"].to_numpy() == fit_split)[0]
    ev = np.where(manifest["split"].to_numpy() == eval_split)[0]
    shared = set(manifest["patient_id"].iloc[fit]) & set(manifest["patient_id"].iloc[ev])
    if shared:
        raise LeakageError(f"manifest: patient_id {sorted(shared)[0]!r} is in both {fit_split} and {eval_split}")
    return fit, ev


# ---- statistics -----------------------------------------------------------------------------------------------
def stratified_bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int = 0,
                            strata: np.ndarray | None = None, alpha: float = 0.05,
                            clusters: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(indices)``, resampling within strata (:func:`nrfm.bootstrap.draw`).

    Site statistics need every site in every resample (a resample without a site changes what the statistic
    means), hence site strata; ``clusters`` (patient_id) keeps a patient's exams together. For statistics
    nrfm.bootstrap computes for all resamples at once, :func:`site_invariance_row` calls it directly.

    Args:
        statistic: maps an index array drawn with replacement to a number; NaN = undefined resample.
        n: number of subjects.
        n_boot: resamples.
        strata: optional labels (n,): each stratum keeps its number of clusters.
        alpha: 1 - coverage.
        clusters: optional patient labels (n,).

    Returns:
        (low, high); NaN, NaN when a resample is undefined.
    """
    from nrfm import bootstrap

    counts = bootstrap.draw(n, n_boot, seed, clusters=clusters, strata=strata)
    values = np.array([statistic(bootstrap.indices(row)) for row in counts], dtype=float)
    return bootstrap.percentile_ci(values, alpha)


def pca_silhouette(train_embedding: np.ndarray, eval_embedding: np.ndarray, eval_sites: Sequence[str],
                   n_components: int = 10) -> tuple[float, np.ndarray, int]:
    """Silhouette of site labels on the leading PCs (PCA fitted on the training embeddings only).

    Args:
        train_embedding: (n_train, D) embeddings that fit the PCA.
        eval_embedding: (n_eval, D) embeddings that are projected and scored.
        eval_sites: (n_eval,) site labels.
        n_components: leading components (capped at min(n_train, D)).

    Returns:
        (silhouette score, per-subject silhouette widths (n_eval,), components used).

    Raises:
        ValueError: fewer than 2 sites, or every subject its own site.
    """
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_samples

    sites = np.asarray(eval_sites).astype(str)
    n_sites = len(np.unique(sites))
    if not 2 <= n_sites <= len(sites) - 1:
        raise ValueError(f"silhouette needs 2 <= number of sites <= n - 1, got {n_sites} sites for "
                         f"{len(sites)} subjects")
    k = int(min(n_components, train_embedding.shape[0], train_embedding.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(train_embedding)
    widths = silhouette_samples(pca.transform(eval_embedding), sites)
    return float(widths.mean()), widths, k


def site_probe_predictions(embedding: np.ndarray, sites: Sequence[str], n_folds: int = 5,
                           seed: int = 0) -> np.ndarray:
    """Out-of-fold site predictions of a standardized logistic regression.

    Args:
        embedding: (n, D).
        sites: (n,) site labels.
        n_folds: stratified folds, capped by the smallest site's count.

    Returns:
        (n,) predicted site labels.

    Raises:
        ValueError: a site with fewer than 2 subjects, or fewer than 2 sites.
    """
    from nrfm.monitor import cross_validated_probe

    sites = np.asarray(sites).astype(str)
    labels, counts = np.unique(sites, return_counts=True)
    if len(labels) < 2 or counts.min() < 2:
        raise ValueError(f"site probe needs >= 2 sites with >= 2 subjects each, got counts "
                         f"{dict(zip(labels.tolist(), counts.tolist()))}")
    # scikit-learn's default logistic regression (C = 1, no class weights); the scaler is fitted inside each fold
    return cross_validated_probe(embedding, sites, c=1.0, folds=n_folds, seed=seed, class_weight=None)


def site_probe_balanced_accuracy(embedding: np.ndarray, sites: Sequence[str], n_folds: int = 5,
                                 seed: int = 0) -> float:
    """Balanced accuracy of :func:`site_probe_predictions` (chance = 1 / number of sites)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(np.asarray(sites).astype(str),
                                         site_probe_predictions(embedding, sites, n_folds, seed)))


def site_invariance_row(train_embedding: np.ndarray, test_embedding: np.ndarray, test_sites: Sequence[str],
                        n_components: int, n_folds: int, n_boot: int, seed: int = 0,
                        test_patients: Sequence[str] | None = None) -> dict:
    """Both site-invariance numbers with bootstrap CIs for one embedding (see the module docstring).

    The CIs come from :mod:`nrfm.bootstrap`: test patients drawn whole (``test_patients``) within site strata.
    """
    from sklearn.metrics import balanced_accuracy_score

    from nrfm import bootstrap

    sites = np.asarray(test_sites).astype(str)
    n_sites = len(np.unique(sites))
    row = {"pca_silhouette_site": np.nan, "site_probe_bacc": np.nan, "pca_silhouette_ci_low": np.nan,
           "pca_silhouette_ci_high": np.nan, "site_probe_bacc_ci_low": np.nan, "site_probe_bacc_ci_high": np.nan,
           "site_probe_chance": 1.0 / max(n_sites, 1), "n": len(sites), "n_sites": n_sites, "pca_components": np.nan}
    notes = []
    try:
        score, widths, k = pca_silhouette(train_embedding, test_embedding, sites, n_components)
        row.update(pca_silhouette_site=score, pca_components=k)
        counts = bootstrap.draw(len(sites), n_boot, seed, clusters=test_patients, strata=sites)
        _, low, high = bootstrap.interval(lambda c: bootstrap.mean(widths, c), counts, len(sites))
        row.update(pca_silhouette_ci_low=low, pca_silhouette_ci_high=high)
    except ValueError as err:
        notes.append(f"no PCA-silhouette: {err}")
    try:
        pred = site_probe_predictions(test_embedding, sites, n_folds, seed)
        row["site_probe_bacc"] = float(balanced_accuracy_score(sites, pred))
        counts = bootstrap.draw(len(sites), n_boot, seed, clusters=test_patients, strata=sites)
        _, low, high = bootstrap.interval(lambda c: bootstrap.multiclass_balanced_accuracy(sites, pred, c), counts,
                                          len(sites))
        row.update(site_probe_bacc_ci_low=low, site_probe_bacc_ci_high=high)
    except ValueError as err:
        notes.append(f"no site probe: {err}")
    for metric, low in (("pca_silhouette_site", "pca_silhouette_ci_low"),
                        ("site_probe_bacc", "site_probe_bacc_ci_low")):
        if np.isfinite(row[metric]) and not np.isfinite(row[low]):
            notes.append(f"no CI for {metric}: some bootstrap resample was undefined")
    row["note"] = "; ".join(notes)
    return row


# ---- table and stage ------------------------------------------------------------------------------------------
def available_stages(ctx) -> tuple[str, ...]:
    """Stages this run produces: pretrained plus the configured fine-tuning objectives among erm, dro."""
    return ("pretrained",) + tuple(s for s in ("erm", "dro") if s in ctx.config.finetuning.objectives)


def site_invariance_table(ctx, methods: Sequence[str], stages: Sequence[str] | None = None,
                          progress: bool = True) -> pd.DataFrame:
    """One row per backbone and stage: PCA-silhouette and site-probe balanced accuracy on TEST subjects.

    Args:
        ctx: the run context (manifest with splits, artifacts with embeddings).
        methods: backbones (SSL method names).
        stages: default :func:`available_stages`.

    Returns:
        DataFrame with columns backbone, stage, pca_silhouette_site, site_probe_bacc, then the CI columns,
        site_probe_chance, n, n_sites, pca_components and note.
    """
    cfg = ctx.config.analyses
    stages = tuple(stages or available_stages(ctx))
    train_idx, test_idx = split_indices(ctx.manifest)
    sites = ctx.manifest["site"].astype(str).to_numpy()
    patients = ctx.manifest["patient_id"].astype(str).to_numpy()
    rows = []
    for method in tqdm(list(methods), desc="site invariance", disable=not progress):
        for stage in stages:
            emb = load_embeddings(ctx, method, stage)
            row = site_invariance_row(emb[train_idx], emb[test_idx], sites[test_idx], cfg.embedding_pca_components,
                                      cfg.site_probe_folds, cfg.bootstrap, seed=ctx.config.seed,
                                      test_patients=patients[test_idx])
            rows.append({"backbone": method, "stage": stage, **row})
    return pd.DataFrame(rows, columns=list(SITE_INVARIANCE_COLUMNS + EXTRA_COLUMNS))


def run_site_invariance_stage(ctx, methods: Sequence[str], progress: bool = True) -> pd.DataFrame:
    """Compute :func:`site_invariance_table` and merge it into ``metrics/site_invariance.csv``."""
    table = site_invariance_table(ctx, methods, progress=progress)
    ctx.write_metrics("site_invariance", table, ["backbone", "stage"])
    return table
