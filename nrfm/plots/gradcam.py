"""Grad-CAM figures: axial, coronal and sagittal slices through the tumour centre, ERM versus DRO.

Volumes are in RAS orientation after preprocessing (array axes x, y, z), so the axial slice fixes z, the
coronal slice fixes y and the sagittal slice fixes x; each is drawn with the second array axis pointing up.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from nrfm.eval.gradcam import CORE_LABELS, decision_threshold, endpoint_index, explained_sign, load_finetuned_model
from nrfm.eval.gradcam_maps import grad_cam_volumes, resolve_target_layer
from nrfm.models.readout import model_input

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # (name, fixed array axis)
T1C = 1  # channel order [t1, t1c, t2, flair]


def pick_subjects(ctx, per_site: int) -> list[int]:
    """First ``per_site`` test rows of each site that have a non-empty tumour mask (manifest order)."""
    dataset = ctx.dataset(progress=False)
    picked = []
    for site in ctx.sites:
        rows = np.where((ctx.manifest["split"].to_numpy() == "test") & (ctx.manifest["site"].to_numpy() == site))[0]
        chosen = [int(i) for i in rows if np.asarray(dataset[int(i)]["seg"]).any()][:per_site]
        picked.extend(chosen)
    return picked


def _slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis).T  # rows = the later axis, drawn upward with origin="lower"


def plot_gradcam_slices(ctx, method: str, objectives: Sequence[str] = ("erm", "dro"), endpoint: str | None = None,
                        rows: Sequence[int] | None = None, load_model: Callable[..., nn.Module] | None = None,
                        save: bool = True):
    """One row per subject; per objective three panels (axial, coronal, sagittal) with the CAM, the lesion outline
    and, where it differs, the core outline.

    Args:
        method: backbone.
        objectives: models side by side.
        endpoint: default ``analyses.gradcam_endpoint``.
        rows: manifest rows; default :func:`pick_subjects` with ``analyses.gradcam_subjects_per_site``.
        load_model: ``(ctx, method, objective) -> model``; default :func:`nrfm.train.finetune.load_finetuned`.

    Saved as ``figures/gradcam_{method}_{endpoint}.png``. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    cfg = ctx.config.analyses
    endpoint = endpoint or cfg.gradcam_endpoint
    rows = list(rows) if rows is not None else pick_subjects(ctx, cfg.gradcam_subjects_per_site)
    load_model = load_model or load_finetuned_model
    dataset = ctx.dataset(progress=False)
    items = [dataset[i] for i in rows]
    cams = {}
    for objective in objectives:
        model = load_model(ctx, method, objective)
        layer, transform = resolve_target_layer(model, cfg.gradcam_target_layer)
        index = endpoint_index(model, endpoint)
        threshold = decision_threshold(ctx, method, objective, endpoint)
        cams[objective] = []
        for it in items:
            image = model_input(model, it)[None]
            sign = explained_sign(model, image, index, endpoint, cfg.gradcam_class, threshold)
            cams[objective].append(grad_cam_volumes(model, image, index, layer, transform, [sign])[0])
    n_cols = 3 * len(objectives)
    fig, axes = plt.subplots(max(len(rows), 1), n_cols, figsize=(2.2 * n_cols, 2.3 * max(len(rows), 1)),
                             squeeze=False)
    for r, (row, item) in enumerate(zip(rows, items)):
        image = np.asarray(item["image"])[T1C]
        seg = np.asarray(item["seg"])[0]
        tumor = seg > 0
        core = np.isin(seg, CORE_LABELS)
        centre = np.round(np.argwhere(tumor).mean(axis=0)).astype(int)
        for k, objective in enumerate(objectives):
            for v, (view, axis) in enumerate(VIEWS):
                ax = axes[r, 3 * k + v]
                ax.imshow(_slice(image, axis, centre[axis]), cmap="gray", origin="lower")
                # hide the near-zero CAM so the anatomy stays readable where the model does not look
                heat = np.ma.masked_less(_slice(cams[objective][r], axis, centre[axis]), 0.05)
                ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, origin="lower")
                outline = _slice(tumor.astype(float), axis, centre[axis])
                if outline.any():
                    ax.contour(outline, levels=[0.5], colors="white", linewidths=0.8)
                inner = _slice(core.astype(float), axis, centre[axis])
                if inner.any() and not np.array_equal(inner, outline):
                    ax.contour(inner, levels=[0.5], colors="yellow", linewidths=0.6)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{objective} {view}", fontsize=8)
                if k == 0 and v == 0:
                    ax.set_ylabel(f"{ctx.manifest['site'].iloc[row]}\n{ctx.manifest['subject_id'].iloc[row]}",
                                  fontsize=7)
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no test subject with a tumour mask", ha="center", transform=axes[0, 0].transAxes)
    fig.suptitle(f"Grad-CAM for {endpoint} ({method}, {cfg.gradcam_class} class); white = lesion (seg > 0), "
                 "yellow = core (labels 1, 4)", fontsize=9)
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"gradcam_{method}_{endpoint}")
    return fig
