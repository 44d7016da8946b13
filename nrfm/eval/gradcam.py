"""Grad-CAM localization: where the fine-tuned 3D models look, scored against the tumour mask, with controls.

NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416, Grad-CAM analysis) shows that the fine-tuned models attend
to tumour and peritumoral tissue. The maps are computed by :mod:`nrfm.eval.gradcam_maps`
(:class:`~nrfm.eval.gradcam_maps.GradCAM3D`: trilinear, mass-preserving upsampling); this module chooses which
class each map explains, scores the maps per subject, adds the controls, summarises per site and runs the stage.

Which class's evidence (``analyses.gradcam_class``): Grad-CAM explains one output ``y``. For a binary endpoint
the logit ``z`` is evidence for the positive class and ``-z`` for the negative one, and the two maps differ:
the ReLU keeps only the positive part of each. ``predicted`` (default) explains each subject's predicted
class at the model's decision threshold (Youden's J on validation, read from the pooled predictions file; 0.5
if that file is missing), the usual reading of Grad-CAM; ``positive`` / ``negative`` fix the sign. On the
default run, IDH-wildtype evidence (enhancement, necrosis) sat in the tumour while "IDH-mutant" evidence, asked
of the 80 % wildtype test subjects, spread outside it: explaining the positive logit alone under-reports
where the model looks. Continuous endpoints (Ki-67, TP53-IHC) always explain the predicted value.

Regions, from the BraTS labels of the preprocessed mask (3 is read as 4 by the preprocessing): the tumour
**core** = labels 1 (necrotic / non-enhancing core) and 4 (enhancing); the **lesion** = core + oedema (label 2),
i.e. ``seg > 0``; the peritumoral **ring** = voxels within ``peritumoral_margin_mm`` (Euclidean, in millimetres at
the preprocessing spacing) of the lesion, outside it. A mask with a single label 1 (a binary tumour mask) makes
core = lesion. Localization score of one subject inside a reference region R (brain mask plus lesion; the whole
crop if there is no brain mask): the CAM share ``sum_{region} cam / sum_R cam`` against the volume share
``|region| / |R|``. Columns of ``metrics/gradcam.csv`` (means over the site's subjects):

* ``cam_in_tumor`` / ``tumor_volume_fraction``: CAM and volume share of the lesion (seg > 0, oedema included);
* ``cam_in_peritumoral`` / ``peritumoral_volume_fraction``: the same for the ring beyond the lesion;
* ``cam_in_core`` / ``core_volume_fraction``: the same for the core (labels 1, 4);
* ``{core,lesion,ring}_enrichment``: mean CAM share / mean volume share (1 = no preference, a flat CAM), with a
  percentile bootstrap CI over subjects.

Two controls beside each enrichment, through the same code path and the same bootstrap resamples:

* ``*_enrichment_shuffled_mask``: the same maps scored against ANOTHER test subject's mask (a fixed derangement of
  the scored subjects, seeded by the run seed: :func:`mask_derangement`). The crop is centred on the tumour, so
  any map that merely favours the crop centre beats 1 here too; attention to the subject's own lesion has to
  beat this control.
* ``*_enrichment_random_init``: the maps of a randomly initialised model of the same architecture
  (:func:`random_init_copy`), explaining the same class per subject as the trained model. Structure that comes
  from the architecture and the input alone (edges, intensity) shows up here.

Empty maps (``n_empty_maps``): Grad-CAM is zero everywhere when no voxel carries positive evidence for the
explained output. Such a subject is kept and scored as a flat map (CAM share = volume share in every region,
enrichment 1: no preference). Dropping it would score the model only on the subjects where it happens to give
evidence (an optimistic selection); a CAM share of 0 would claim attention away from every region, which an
absent map does not show either. The enrichments therefore shrink toward 1 as the share of empty maps grows, and
the count is in the table.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS
from nrfm.errors import ConfigError
from nrfm.eval import bootstrap
from nrfm.eval.gradcam_maps import grad_cam_volumes, resolve_target_layer
from nrfm.files import atomic_write_csv
from nrfm.models.readout import model_input
from nrfm.train.finetune import load_finetuned

GRADCAM_COLUMNS = ("backbone", "objective", "endpoint", "site", "cam_in_tumor", "cam_in_peritumoral",
                   "tumor_volume_fraction")
SCORE_COLUMNS = ("cam_in_tumor", "cam_in_peritumoral", "tumor_volume_fraction", "peritumoral_volume_fraction",
                 "cam_in_core", "core_volume_fraction")
# region -> (CAM share column, volume share column) of the per-subject scores
REGION_SCORES = {"core": ("cam_in_core", "core_volume_fraction"),
                 "lesion": ("cam_in_tumor", "tumor_volume_fraction"),
                 "ring": ("cam_in_peritumoral", "peritumoral_volume_fraction")}
CONTROLS = ("shuffled_mask", "random_init")
CORE_LABELS = (1, 3, 4)  # BraTS necrotic/non-enhancing core and enhancing tumour (3 = enhancing in BraTS 2023)
OEDEMA_LABEL = 2
RANDOM_INIT_SEED_OFFSET = 104729


def _enrichment_columns() -> tuple[str, ...]:
    out = []
    for region in REGION_SCORES:
        for suffix in ("",) + tuple(f"_{c}" for c in CONTROLS):
            name = f"{region}_enrichment{suffix}"
            out += [name, f"{name}_ci_low", f"{name}_ci_high"]
    return tuple(out)


EXTRA_COLUMNS = (("n", "n_empty_maps", "n_skipped", "peritumoral_volume_fraction", "cam_in_core",
                  "core_volume_fraction")
                 + _enrichment_columns() + ("n_empty_maps_random_init", "explained_class", "note"))


# ---- localization -----------------------------------------------------------------------------------------------
def peritumoral_ring(tumor: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels within ``margin_mm`` (Euclidean, in mm at ``spacing_mm``) of the tumour, excluding the tumour."""
    from scipy.ndimage import distance_transform_edt

    tumor = np.asarray(tumor, bool)
    if not tumor.any():
        return np.zeros_like(tumor)
    distance = distance_transform_edt(~tumor, sampling=tuple(float(s) for s in spacing_mm))
    return (distance <= margin_mm) & ~tumor


