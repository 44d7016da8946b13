"""Handcrafted radiomics-style features of a preprocessed exam: the baseline a learned backbone must beat.

Per tumour sub-region (BraTS labels: ``necrotic`` core 1, ``oedema`` 2, ``enhancing`` 4 (3 read as 4, as in
:mod:`nrfm.data.preprocessing`), and the whole ``lesion``, seg > 0) and per contrast (t1, t1c, t2, flair), the
first-order statistics of the preprocessed (z-scored in the brain) intensities: mean, SD, 10th/50th/90th
percentiles, skewness and excess kurtosis. Shape and location: sub-region volumes in ml, their fractions of
the lesion, the lesion's number of connected components, extent (volume over bounding-box volume),
surface-to-volume ratio and sphericity (surface from exposed voxel faces), and the lesion centroid in world
coordinates (mm, RAS) and as a fraction of the brain box visible in the crop.

Names: ``<contrast>_<region>_<statistic>`` (e.g. ``flair_oedema_p90``), ``volume_ml_<region>``,
``fraction_<region>``, ``enhancing_fraction_of_core``, ``lesion_components``, ``lesion_extent``,
``lesion_surface_to_volume_per_mm``, ``lesion_sphericity``, ``centroid_{lr,ap,si}_mm``,
``centroid_abs_lr_mm`` (distance from the mid-sagittal plane x = 0 of MNI-like spaces),
``centroid_{lr,ap,si}_brain``. A statistic that does not exist for an exam (an empty sub-region, a
constant one for skewness) is NaN; :func:`nrfm.eval.baselines.fit_predict_baseline` imputes it with the
training median.

pyradiomics (the field's reference implementation) has no wheel for this environment's Python, so the
features are computed here with numpy/scipy; the definitions follow its first-order and shape classes where
they overlap (population SD, Fisher kurtosis).

Usage::

    from nrfm.eval.handcrafted import handcrafted_features, feature_table_of_run
    feats = handcrafted_features(image, seg, spacing_mm=(3, 3, 3), brain=brain, affine=affine)
    table = feature_table_of_run(ctx)          # one row per manifest row, index subject_id
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

CONTRASTS = ("t1", "t1c", "t2", "flair")
REGIONS: Mapping[str, tuple[int, ...]] = {"necrotic": (1,), "oedema": (2,), "enhancing": (3, 4), "lesion": ()}
FIRST_ORDER = ("mean", "std", "p10", "p50", "p90", "skewness", "kurtosis")
AXES = ("lr", "ap", "si")  # spatial axes of a RAS volume


def _region_masks(seg: np.ndarray) -> dict[str, np.ndarray]:
    masks = {name: np.isin(seg, labels) for name, labels in REGIONS.items() if labels}
    masks["lesion"] = seg > 0
    return masks


def first_order(values: np.ndarray) -> dict[str, float]:
    """Mean, population SD, 10/50/90th percentiles, skewness and excess (Fisher) kurtosis of ``values``.

    NaN for an empty array; skewness and kurtosis NaN when the values are constant.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return {s: float("nan") for s in FIRST_ORDER}
    mean = v.mean()
    centred = v - mean
    m2 = float(np.mean(centred ** 2))
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    out = {"mean": float(mean), "std": float(np.sqrt(m2)), "p10": float(p10), "p50": float(p50), "p90": float(p90)}
    if m2 <= 1e-12 * max(1.0, mean * mean):
        out.update(skewness=float("nan"), kurtosis=float("nan"))
    else:
        out.update(skewness=float(np.mean(centred ** 3) / m2 ** 1.5),
                   kurtosis=float(np.mean(centred ** 4) / m2 ** 2 - 3.0))
    return out


