"""Multi-task fine-tuning of a pretrained backbone on the ten endpoints with ERM, reweighted ERM or group DRO.

One linear head per endpoint (packed in one ``nn.Linear`` after a LayerNorm) on the backbone's embedding.
Binary endpoints use BCE-with-logits; Ki-67 and TP53-IHC are regressed on ``log1p(percent)`` standardised
with the training mean and SD (so the squared error of a constant prediction is about 1, the scale of a
chance-level BCE of 0.69, and group DRO sees comparable losses). Unknown labels are masked from the loss.

**Groups and the multi-task objective.** Each known label of a training subject is one loss element, and
each element belongs to one group of its endpoint: ``(site, class)`` (``dro_groups = site_class``; ``site``
drops the class, ``class`` drops the site); continuous endpoints take their class from the binarized label
(``>= ki67_threshold`` / ``tp53_ihc_threshold``). :class:`~nrfm.dro.GroupDRO` keeps one q per endpoint over that
endpoint's groups and averages the endpoints' robust losses with equal weights (its docstring says why), so q
can move weight to, e.g., CDKN2A/B-positive subjects of the rare site. ERM is the plain mean over all known
elements; reweighted ERM weights each element by 1 / n_g within its endpoint and averages endpoints equally.

**Batches** (:mod:`nrfm.samplers`). ERM: every training row exactly once per epoch, shuffled. Reweighted ERM and
group DRO: as many group-balanced draws with replacement (Sagawa et al.'s ``--reweight_groups``, multi-task form
in :mod:`nrfm.samplers`), with the sampler's importance weights in the group means.

**Modes** (``FinetuningConfig.mode``):

* ``partial`` (default): the backbone's early stages are frozen and their output is computed once per
  backbone; the last stage (ResNet ``layer4``; the last ViT block and final norm) and the heads are trained.
  DRO can therefore change the embedding (needed by the site-invariance analysis) while every run costs a
  fraction of full fine-tuning: the whole stage (4 backbones x three objectives x grid x pooled + LOSO) fits in
  minutes on 2 CPU cores. No augmentation (inputs are fixed features; the same for every objective).
* ``linear``: frozen backbone, heads only (embeddings identical to the pretrained ones).
* ``full``: every backbone weight is trained on the volumes (slow on a CPU; no augmentation).

The backbone is trained at ``lr * backbone_lr_scale``, the heads at ``lr`` (AdamW).

**Model selection** (the same rule for every objective: the fair comparison). Each objective is fitted once
per point of its regularisation grid (``FinetuningConfig.settings``: weight decay; for group DRO also eta and C),
each from the same pretrained weights and seed. After every epoch the validation subjects are scored, and the
epoch and grid point with the lowest *worst-group validation loss* are kept
(:func:`~nrfm.finetune_data.worst_group_loss`: per endpoint the highest mean loss among its groups with at least
``select_min_group_labels`` validation labels, averaged over endpoints; the mean validation loss only if no group
qualifies). Every point's score goes to ``metrics/finetune_selection.csv``. Decision thresholds are then chosen
on validation by Youden's J.

**Protocols.** ``pooled``: train on the train split of all sites, select on val, test on the test split
(reported per site). ``loso``: for each site, train on the other sites' train split, select on their val
split, and test on every subject of the held-out site.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS, OBJECTIVES, PROTOCOLS, FinetuningConfig
from nrfm.dro import GroupDRO, build_objective
from nrfm.samplers import balanced_batches, balanced_row_probabilities, epoch_batches, importance_weights
from nrfm.errors import CheckpointError, TrainingError
from nrfm.files import atomic_torch_save, atomic_write_bytes, atomic_write_csv, atomic_write_json, safe_torch_load
from nrfm.finetune_data import (GroupSpec, apply_in_batches, autocast, build_groups, cuts_of, frozen_inputs,
                                to_device, regression_stats, split_backbone, standardise_targets,
                                worst_group_loss, youden_thresholds, worst_site_mean_auc)
from nrfm.metrics import molecular_table

CHECKPOINT_FORMAT = 1


class FinetuneModel(nn.Module):
    """Backbone plus one output per endpoint.

    ``forward(x (B, 4, D, H, W)) -> (B, len(endpoints))``: logits for binary endpoints, predicted values in
    percent for continuous ones, in ``endpoints`` order. ``backbone`` is the (fine-tuned) Backbone.

    Args:
        backbone: a Backbone (``embed``, ``embed_dim``).
        endpoints: endpoint names, in output order.
        target_mean, target_std: (E,) standardisation of ``log1p(percent)`` for continuous endpoints
            (ignored, 0 / 1, for binary ones).
    """

    def __init__(self, backbone: nn.Module, endpoints: tuple[str, ...], target_mean: Tensor | None = None,
                 target_std: Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.endpoints = tuple(endpoints)
        n = len(self.endpoints)
        self.heads = nn.Sequential(nn.LayerNorm(backbone.embed_dim), nn.Linear(backbone.embed_dim, n))
        self.register_buffer("is_continuous", torch.tensor([e in CONTINUOUS_ENDPOINTS for e in self.endpoints]))
        self.register_buffer("target_mean", torch.zeros(n) if target_mean is None else target_mean.float())
        self.register_buffer("target_std", torch.ones(n) if target_std is None else target_std.float())

    def head_outputs(self, embedding: Tensor) -> Tensor:
        """(B, embed_dim) -> (B, E) raw outputs: logits, and standardised log1p values for continuous endpoints."""
        return self.heads(embedding)

    def to_output(self, raw: Tensor) -> Tensor:
        """Raw head outputs -> logits (binary) and percent in [0, 100] (continuous)."""
        percent = torch.expm1(raw.float() * self.target_std + self.target_mean).clamp(0.0, 100.0)
        return torch.where(self.is_continuous, percent, raw.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.to_output(self.head_outputs(self.backbone.embed(x)))


# ---------------------------------------------------------------------------------------------- training
@dataclass
class FitResult:
    model: FinetuneModel
    objective: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    groups: GroupSpec
    setting: dict[str, float] = field(default_factory=dict)
    val_worst_group_loss: float = float("nan")
    search: list[dict[str, Any]] = field(default_factory=list)
    selection_key: tuple[int, float] = (2, float("inf"))  # lower is better; compared across grid points
    val_worst_site_auc: float = float("nan")  # of the kept model, for the record
    val_site_auc: dict[str, float] = field(default_factory=dict)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches using every row exactly once; a last batch of one joins the previous one."""
    return epoch_batches(n, batch_size, generator)