def tumour_regions(seg: np.ndarray, brain: np.ndarray | None, margin_mm: float,
                   spacing_mm: Sequence[float]) -> dict[str, np.ndarray]:
    """Boolean masks ``core``, ``lesion``, ``ring`` and the reference region ``reference`` from a label map.

    Args:
        seg: (D, H, W) BraTS labels (bool is read as label 1: a binary tumour mask, core = lesion).
        brain: (D, H, W) bool brain mask or None (then the whole crop is the reference region).
        margin_mm, spacing_mm: ring width and voxel spacing.
    """
    seg = np.asarray(seg).astype(np.int64)
    lesion = seg > 0
    reference = np.ones_like(lesion) if brain is None or not np.any(brain) else (np.asarray(brain, bool) | lesion)
    return {"core": np.isin(seg, CORE_LABELS), "lesion": lesion,
            "ring": peritumoral_ring(lesion, margin_mm, spacing_mm) & reference, "reference": reference}


def localization_scores(cam: np.ndarray, seg: np.ndarray, brain: np.ndarray | None, margin_mm: float,
                        spacing_mm: Sequence[float]) -> dict[str, float]:
    """CAM share and volume share of the core, the lesion and the ring beyond it (see the module docstring).

    Args:
        cam: (D, H, W) non-negative CAM.
        seg: (D, H, W) BraTS label map (or a bool tumour mask).
        brain: (D, H, W) bool brain mask or None (then the whole crop is the reference region).
        margin_mm, spacing_mm: ring width and voxel spacing.

    Returns:
        :data:`SCORE_COLUMNS` plus ``empty_map`` (1.0 when the CAM has no mass in the reference region: then every
        CAM share is set to its volume share, the score of a flat map).

    Raises:
        ValueError: empty tumour mask, or shapes differ.
    """
    seg = np.asarray(seg)
    if cam.shape != seg.shape or (brain is not None and np.shape(brain) != seg.shape):
        raise ValueError(f"cam {cam.shape}, tumour {seg.shape} and brain {np.shape(brain)} shapes differ")
    if not np.any(seg > 0):
        raise ValueError("empty tumour mask")
    masks = tumour_regions(seg, brain, margin_mm, spacing_mm)
    region = masks["reference"]
    mass = float(cam[region].sum())
    out = {"empty_map": float(not mass > 0)}
    for name, (cam_col, volume_col) in REGION_SCORES.items():
        volume = float(masks[name].sum() / region.sum())
        out[volume_col] = volume
        out[cam_col] = float(cam[masks[name]].sum()) / mass if mass > 0 else volume
    return {k: out[k] for k in (*SCORE_COLUMNS, "empty_map")}


