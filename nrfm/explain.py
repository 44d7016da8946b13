"""Grad-CAM on the fine-tuned 3D models and a localization score against the tumour mask.

NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416, Grad-CAM analysis) shows that the fine-tuned models attend
to tumour and peritumoral tissue. Grad-CAM (Selvaraju et al., ICCV 2017): for the target layer's activations
A_k (B, K, d, h, w) and the chosen output y (one endpoint's logit), ``cam = ReLU(sum_k w_k A_k)`` with
``w_k = mean over voxels of dy/dA_k``, upsampled to the input grid.

pytorch-grad-cam 1.5.7 and 5-D input (read from its ``base_cam.py``, ``grad_cam.py``, ``utils/image.py``):
the channel weights and the weighted sum handle 5-D activations, and ``get_target_width_height`` returns the
sizes so that ``scale_cam_image`` upsamples with ``scipy.ndimage.zoom`` in the right axis order. What it
lacks for a mass-share score on coarse 3D maps (a ResNet's layer3 is 2^3 for a 24^3 crop):

* ``zoom`` uses a cubic spline (order 3) on a corner-aligned grid: the spline overshoots (values below 0 and
  above the coarse maximum) and the corner alignment stretches each coarse cell toward the border;
* each layer's CAM is min-max scaled *before* upsampling, which zeroes the weakest coarse cell and so moves
  CAM mass between regions.

:class:`GradCAM3D` therefore keeps pytorch-grad-cam's hooks, targets and weights (it subclasses ``GradCAM``)
and replaces only the upsampling: trilinear ``torch.nn.functional.interpolate`` with ``align_corners=False``
(each coarse cell's centre lands on the centre of the voxel block it summarises; values stay between their
neighbours, so non-negative) and a division by the maximum instead of min-max scaling. Measured on a 2^3 map
whose only active cell covers one octant of a 24^3 crop: 0.67 of the CAM mass stays in that octant with this
upsampling, 0.55 with the library's; at the input resolution both agree to 1e-7. Test-time augmentation
(``aug_smooth``, 2-D only in ttach) is not used. For the MAE ViT the backbone's reshape transform maps tokens
(B, N, C) to (B, C, gd, gh, gw); the input size is passed to it so non-cubic crops get the right grid.

Which class's evidence (``analyses.gradcam_class``): Grad-CAM explains one output ``y``. For a binary endpoint
the logit ``z`` is evidence for the positive class and ``-z`` for the negative one, and the two maps differ:
the ReLU keeps only the positive part of each. ``predicted`` (default) explains each subject's predicted
class at the model's decision threshold (Youden's J on validation, read from the pooled predictions file; 0.5
if that file is missing), the usual reading of Grad-CAM; ``positive`` / ``negative`` fix the sign. On the
default run, IDH-wildtype evidence (enhancement, necrosis) sat in the tumour while "IDH-mutant" evidence, asked
of the 80 % wildtype test subjects, spread outside it: explaining the positive logit alone under-reports
where the model looks. Continuous endpoints (Ki-67, TP53-IHC) always explain the predicted value.

Localization score of one subject, inside a reference region R (brain mask plus tumour; the whole crop if
there is no brain mask): ``cam_in_tumor = sum_{tumour} cam / sum_R cam`` against ``tumor_volume_fraction =
|tumour| / |R|``; the same for the peritumoral ring (tumour dilated by ``peritumoral_margin_mm`` in millimetres
at the preprocessing spacing, minus the tumour, within R). A flat CAM scores exactly the volume fractions.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS
from nrfm.errors import ConfigError

GRADCAM_COLUMNS = ("backbone", "objective", "endpoint", "site", "cam_in_tumor", "cam_in_peritumoral",
                   "tumor_volume_fraction")
EXTRA_COLUMNS = ("n", "peritumoral_volume_fraction", "tumor_enrichment", "tumor_enrichment_ci_low",
                 "tumor_enrichment_ci_high", "lesion_enrichment", "lesion_enrichment_ci_low", "lesion_enrichment_ci_high",
                 "explained_class", "n_skipped", "note")
SCORE_COLUMNS = ("cam_in_tumor", "cam_in_peritumoral", "tumor_volume_fraction", "peritumoral_volume_fraction")


class GradCAM3D(GradCAM):
    """pytorch-grad-cam ``GradCAM`` with trilinear, mass-preserving upsampling for 5-D inputs.

    Call as ``GradCAM3D(model, [layer], reshape_transform)(x (B, C, D, H, W), [ClassifierOutputTarget(i)])``
    -> (B, D, H, W) float32 CAMs in [0, 1] (divided by each subject's maximum; all zero if the CAM is).
    """

    def compute_cam_per_layer(self, input_tensor: torch.Tensor, targets, eigen_smooth: bool) -> list[np.ndarray]:
        if input_tensor.ndim != 5:
            raise ValueError(f"GradCAM3D needs (B, C, D, H, W) input, got shape {tuple(input_tensor.shape)}")
        activations = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
        if len(grads) < len(self.target_layers):
            raise RuntimeError("no gradient reached the Grad-CAM target layer; is the output connected to it?")
        out = []
        for layer, act, grad in zip(self.target_layers, activations, grads):
            cam = np.maximum(self.get_cam_image(input_tensor, layer, targets, act, grad, eigen_smooth), 0)
            up = torch.nn.functional.interpolate(torch.from_numpy(np.float32(cam))[:, None],
                                                 size=tuple(input_tensor.shape[2:]), mode="trilinear",
                                                 align_corners=False)
            out.append(up.numpy()[:, :1])
        return out

    def aggregate_multi_layers(self, cam_per_target_layer: list[np.ndarray]) -> np.ndarray:
        cam = np.maximum(np.concatenate(cam_per_target_layer, axis=1).mean(axis=1), 0)
        peak = cam.reshape(cam.shape[0], -1).max(axis=1)
        return np.float32(cam / np.where(peak > 0, peak, 1.0)[:, None, None, None])


class EndpointTarget:
    """Grad-CAM target: ``sign * output[index]`` (+1 explains the positive class of a binary endpoint, -1 the negative)."""

    def __init__(self, index: int, sign: float = 1.0):
        self.index, self.sign = int(index), float(sign)

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.sign * model_output[..., self.index]


# ---- target layer -----------------------------------------------------------------------------------------------
def resolve_target_layer(model: nn.Module, name: str = "") -> tuple[nn.Module, Callable | None]:
    """The Grad-CAM target layer and reshape transform of a fine-tuned model.

    Args:
        model: a FinetuneModel-like module (``model.backbone.gradcam_target()`` gives the default).
        name: dotted module name in ``model.named_modules()``; empty = the backbone's choice.

    Raises:
        ConfigError: ``name`` is not a module of the model (the message lists the available names).
    """
    backbone = getattr(model, "backbone", model)
    default_layer, transform = backbone.gradcam_target() if hasattr(backbone, "gradcam_target") else (None, None)
    if not name:
        if default_layer is None:
            raise ConfigError("analyses.gradcam_target_layer: the model has no default Grad-CAM layer; name one")
        return default_layer, transform
    modules = dict(model.named_modules())
    if name not in modules:
        names = [n for n in modules if n]
        raise ConfigError(f"analyses.gradcam_target_layer: no layer {name!r} in the model; available: "
                          f"{', '.join(names)}")
    return modules[name], transform


def _spatial_transform(transform: Callable | None, spatial: Sequence[int]) -> Callable | None:
    """Bind the input size if the transform takes it, and pass non-token (5-D) outputs through unchanged."""
    if transform is None:
        return None
    takes_spatial = "spatial" in inspect.signature(transform).parameters

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 3:  # a named CNN-like layer inside a ViT model: already (B, C, d, h, w)
            return t
        return transform(t, spatial=tuple(spatial)) if takes_spatial else transform(t)

    return apply


def grad_cam_volumes(model: nn.Module, images: torch.Tensor, endpoint_index: int, target_layer: nn.Module,
                     reshape_transform: Callable | None = None, signs: Sequence[float] | None = None) -> np.ndarray:
    """Grad-CAM of one endpoint output for a batch of volumes.

    Args:
        model: forward (B, 4, D, H, W) -> (B, E).
        images: (B, 4, D, H, W) float32.
        endpoint_index: output column (``model.endpoints.index(endpoint)``).
        target_layer: module whose activations are weighted.
        reshape_transform: tokens -> (B, C, gd, gh, gw) for ViTs; None for CNNs.
        signs: (B,) +1 explains the output (positive class), -1 its negative (negative class); default all +1.

    Returns:
        (B, D, H, W) CAMs scaled to max 1.
    """
    device = next(model.parameters()).device
    x = images.to(device=device, dtype=torch.float32)
    cam = GradCAM3D(model, [target_layer], _spatial_transform(reshape_transform, x.shape[2:]))
    # gradients must reach the target layer even when its parameters are frozen (linear fine-tuning)
    cam.compute_input_gradient = True
    try:
        if signs is None:
            return cam(x, [ClassifierOutputTarget(endpoint_index)] * x.shape[0])
        return cam(x, [EndpointTarget(endpoint_index, sign) for sign in signs])
    finally:
        cam.activations_and_grads.release()


# ---- localization -----------------------------------------------------------------------------------------------
def peritumoral_ring(tumor: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, in mm at ``spacing_mm``) of the tumour, excluding the tumour."""
    from scipy.ndimage import distance_transform_edt

    tumor = np.asarray(tumor, bool)
    if not tumor.any():
        return np.zeros_like(tumor)
    distance = distance_transform_edt(~tumor, sampling=tuple(float(s) for s in spacing_mm))
    return (distance <= margin_mm) & ~tumor


def localization_scores(cam: np.ndarray, tumor: np.ndarray, brain: np.ndarray | None, margin_mm: float,
                        spacing_mm: Sequence[float]) -> dict[str, float]:
    """Share of CAM mass in the tumour and the peritumoral ring, and the share of volume they occupy.

    Args:
        cam: (D, H, W) non-negative CAM.
        tumor: (D, H, W) bool tumour mask (seg > 0).
        brain: (D, H, W) bool brain mask or None (then the whole crop is the reference region).
        margin_mm, spacing_mm: ring width and voxel spacing.

    Raises:
        ValueError: empty tumour mask, shapes differ, or the CAM has no mass in the reference region.
    """
    tumor = np.asarray(tumor, bool)
    if cam.shape != tumor.shape or (brain is not None and np.shape(brain) != tumor.shape):
        raise ValueError(f"cam {cam.shape}, tumour {tumor.shape} and brain {np.shape(brain)} shapes differ")
    if not tumor.any():
        raise ValueError("empty tumour mask")
    region = np.ones_like(tumor) if brain is None or not np.any(brain) else (np.asarray(brain, bool) | tumor)
    ring = peritumoral_ring(tumor, margin_mm, spacing_mm) & region
    mass = float(cam[region].sum())
    if not mass > 0:
        raise ValueError("the CAM is zero everywhere in the brain")
    return {"cam_in_tumor": float(cam[tumor].sum()) / mass, "cam_in_peritumoral": float(cam[ring].sum()) / mass,
            "tumor_volume_fraction": float(tumor.sum() / region.sum()),
            "peritumoral_volume_fraction": float(ring.sum() / region.sum())}


# ---- stage ------------------------------------------------------------------------------------------------------
def load_finetuned_model(ctx, method: str, objective: str) -> nn.Module:
    """The fine-tuned model of ``method`` and ``objective`` (:func:`nrfm.finetune.load_finetuned`)."""
    from nrfm.finetune import load_finetuned

    return load_finetuned(ctx, method, objective)


def endpoint_index(model: nn.Module, endpoint: str) -> int:
    """Output column of ``endpoint`` in ``model.endpoints``; ConfigError listing the outputs if absent."""
    endpoints = tuple(getattr(model, "endpoints", ()))
    if endpoint not in endpoints:
        raise ConfigError(f"analyses.gradcam_endpoint: {endpoint!r} is not an output of the model; "
                          f"available: {list(endpoints)}")
    return endpoints.index(endpoint)


def decision_threshold(ctx, method: str, objective: str, endpoint: str) -> float | None:
    """The pooled model's probability threshold for ``endpoint`` (from its predictions file), or None if absent."""
    path = ctx.artifacts_dir / f"predictions_{method}_{objective}_pooled.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path, usecols=["endpoint", "threshold"])
    values = table.loc[table["endpoint"] == endpoint, "threshold"].dropna()
    return float(values.iloc[0]) if len(values) else None


def explained_sign(model: nn.Module, image: torch.Tensor, index: int, endpoint: str, mode: str,
                   threshold: float | None) -> float:
    """+1 to explain the positive class (or a continuous output), -1 the negative one, per ``mode``."""
    if endpoint in CONTINUOUS_ENDPOINTS or mode == "positive":
        return 1.0
    if mode == "negative":
        return -1.0
    device = next(model.parameters()).device
    with torch.no_grad():
        logit = float(model(image.to(device=device, dtype=torch.float32))[0, index])
    probability = 1.0 / (1.0 + np.exp(-logit))
    return 1.0 if probability >= (0.5 if threshold is None else threshold) else -1.0


def gradcam_subject_scores(ctx, model: nn.Module, endpoint: str, rows: Sequence[int], progress: bool = True,
                           threshold: float | None = None) -> pd.DataFrame:
    """Localization scores of manifest rows ``rows`` (one row per subject; empty masks skipped with a note).

    ``threshold``: the model's probability threshold for the predicted class (``analyses.gradcam_class``).
    """
    cfg = ctx.config.analyses
    layer, transform = resolve_target_layer(model, cfg.gradcam_target_layer)
    index = endpoint_index(model, endpoint)
    dataset = ctx.dataset(progress=progress)
    out = []
    for i in tqdm(list(rows), desc="Grad-CAM", disable=not progress, leave=False):
        item = dataset[int(i)]
        rec = {"subject_id": str(ctx.manifest["subject_id"].iloc[i]), "site": str(ctx.manifest["site"].iloc[i]),
               "note": ""}
        tumor = np.asarray(item["seg"])[0] > 0
        if not tumor.any():
            out.append({**rec, "note": "skipped: empty tumour mask"})
            continue
        image = torch.as_tensor(item["image"])[None]
        sign = explained_sign(model, image, index, endpoint, cfg.gradcam_class, threshold)
        rec["explained_class"] = "positive" if sign > 0 else "negative"
        cam = grad_cam_volumes(model, image, index, layer, transform, [sign])[0]
        try:
            rec.update(localization_scores(cam, tumor, np.asarray(item["brain"])[0], cfg.peritumoral_margin_mm,
                                           ctx.config.preprocessing.spacing_mm))
        except ValueError as err:
            rec["note"] = f"skipped: {err}"
        out.append(rec)
    return pd.DataFrame(out, columns=["subject_id", "site", "explained_class", *SCORE_COLUMNS, "note"])


def enrichment_ci(cam_share: np.ndarray, volume_share: np.ndarray, n_boot: int, seed: int = 0,
                  alpha: float = 0.05, clusters: Sequence[str] | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI (:mod:`nrfm.bootstrap`, patients drawn whole) of
    ``mean(cam_share) / mean(volume_share)``."""
    from nrfm import bootstrap

    cam_share, volume_share = np.asarray(cam_share, float), np.asarray(volume_share, float)
    if len(cam_share) < 2 or n_boot < 1:
        return np.nan, np.nan
    counts = bootstrap.draw(len(cam_share), n_boot, seed, clusters=clusters)
    return bootstrap.percentile_ci(bootstrap.ratio_of_means(cam_share, volume_share, counts), alpha)


def summarise_scores(scores: pd.DataFrame, sites: Sequence[str], n_boot: int = 0, seed: int = 0) -> list[dict]:
    """Mean scores per site and ``all`` over the subjects that were scored (skips counted in the note).

    ``tumor_enrichment`` = mean CAM share in the tumour / mean tumour volume share (1 = no preference) and
    ``lesion_enrichment`` the same for tumour + peritumoral ring (the paper's claim), each with a bootstrap CI over
    subjects when ``n_boot`` > 0; ``explained_class`` counts the classes whose evidence was shown.
    """
    rows = []
    for site in list(sites) + ["all"]:
        part = scores if site == "all" else scores[scores["site"] == site]
        scored = part[part["note"] == ""]
        row = {"site": site, "n": len(scored), "n_skipped": len(part) - len(scored)}
        row.update({m: float(scored[m].mean()) if len(scored) else np.nan for m in SCORE_COLUMNS})
        row["tumor_enrichment"] = row["cam_in_tumor"] / row["tumor_volume_fraction"] if len(scored) else np.nan
        patients = scored["patient_id"].astype(str).to_numpy() if "patient_id" in scored else None
        row["tumor_enrichment_ci_low"], row["tumor_enrichment_ci_high"] = enrichment_ci(
            scored["cam_in_tumor"], scored["tumor_volume_fraction"], n_boot, seed, clusters=patients)
        lesion_cam = scored["cam_in_tumor"] + scored["cam_in_peritumoral"]
        lesion_volume = scored["tumor_volume_fraction"] + scored["peritumoral_volume_fraction"]
        row["lesion_enrichment"] = float(lesion_cam.mean() / lesion_volume.mean()) if len(scored) else np.nan
        row["lesion_enrichment_ci_low"], row["lesion_enrichment_ci_high"] = enrichment_ci(
            lesion_cam, lesion_volume, n_boot, seed, clusters=patients)
        if "explained_class" in scored:
            counts = scored["explained_class"].value_counts()
            row["explained_class"] = ", ".join(f"{name} {counts[name]}" for name in sorted(counts.index))
        reasons = part.loc[part["note"] != "", "note"].value_counts()
        notes = [f"{count} subject(s) {reason}" for reason, count in reasons.items()]
        row["note"] = "; ".join(notes) if len(part) else "no test subjects at this site"
        rows.append(row)
    return rows


def gradcam_table(ctx, methods: Sequence[str], objectives: Sequence[str] | None = None, endpoint: str | None = None,
                  load_model: Callable[..., nn.Module] | None = None, progress: bool = True) -> pd.DataFrame:
    """Grad-CAM localization on the TEST subjects per backbone, objective and site (+ ``all``).

    Args:
        methods: backbones; objectives: default the configured ones among erm, dro.
        endpoint: default ``analyses.gradcam_endpoint``.
        load_model: ``(ctx, method, objective) -> model``; default :func:`nrfm.finetune.load_finetuned`.

    Also writes per-subject scores to ``artifacts/gradcam_subjects_{method}_{objective}_{endpoint}.csv``.
    """
    from nrfm.files import atomic_write_csv

    endpoint = endpoint or ctx.config.analyses.gradcam_endpoint
    objectives = tuple(objectives or [o for o in ("erm", "dro") if o in ctx.config.finetuning.objectives])
    load_model = load_model or load_finetuned_model
    test_rows = np.where(ctx.manifest["split"].to_numpy() == "test")[0]
    rows = []
    for method in methods:
        for objective in objectives:
            model = load_model(ctx, method, objective)
            threshold = decision_threshold(ctx, method, objective, endpoint)
            scores = gradcam_subject_scores(ctx, model, endpoint, test_rows, progress=progress, threshold=threshold)
            atomic_write_csv(ctx.artifacts_dir / f"gradcam_subjects_{method}_{objective}_{endpoint}.csv", scores)
            for row in summarise_scores(scores, ctx.sites, ctx.config.analyses.bootstrap, ctx.config.seed):
                rows.append({"backbone": method, "objective": objective, "endpoint": endpoint, **row})
    return pd.DataFrame(rows, columns=list(GRADCAM_COLUMNS + EXTRA_COLUMNS))


def run_gradcam_stage(ctx, methods: Sequence[str], load_model: Callable[..., nn.Module] | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Compute :func:`gradcam_table` and merge it into ``metrics/gradcam.csv``."""
    table = gradcam_table(ctx, methods, load_model=load_model, progress=progress)
    ctx.write_metrics("gradcam", table, ["backbone", "objective", "endpoint", "site"])
    return table