def elementwise_loss(raw: Tensor, targets: Tensor, is_continuous: Tensor) -> tuple[Tensor, Tensor]:
    """Per-label losses of known labels.

    Args:
        raw: (B, E) head outputs; targets: (B, E) with NaN for unknown labels (binary 0/1, continuous
            standardised); is_continuous: (E,) bool.

    Returns:
        (M,) losses of the M known labels (BCE-with-logits or squared error) and the (B, E) bool mask of them.
    """
    known = torch.isfinite(targets)
    filled = torch.where(known, targets, torch.zeros_like(targets))
    bce = F.binary_cross_entropy_with_logits(raw, filled.clamp(0, 1), reduction="none")
    squared = (raw - filled) ** 2
    losses = torch.where(is_continuous.unsqueeze(0), squared, bce)
    return losses[known], known


def _selection_key(worst_group: float, val_loss: float) -> tuple[int, float]:
    """Lower is better: the worst-group validation loss; the mean validation loss only when no group qualifies."""
    return (0, worst_group) if np.isfinite(worst_group) else (1, val_loss)


def fit(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray, val_rows: np.ndarray,
        cfg: FinetuningConfig, objective: str, device: torch.device, seed: int, progress: bool = True,
        desc: str = "finetune") -> FitResult:
    """Fine-tune ``backbone`` (modified in place) with heads on ``train_rows``, selecting the epoch on ``val_rows``.

    One point of the regularisation grid: ``cfg.weight_decay``, ``cfg.dro_eta`` and ``cfg.dro_adjustment``
    (:func:`search_fit` runs the whole grid). ERM sees every training row once per epoch in shuffled batches;
    reweighted ERM and group DRO see as many group-balanced draws (:mod:`nrfm.samplers`), with the sampler's
    importance weights in their group means. The kept epoch has the lowest worst-group validation loss
    (:func:`nrfm.finetune_data.worst_group_loss`).

    Args:
        inputs: (N, ...) inputs of the trainable part for every manifest row (see :func:`split_backbone`).
        manifest: the run's manifest (labels and sites of every row).
        train_rows, val_rows: integer row positions.
        objective: ``erm``, ``reweighted`` or ``dro``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    endpoints = tuple(cfg.endpoints)
    cuts = cuts_of(cfg)
    torch.manual_seed(seed)
    mean, std = regression_stats(manifest.iloc[train_rows], endpoints)
    model = FinetuneModel(backbone, endpoints, mean, std).to(device)
    split = split_backbone(model.backbone, cfg.mode)
    if cfg.channels_last:
        model.backbone.to(memory_format=torch.channels_last_3d)
    targets = standardise_targets(manifest, endpoints, mean, std)  # (N, E) NaN = unknown
    groups = build_groups(manifest, endpoints, train_rows, cfg.dro_groups, cuts)
    obj = build_objective(objective, len(groups.names), groups.counts, cfg.dro_eta, cfg.dro_adjustment,
                          groups.names, groups.task).to(device)
    train_index = groups.index[train_rows]  # (n_train, E) group of each training label, -1 unknown
    if objective == "erm":
        probabilities, label_weight = None, None
    else:
        probabilities = balanced_row_probabilities(train_index, groups.task, groups.counts)
        label_weight, _ = importance_weights(train_index, groups.counts, probabilities)
    trainable = [p for m in split.tail_modules for p in m.parameters()]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": list(model.heads.parameters()), "lr": cfg.lr},
                                   {"params": trainable, "lr": cfg.lr * cfg.backbone_lr_scale}],
                                  weight_decay=cfg.weight_decay, foreach=True)  # one fused update, not per tensor
    generator = torch.Generator().manual_seed(seed)
    val_y = manifest.iloc[val_rows]
    val_targets, val_index = targets[val_rows].to(device), groups.index[val_rows]
    history, best, best_state, best_epoch, best_worst = [], (2, np.inf), None, 0, float("nan")
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        model.backbone.eval()  # frozen stages keep their BatchNorm statistics
        for m in split.tail_modules:
            m.train()
        obj.train()
        total, count = 0.0, 0
        batches = (_batches(len(train_rows), cfg.batch_size, generator) if probabilities is None
                   else balanced_batches(probabilities, len(train_rows), cfg.batch_size, generator))
        for batch in batches:
            positions = batch.numpy()
            rows = train_rows[positions]
            x = to_device(inputs[rows], device, cfg.channels_last)
            with autocast(device, cfg.bf16):
                raw = model.head_outputs(split.tail(x)).float()
            losses, known = elementwise_loss(raw, targets[rows].to(device), model.is_continuous)
            if losses.numel() == 0:
                continue
            weight = None if label_weight is None else label_weight[positions].to(device)[known]
            loss = obj.loss(losses, train_index[positions].to(device)[known], weight)
            if not torch.isfinite(loss):
                raise TrainingError(f"{desc}: non-finite loss at epoch {epoch}; lower finetuning.lr or "
                                    "finetuning.dro_eta")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(rows), count + len(rows)
        model.eval()
        raw_val = apply_in_batches(lambda z: model.head_outputs(split.tail(z)), inputs[val_rows], device,
                                   cfg.bf16, cfg.channels_last)
        val_losses, val_known = elementwise_loss(raw_val.to(device), val_targets, model.is_continuous)
        worst, per_group = worst_group_loss(val_losses.detach().cpu(), val_index[val_known.cpu()], groups,
                                            cfg.select_min_group_labels)
        entry = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": float(val_losses.mean()),
                 "val_worst_group_loss": worst, "val_group_loss": per_group}
        if isinstance(obj, GroupDRO):
            entry["q"] = obj.q.detach().cpu().tolist()
        history.append(entry)
        key = _selection_key(worst, entry["val_loss"])
        if key < best:  # ties keep the earlier epoch
            best, best_epoch, best_worst = key, epoch, worst
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val=f"{worst:.3f}")
    model.load_state_dict(best_state)
    model.eval()
    # the worst-site mean validation AUC of the kept model, for the record only (selection is on the loss)
    raw_val = apply_in_batches(lambda z: model.head_outputs(split.tail(z)), inputs[val_rows], device, cfg.bf16,
                               cfg.channels_last)
    auc_score, per_site = worst_site_mean_auc(val_y, endpoints, model.to_output(raw_val.to(device)).cpu(), cuts)
    return FitResult(model, obj, history, best_epoch, groups, val_worst_group_loss=best_worst, selection_key=best,
                     val_worst_site_auc=auc_score, val_site_auc=per_site)


def setting_label(objective: str, setting: dict[str, float]) -> str:
    """Short name of a grid point, e.g. ``weight_decay=0.01 eta=0.1 C=0`` (eta and C for group DRO only)."""
    label = f"weight_decay={setting['weight_decay']:g}"
    if objective == "dro":
        label += f" eta={setting['dro_eta']:g} C={setting['dro_adjustment']:g}"
    return label


def search_fit(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray,
               val_rows: np.ndarray, cfg: FinetuningConfig, objective: str, device: torch.device, seed: int,
               progress: bool = True, desc: str = "finetune") -> FitResult:
    """:func:`fit` once per point of ``cfg.settings(objective)``; keep the lowest worst-group validation loss.

    Every point starts from its own copy of ``backbone`` (left unchanged) with the same seed, so the points of
    one objective see the same batches and initial heads. Ties keep the earlier point of the grid. The returned
    result carries the chosen ``setting`` and a ``search`` row per point (setting, best epoch, score).
    """
    best, rows = None, []
    for setting in cfg.settings(objective):
        label = setting_label(objective, setting)
        point = dataclasses.replace(cfg, **setting)
        result = fit(copy.deepcopy(backbone), inputs, manifest, train_rows, val_rows, point, objective, device,
                     seed, progress, desc=f"{desc} {label}")
        result.setting = {"setting": label, **setting}
        rows.append({"setting": label, **setting, "best_epoch": result.best_epoch,
                     "val_worst_group_loss": result.val_worst_group_loss, "chosen": False})
        if best is None or result.selection_key < best.selection_key:
            best = result
    for row in rows:
        row["chosen"] = row["setting"] == best.setting["setting"]
    best.search = rows
    return best


def _write_selection(ctx, method: str, objective: str, protocol: str, rows: list[dict[str, Any]]) -> None:
    """Replace this (backbone, objective, protocol)'s rows of ``metrics/finetune_selection.csv``."""
    frame = pd.DataFrame(rows, columns=SELECTION_COLUMNS)
    path = ctx.metrics_dir / "finetune_selection.csv"
    if path.is_file() and path.stat().st_size > 0:
        old = pd.read_csv(path, dtype={"backbone": str, "objective": str, "protocol": str, "fold": str})
        stale = (old["backbone"] == method) & (old["objective"] == objective) & (old["protocol"] == protocol)
        frame = pd.concat([old[~stale], frame], ignore_index=True)
    frame = frame.sort_values(["backbone", "objective", "protocol", "fold", "setting"], kind="stable")
    atomic_write_csv(path, frame.reset_index(drop=True))