def mask_derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one n-cycle); n < 2: identity."""
    perm = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i (not <= i): the result is a single cycle, so nobody keeps its own
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def random_init_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter re-drawn: same architecture, buffers and endpoints, no training.

    Modules with ``reset_parameters`` (convolutions, linear layers, norms; batch norms also reset their running
    statistics) use their own initialisation; parameters owned by other modules (e.g. a ViT's position
    embeddings or class token) are drawn from a truncated normal with std 0.02, the ViT convention. The draw is
    seeded by ``seed`` plus a fixed offset (so it does not replay a model built right after seeding with the run
    seed) inside a forked RNG (the caller's random state is untouched).
    """
    import copy

    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed + RANDOM_INIT_SEED_OFFSET)
        for module in clone.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for param in module.parameters(recurse=False):
                    nn.init.trunc_normal_(param, std=0.02)
    return clone.train(model.training)


# ---- stage ------------------------------------------------------------------------------------------------------
def load_finetuned_model(ctx, method: str, objective: str) -> nn.Module:
    """The fine-tuned model of ``method`` and ``objective`` (:func:`nrfm.train.finetune.load_finetuned`)."""
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
    path = ctx.layout.predictions(method, objective, "pooled")
    if not path.is_file():
        return None
    table = pd.read_csv(path, usecols=["endpoint", "threshold"])
    values = table.loc[table["endpoint"] == endpoint, "threshold"].dropna()
    return float(values.iloc[0]) if len(values) else None


def explained_signs(model: nn.Module, images: torch.Tensor, index: int, endpoint: str, mode: str,
                    threshold: float | None) -> list[float]:
    """Per volume of ``images`` (B, 4, D, H, W): +1 to explain the positive class (or a continuous output), -1 the
    negative one, per ``mode`` (``predicted``: the model's class at ``threshold``, else 0.5)."""
    if endpoint in CONTINUOUS_ENDPOINTS or mode == "positive":
        return [1.0] * len(images)
    if mode == "negative":
        return [-1.0] * len(images)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(images.to(device=device, dtype=torch.float32))[:, index].float().cpu().numpy()
    probability = 1.0 / (1.0 + np.exp(-logits))
    return [1.0 if p >= (0.5 if threshold is None else threshold) else -1.0 for p in probability]


def explained_sign(model: nn.Module, image: torch.Tensor, index: int, endpoint: str, mode: str,
                   threshold: float | None) -> float:
    """:func:`explained_signs` of one volume (1, 4, D, H, W)."""
    return explained_signs(model, image, index, endpoint, mode, threshold)[0]


GRADCAM_BATCH = 16  # volumes per Grad-CAM pass (eval mode: a volume's map does not depend on its batch)


def _test_masks(ctx, rows: Sequence[int], progress: bool = True) -> dict[int, np.ndarray]:
    """uint8 (D, H, W) label maps of manifest rows ``rows`` (for the shuffled-mask control)."""
    dataset = ctx.dataset(progress=progress)
    return {int(i): np.asarray(dataset[int(i)]["seg"])[0].astype(np.uint8) for i in rows}


