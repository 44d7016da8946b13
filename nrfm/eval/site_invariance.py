"""Site invariance of embeddings: PCA-silhouette of site labels and a cross-validated site probe.

NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416, Sec. "Site invariance") argues that group DRO fine-tuning
makes embeddings mix acquisition sites more than ERM does. Two numbers per backbone and stage (pretrained, ERM,
DRO), both on the TEST subjects:

* **PCA-silhouette** (the paper's measure): the silhouette of the site labels in the leading principal
  components. The PCA is fitted on the TRAINING subjects only (a statistic of held-out data must not shape its
  own projection); the test subjects are projected. Range [-1, 1]; lower = sites mix more, about 0 = no site
  structure.
* **Site probe**: out-of-fold predictions of a standardized multinomial logistic regression predicting site
  from the embedding (stratified K-fold grouped by patient, scaler fitted inside each fold); balanced accuracy,
  chance = 1 / number of sites. Near chance = the embedding carries little site information a linear model can
  read.

**Fixed case-mix** (``*_casemix`` columns): sites differ in what they treat (a GBM-only site against a mixed-grade
one), so an embedding that encodes tumour type separates sites through case-mix alone. Both numbers are therefore
also computed on the test subjects with ``analyses.site_casemix_endpoint == analyses.site_casemix_value``
(IDH-wildtype by default), with the same PCA projection; ``n_casemix`` of them.

**Reference rows** (``backbone = "none"``): a reader needs the scale of these numbers, so two rows computed from
image intensities rather than an embedding (:func:`intensity_features`: per contrast, mean, SD and the 5th, 50th and
95th percentiles inside the brain mask):

* ``stage = preprocessing_baseline``: the features of the PREPROCESSED volumes (after resampling and z-scoring).
  Whatever site signal survives preprocessing (noise, blur, contrast) is here; an embedding at or below this row
  added no site information of its own.
* ``stage = positive_control``: the same features of the RAW volumes (before z-scoring, non-zero voxels) plus the
  native voxel spacing read from the NIfTI header; scanner gain, offset and resolution carry site, so this row
  shows what a clearly site-coded representation scores.

Bootstrap CIs (:mod:`nrfm.eval.bootstrap`) resample test patients within site (so every resample keeps every site):
for the silhouette the per-subject silhouette widths are resampled (the projection is fixed), for the probe the
out-of-fold predictions are resampled (the probe is not refitted). Both CIs therefore describe the evaluation sample's
variability, not that of the PCA or probe fit.

Artifacts read: ``artifacts/embeddings_{method}_{stage}.npz`` with ``subject_id`` (N,) and ``embedding``
(N, D) for every manifest row, written by :mod:`nrfm.train.finetune`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from nrfm.errors import DataError, LeakageError, RunError
from nrfm.eval import bootstrap
from nrfm.train.monitor import _folds, cross_validated_probe

STAGES = ("pretrained", "erm", "dro")
REFERENCE_STAGES = ("preprocessing_baseline", "positive_control")  # rows with backbone "none"
REFERENCE_BACKBONE = "none"
SITE_INVARIANCE_COLUMNS = ("backbone", "stage", "pca_silhouette_site", "site_probe_bacc")
EXTRA_COLUMNS = ("pca_silhouette_ci_low", "pca_silhouette_ci_high", "site_probe_bacc_ci_low",
                 "site_probe_bacc_ci_high", "site_probe_chance", "n", "n_sites", "pca_components",
                 "pca_silhouette_site_casemix", "pca_silhouette_casemix_ci_low", "pca_silhouette_casemix_ci_high",
                 "site_probe_bacc_casemix", "site_probe_bacc_casemix_ci_low", "site_probe_bacc_casemix_ci_high",
                 "n_casemix", "n_sites_casemix", "casemix", "note")
INTENSITY_PERCENTILES = (5, 50, 95)


# ---- artifacts ------------------------------------------------------------------------------------------------
def embeddings_path(ctx, method: str, stage: str):
    """Path of the embeddings artifact of ``method`` at ``stage`` (pretrained, erm, dro)."""
    if stage not in STAGES:
        raise ValueError(f"unknown embedding stage {stage!r}; valid: {list(STAGES)}")
    return ctx.layout.embeddings(method, stage)


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
                       f"(nrfm.train.finetune writes the {stage} embeddings)")
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
    """Percentile bootstrap CI of ``statistic(indices)``, resampling within strata (:func:`nrfm.eval.bootstrap.draw`).

    Site statistics need every site in every resample (a resample without a site changes what the statistic
    means), hence site strata; ``clusters`` (patient_id) keeps a patient's exams together. For statistics
    nrfm.eval.bootstrap computes for all resamples at once, :func:`site_invariance_row` calls it directly.

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
                           seed: int = 0, groups: Sequence[str] | None = None) -> np.ndarray:
    """Out-of-fold site predictions of a standardized logistic regression.

    Args:
        embedding: (n, D).
        sites: (n,) site labels.
        n_folds: stratified folds, capped by the smallest site's count (of patients, with ``groups``).
        groups: (n,) patient ids: folds grouped by patient (:func:`nrfm.train.monitor.cross_validated_probe`).

    Returns:
        (n,) predicted site labels.

    Raises:
        ValueError: a site with fewer than 2 subjects (patients), or fewer than 2 sites.
    """
    sites = np.asarray(sites).astype(str)
    labels, counts = np.unique(sites, return_counts=True)
    if len(labels) < 2 or counts.min() < 2 or _folds(sites, n_folds, groups) < 2:
        raise ValueError(f"site probe needs >= 2 sites with >= 2 subjects (patients) each, got counts "
                         f"{dict(zip(labels.tolist(), counts.tolist()))}")
    # scikit-learn's default logistic regression (C = 1, no class weights); the scaler is fitted inside each fold
    return cross_validated_probe(embedding, sites, c=1.0, folds=n_folds, seed=seed, class_weight=None,
                                 groups=None if groups is None else np.asarray(groups).astype(str))


