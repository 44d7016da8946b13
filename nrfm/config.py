"""Run configuration: one frozen dataclass per stage, with the range checks of each section.

A YAML file mirrors :class:`Config`: top-level ``seed`` and ``device`` plus one mapping per stage
(``cohort``, ``preprocessing``, ``pretraining``, ``finetuning``, ``analyses``, ``report``). Keys left out
take the defaults below. Loading, type checks and overrides are in :mod:`nrfm.config_loading`
(:func:`~nrfm.config_loading.load_config`); an unknown key, a wrong type or an out-of-range value raises
:class:`~nrfm.errors.ConfigError` naming the file and the dotted key, e.g.
``configs/my.yaml: pretraining.epochs: must be >= 1, got 0``.

Example::

    cfg = load_config("configs/smoke.yaml", overrides={"seed": 1})  # from nrfm.config_loading
    cfg.pretraining.epochs
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from nrfm.schema import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS  # noqa: F401 (re-exported)
from nrfm.ssl.registry import method_names

SSL_METHODS = method_names()  # one module per method in nrfm/ssl/methods/
GRADCAM_CLASSES = ("predicted", "positive", "negative")
OBJECTIVES = ("erm", "dro", "reweighted")
PROTOCOLS = ("pooled", "loso")


class _Invalid(ValueError):
    """Raised by ``_check`` methods with the offending key; the loader adds file and section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


def _subset(values: tuple, valid: tuple, key: str) -> None:
    bad = [v for v in values if v not in valid]
    _require(not bad, key, f"unknown value(s) {bad}; valid: {list(valid)}")
    _require(len(values) > 0, key, "must not be empty")


@dataclass(frozen=True)
class CohortConfig:
    """Which data to use: an imported manifest, or the embedded synthetic cohort."""

    manifest: str = ""  # path to a canonical manifest; empty = the synthetic cohort below
    synth_profile: str = "default"  # smoke | default | large
    synth_sites: str = ""  # site spec for `nrfm synth --sites`; empty = the profile's sites
    synth_seed: int = 0  # seed of the synthetic cohort (the run's `seed` drives splits and training)
    synth_scenario: str = "site-shift"  # site-shift (a minority site where the shortcut fails) | no-shift (control)
    data_dir: str = "data"  # synthetic cohorts are generated (once per profile and seed) under here
    split_endpoint: str = "idh"  # splits are stratified by site and this endpoint
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test (by patient)
    # Sites whose manifest fixes the test patients (the synthetic cohort does) split the rest into train/val
    # only, with at least this many validation patients per site (worst-group selection needs some).
    split_min_val_patients: int = 0

    def _check(self) -> None:
        _require(self.synth_profile in ("smoke", "default", "large"), "synth_profile",
                 f"unknown profile {self.synth_profile!r}; valid: ['smoke', 'default', 'large']")
        _require(self.synth_seed >= 0, "synth_seed", f"must be >= 0, got {self.synth_seed}")
        _require(self.synth_scenario in ("site-shift", "no-shift"), "synth_scenario",
                 f"unknown scenario {self.synth_scenario!r}; valid: ['site-shift', 'no-shift']")
        _require(self.split_min_val_patients >= 0, "split_min_val_patients",
                 f"must be >= 0, got {self.split_min_val_patients}")
        _require(self.split_endpoint in BINARY_ENDPOINTS, "split_endpoint",
                 f"unknown endpoint {self.split_endpoint!r}; valid: {list(BINARY_ENDPOINTS)}")
        _require(all(f > 0 for f in self.split_fractions), "split_fractions", "each fraction must be > 0")
        _require(abs(sum(self.split_fractions) - 1.0) < 1e-6, "split_fractions",
                 f"must sum to 1, got {sum(self.split_fractions):.3f}")


@dataclass(frozen=True)
class PreprocessingConfig:
    """MONAI preprocessing shared by every cohort: RAS, resample, z-score in brain, tumour-centred crop."""

    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    crop_size: tuple[int, int, int] = (32, 32, 32)
    cache_dir: str = ".cache/nrfm"  # preprocessed volumes, keyed by file content and these settings

    def _check(self) -> None:
        _require(all(0.2 <= s <= 10 for s in self.spacing_mm), "spacing_mm", "each spacing must be in [0.2, 10] mm")
        _require(all(8 <= c <= 512 for c in self.crop_size), "crop_size", "each crop side must be in [8, 512]")