def gradcam_subject_scores(ctx, model: nn.Module, endpoint: str, rows: Sequence[int], progress: bool = True,
                           threshold: float | None = None, signs: dict[int, float] | None = None,
                           partners: dict[int, int] | None = None,
                           masks: dict[int, np.ndarray] | None = None) -> pd.DataFrame:
    """Localization scores of manifest rows ``rows`` (one row per subject; empty tumour masks skipped with a note).

    Args:
        threshold: the model's probability threshold for the predicted class (``analyses.gradcam_class``).
        signs: row -> +1/-1, the class to explain (overrides ``gradcam_class``; the random-init control uses the
            trained model's choice).
        partners: row -> another row whose mask scores this row's map (the shuffled-mask control); the scores go
            to ``shuffled_mask_*`` columns and the partner's subject id to ``shuffled_mask_subject_id``.
        masks: row -> label map, to avoid reloading the partners' masks.

    Returns:
        subject_id, site, explained_class, empty_map, :data:`SCORE_COLUMNS`, the shuffled-mask columns and note
        (empty for a scored subject).
    """
    cfg = ctx.config.analyses
    layer, transform = resolve_target_layer(model, cfg.gradcam_target_layer)
    index = endpoint_index(model, endpoint)
    dataset = ctx.dataset(progress=progress)
    spacing = ctx.config.preprocessing.spacing_mm
    shuffled = [f"shuffled_mask_{c}" for c in (*SCORE_COLUMNS, "subject_id")]
    out, scorable = {}, []
    for i in (int(i) for i in rows):
        out[i] = {"subject_id": str(ctx.manifest["subject_id"].iloc[i]), "site": str(ctx.manifest["site"].iloc[i]),
                  "note": ""}
        seg = masks[i] if masks is not None and i in masks else np.asarray(dataset[i]["seg"])[0]
        if not np.any(seg > 0):
            out[i]["note"] = "skipped: empty tumour mask"
        else:
            scorable.append(i)
    bar = tqdm(total=len(scorable), desc="Grad-CAM", disable=not progress, leave=False)
    for start in range(0, len(scorable), GRADCAM_BATCH):
        chunk = scorable[start:start + GRADCAM_BATCH]
        items = [dataset[i] for i in chunk]
        images = torch.stack([model_input(model, item) for item in items])
        chosen = explained_signs(model, images, index, endpoint, cfg.gradcam_class, threshold)
        chosen = [float(signs[i]) if signs is not None and i in signs else c for i, c in zip(chunk, chosen)]
        cams = grad_cam_volumes(model, images, index, layer, transform, chosen)
        for i, item, sign, cam in zip(chunk, items, chosen, cams):
            rec = out[i]
            rec["explained_class"] = "positive" if sign > 0 else "negative"
            seg, brain = np.asarray(item["seg"])[0], np.asarray(item["brain"])[0]
            rec.update(localization_scores(cam, seg, brain, cfg.peritumoral_margin_mm, spacing))
            if partners is not None and i in partners:
                j = partners[i]
                other = masks[j] if masks is not None and j in masks else np.asarray(dataset[j]["seg"])[0]
                control = localization_scores(cam, other, brain, cfg.peritumoral_margin_mm, spacing)
                rec.update({f"shuffled_mask_{k}": control[k] for k in SCORE_COLUMNS})
                rec["shuffled_mask_subject_id"] = str(ctx.manifest["subject_id"].iloc[j])
        bar.update(len(chunk))
    bar.close()
    out = list(out.values())
    columns = ["subject_id", "site", "explained_class", "empty_map", *SCORE_COLUMNS]
    return pd.DataFrame(out, columns=columns + (shuffled if partners is not None else []) + ["note"])


def enrichment_ci(cam_share: np.ndarray, volume_share: np.ndarray, n_boot: int, seed: int = 0,
                  alpha: float = 0.05, clusters: Sequence[str] | None = None) -> tuple[float, float]:
    """Percentile bootstrap CI (:mod:`nrfm.eval.bootstrap`, patients drawn whole) of
    ``mean(cam_share) / mean(volume_share)``."""
    cam_share, volume_share = np.asarray(cam_share, float), np.asarray(volume_share, float)
    if len(cam_share) < 2 or n_boot < 1:
        return np.nan, np.nan
    counts = bootstrap.draw(len(cam_share), n_boot, seed, clusters=clusters)
    return bootstrap.percentile_ci(bootstrap.ratio_of_means(cam_share, volume_share, counts), alpha)