SELECTION_COLUMNS = ["backbone", "objective", "protocol", "fold", "setting", "weight_decay", "dro_eta",
                     "dro_adjustment", "best_epoch", "val_worst_group_loss", "chosen"]


# -------------------------------------------------------------------------------------------------- stage
@dataclass
class FinetuneResult:
    """What :func:`run_finetune_stage` produced (paths are under the run folder)."""

    method: str
    objective: str
    protocol: str
    metrics: pd.DataFrame
    predictions_path: Any
    history: dict[str, Any]
    checkpoint_path: Any = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _fold_rows(manifest: pd.DataFrame, protocol: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(fold name, train rows, val rows, test rows) per fold of a protocol."""
    split, site = manifest["split"].to_numpy(), manifest["site"].to_numpy()
    if protocol == "pooled":
        return [("pooled", *(np.flatnonzero(split == s) for s in ("train", "val", "test")))]
    if protocol != "loso":
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    sites = sorted(set(site))
    if len(sites) < 2:
        raise TrainingError(f"protocol loso needs at least two sites, the manifest has {sites}")
    return [(held, np.flatnonzero((split == "train") & (site != held)),
             np.flatnonzero((split == "val") & (site != held)),
             np.flatnonzero(site == held)) for held in sites]


def _scores(model: FinetuneModel, outputs: Tensor) -> Tensor:
    """Model outputs -> reported scores: probability for binary endpoints, percent for continuous ones."""
    return torch.where(model.is_continuous.cpu(), outputs, torch.sigmoid(outputs))


def _predictions(manifest: pd.DataFrame, outputs: Tensor, fold: str, train: np.ndarray, val: np.ndarray,
                 test: np.ndarray, endpoints: tuple[str, ...], thresholds: dict[str, float], seed: int) -> pd.DataFrame:
    """Long predictions table (known labels only); ``split`` is each row's role in this fold."""
    role = {**{int(i): "train" for i in train}, **{int(i): "val" for i in val}, **{int(i): "test" for i in test}}
    rows = np.array(sorted(role))
    base = manifest.iloc[rows][["subject_id", "patient_id", "site"]].reset_index(drop=True)
    frames = []
    for j, endpoint in enumerate(endpoints):
        score = outputs[rows, j].numpy().astype(float)
        frames.append(base.assign(split=[role[int(i)] for i in rows], fold=fold, endpoint=endpoint,
                                  y_true=manifest[endpoint].to_numpy(dtype=float)[rows], y_score=score,
                                  threshold=thresholds[endpoint], seed=seed))
    return pd.concat(frames, ignore_index=True).dropna(subset=["y_true"])


def _write_embeddings(path, manifest: pd.DataFrame, embedding: Tensor) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, subject_id=np.asarray(manifest["subject_id"].astype(str).tolist(), dtype=str),
             embedding=embedding.numpy().astype(np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def run_finetune_stage(ctx, method: str, objective: str, protocol: str, progress: bool = True,
                       backbone: nn.Module | None = None) -> FinetuneResult:
    """Fine-tune one pretrained backbone with one objective under one protocol; write artifacts and metrics.

    Writes ``artifacts/predictions_{method}_{objective}_{protocol}.csv``, ``artifacts/history_...json``, and
    for ``pooled`` also ``checkpoints/{method}/finetune_{objective}_pooled.pt`` and the embeddings
    ``artifacts/embeddings_{method}_{objective}.npz`` (and ``..._pretrained.npz``) of every manifest row; merges
    the rows of :func:`nrfm.metrics.molecular_table` into ``metrics/molecular.csv``.

    Args:
        ctx: the run context. method: SSL method (backbone name). objective: erm | reweighted | dro.
        protocol: pooled | loso. backbone: use this pretrained backbone instead of
            ``nrfm.pretrain.ensure_pretrained(ctx, method)`` (tests, custom backbones).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    start = time.perf_counter()
    cfg, device, manifest = ctx.config.finetuning, ctx.device, ctx.manifest.reset_index(drop=True)
    if backbone is None:
        from nrfm.pretrain import ensure_pretrained  # the pretraining stage is needed only here

        backbone = ensure_pretrained(ctx, method, progress=progress)
    backbone = backbone.to(device).eval()
    split = split_backbone(backbone, cfg.mode)
    inputs = frozen_inputs(ctx, method, backbone, split, progress)
    if protocol == "pooled":
        emb = apply_in_batches(lambda z: split.tail(z), inputs, device, cfg.bf16, cfg.channels_last)
        _write_embeddings(ctx.artifacts_dir / f"embeddings_{method}_pretrained.npz", manifest, emb)
    endpoints, frames, history, checkpoint, notes = tuple(cfg.endpoints), [], {}, None, []
    selection: list[dict[str, Any]] = []
    for k, (fold, train, val, test) in enumerate(_fold_rows(manifest, protocol)):
        result = search_fit(backbone, inputs, manifest, train, val, cfg, objective, device,
                            seed=ctx.config.seed + k, progress=progress, desc=f"{method}/{objective}/{fold}")
        selection += [{"backbone": method, "objective": objective, "protocol": protocol, "fold": fold, **row}
                      for row in result.search]
        tail = split_backbone(result.model.backbone, cfg.mode).tail
        raw = apply_in_batches(lambda z: result.model.head_outputs(tail(z)), inputs, device, cfg.bf16,
                               cfg.channels_last)
        outputs = _scores(result.model, result.model.to_output(raw.to(device)).cpu())
        thresholds = youden_thresholds(manifest.iloc[val], endpoints, outputs[val], cuts_of(cfg))
        frames.append(_predictions(manifest, outputs, fold, train, val, test, endpoints, thresholds, ctx.config.seed))
        history[fold] = {"epochs": result.history, "best_epoch": result.best_epoch, "groups": result.groups.names,
                         "group_counts": result.groups.counts.tolist(), "group_task": result.groups.task.tolist(),
                         "tasks": result.groups.task_names, "setting": result.setting, "search": result.search,
                         "val_worst_site_auc": result.val_worst_site_auc, "val_site_auc": result.val_site_auc}
        if protocol == "pooled":
            emb = apply_in_batches(tail, inputs, device, cfg.bf16, cfg.channels_last)
            _write_embeddings(ctx.artifacts_dir / f"embeddings_{method}_{objective}.npz", manifest, emb)
            checkpoint = ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt"
            atomic_torch_save(checkpoint, {
                "format": CHECKPOINT_FORMAT, "method": method, "objective": objective, "mode": cfg.mode,
                "arch": getattr(backbone, "arch", type(backbone).__name__), "endpoints": list(endpoints),
                "model": {k2: v.cpu() for k2, v in result.model.state_dict().items()},
                "objective_state": {k2: v.cpu() for k2, v in result.objective.state_dict().items()},
                "groups": result.groups.names, "best_epoch": result.best_epoch,
                "config_sha256": ctx.config.sha256()})
    _write_selection(ctx, method, objective, protocol, selection)
    predictions = pd.concat(frames, ignore_index=True)
    pred_path = atomic_write_csv(ctx.artifacts_dir / f"predictions_{method}_{objective}_{protocol}.csv", predictions)
    atomic_write_json(ctx.artifacts_dir / f"history_{method}_{objective}_{protocol}.json",
                      {"method": method, "objective": objective, "protocol": protocol, "mode": cfg.mode,
                       "config_sha256": ctx.config.sha256(), "folds": history})
    table = molecular_table(predictions, method, objective, protocol, ctx.config.seed, cuts_of(cfg),
                            n_boot=ctx.config.analyses.bootstrap, oracle=ctx.oracle, endpoints=endpoints)
    ctx.write_metrics("molecular", table, key_columns=["backbone", "objective", "protocol", "seed", "site", "endpoint"])
    notes += sorted({n for n in table["note"] if n})
    return FinetuneResult(method, objective, protocol, table, pred_path, history, checkpoint,
                          time.perf_counter() - start, notes)


def load_finetuned(ctx, method: str, objective: str, backbone: nn.Module | None = None) -> FinetuneModel:
    """The pooled-protocol fine-tuned model of ``method`` and ``objective`` (weights_only load), in eval mode.

    Args:
        backbone: an untrained backbone of the right architecture to load into (default:
            ``nrfm.backbones.build_backbone(method, ctx.config.pretraining, crop_size)``).
    """
    path = ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt"
    ckpt = safe_torch_load(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("method") != method:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint of {method!r} (method {ckpt.get('method')!r}, "
                              f"format {ckpt.get('format')!r})")
    if backbone is None:
        from nrfm.backbones import build_backbone

        backbone = build_backbone(method, ctx.config.pretraining, ctx.config.preprocessing.crop_size)
    model = FinetuneModel(backbone, tuple(ckpt["endpoints"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit a {ckpt.get('arch')} backbone of this config "
                              f"({str(err).splitlines()[0][:160]})") from None
    return model.eval()


def ensure_finetuned(ctx, method: str, progress: bool = True) -> None:
    """Fine-tune (pooled protocol) each configured objective whose model or embeddings this run lacks.

    Later stages call this, so a notebook run on its own (or after ``--only``) computes what it needs.
    """
    for objective in ctx.config.finetuning.objectives:
        done = ((ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt").is_file()
                and (ctx.artifacts_dir / f"embeddings_{method}_{objective}.npz").is_file())
        if not done:
            run_finetune_stage(ctx, method, objective, "pooled", progress=progress)


def read_history(ctx, method: str, objective: str, protocol: str = "pooled") -> dict[str, Any] | None:
    """The training history written by :func:`run_finetune_stage` (None if that run has not happened)."""
    path = ctx.artifacts_dir / f"history_{method}_{objective}_{protocol}.json"
    return json.loads(path.read_text()) if path.is_file() else None