def surface_area_mm2(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Area of the voxel faces between ``mask`` and its outside (the volume's border counts as outside)."""
    padded = np.pad(mask.astype(bool), 1)
    sx, sy, sz = (float(s) for s in spacing_mm)
    face = (sy * sz, sx * sz, sx * sy)  # area of a face normal to each axis
    return float(sum(np.count_nonzero(np.diff(padded, axis=a)) * face[a] for a in range(3)))


def _shape_features(masks: dict[str, np.ndarray], spacing_mm: Sequence[float]) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = {name: int(m.sum()) for name, m in masks.items()}
    out = {f"volume_ml_{name}": counts[name] * voxel_ml for name in REGIONS}
    lesion = counts["lesion"]
    for name in ("necrotic", "oedema", "enhancing"):
        out[f"fraction_{name}"] = counts[name] / lesion if lesion else float("nan")
    core = counts["necrotic"] + counts["enhancing"]
    out["enhancing_fraction_of_core"] = counts["enhancing"] / core if core else float("nan")
    mask = masks["lesion"]
    if lesion == 0:
        out.update(lesion_components=0.0, lesion_extent=float("nan"), lesion_surface_to_volume_per_mm=float("nan"),
                   lesion_sphericity=float("nan"))
        return out
    out["lesion_components"] = float(ndimage.label(mask)[1])
    idx = np.argwhere(mask)
    box = np.prod(idx.max(0) - idx.min(0) + 1)
    out["lesion_extent"] = lesion / float(box)
    volume_mm3 = lesion * voxel_ml * 1000.0
    area = surface_area_mm2(mask, spacing_mm)
    out["lesion_surface_to_volume_per_mm"] = area / volume_mm3
    # 1 for a sphere; voxel faces overstate a smooth surface, so values sit below 1 even for round lesions
    out["lesion_sphericity"] = float(np.pi ** (1 / 3) * (6 * volume_mm3) ** (2 / 3) / area)
    return out


def _location_features(lesion: np.ndarray, brain: np.ndarray | None, affine: np.ndarray | None) -> dict[str, float]:
    out = {}
    centroid = np.argwhere(lesion).mean(0) if lesion.any() else None
    if affine is not None:
        world = (np.asarray(affine, dtype=np.float64) @ np.append(centroid, 1.0))[:3] if centroid is not None \
            else np.full(3, np.nan)
        out.update({f"centroid_{a}_mm": float(w) for a, w in zip(AXES, world)})
        out["centroid_abs_lr_mm"] = float(abs(world[0]))
    if brain is not None:
        if centroid is not None and brain.any():
            idx = np.argwhere(brain)
            lo, hi = idx.min(0), idx.max(0)
            rel = (centroid - lo) / np.maximum(hi - lo, 1)
        else:
            rel = np.full(3, np.nan)
        out.update({f"centroid_{a}_brain": float(r) for a, r in zip(AXES, rel)})
    return out


def handcrafted_features(image: np.ndarray, seg: np.ndarray, spacing_mm: Sequence[float],
                         brain: np.ndarray | None = None, affine: np.ndarray | None = None,
                         contrasts: Sequence[str] = CONTRASTS) -> dict[str, float]:
    """Radiomics-style features of one preprocessed exam (see the module docstring for the names).

    Args:
        image: (C, X, Y, Z) preprocessed intensities (z-scored in the brain), channels in ``contrasts`` order.
        seg: (X, Y, Z) or (1, X, Y, Z) tumour labels {0, 1, 2, 4} (3 is read as 4).
        spacing_mm: voxel size (3 values, mm).
        brain: optional (X, Y, Z) or (1, X, Y, Z) brain mask; adds ``centroid_*_brain`` (the lesion centroid as a
            fraction of the brain's bounding box within the crop; the crop may cut the brain, so this is
            a coarse position).
        affine: optional (4, 4) voxel-to-world (RAS, mm) affine of the crop; adds ``centroid_*_mm`` and
            ``centroid_abs_lr_mm``.
        contrasts: channel names.

    Returns:
        Feature name -> float (NaN where undefined), always the same keys for the same arguments.

    Raises:
        ValueError: shapes that do not fit together, or a ``contrasts`` list of the wrong length.
    """
    image = np.asarray(image)
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 and seg.shape[0] == 1 else seg
    if image.ndim != 4 or seg.shape != image.shape[1:]:
        raise ValueError(f"handcrafted_features: image {tuple(image.shape)} must be (C, X, Y, Z) and seg "
                         f"{tuple(seg.shape)} must be its (X, Y, Z)")
    if len(contrasts) != image.shape[0]:
        raise ValueError(f"handcrafted_features: {image.shape[0]} channels but contrasts {list(contrasts)}")
    if len(spacing_mm) != 3:
        raise ValueError(f"handcrafted_features: spacing_mm {list(spacing_mm)} must have 3 values")
    if brain is not None:
        brain = np.asarray(brain).astype(bool)
        brain = brain[0] if brain.ndim == 4 and brain.shape[0] == 1 else brain
        if brain.shape != seg.shape:
            raise ValueError(f"handcrafted_features: brain {tuple(brain.shape)} must have seg's shape {seg.shape}")
    masks = _region_masks(seg)
    out: dict[str, float] = {}
    for c, contrast in enumerate(contrasts):
        channel = image[c]
        for region in REGIONS:
            stats = first_order(channel[masks[region]])
            out.update({f"{contrast}_{region}_{s}": v for s, v in stats.items()})
    out.update(_shape_features(masks, spacing_mm))
    out.update(_location_features(masks["lesion"], brain, affine))
    return out


def feature_table(dataset, spacing_mm: Sequence[float], subject_ids: Sequence[str] | None = None,
                  contrasts: Sequence[str] = CONTRASTS, progress: bool = False) -> pd.DataFrame:
    """Features of every item of a preprocessed dataset, one row per item, index ``subject_id``.

    Args:
        dataset: items ``{"image": (C, X, Y, Z), "seg": (1, X, Y, Z), "brain": (1, X, Y, Z) optional}``
            (:class:`nrfm.data.preprocessing.VolumeDataset`); its ``affine(i)`` method, when present, adds world
            coordinates.
        spacing_mm: voxel size of the preprocessed volumes (``PreprocessingConfig.spacing_mm``).
        subject_ids: index labels (default: ``dataset.subject_ids``, else 0..n-1 as strings).
    """
    from tqdm.auto import tqdm

    n = len(dataset)
    if subject_ids is None:
        subject_ids = getattr(dataset, "subject_ids", [str(i) for i in range(n)])
    if len(subject_ids) != n:
        raise ValueError(f"feature_table: {len(subject_ids)} subject_ids for a dataset of {n} items")
    rows = []
    for i in tqdm(range(n), desc="handcrafted features", disable=not progress, leave=False):
        item = dataset[i]
        brain = item.get("brain")
        affine = dataset.affine(i) if hasattr(dataset, "affine") else item.get("affine")
        rows.append(handcrafted_features(np.asarray(item["image"]), np.asarray(item["seg"]), spacing_mm,
                                         None if brain is None else np.asarray(brain),
                                         None if affine is None else np.asarray(affine), contrasts))
    return pd.DataFrame(rows, index=pd.Index([str(s) for s in subject_ids], name="subject_id"))


def feature_table_of_run(ctx, progress: bool = True) -> pd.DataFrame:
    """:func:`feature_table` of every manifest row of a run (``ctx.dataset()``), in manifest order."""
    return feature_table(ctx.dataset(progress=progress), ctx.config.preprocessing.spacing_mm,
                         ctx.manifest["subject_id"].astype(str).tolist(), progress=progress)