def _enrichment(frame: pd.DataFrame, prefix: str, region: str, n_boot: int, seed: int) -> tuple[float, float, float]:
    """(enrichment, CI low, CI high) of one region from ``{prefix}{cam column}`` / ``{prefix}{volume column}``."""
    cam_col, volume_col = (prefix + c for c in REGION_SCORES[region])
    if cam_col not in frame or volume_col not in frame:
        return np.nan, np.nan, np.nan
    part = frame[[cam_col, volume_col]].dropna()
    if not len(part) or not part[volume_col].mean() > 0:
        return np.nan, np.nan, np.nan
    low, high = enrichment_ci(part[cam_col], part[volume_col], n_boot, seed)
    return float(part[cam_col].mean() / part[volume_col].mean()), low, high


def summarise_scores(scores: pd.DataFrame, sites: Sequence[str], n_boot: int = 0, seed: int = 0) -> list[dict]:
    """Mean scores and enrichments per site and ``all`` over the scored subjects (empty maps included as flat maps).

    ``{region}_enrichment`` = mean CAM share / mean volume share of the region (1 = no preference), each with a
    bootstrap CI over subjects when ``n_boot`` > 0, and the same for the controls when ``scores`` has their
    columns (``shuffled_mask_*``, ``random_init_*``; every enrichment of a site uses the same resamples).
    ``n`` counts scored subjects, ``n_empty_maps`` those among them whose CAM was zero everywhere, ``n_skipped``
    those without a tumour mask; ``explained_class`` counts the classes whose evidence was shown.
    """
    rows = []
    for site in list(sites) + ["all"]:
        part = scores if site == "all" else scores[scores["site"] == site]
        scored = part[part["note"] == ""]
        row = {"site": site, "n": len(scored), "n_skipped": len(part) - len(scored),
               "n_empty_maps": int(pd.to_numeric(scored.get("empty_map"), errors="coerce").fillna(0).sum())
               if "empty_map" in scored else 0}
        row.update({m: float(scored[m].mean()) if len(scored) else np.nan for m in SCORE_COLUMNS})
        for region in REGION_SCORES:
            for prefix, suffix in (("", ""), ("shuffled_mask_", "_shuffled_mask"), ("random_init_", "_random_init")):
                name = f"{region}_enrichment{suffix}"
                row[name], row[f"{name}_ci_low"], row[f"{name}_ci_high"] = _enrichment(scored, prefix, region,
                                                                                       n_boot, seed)
        if "random_init_empty_map" in scored:
            row["n_empty_maps_random_init"] = int(scored["random_init_empty_map"].fillna(0).sum())
        if "explained_class" in scored:
            counts = scored["explained_class"].value_counts()
            row["explained_class"] = ", ".join(f"{name} {counts[name]}" for name in sorted(counts.index))
        reasons = part.loc[part["note"] != "", "note"].value_counts()
        notes = [f"{count} subject(s) {reason}" for reason, count in reasons.items()]
        if row["n_empty_maps"]:
            notes.append(f"{row['n_empty_maps']} of {row['n']} map(s) zero everywhere, scored as flat maps "
                         "(enrichment 1)")
        row["note"] = "; ".join(notes) if len(part) else "no test subjects at this site"
        rows.append(row)
    return rows


def enrichment_view(table: pd.DataFrame, region: str = "lesion") -> pd.DataFrame:
    """Compact view of a :func:`gradcam_table` for display: one region's enrichment, its two controls, and counts."""
    if region not in REGION_SCORES:
        raise ValueError(f"unknown region {region!r}; valid: {list(REGION_SCORES)}")
    name = f"{region}_enrichment"
    columns = ["backbone", "objective", "site", "n", "n_empty_maps"]
    for suffix in ("",) + tuple(f"_{c}" for c in CONTROLS):
        columns += [f"{name}{suffix}", f"{name}{suffix}_ci_low", f"{name}{suffix}_ci_high"]
    return table[[c for c in columns + ["note"] if c in table]]