@dataclass(frozen=True)
class PretrainingConfig:
    """Self-supervised pretraining (one loop for BYOL, DINO, MAE, MoCo)."""

    methods: tuple[str, ...] = SSL_METHODS
    cnn_arch: str = "resnet10"  # resnet10 | resnet18, used by byol, dino, moco
    cnn_width: int = 32  # channels of the first ResNet stage (MONAI's default is 64)
    cnn_stem_stride: int = 2  # ResNet stem stride: 2 = standard ResNet/Med3D stem (~5x faster), 1 = MONAI default
    vit_patch_size: int = 8  # MAE ViT: cubic patch side in voxels
    vit_hidden_size: int = 192
    vit_layers: int = 4
    vit_heads: int = 4
    mask_ratio: float = 0.75
    epochs: int = 20
    mae_epochs: int = 0  # MAE's own epoch count (0 = epochs); MAE needs longer schedules (He et al. 2022, Fig. 7)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    grad_clip: float = 3.0
    view_size: tuple[int, int, int] = (24, 24, 24)  # global crops (voxels)
    local_view_size: tuple[int, int, int] = (16, 16, 16)  # DINO local crops
    mae_view_size: tuple[int, ...] = ()  # MAE's crop (empty = view_size); MAE needs no second view to compare
    n_local_views: int = 2
    bf16: bool = True  # bf16 autocast (CPU with AMX/AVX-512, CUDA)
    channels_last: bool = True  # channels_last_3d memory format
    num_workers: int = 1  # DataLoader workers producing views
    threads: int = 0  # torch intra-op threads; 0 = every core (1 is faster on a machine shared with other jobs)
    monitor_endpoint: str = "idh"  # representation monitor: cross-validated linear-probe AUC on this marker (+ site)
    monitor_every: int = 1  # score the monitor every this many epochs (always at epoch 0 and the last epoch)
    monitor_c: float = 0.1  # inverse L2 strength of the monitor's logistic-regression probe (CV on train + val)
    head_hidden_dim: int = 512  # BYOL/MoCo/DINO MLP heads (papers: 4096 / 2048 / 2048)
    head_out_dim: int = 128  # BYOL/MoCo projection output (papers: 256 / 128)
    dino_out_dim: int = 1024  # DINO prototypes K (paper: 65536)
    dino_warmup_teacher_temp: float = 0.04  # DINO teacher temperature at step 0 (paper 0.04) ...
    dino_teacher_temp: float = 0.07  # ... warmed up linearly to this over the first 30% of steps (paper 0.04-0.07)
    momentum_base: float = 0.99  # EMA start for BYOL/DINO/MoCo, cosine to 1 (papers 0.996/0.996/0.999; runs are short)
    moco_memory_bank: int = 128  # MoCo v2 negatives in the queue (paper 65536; keep below the train-set size)
    mae_decoder_hidden_size: int = 96  # MAE decoder width (paper 512)
    mae_decoder_layers: int = 2  # MAE decoder blocks (paper 8)
    batch_augment: bool = True  # intensity/affine/blur/noise augmentation in torch (else per sample in MONAI)
    augment_on: str = "loader"  # where the torch augmentation runs: loader (workers, per view) | device (whole batch)

    def view_size_of(self, method: str) -> tuple[int, ...]:
        """Global crop size of ``method`` (``mae_view_size`` for MAE when set, else ``view_size``)."""
        return tuple(self.mae_view_size) if method == "mae" and self.mae_view_size else tuple(self.view_size)

    def epochs_of(self, method: str) -> int:
        """Pretraining epochs of ``method`` (``mae_epochs`` for MAE when set, else ``epochs``)."""
        return self.mae_epochs if method == "mae" and self.mae_epochs else self.epochs

    def _check(self) -> None:
        _subset(self.methods, SSL_METHODS, "methods")
        _require(self.cnn_arch in ("resnet10", "resnet18"), "cnn_arch",
                 f"unknown architecture {self.cnn_arch!r}; valid: ['resnet10', 'resnet18']")
        _require(self.cnn_width >= 4, "cnn_width", f"must be >= 4, got {self.cnn_width}")
        _require(0.0 < self.mask_ratio < 1.0, "mask_ratio", f"must be in (0, 1), got {self.mask_ratio}")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0, "warmup_epochs",
                 f"must be in [0, epochs), got {self.warmup_epochs}")
        _require(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _require(all(s >= 8 for s in self.view_size), "view_size", "each side must be >= 8")
        _require(all(s >= 8 for s in self.local_view_size), "local_view_size", "each side must be >= 8")
        _require(self.n_local_views >= 0, "n_local_views", "must be >= 0")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")
        _require(self.threads >= 0, "threads", "must be >= 0")
        _require(self.augment_on in ("loader", "device"), "augment_on",
                 f"unknown place {self.augment_on!r}; valid: ['loader', 'device']")
        _require(self.monitor_endpoint in BINARY_ENDPOINTS, "monitor_endpoint",
                 f"unknown endpoint {self.monitor_endpoint!r}; valid: {list(BINARY_ENDPOINTS)}")
        _require(self.cnn_stem_stride in (1, 2), "cnn_stem_stride", f"must be 1 or 2, got {self.cnn_stem_stride}")
        _require(self.mae_epochs >= 0, "mae_epochs", f"must be >= 0 (0 = epochs), got {self.mae_epochs}")
        _require(self.monitor_every >= 1, "monitor_every", f"must be >= 1, got {self.monitor_every}")
        _require(self.monitor_c > 0, "monitor_c", f"must be > 0, got {self.monitor_c}")
        _require(self.head_hidden_dim >= 8 and self.head_out_dim >= 8 and self.dino_out_dim >= 8,
                 "head_hidden_dim", "head_hidden_dim, head_out_dim and dino_out_dim must each be >= 8")
        _require(0 < self.dino_warmup_teacher_temp <= 1 and 0 < self.dino_teacher_temp <= 1, "dino_teacher_temp",
                 "dino_warmup_teacher_temp and dino_teacher_temp must be in (0, 1]")
        _require(0.0 <= self.momentum_base < 1.0, "momentum_base", f"must be in [0, 1), got {self.momentum_base}")
        _require(self.moco_memory_bank >= 0, "moco_memory_bank", "must be >= 0 (0 = in-batch negatives)")
        _require(self.vit_hidden_size % 6 == 0 and self.vit_hidden_size % self.vit_heads == 0, "vit_hidden_size",
                 f"must be a multiple of 6 (3D sine-cosine embedding) and of vit_heads, got {self.vit_hidden_size}")
        _require(self.mae_decoder_hidden_size % 6 == 0 and self.mae_decoder_hidden_size % self.vit_heads == 0,
                 "mae_decoder_hidden_size", f"must be a multiple of 6 and of vit_heads, got {self.mae_decoder_hidden_size}")
        _require(self.mae_decoder_layers >= 1, "mae_decoder_layers", "must be >= 1")
        _require(len(self.mae_view_size) in (0, 3) and all(s >= 8 for s in self.mae_view_size), "mae_view_size",
                 "must be empty (= view_size) or three sides >= 8")
        key = "mae_view_size" if self.mae_view_size else "view_size"
        for side in self.view_size_of("mae"):
            _require(side % self.vit_patch_size == 0 or "mae" not in self.methods, key,
                     f"each side must be a multiple of vit_patch_size={self.vit_patch_size} for mae")


@dataclass(frozen=True)
class FinetuningConfig:
    """Supervised fine-tuning on the ten endpoints with ERM, reweighted ERM or group DRO.

    ERM trains on one shuffled pass over the training rows per epoch; reweighted ERM and group DRO on
    group-balanced draws (Sagawa et al.'s ``--reweight_groups``; see :mod:`nrfm.train.samplers`). Each objective is fit
    over the points of its regularisation grid (``search_*``: weight decay for all three, also eta and C for
    group DRO; an empty list means the single value of the scalar key), with one round of successive halving
    (``search_rung_epochs``); the point and the epoch with the lowest worst-group validation loss are kept
    (:func:`nrfm.train.finetune_data.worst_group_loss`; in linear mode per endpoint, see ``selection``), and every
    point's score is written to ``metrics/finetune_selection.csv``.
    """

    objectives: tuple[str, ...] = ("erm", "reweighted", "dro")
    protocols: tuple[str, ...] = ("pooled", "loso")
    endpoints: tuple[str, ...] = ENDPOINTS
    # partial = last backbone stage and heads on cached early-stage features (fast; DRO can change the
    # embedding); full = whole backbone and heads (slow on CPU); linear = frozen backbone, heads only
    mode: str = "partial"
    # what the heads read: global = the backbone's embedding (global average of its last feature map); tumour = one
    # stage's feature map averaged over the crop and each tumour sub-region, five means concatenated, with the exam's
    # segmentation as a fifth input channel (nrfm/models/readout.py)
    readout: str = "global"
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # trained backbone part (partial: last stage; full: all) at lr * this
    # linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): the first head_epochs of `epochs` train the heads
    # alone on the frozen embedding (cached once), so that the backbone part then starts from fitted heads and the
    # selection can keep a heads-only epoch; 0 = the backbone part trains from the first epoch
    head_epochs: int = 0
    weight_decay: float = 1e-4  # AdamW weight decay when search_weight_decay is empty
    # L2 penalty lambda / 2 * ||W||^2 on the heads' weights (not biases), added to the training objective as in
    # Sagawa et al. 2020 (SGD weight decay, i.e. a coupled L2): group DRO only beats ERM on worst groups with strong
    # L2 (their lambda = 1) or early stopping. AdamW's decoupled weight decay at lr 3e-3 shrinks a weight by
    # lr * weight_decay = 3e-5 per step, no regulariser at these step counts. When search_head_l2 is empty
    head_l2: float = 0.0
    dro_groups: str = "site_class"  # site_class | site | class (within each endpoint)
    dro_eta: float = 0.01  # step size of the exponentiated-gradient update of q, when search_dro_eta is empty
    dro_adjustment: float = 0.0  # C in the adjustment C / sqrt(n_g); 0 = off; when search_dro_adjustment is empty
    # regularisation grid, every objective gets the same weight-decay grid; DRO also eta x C (product)
    search_weight_decay: tuple[float, ...] = (1e-4,)
    search_dro_eta: tuple[float, ...] = (0.01, 0.1)
    search_dro_adjustment: tuple[float, ...] = ()
    search_head_l2: tuple[float, ...] = (0.0, 0.1, 1.0)
    # successive halving: every grid point trains this many epochs, then only the best one trains on to `epochs`
    # (0 = every point trains all epochs); keeps the default grid's fine-tuning time within ~2.5x one fit per objective
    search_rung_epochs: int = 5
    # a validation group with fewer labels than this is left out of the worst-group validation loss
    select_min_group_labels: int = 3
    # joint = one grid point and epoch for every head (the worst-group validation loss averaged over endpoints);
    # per_endpoint = each endpoint's head from the grid point and epoch with its own lowest worst-group validation loss
    # (linear mode only, where the heads are the whole model; every grid point then trains all epochs);
    # auto = per_endpoint in linear mode, joint otherwise
    selection: str = "auto"
    # the baselines every fine-tuned model is compared with (nrfm/eval/baselines.py): probe = logistic/ridge on the
    # frozen pretrained embedding; handcrafted = radiomics-style features; scratch = the same network randomly
    # initialised and fine-tuned the same way (ERM, same grid and selection)
    baselines: tuple[str, ...] = ("probe", "handcrafted", "scratch")
    ki67_threshold: float = 10.0  # percent; Ki-67 is also reported binarized as >= this
    tp53_ihc_threshold: float = 10.0  # percent of p53-positive nuclei; binarized as >= this
    bf16: bool = True
    channels_last: bool = True

    @property
    def per_endpoint_selection(self) -> bool:
        """Whether each head is selected on its own endpoint (``selection``: per_endpoint, or auto in linear mode)."""
        return self.selection == "per_endpoint" or (self.selection == "auto" and self.mode == "linear")

    def settings(self, objective: str) -> list[dict[str, float]]:
        """The regularisation grid of ``objective``: dicts with weight_decay, head_l2, dro_eta, dro_adjustment."""
        decays = self.search_weight_decay or (self.weight_decay,)
        l2s = self.search_head_l2 or (self.head_l2,)
        etas = (self.search_dro_eta or (self.dro_eta,)) if objective == "dro" else (self.dro_eta,)
        adjustments = ((self.search_dro_adjustment or (self.dro_adjustment,)) if objective == "dro"
                       else (self.dro_adjustment,))
        return [{"weight_decay": float(wd), "head_l2": float(l2), "dro_eta": float(eta), "dro_adjustment": float(c)}
                for wd in decays for l2 in l2s for eta in etas for c in adjustments]

    def _check(self) -> None:
        _subset(self.objectives, OBJECTIVES, "objectives")
        _subset(self.protocols, PROTOCOLS, "protocols")
        _subset(self.endpoints, ENDPOINTS, "endpoints")
        _require(self.mode in ("partial", "full", "linear"), "mode",
                 f"unknown mode {self.mode!r}; valid: ['partial', 'full', 'linear']")
        _require(self.readout in ("global", "tumour"), "readout",
                 f"unknown readout {self.readout!r}; valid: ['global', 'tumour']")
        _require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        _require(0 <= self.head_epochs <= self.epochs, "head_epochs",
                 f"must be between 0 and epochs ({self.epochs}), got {self.head_epochs}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.backbone_lr_scale >= 0, "backbone_lr_scale", "must be >= 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.head_l2 >= 0, "head_l2", "must be >= 0")
        _require(all(v >= 0 for v in self.search_head_l2), "search_head_l2", "each value must be >= 0")
        _require(self.dro_groups in ("site_class", "site", "class"), "dro_groups",
                 f"unknown grouping {self.dro_groups!r}; valid: ['site_class', 'site', 'class']")
        _require(self.dro_eta > 0, "dro_eta", f"must be > 0, got {self.dro_eta}")
        _require(self.dro_adjustment >= 0, "dro_adjustment", f"must be >= 0, got {self.dro_adjustment}")
        _require(all(v >= 0 for v in self.search_weight_decay), "search_weight_decay", "each value must be >= 0")
        _require(all(v > 0 for v in self.search_dro_eta), "search_dro_eta", "each value must be > 0")
        _require(all(v >= 0 for v in self.search_dro_adjustment), "search_dro_adjustment",
                 "each value must be >= 0")
        for key in ("search_weight_decay", "search_head_l2", "search_dro_eta", "search_dro_adjustment"):
            values = getattr(self, key)
            _require(len(set(values)) == len(values), key, f"values must be distinct, got {list(values)}")
        _require(self.select_min_group_labels >= 1, "select_min_group_labels", "must be >= 1")
        _require(self.selection in ("auto", "joint", "per_endpoint"), "selection",
                 f"unknown selection {self.selection!r}; valid: ['auto', 'joint', 'per_endpoint']")
        _require(self.selection != "per_endpoint" or self.mode == "linear", "selection",
                 f"per_endpoint needs mode: linear (in {self.mode} mode the heads share the trained backbone part, "
                 "so one epoch serves every head); use joint or auto")
        if self.baselines:  # empty = no baselines
            _subset(self.baselines, ("probe", "handcrafted", "scratch"), "baselines")
        _require(self.search_rung_epochs >= 0, "search_rung_epochs", f"must be >= 0, got {self.search_rung_epochs}")
        _require(0 < self.ki67_threshold < 100, "ki67_threshold", "must be in (0, 100) percent")
        _require(0 < self.tp53_ihc_threshold < 100, "tp53_ihc_threshold", "must be in (0, 100) percent")


@dataclass(frozen=True)
class AnalysesConfig:
    """Evaluation: bootstrap, site invariance, survival and Grad-CAM settings."""

    bootstrap: int = 1000  # resamples for 95% CIs
    embedding_pca_components: int = 10  # leading PCs for the PCA-silhouette
    umap: bool = True
    tsne: bool = False
    survival_pca_components: int = 5
    survival_use_age: bool = True
    survival_penalizers: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # chosen on validation
    survival_min_events: int = 5  # fewer events at a site: no c-index, said in the table
    gradcam_endpoint: str = "idh"
    # which class's evidence the CAM shows: predicted (each subject's class at the model's validation-chosen
    # threshold, the usual reading of Grad-CAM), positive (the endpoint's logit) or negative (minus the logit)
    gradcam_class: str = "predicted"
    gradcam_subjects_per_site: int = 3
    # test subjects scored per site for the enrichment and its controls (a seeded sample drawn before any map is
    # made, the same for every backbone and objective); 0 = every test subject
    gradcam_max_subjects_per_site: int = 0
    peritumoral_margin_mm: float = 10.0
    site_probe_folds: int = 5  # stratified CV folds of the site probe (capped by the smallest site)
    umap_neighbors: int = 15  # capped at n_subjects - 1 for small test sets
    survival_dro_steps: int = 300  # full-batch Adam steps of the DRO Cox head
    survival_dro_lr: float = 0.05
    survival_dro_eta: float = 0.01  # group DRO step size over sites for the survival head
    gradcam_target_layer: str = ""  # dotted module name in the fine-tuned model; empty = the backbone's choice
    # LOSO and pretraining: unseen_only = a fold scores only the held-out site's exams that self-supervised
    # pretraining never saw (pretraining uses every site's train split); exclude = pretrain per fold without
    # the held-out site (not implemented yet)
    loso_pretrain: str = "unseen_only"
    # site invariance at a fixed case-mix: the *_casemix columns use the test subjects with this marker value
    # (IDH-wildtype by default), so sites that treat different tumour types do not separate through case-mix alone
    site_casemix_endpoint: str = "idh"
    site_casemix_value: float = 0.0
    # reference rows of site_invariance.csv (backbone "none"): intensity features of the preprocessed volumes
    # (preprocessing_baseline) and of the raw volumes plus voxel spacing (positive_control)
    site_reference_rows: bool = True

    def _check(self) -> None:
        _require(self.site_probe_folds >= 2, "site_probe_folds", f"must be >= 2, got {self.site_probe_folds}")
        _require(self.umap_neighbors >= 2, "umap_neighbors", f"must be >= 2, got {self.umap_neighbors}")
        _require(self.survival_dro_steps >= 1, "survival_dro_steps", f"must be >= 1, got {self.survival_dro_steps}")
        _require(self.survival_dro_lr > 0, "survival_dro_lr", f"must be > 0, got {self.survival_dro_lr}")
        _require(self.survival_dro_eta > 0, "survival_dro_eta", f"must be > 0, got {self.survival_dro_eta}")
        _require(self.bootstrap >= 10, "bootstrap", f"must be >= 10, got {self.bootstrap}")
        _require(self.embedding_pca_components >= 2, "embedding_pca_components", "must be >= 2")
        _require(self.survival_pca_components >= 1, "survival_pca_components", "must be >= 1")
        _require(len(self.survival_penalizers) > 0 and all(p >= 0 for p in self.survival_penalizers),
                 "survival_penalizers", "must be a non-empty list of values >= 0")
        _require(self.survival_min_events >= 2, "survival_min_events", "must be >= 2")
        _require(self.gradcam_endpoint in ENDPOINTS, "gradcam_endpoint",
                 f"unknown endpoint {self.gradcam_endpoint!r}; valid: {list(ENDPOINTS)}")
        _require(self.gradcam_class in GRADCAM_CLASSES, "gradcam_class",
                 f"unknown class {self.gradcam_class!r}; valid: {list(GRADCAM_CLASSES)}")
        _require(self.gradcam_subjects_per_site >= 1, "gradcam_subjects_per_site", "must be >= 1")
        _require(self.gradcam_max_subjects_per_site >= 0, "gradcam_max_subjects_per_site", "must be >= 0")
        _require(self.peritumoral_margin_mm > 0, "peritumoral_margin_mm", "must be > 0")
        _require(self.loso_pretrain in ("unseen_only", "exclude"), "loso_pretrain",
                 f"unknown value {self.loso_pretrain!r}; valid: ['unseen_only', 'exclude']")
        _require(self.loso_pretrain != "exclude", "loso_pretrain",
                 "'exclude' (pretraining once per fold without the held-out site) is not implemented; "
                 "use 'unseen_only' (each fold scores only the held-out exams pretraining never saw)")
        _require(self.site_casemix_endpoint in BINARY_ENDPOINTS, "site_casemix_endpoint",
                 f"unknown binary endpoint {self.site_casemix_endpoint!r}; valid: {list(BINARY_ENDPOINTS)}")
        _require(self.site_casemix_value in (0, 1), "site_casemix_value",
                 f"must be 0 or 1, got {self.site_casemix_value}")


@dataclass(frozen=True)
class ReportConfig:
    """The run report."""

    title: str = "NeuroRAD-FM reproduction"
    notebooks: tuple[str, ...] = ()  # empty = every notebook in notebooks/, in order
    # what a completed run keeps (nrfm/pipeline/layout.py): the report, metrics, artifacts and the pretrained and
    # fine-tuned models always; pretraining's resume state (last.pt, ~70 MB per backbone) only if this is true
    keep_resume_state: bool = False

    def _check(self) -> None:
        _require(bool(self.title.strip()), "title", "must not be empty")


@dataclass(frozen=True)
class Config:
    """A whole run. ``source`` is the file it came from (for messages), not part of the hash."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    cohort: CohortConfig = field(default_factory=CohortConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    pretraining: PretrainingConfig = field(default_factory=PretrainingConfig)
    finetuning: FinetuningConfig = field(default_factory=FinetuningConfig)
    analyses: AnalysesConfig = field(default_factory=AnalysesConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: str = field(default="<defaults>", compare=False)

    def _check(self) -> None:
        _require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        _require(self.device in ("auto", "cpu", "cuda"), "device",
                 f"unknown device {self.device!r}; valid: ['auto', 'cpu', 'cuda']")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def sha256(self) -> str:
        """Hash of the resolved settings (not of the file's formatting or location)."""
        return hashlib.sha256(json.dumps(_plain(self.to_dict()), sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