def site_probe_balanced_accuracy(embedding: np.ndarray, sites: Sequence[str], n_folds: int = 5,
                                 seed: int = 0, groups: Sequence[str] | None = None) -> float:
    """Balanced accuracy of :func:`site_probe_predictions` (chance = 1 / number of sites)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(np.asarray(sites).astype(str),
                                         site_probe_predictions(embedding, sites, n_folds, seed, groups)))


def _site_numbers(train_embedding: np.ndarray, test_embedding: np.ndarray, sites: np.ndarray,
                  groups: np.ndarray | None, n_components: int, n_folds: int, n_boot: int, seed: int,
                  suffix: str = "") -> tuple[dict, list[str]]:
    """PCA-silhouette and site probe with CIs; keys carry ``suffix`` (e.g. ``_casemix``)."""
    from sklearn.metrics import balanced_accuracy_score

    sil, probe = f"pca_silhouette_site{suffix}", f"site_probe_bacc{suffix}"
    sil_ci, probe_ci = f"pca_silhouette{suffix}", f"site_probe_bacc{suffix}"
    row = {sil: np.nan, probe: np.nan, f"{sil_ci}_ci_low": np.nan, f"{sil_ci}_ci_high": np.nan,
           f"{probe_ci}_ci_low": np.nan, f"{probe_ci}_ci_high": np.nan}
    notes = []
    label = f" ({suffix.strip('_')})" if suffix else ""
    # the resamples of stratified_bootstrap_ci (patients whole, every site kept), drawn once and scored for all of
    # them at once by both statistics (the same numbers as the loop, tested)
    counts = bootstrap.draw(len(sites), n_boot, seed, clusters=groups, strata=sites)
    try:
        score, widths, k = pca_silhouette(train_embedding, test_embedding, sites, n_components)
        row.update({sil: score, "pca_components": k})
        low, high = bootstrap.percentile_ci(bootstrap.mean(widths, counts))
        row.update({f"{sil_ci}_ci_low": low, f"{sil_ci}_ci_high": high})
    except ValueError as err:
        notes.append(f"no PCA-silhouette{label}: {err}")
    try:
        pred = site_probe_predictions(test_embedding, sites, n_folds, seed, groups)
        row[probe] = float(balanced_accuracy_score(sites, pred))
        low, high = bootstrap.percentile_ci(bootstrap.multiclass_balanced_accuracy(sites, pred, counts))
        row.update({f"{probe_ci}_ci_low": low, f"{probe_ci}_ci_high": high})
    except ValueError as err:
        notes.append(f"no site probe{label}: {err}")
    for metric, low in ((sil, f"{sil_ci}_ci_low"), (probe, f"{probe_ci}_ci_low")):
        if np.isfinite(row[metric]) and not np.isfinite(row[low]):
            notes.append(f"no CI for {metric}: some bootstrap resample was undefined")
    return row, notes


def site_invariance_row(train_embedding: np.ndarray, test_embedding: np.ndarray, test_sites: Sequence[str],
                        n_components: int, n_folds: int, n_boot: int, seed: int = 0,
                        test_groups: Sequence[str] | None = None, casemix: np.ndarray | None = None,
                        casemix_label: str = "") -> dict:
    """Both site-invariance numbers with bootstrap CIs for one embedding (see the module docstring).

    Args:
        test_groups: (n_test,) patient ids (probe folds grouped by patient); None = every subject its own.
        casemix: (n_test,) bool, the fixed case-mix subset; None = no ``*_casemix`` numbers.
        casemix_label: what the subset is (e.g. ``idh=0``), for the ``casemix`` column.
    """
    sites = np.asarray(test_sites).astype(str)
    groups = None if test_groups is None else np.asarray(test_groups).astype(str)
    n_sites = len(np.unique(sites))
    row = {"site_probe_chance": 1.0 / max(n_sites, 1), "n": len(sites), "n_sites": n_sites, "pca_components": np.nan}
    numbers, notes = _site_numbers(train_embedding, test_embedding, sites, groups, n_components, n_folds, n_boot, seed)
    row.update(numbers)
    if casemix is not None:
        keep = np.asarray(casemix, bool)
        k = row["pca_components"]
        numbers, more = _site_numbers(train_embedding, test_embedding[keep], sites[keep],
                                      None if groups is None else groups[keep], n_components, n_folds, n_boot, seed,
                                      suffix="_casemix")
        numbers.pop("pca_components", None)
        row.update(numbers, pca_components=k, n_casemix=int(keep.sum()), n_sites_casemix=len(np.unique(sites[keep])),
                   casemix=casemix_label)
        notes += more
    row["note"] = "; ".join(notes)
    return row


# ---- reference rows: intensity features -----------------------------------------------------------------------
def intensity_features(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per channel: mean, SD and the :data:`INTENSITY_PERCENTILES` inside ``mask`` ((C, ...) -> (C * 5,)).

    Args:
        image: (C, D, H, W) volumes.
        mask: (D, H, W) bool; None = voxels where any channel is non-zero (skull-stripped input).
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.any(image != 0, axis=0) if mask is None else np.asarray(mask, bool)
    if not mask.any():
        mask = np.ones(image.shape[1:], bool)
    out = []
    for channel in image:
        inside = channel[mask]
        out += [inside.mean(), inside.std(), *np.percentile(inside, INTENSITY_PERCENTILES)]
    return np.asarray(out)


def preprocessed_intensity_features(ctx, rows: Sequence[int], progress: bool = False) -> np.ndarray:
    """(len(rows), 4 * 5) :func:`intensity_features` of the preprocessed volumes inside their brain masks."""
    dataset = ctx.dataset(progress=progress)
    feats = []
    for i in rows:
        item = dataset[int(i)]
        feats.append(intensity_features(np.asarray(item["image"]), np.asarray(item["brain"])[0]))
    return np.asarray(feats)


def raw_intensity_features(manifest: pd.DataFrame, rows: Sequence[int],
                           contrasts: Sequence[str] = ("t1", "t1c", "t2", "flair")) -> np.ndarray:
    """(len(rows), 4 * 5 + 3): :func:`intensity_features` of the raw NIfTI volumes (non-zero voxels of each
    contrast, before any normalisation) and the native voxel spacing of the first contrast.

    Raises:
        DataError: a file cannot be read (names the file).
    """
    import nibabel as nib

    feats = []
    for i in rows:
        row, parts, spacing = manifest.iloc[int(i)], [], None
        for contrast in contrasts:
            path = row[contrast]
            try:
                img = nib.load(str(path))
                data = np.asarray(img.dataobj, dtype=np.float64)
            except (OSError, ValueError) as err:
                raise DataError(f"{path}: cannot read the image for the site positive control: {err}") from None
            spacing = spacing if spacing is not None else [float(z) for z in img.header.get_zooms()[:3]]
            parts.append(intensity_features(data[None], data != 0))
        feats.append(np.concatenate(parts + [np.asarray(spacing)]))
    return np.asarray(feats)


def reference_rows(ctx, train_idx: np.ndarray, test_idx: np.ndarray, casemix: np.ndarray | None,
                   casemix_label: str = "", progress: bool = False) -> list[dict]:
    """The ``preprocessing_baseline`` and ``positive_control`` rows (module docstring), same splits and settings."""
    cfg = ctx.config.analyses
    man = ctx.manifest
    sites = man["site"].astype(str).to_numpy()
    patients = (man["patient_id"] if "patient_id" in man else man["subject_id"]).astype(str).to_numpy()
    both = np.concatenate([train_idx, test_idx])
    features = {"preprocessing_baseline": lambda: preprocessed_intensity_features(ctx, both, progress),
                "positive_control": lambda: raw_intensity_features(man, both)}
    rows = []
    for stage, compute in features.items():
        feats = compute()
        train, test = feats[:len(train_idx)], feats[len(train_idx):]
        # standardize with the training statistics so no raw unit (intensity, mm) dominates the PCA
        mean, std = train.mean(0), train.std(0)
        scale = np.where(std > 0, std, 1.0)
        row = site_invariance_row((train - mean) / scale, (test - mean) / scale, sites[test_idx],
                                  cfg.embedding_pca_components, cfg.site_probe_folds, cfg.bootstrap,
                                  seed=ctx.config.seed, test_groups=patients[test_idx], casemix=casemix,
                                  casemix_label=casemix_label)
        rows.append({"backbone": REFERENCE_BACKBONE, "stage": stage, **row})
    return rows


# ---- table and stage ------------------------------------------------------------------------------------------
def available_stages(ctx) -> tuple[str, ...]:
    """Stages this run produces: pretrained plus the configured fine-tuning objectives among erm, dro."""
    return ("pretrained",) + tuple(s for s in ("erm", "dro") if s in ctx.config.finetuning.objectives)


def casemix_subset(ctx, rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Bool mask over ``rows`` of the fixed case-mix subset and its label (e.g. ``idh=0``)."""
    cfg = ctx.config.analyses
    column, value = cfg.site_casemix_endpoint, cfg.site_casemix_value
    label = f"{column}={value:g}"
    if column not in ctx.manifest:
        return np.zeros(len(rows), bool), label
    values = pd.to_numeric(ctx.manifest[column], errors="coerce").to_numpy(float)[rows]
    return values == value, label