def scored_test_rows(manifest: pd.DataFrame, per_site: int, seed: int) -> np.ndarray:
    """Test rows scored by Grad-CAM: all, or a seeded sample of ``per_site`` per site (fixed before any map)."""
    test_rows = np.where(manifest["split"].to_numpy() == "test")[0]
    if per_site <= 0:
        return test_rows
    rng = np.random.default_rng(seed)
    sites = manifest["site"].to_numpy()[test_rows]
    kept = [rng.permutation(test_rows[sites == site])[:per_site] for site in sorted(set(sites))]
    return np.sort(np.concatenate(kept))


def gradcam_table(ctx, methods: Sequence[str], objectives: Sequence[str] | None = None, endpoint: str | None = None,
                  load_model: Callable[..., nn.Module] | None = None, progress: bool = True) -> pd.DataFrame:
    """Grad-CAM localization on the TEST subjects per backbone, objective and site (+ ``all``), with controls.

    The subjects: every test subject, or ``analyses.gradcam_max_subjects_per_site`` per site
    (:func:`scored_test_rows`).

    Args:
        methods: backbones; objectives: default the configured ones among erm, dro.
        endpoint: default ``analyses.gradcam_endpoint``.
        load_model: ``(ctx, method, objective) -> model``; default :func:`nrfm.train.finetune.load_finetuned`.

    Also writes per-subject scores (the trained maps, their shuffled-mask scores and the random-init maps'
    ``random_init_*`` scores) to ``artifacts/gradcam_subjects_{method}_{objective}_{endpoint}.csv``.
    """
    seed = ctx.config.seed
    endpoint = endpoint or ctx.config.analyses.gradcam_endpoint
    objectives = tuple(objectives or [o for o in ("erm", "dro") if o in ctx.config.finetuning.objectives])
    load_model = load_model or load_finetuned_model
    test_rows = scored_test_rows(ctx.manifest, ctx.config.analyses.gradcam_max_subjects_per_site, seed)
    masks = _test_masks(ctx, test_rows, progress)
    scorable = [int(i) for i in test_rows if np.any(masks[int(i)] > 0)]
    order = mask_derangement(len(scorable), seed)
    partners = {i: scorable[j] for i, j in zip(scorable, order) if i != scorable[j]}
    rows = []
    for method in methods:
        for objective in objectives:
            model = load_model(ctx, method, objective)
            threshold = decision_threshold(ctx, method, objective, endpoint)
            scores = gradcam_subject_scores(ctx, model, endpoint, test_rows, progress=progress, threshold=threshold,
                                            partners=partners, masks=masks)
            position = {sid: int(i) for i, sid in zip(test_rows, ctx.manifest["subject_id"].iloc[test_rows])}
            signs = {position[sid]: 1.0 if cls == "positive" else -1.0
                     for sid, cls in zip(scores["subject_id"], scores["explained_class"]) if isinstance(cls, str)}
            control = gradcam_subject_scores(ctx, random_init_copy(model, seed), endpoint, test_rows,
                                             progress=progress, signs=signs)
            control = control[control["note"] == ""][["subject_id", "empty_map", *SCORE_COLUMNS]]
            scores = scores.merge(control.add_prefix("random_init_").rename(
                columns={"random_init_subject_id": "subject_id"}), on="subject_id", how="left")
            scores = scores[[c for c in scores.columns if c != "note"] + ["note"]]
            atomic_write_csv(ctx.layout.gradcam_subjects(method, objective, endpoint), scores)
            for row in summarise_scores(scores, ctx.sites, ctx.config.analyses.bootstrap, seed):
                rows.append({"backbone": method, "objective": objective, "endpoint": endpoint, **row})
    return pd.DataFrame(rows, columns=list(GRADCAM_COLUMNS + EXTRA_COLUMNS))


def run_gradcam_stage(ctx, methods: Sequence[str], load_model: Callable[..., nn.Module] | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """Compute :func:`gradcam_table` and merge it into ``metrics/gradcam.csv``."""
    table = gradcam_table(ctx, methods, load_model=load_model, progress=progress)
    ctx.write_metrics("gradcam", table, ["backbone", "objective", "endpoint", "site"])
    return table
