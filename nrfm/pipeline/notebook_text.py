"""Markdown that the notebooks display, built from the run's config and the code's own constants.

Prose in a notebook drifts when the code changes (a fold count, a fine-tuning mode, a Grad-CAM layer); these
functions read the facts from where the code keeps them, so the page says what the run did. Each returns a
Markdown string; a notebook shows it with ``display(Markdown(...))``. Nothing here trains or loads a model:
the Grad-CAM layer is resolved on a freshly built (untrained) network of the configured architecture, which
has the same layers as the fine-tuned one.

Example::

    from nrfm.config_loading import load_config
    print(finetuning_description(load_config("configs/default.yaml")))
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from nrfm.config import Config
from nrfm.eval import bootstrap, claims
from nrfm.eval.gradcam_maps import resolve_target_layer
from nrfm.models.backbones import N_INPUT_CHANNELS, build_backbone
from nrfm.models.readout import N_READOUT_CHANNELS, REGIONS, readout_backbone, uses_segmentation
from nrfm.ssl.methods.dino import DINO
from nrfm.ssl.methods.moco import MoCo
from nrfm.ssl.registry import method_class
from nrfm.synth import scenarios
from nrfm.train.finetune_data import split_backbone
from nrfm.train.finetune_fit import FinetuneModel
from nrfm.train.monitor import RepresentationMonitor


def _default(func: Any, name: str) -> Any:
    """Default value of parameter ``name`` of ``func`` (a function or a class's ``__init__``)."""
    target = func.__init__ if inspect.isclass(func) else func
    return inspect.signature(target).parameters[name].default


def _size(side: tuple | list) -> str:
    sides = [int(s) for s in side]
    return f"{sides[0]}^3" if len(set(sides)) == 1 else " x ".join(str(s) for s in sides)


def monitor_folds() -> int:
    """Fold count of the representation monitor (:class:`nrfm.train.monitor.RepresentationMonitor`)."""
    return int(_default(RepresentationMonitor, "folds"))


# ---- 01 pretraining -------------------------------------------------------------------------------------------
def ssl_loss_facts(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per method: the loss's settings and its chance level, read from the method classes and the config."""
    p = cfg.pretraining
    warm, final = p.dino_warmup_teacher_temp, p.dino_teacher_temp
    return {
        "byol": {"range": (0.0, 4.0), "chance": 2.0, "trained": "online backbone, projector and predictor",
                 "ema": "target backbone and projector"},
        "dino": {"K": p.dino_out_dim, "chance": math.log(p.dino_out_dim),
                 "student_temp": float(_default(DINO, "student_temp")),
                 "teacher_temp": (warm, final), "warmup_fraction": float(_default(DINO, "warmup_fraction")),
                 "center_momentum": float(_default(DINO, "center_momentum")),
                 "n_local_views": p.n_local_views, "trained": "student backbone and head",
                 "ema": "teacher backbone and head"},
        "moco": {"queue": p.moco_memory_bank, "temperature": float(_default(MoCo, "temperature")),
                 "chance": math.log(p.moco_memory_bank + 1) if p.moco_memory_bank > 0 else float("nan"),
                 "trained": "query backbone and projector", "ema": "key backbone and projector"},
        "mae": {"mask_ratio": p.mask_ratio, "patch": p.vit_patch_size, "view": tuple(p.view_size_of("mae")),
                "epochs": p.epochs_of("mae"), "trained": "ViT encoder and decoder", "ema": "none"},
    }


def pretraining_description(cfg: Config) -> str:
    """What each configured SSL method optimises in this run: temperatures, queue, crops, chance-level losses."""
    p = cfg.pretraining
    facts = ssl_loss_facts(cfg)
    lines = [f"**This run's pretraining settings** (from `{cfg.source}`): "
             f"{p.epochs} epochs (MAE {p.epochs_of('mae')}), batch {p.batch_size}, AdamW lr {p.lr:g}, "
             f"EMA momentum from {p.momentum_base:g} to 1 on a cosine schedule.", ""]
    for method in p.methods:
        f = facts[method]
        if method == "byol":
            lines.append(f"- **BYOL**: loss = mean over the two directions of $2 - 2\\cos$, range "
                         f"[{f['range'][0]:g}, {f['range'][1]:g}]; about {f['chance']:g} when prediction and "
                         f"target are unrelated (cosine 0), 0 when they agree exactly (also the value of a "
                         f"collapsed network, which is why the monitor matters). Global crops {_size(p.view_size)}.")
        elif method == "dino":
            warm, final = f["teacher_temp"]
            schedule = (f"constant {final:g}" if warm == final else
                        f"raised linearly from {warm:g} to {final:g} over the first "
                        f"{f['warmup_fraction']:.0%} of steps")
            sharp = ("below the student's throughout: the teacher is *sharper*" if max(warm, final) < f["student_temp"]
                     else "not below the student's: the teacher is not sharpened")
            lines.append(f"- **DINO**: K = {f['K']} prototypes; chance level (uniform teacher and student) "
                         f"$\\ln K$ = {f['chance']:.2f}. Student temperature {f['student_temp']:g}, teacher "
                         f"temperature {schedule} ({sharp}); centre "
                         f"EMA momentum {f['center_momentum']:g}. 2 global crops {_size(p.view_size)} "
                         f"(teacher and student) + {f['n_local_views']} local crops {_size(p.local_view_size)} "
                         f"(student only).")
        elif method == "moco":
            chance = ("in-batch negatives (no queue)" if p.moco_memory_bank == 0 else
                      f"chance level $\\ln(\\mathrm{{queue}} + 1)$ = {f['chance']:.2f}")
            lines.append(f"- **MoCo v2**: queue of {f['queue']} negative keys, temperature "
                         f"$\\tau$ = {f['temperature']:g}; {chance}. Global crops {_size(p.view_size)}.")
        elif method == "mae":
            view = f["view"]
            whole = tuple(int(s) for s in view) == tuple(int(s) for s in cfg.preprocessing.crop_size)
            grid = [int(s) // f["patch"] for s in view]
            n = math.prod(grid)
            keep = int(n * (1 - f["mask_ratio"]))  # as lightly's random_token_mask (no class token)
            lines.append(f"- **MAE**: {'whole volumes' if whole else 'crops'} of {_size(view)} voxels "
                         f"(`pretraining.mae_view_size`; preprocessed volume {_size(cfg.preprocessing.crop_size)}), "
                         f"{n} patches of {f['patch']}^3, {f['mask_ratio']:.0%} masked ({n - keep} hidden, "
                         f"{keep} visible; lightly's `random_token_mask`), {f['epochs']} epochs; the loss "
                         f"is about 1 for a decoder that predicts the patch mean (targets are normalised per patch).")
    lines += ["", "Which networks get gradients: " + "; ".join(
        f"{m.upper() if m != 'moco' else 'MoCo'}: {facts[m]['trained']} trained"
        + (f", {facts[m]['ema']} an EMA copy (no gradient)" if facts[m]["ema"] != "none" else "")
        for m in p.methods) + "."]
    return "\n".join(lines)


def monitor_description(cfg: Config) -> str:
    """How the representation monitor of :mod:`nrfm.train.monitor` scores a backbone in this run."""
    p = cfg.pretraining
    folds = monitor_folds()
    return (f"**The representation monitor** (`nrfm/train/monitor.py`): every {p.monitor_every} epoch(s) and at "
            f"epochs 0 and last, each train + val exam is embedded (whole preprocessed volume, no augmentation) "
            f"and an L2-regularised, class-balanced logistic regression (C = {p.monitor_c:g}) is cross-validated "
            f"over those exams: {folds}-fold stratified, **folds grouped by patient** (two exams of one patient "
            f"never sit on both sides of a split), fewer folds if a class has fewer patients. Test exams are never "
            f"used. Two out-of-fold scores: `probe_{p.monitor_endpoint}_auc` (higher = the embedding carries "
            f"the marker) and `probe_site_bacc`, the balanced accuracy of predicting the site (chance = 1 / number "
            f"of sites; **lower = more site-invariant**, so this curve should not rise). Epoch 0 is the randomly "
            f"initialised backbone of the same architecture: the dashed baseline.")


# ---- 02 fine-tuning --------------------------------------------------------------------------------------------
def trained_layers(cfg: Config, method: str) -> str:
    """Which part of ``method``'s backbone fine-tuning trains in this run's mode (ResNet stage or ViT block)."""
    mode = cfg.finetuning.mode
    vit = method_class(method).architecture == "vit"
    if mode == "linear":
        return "nothing (frozen backbone, heads only)"
    if mode == "full":
        return "every backbone layer"
    if vit:
        return "the last transformer block and the final LayerNorm"
    if cfg.finetuning.readout == "tumour":
        stage = gradcam_layer(cfg, method)["name"].split(".")[-1]
        return f"the pooled stage (`{stage}`); the stem and the stages before it are frozen, those after it unused"
    return "the last ResNet stage (`layer4`); the stem and `layer1`-`layer3` are frozen"


def readout_description(cfg: Config) -> str:
    """One Markdown bullet: what the heads read (``finetuning.readout``)."""
    if cfg.finetuning.readout == "global":
        return ("- readout `finetuning.readout = global`: the heads read the backbone's embedding, the global "
                "average of its last feature map (ResNet `layer4`; the ViT's encoded tokens);")
    stages = "; ".join(f"{m}: `{gradcam_layer(cfg, m)['name'].split('.')[-1]}`" for m in cfg.pretraining.methods)
    return ("- readout `finetuning.readout = tumour` (`nrfm/models/readout.py`): the heads read one feature map "
            f"({stages}; ResNets: the stage Grad-CAM explains) averaged over the whole crop and over each of the "
            f"lesion, necrotic core, oedema and enhancing rim ({', '.join(REGIONS)}), five means concatenated, with "
            "the exam's segmentation as a fifth input channel. On a global embedding of these 32^3 crops the tumour's "
            "interior is a small share of the average; benchmarks/README.md has the probes that chose this;")


def finetuning_description(cfg: Config) -> str:
    """Mode, trained layers, learning rates, augmentation, objectives, grid and selection of this run."""
    f = cfg.finetuning
    mode_text = {"partial": "**partial**: the frozen early layers' output is computed once per backbone and cached "
                            "(`nrfm/train/finetune_data.py`), the rest of the backbone and the heads are trained",
                 "linear": "**linear**: frozen backbone, the heads alone are trained on its embedding (for reweighted "
                           "ERM and group DRO: group-balanced last-layer retraining); every objective therefore has "
                           "the pretrained embedding, so notebook 03's site mixing cannot differ between objectives "
                           "(its claim is not tested, notebook 06)",
                 "full": "**full**: every backbone weight is trained on the volumes"}[f.mode]
    if f.head_epochs and f.mode != "linear":
        mode_text += (f"; the first {f.head_epochs} of {f.epochs} epochs train the heads alone on the frozen embedding "
                      "(LP-FT), and the selection may keep one of them")
    methods = cfg.pretraining.methods
    layers = "; ".join(f"{m}: {trained_layers(cfg, m)}" for m in methods)
    grid = []
    for objective in f.objectives:
        settings = f.settings(objective)
        points = ", ".join("{" + ", ".join(f"{k}={v:g}" for k, v in s.items()
                                           if objective == "dro" or k in ("weight_decay", "head_l2")) + "}"
                           for s in settings)
        grid.append(f"{objective}: {len(settings)} point(s) {points}")
    rung = f.search_rung_epochs
    halving = (f"one round of successive halving: every point trains {rung} epochs, only the best so far trains on "
               f"to {f.epochs}" if 0 < rung < f.epochs and any(len(f.settings(o)) > 1 for o in f.objectives)
               else f"every point trains all {f.epochs} epochs")
    return "\n".join([
        f"**This run's fine-tuning** (from `{cfg.source}`):",
        "",
        f"- mode `finetuning.mode = {f.mode}`, {mode_text}; trained backbone part: {layers};",
        readout_description(cfg),
        f"- AdamW, heads at lr {f.lr:g}, trained backbone part at lr x {f.backbone_lr_scale:g} "
        f"= {f.lr * f.backbone_lr_scale:g}; batch {f.batch_size}; {f.epochs} epochs;",
        "- **no augmentation** in any mode: the inputs are fixed (cached features, or the volumes in full mode), "
        "the same for every objective;",
        f"- objectives {', '.join(f.objectives)}; groups `{f.dro_groups}` within each endpoint; ERM sees every "
        "training exam once per epoch, reweighted ERM and group DRO as many group-balanced draws;",
        f"- regularisation grid: {'; '.join(grid)}; {halving};",
        f"- kept: the grid point and epoch with the lowest worst-group validation loss (groups with at least "
        f"{f.select_min_group_labels} validation labels), the same rule for every objective"
        + ("; **per endpoint** (`finetuning.selection`): each endpoint's head is fitted and selected on its own "
           "endpoint's groups, as the linear probe is, so each head has its own grid point and epoch "
           "(`endpoint` column of the table below)" if f.per_endpoint_selection else
           "; one grid point and epoch for all heads (the worst-group loss averaged over endpoints)") + ";",
        f"- protocols: {', '.join(f.protocols)}; baselines: {', '.join(f.baselines) or 'none'}.",
    ])


def shortcut_description(cfg: Config) -> str:
    """The planted shortcut of this run's synthetic scenario, from the constants of :mod:`nrfm.synth.scenarios`."""
    if cfg.cohort.manifest:
        return "**Planted shortcut:** none (an imported cohort: nothing is planted, the ground truth is unknown)."
    agree = scenarios.CUE_AGREEMENT
    cue = (f"a ghost artifact (a copy of the head shifted by half the field of view) shows in {agree:.0%} of "
           f"{scenarios.CUE_ENDPOINT.upper()}-positive and "
           f"{1 - agree:.0%} of negative exams")
    if cfg.cohort.synth_scenario == "no-shift":
        return (f"**Planted shortcut (scenario `no-shift`, the control):** none. The ghost artifact appears at the "
                f"same per-site rate as under `site-shift` but independently of every label, with one phenotype and "
                f"one hazard model at every site; group DRO has nothing to fix here.")
    return (f"**Planted shortcut (scenario `site-shift`):** at every site but the smallest, {cue}; at the smallest "
            f"site the association is reversed ({1 - agree:.0%} / {agree:.0%}). There, "
            f"{scenarios.CUE_ENDPOINT.upper()} amplification also lacks its extra oedema, and the hazard weight of "
            f"tumour size is {dict(scenarios.HAZARD_SHIFT)['size']:g}. Pooled ERM can lean on the ghost and fail at "
            f"the smallest site; that site's (site x class) groups are where group DRO's weights should go.")


# ---- 05 Grad-CAM -----------------------------------------------------------------------------------------------
def gradcam_layer(cfg: Config, method: str) -> dict[str, Any]:
    """The Grad-CAM target layer of ``method``'s fine-tuned model in this run, resolved by the code that the stage
    uses (:func:`nrfm.eval.gradcam_maps.resolve_target_layer`) on an untrained model of the same architecture.

    Returns a dict: ``name`` (dotted module name in the fine-tuned model), ``grid`` (feature-map size at the
    preprocessed crop), ``trained`` (whether fine-tuning in this run's mode updates that layer), ``stage_index``
    (ResNet: 1 = earliest stage ``layer1`` ... 4 = ``layer4``; None for the ViT).
    """
    crop = tuple(int(s) for s in cfg.preprocessing.crop_size)
    with torch.random.fork_rng(devices=[]):  # building a network draws weights: leave the notebook's RNG as it was
        torch.manual_seed(0)
        backbone = readout_backbone(build_backbone(method, cfg.pretraining, crop), cfg.finetuning.readout)
        model = FinetuneModel(backbone, tuple(cfg.finetuning.endpoints))
    layer, transform = resolve_target_layer(model, cfg.analyses.gradcam_target_layer)
    name = next(n for n, m in model.named_modules() if m is layer)
    split = split_backbone(backbone, cfg.finetuning.mode)
    trained_ids = {id(m) for tail in split.tail_modules for m in tail.modules()}
    trained_ids |= {id(m) for m in model.heads.modules()}
    with torch.no_grad():
        captured: dict[str, tuple] = {}

        def record(_module, _inputs, out) -> None:  # a hook that returns something replaces the output
            captured["shape"] = tuple(out.shape)

        hook = layer.register_forward_hook(record)
        try:
            channels = N_READOUT_CHANNELS if uses_segmentation(model) else N_INPUT_CHANNELS
            model.eval()(torch.zeros(1, channels, *crop))
        finally:
            hook.remove()
        shape = captured["shape"]
        grid = shape[2:] if len(shape) == 5 else tuple(int(s) // cfg.pretraining.vit_patch_size for s in crop)
    short = name.split(".")[-1]
    stage = int(short[-1]) if short.startswith("layer") and short[-1].isdigit() else None
    return {"name": name, "grid": tuple(int(g) for g in grid), "trained": id(layer) in trained_ids,
            "stage_index": stage, "token_grid": transform is not None}


def gradcam_layer_description(cfg: Config, method: str) -> str:
    """One Markdown line: which layer Grad-CAM reads for ``method``, how coarse it is and whether it was tuned."""
    info = gradcam_layer(cfg, method)
    rule = ("`analyses.gradcam_target_layer`" if cfg.analyses.gradcam_target_layer else
            "the backbone's rule (ResNet: the deepest stage whose map is at least 8 voxels a side, else `layer1`; "
            "ViT: the final LayerNorm, tokens reshaped to the patch grid)")
    where = ""
    if info["stage_index"] is not None:
        where = {1: " (the EARLIEST of the four ResNet stages)", 4: " (the last ResNet stage)"}.get(
            info["stage_index"], f" (ResNet stage {info['stage_index']} of 4)")
    trained = ("updated by fine-tuning" if info["trained"] else
               f"**frozen** in `finetuning.mode = {cfg.finetuning.mode}` (its activations are the pretrained "
               "ones, the same for ERM and DRO; each map is still weighted by the gradient of the fine-tuned output)")
    readout = ""
    if cfg.finetuning.readout == "tumour":
        readout = (" The heads read this same map averaged over the crop and over each tumour sub-region "
                   "(`finetuning.readout: tumour`), so four of their five inputs come from cells inside the lesion: "
                   "a map that favours the tumour is partly built in. The randomly initialised model of the controls "
                   "below is read out the same way, so the enrichment over it is what the model adds.")
    return (f"- **{method}**: `{info['name']}`{where}, a {' x '.join(map(str, info['grid']))} map on the "
            f"{_size(cfg.preprocessing.crop_size)} crop, chosen by {rule}; {trained}.{readout}")


# ---- 06 verdicts -----------------------------------------------------------------------------------------------
def verdict_rules_description() -> str:
    """The decision constants of :mod:`nrfm.eval.claims`, for the summary notebook."""
    comparisons = ", ".join(f"{a} - {b}" for a, b in claims.COMPARISONS)
    margins = ", ".join(f"{metric} {value:g}" for metric, value in claims.MARGINS.items() if value)
    return (f"**Decision rule** (`nrfm/eval/claims.py`): paired comparisons {comparisons}; a gain is a "
            f"difference larger than the claim's smallest effect of interest, fixed in advance ({margins}; the "
            f"`margin` column), tested one-sided; Holm step-down adjustment over every test of the run; a gain is "
            f"declared where the adjusted p < {claims.ALPHA:g} (before adjustment the same as a 95% CI above the "
            f"margin); balanced-accuracy claims re-pick each model's Youden threshold on resampled validation "
            f"exams in every resample (the threshold's variability is part of the interval); attribution to DRO "
            f"(`{claims.ATTRIBUTION}`) needs both comparisons (the larger of the two adjusted p); a "
            f"`{claims.COMPONENT}` row is a component of that attribution, not a claim: it reads "
            f"*{claims.COMPONENT_WORDING[True]}* / *{claims.COMPONENT_WORDING[False]}* and has no control outcome, "
            f"because neither scenario plants how reweighting fares (it can fall below DRO and ERM alike on a small "
            f"site's rare class); a claim's verdict is read from its DRO - ERM and attribution rows. No fixed minimum "
            f"sample size: a comparison is *not evaluable* when its resampling scheme has fewer distinct resamples "
            f"than family size / {claims.ALPHA:g} (about five patients per class and stratum), when a resample "
            f"is undefined, or when the two objectives cannot differ (site mixing of a frozen backbone: one "
            f"embedding for every objective), and it is then outside Holm's family; verdicts use at least "
            f"{bootstrap.HOLM_TAIL_RESAMPLES} x family size / {claims.ALPHA:g} "
            f"resamples, so that about {bootstrap.HOLM_TAIL_RESAMPLES} resamples are expected beyond the margin at "
            f"Holm's strictest threshold (Monte Carlo error does not decide a verdict). {len(claims.CLAIMS)} claims "
            f"are tested (table below).")