def site_invariance_table(ctx, methods: Sequence[str], stages: Sequence[str] | None = None,
                          progress: bool = True, references: bool | None = None) -> pd.DataFrame:
    """One row per backbone and stage: PCA-silhouette and site-probe balanced accuracy on TEST subjects.

    Args:
        ctx: the run context (manifest with splits, artifacts with embeddings).
        methods: backbones (SSL method names).
        stages: default :func:`available_stages`.
        references: add the reference rows (:func:`reference_rows`); default ``analyses.site_reference_rows``.

    Returns:
        DataFrame with columns backbone, stage, pca_silhouette_site, site_probe_bacc, then the CI columns,
        site_probe_chance, n, n_sites, pca_components, the ``*_casemix`` columns and note.
    """
    cfg = ctx.config.analyses
    stages = tuple(stages or available_stages(ctx))
    train_idx, test_idx = split_indices(ctx.manifest)
    sites = ctx.manifest["site"].astype(str).to_numpy()
    patients = (ctx.manifest["patient_id"] if "patient_id" in ctx.manifest
                else ctx.manifest["subject_id"]).astype(str).to_numpy()
    casemix, label = casemix_subset(ctx, test_idx)
    rows = []
    for method in tqdm(list(methods), desc="site invariance", disable=not progress):
        for stage in stages:
            emb = load_embeddings(ctx, method, stage)
            row = site_invariance_row(emb[train_idx], emb[test_idx], sites[test_idx], cfg.embedding_pca_components,
                                      cfg.site_probe_folds, cfg.bootstrap, seed=ctx.config.seed,
                                      test_groups=patients[test_idx], casemix=casemix, casemix_label=label)
            rows.append({"backbone": method, "stage": stage, **row})
    if cfg.site_reference_rows if references is None else references:
        rows += reference_rows(ctx, train_idx, test_idx, casemix, label, progress=progress)
    return pd.DataFrame(rows, columns=list(SITE_INVARIANCE_COLUMNS + EXTRA_COLUMNS))


def run_site_invariance_stage(ctx, methods: Sequence[str], progress: bool = True) -> pd.DataFrame:
    """Compute :func:`site_invariance_table` and merge it into ``metrics/site_invariance.csv``."""
    table = site_invariance_table(ctx, methods, progress=progress)
    ctx.write_metrics("site_invariance", table, ["backbone", "stage"])
    return table
