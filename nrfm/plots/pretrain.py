"""Figures of the pretraining stage: loss curves, representation-monitor curves and example views.

Each function returns the matplotlib Figure and saves it through ``ctx.save_figure`` under a stable name
(``pretrain_loss_<method>``, ``pretrain_monitor_<method>``, ``pretrain_views_<method>``).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from nrfm.config import SSL_METHODS
from nrfm.errors import RunError
from nrfm.schema import CONTRASTS
from nrfm.ssl.views import BatchAugment, SampleViews, _item_seed, batch_generator, view_recipe

CHANNELS = CONTRASTS


def _log(ctx, method: str | None) -> pd.DataFrame:
    log = ctx.read_metrics("pretrain")
    if log is None or log.empty:
        raise RunError(f"{ctx.layout.metrics('pretrain')}: no pretraining log yet; run the pretraining stage first")
    if method is not None:
        if method not in SSL_METHODS:
            raise ValueError(f"unknown SSL method {method!r}; valid: {list(SSL_METHODS)}")
        log = log[log["backbone"] == method]
        if log.empty:
            raise RunError(f"{ctx.layout.metrics('pretrain')}: no rows for backbone {method!r}")
    return log.sort_values(["backbone", "epoch"])


def plot_loss_curve(ctx, method: str | None = None):
    """Training loss per epoch (one line per backbone; ``method`` restricts to one)."""
    log = _log(ctx, method)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, part in log.groupby("backbone"):
        part = part[part["epoch"] > 0]
        ax.plot(part["epoch"], part["loss"], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("SSL loss (method-specific scale)")
    ax.set_title(f"Pretraining loss{'' if method is None else f': {method}'}")
    ax.legend(frameon=False)
    fig.tight_layout()
    ctx.save_figure(fig, f"pretrain_loss_{method or 'all'}")
    return fig


def plot_monitor_curves(ctx, method: str):
    """Cross-validated linear-probe scores per epoch (marker AUC, site balanced accuracy); random init (epoch 0) dashed."""
    log = _log(ctx, method)
    columns = [c for c in log.columns if c.startswith("probe_") and c.endswith(("_auc", "_bacc")) and log[c].notna().any()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    trained, baseline = log[log["epoch"] > 0], log[log["epoch"] == 0]
    for i, column in enumerate(columns):
        color = f"C{i}"
        name, metric = column.removeprefix("probe_").rsplit("_", 1)
        label = f"{name} {'AUC' if metric == 'auc' else 'bal. acc.'}"
        scored = trained[trained[column].notna()]
        ax.plot(scored["epoch"], scored[column], marker="o", ms=3, color=color, label=f"{label} (pretrained)")
        if not baseline.empty and np.isfinite(baseline[column].iloc[0]):
            ax.axhline(baseline[column].iloc[0], color=color, ls="--", lw=1, label=f"{label} (random init)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear probe, 5-fold CV (train + val)")
    ax.set_title(f"Representation monitor: {method}")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    ctx.save_figure(fig, f"pretrain_monitor_{method}")
    return fig


def plot_example_views(ctx, method: str, subject: int = 0):
    """Axial middle slices of every view of one train subject (rows: views; columns: the four contrasts)."""
    pcfg = ctx.config.pretraining
    recipe = view_recipe(method, pcfg)
    train = np.flatnonzero(ctx.manifest["split"].astype(str).to_numpy() == "train")
    index = int(train[subject % len(train)])
    image = ctx.dataset()[index]["image"]
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    views = SampleViews(recipe, pcfg.view_size_of(method), pcfg.local_view_size, full_monai=not pcfg.batch_augment)(
        image, _item_seed(ctx.config.seed, 0, index))
    if recipe.strong and pcfg.batch_augment:
        gen = batch_generator(ctx.config.seed, 0, 0, torch.device("cpu"))
        views = [BatchAugment()(v[None], gen)[0] for v in views]
    rows = [("volume", image)] + [(f"{'global' if i < recipe.n_global else 'local'} view {i + 1}", v)
                                  for i, v in enumerate(views)]
    fig, axes = plt.subplots(len(rows), 4, figsize=(6.4, 1.6 * len(rows)), squeeze=False)
    for r, (name, vol) in enumerate(rows):
        for c in range(4):
            ax = axes[r, c]
            ax.imshow(vol[c, vol.shape[1] // 2].numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(CHANNELS[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(f"{method} views of subject {ctx.manifest['subject_id'].iloc[index]}", fontsize=9)
    fig.tight_layout()
    ctx.save_figure(fig, f"pretrain_views_{method}")
    return fig
