"""Figures of the site-invariance analysis: 2-D views of test embeddings and the summary table.

The views put the stages side by side (pretrained | ERM | DRO), one row coloured by site and one by a marker,
so a reader sees whether fine-tuning with group DRO mixes the sites while keeping the marker separated
(NeuroRAD-FM, arXiv 2509.15416, site-invariance figure; the paper shows t-SNE, this kit defaults to UMAP).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from nrfm.eval.site_invariance import REFERENCE_STAGES, available_stages, load_embeddings, split_indices

PROJECTIONS = ("pca", "umap", "tsne")


def configured_projections(ctx) -> tuple[str, ...]:
    """Views the run asks for: PCA always, UMAP if ``analyses.umap``, t-SNE if ``analyses.tsne``."""
    cfg = ctx.config.analyses
    return ("pca",) + (("umap",) if cfg.umap else ()) + (("tsne",) if cfg.tsne else ())


def embedding_projection(train_embedding: np.ndarray, test_embedding: np.ndarray, projection: str = "umap",
                         seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-D coordinates (n_test, 2) of the test embeddings.

    ``pca`` fits on the training embeddings and projects the test ones (the same PCA as the PCA-silhouette);
    ``umap`` and ``tsne`` are unsupervised views fitted on the test embeddings themselves (no labels are
    used, so nothing leaks into a statistic); both have a fixed random state.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; valid: {list(PROJECTIONS)}")
    n = test_embedding.shape[0]
    if projection == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit(train_embedding).transform(test_embedding)
    if n < 4:
        raise ValueError(f"{projection} needs at least 4 test subjects, got {n}")
    if projection == "umap":
        import umap

        # small test sets: the neighbourhood must stay below n; PCA initialisation is stable where the
        # default spectral initialisation can fail on a handful of points
        reducer = umap.UMAP(n_neighbors=int(min(n_neighbors, n - 1)), random_state=seed, init="pca", n_jobs=1)
        return reducer.fit_transform(test_embedding)
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=float(min(30.0, (n - 1) / 3)), init="pca",
                random_state=seed).fit_transform(test_embedding)


def _colour_values(manifest: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    values = manifest[column].iloc[rows]
    if column != "site":
        values = values.map(lambda v: "unknown" if pd.isna(v) else f"{column}={int(v) if float(v).is_integer() else v}")
    return values.astype(str).to_numpy()


def plot_embedding_views(ctx, method: str, projection: str = "umap", marker: str = "idh",
                         stages: Sequence[str] | None = None, save: bool = True):
    """Grid of 2-D views: columns = stages, rows = coloured by site, coloured by ``marker``.

    Saved as ``figures/embeddings_{projection}_{method}.png``. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if marker not in ctx.manifest.columns:
        raise ValueError(f"unknown marker column {marker!r}; valid: {sorted(ctx.manifest.columns)}")
    stages = tuple(stages or available_stages(ctx))
    train_idx, test_idx = split_indices(ctx.manifest)
    colourings = ("site", marker)
    fig, axes = plt.subplots(len(colourings), len(stages), figsize=(4 * len(stages), 3.6 * len(colourings)),
                             squeeze=False)
    for col, stage in enumerate(stages):
        emb = load_embeddings(ctx, method, stage)
        xy = embedding_projection(emb[train_idx], emb[test_idx], projection, seed=ctx.config.seed,
                                  n_neighbors=ctx.config.analyses.umap_neighbors)
        for row, column in enumerate(colourings):
            ax = axes[row, col]
            labels = _colour_values(ctx.manifest, column, test_idx)
            for j, label in enumerate(sorted(set(labels))):
                keep = labels == label
                colour = "lightgrey" if label == "unknown" else f"C{j}"
                ax.scatter(xy[keep, 0], xy[keep, 1], s=14, alpha=0.8, c=colour, label=label)
            ax.set_title(f"{method} {stage}: {column}")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == len(stages) - 1:
                ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{projection.upper()} of test-subject embeddings ({method})")
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"embeddings_{projection}_{method}")
    return fig


def plot_site_invariance(ctx, table: pd.DataFrame, save: bool = True):
    """PCA-silhouette and site-probe balanced accuracy with 95% CIs per backbone and stage.

    Bars: all test subjects; open circles: the fixed case-mix subset (``*_casemix``); horizontal lines: the
    reference rows (preprocessing baseline, positive control), which do not depend on the backbone.
    Saved as ``figures/site_invariance.png``. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    references = table[table["stage"].isin(REFERENCE_STAGES)]
    table = table[~table["stage"].isin(REFERENCE_STAGES)]
    backbones = list(dict.fromkeys(table["backbone"]))
    stages = list(dict.fromkeys(table["stage"]))
    width = 0.8 / max(len(stages), 1)
    panels = (("pca_silhouette_site", "pca_silhouette", "PCA-silhouette of site (lower = mixed)"),
              ("site_probe_bacc", "site_probe_bacc", "site probe balanced accuracy"))
    for ax, (metric, ci, title) in zip(axes, panels):
        for k, stage in enumerate(stages):
            part = table[table["stage"] == stage].set_index("backbone").reindex(backbones)
            x = np.arange(len(backbones)) + (k - (len(stages) - 1) / 2) * width
            value = part[metric].to_numpy(float)
            err = np.vstack([value - part[f"{ci}_ci_low"].to_numpy(float),
                             part[f"{ci}_ci_high"].to_numpy(float) - value])
            ax.bar(x, value, width, label=stage, yerr=np.nan_to_num(err), capsize=2, color=f"C{k}")
            if f"{metric}_casemix" in part:
                ax.scatter(x, part[f"{metric}_casemix"].to_numpy(float), facecolors="none", edgecolors="k", s=18,
                           zorder=3, label="fixed case-mix" if k == 0 else None)
        for j, (_, ref) in enumerate(references.iterrows()):
            if np.isfinite(float(ref[metric])):
                ax.axhline(float(ref[metric]), color=("0.4", "C3")[j % 2], ls=":", lw=1.2,
                           label=str(ref["stage"]).replace("_", " "))
        if metric == "site_probe_bacc" and "site_probe_chance" in table and len(table):
            ax.axhline(float(table["site_probe_chance"].iloc[0]), color="k", ls="--", lw=1, label="chance")
        ax.set_xticks(np.arange(len(backbones)), backbones)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, "site_invariance")
    return fig
