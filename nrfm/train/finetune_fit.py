"""Fitting the fine-tuning model: the multi-task heads, the loss, one training run and the grid search.

One linear head per endpoint (packed in one ``nn.Linear`` after a LayerNorm) on the backbone's embedding.
Binary endpoints use BCE-with-logits; Ki-67 and TP53-IHC are regressed on ``log1p(percent)`` standardised
with the training mean and SD (so the squared error of a constant prediction is about 1, the scale of a
chance-level BCE of 0.69, and group DRO sees comparable losses). Unknown labels are masked from the loss.

**Groups and the multi-task objective.** Each known label of a training subject is one loss element, and
each element belongs to one group of its endpoint: ``(site, class)`` (``dro_groups = site_class``; ``site``
drops the class, ``class`` drops the site); continuous endpoints take their class from the binarized label
(``>= ki67_threshold`` / ``tp53_ihc_threshold``). :class:`~nrfm.train.dro.GroupDRO` keeps one q per endpoint over that
endpoint's groups and averages the endpoints' robust losses with equal weights (its docstring says why), so q
can move weight to, e.g., CDKN2A/B-positive subjects of the rare site. ERM is the plain mean over all known
elements; reweighted ERM weights each element by 1 / n_g within its endpoint and averages endpoints equally.

**Batches** (:mod:`nrfm.train.samplers`). ERM: every training row exactly once per epoch, shuffled. Reweighted ERM and
group DRO: as many group-balanced draws with replacement (Sagawa et al.'s ``--reweight_groups``, multi-task form
in :mod:`nrfm.train.samplers`), with the sampler's importance weights in the group means.

**Modes** (``FinetuningConfig.mode``):

* ``partial`` (default): the backbone's early stages are frozen and their output is computed once per
  backbone; the last stage (ResNet ``layer4``; the last ViT block and final norm) and the heads are trained.
  DRO can therefore change the embedding (needed by the site-invariance analysis) while every run costs a
  fraction of full fine-tuning: the whole stage (4 backbones x three objectives x grid x pooled + LOSO) fits in
  minutes on 2 CPU cores. No augmentation (inputs are fixed features; the same for every objective).
* ``linear``: frozen backbone, heads only (embeddings identical to the pretrained ones).
* ``full``: every backbone weight is trained on the volumes (slow on a CPU; no augmentation).

With ``readout: tumour`` the heads read :class:`~nrfm.models.readout.TumourReadout` (one stage's map averaged over the
crop and each tumour sub-region); ``partial`` then trains that pooled stage (ResNet) or the last block (ViT).

The backbone is trained at ``lr * backbone_lr_scale``, the heads at ``lr`` (AdamW). With ``head_epochs`` = h > 0
the first h epochs train the heads alone on the frozen embedding (computed once), the rest train the backbone part
too (LP-FT, Kumar et al. 2022: fine-tuning from random heads distorts the pretrained features; starting from
fitted heads keeps what a linear probe finds, and the selection below may keep a heads-only epoch). The heads-only
epochs use the same objective, batches and grid as the others.

**Model selection** (the same rule for every objective: the fair comparison). Each objective is fitted once
per point of its regularisation grid (``FinetuningConfig.settings``: weight decay and the heads' L2,
:func:`head_l2_penalty`; for group DRO also eta and C), each from the same pretrained weights and seed. After
every epoch the validation subjects are scored, and the epoch and grid point with the lowest *worst-group validation loss* are kept
(:func:`~nrfm.train.finetune_data.worst_group_loss`: per endpoint the highest mean loss among its groups with at least
``select_min_group_labels`` validation labels, averaged over endpoints; the mean validation loss only if no group
qualifies). Every point's score goes to ``metrics/finetune_selection.csv`` (written by the stage,
:func:`nrfm.train.finetune.run_finetune_stage`). Decision thresholds are then chosen on validation by Youden's J.

**Per-endpoint selection** (``FinetuningConfig.selection``; the default in ``linear`` mode). With a frozen backbone the
heads are the whole model, so nothing ties the endpoints together but the selection; each endpoint's head is then fitted
and selected on its own (:mod:`nrfm.train.finetune_endpoints`: the rule above on that endpoint's groups), as the
linear-probe baseline is. On the default runs of 2026-12-04 (frozen embeddings of four backbones, four runs) this raised ERM's test
ceiling fraction in 15 of 16 backbone-runs (MoCo 0.05 -> 0.20 in one), where the joint rule had kept one grid point
and epoch for all ten heads (the strongest L2 of the grid, at its edge, for every ERM fit).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS, FinetuningConfig, OBJECTIVES
from nrfm.errors import TrainingError
from nrfm.models.backbones import use_channels_last
from nrfm.train.dro import GroupDRO, build_objective
from nrfm.train.finetune_data import (GroupSpec, apply_in_batches, build_groups, cuts_of, regression_stats,
                                      split_backbone, standardise_targets, to_device, worst_group_loss,
                                      worst_site_mean_auc)
from nrfm.train.monitor import autocast_context
from nrfm.train.samplers import balanced_batches, balanced_row_probabilities, epoch_batches, importance_weights


class FinetuneModel(nn.Module):
    """Backbone plus one output per endpoint.

    ``forward(x (B, 4, D, H, W)) -> (B, len(endpoints))``: logits for binary endpoints, predicted values in
    percent for continuous ones, in ``endpoints`` order. ``backbone`` is the (fine-tuned) Backbone; a
    :class:`~nrfm.models.readout.TumourReadout` takes (B, 5, D, H, W), the segmentation as a fifth channel.

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
    # per-endpoint selection: {endpoint: {"setting", grid values, "epoch", "val_worst_group_loss"}}; empty = joint
    per_endpoint: dict[str, dict[str, Any]] = field(default_factory=dict)


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


class _Training:
    """One fine-tuning run that can be advanced epoch by epoch (the search stops some runs early).

    ``advance(epoch)`` trains up to that epoch, scoring validation after each; ``result()`` loads the kept epoch.
    See :func:`fit` for what one epoch does.
    """

    def __init__(self, backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray,
                 val_rows: np.ndarray, cfg: FinetuningConfig, objective: str, device: torch.device, seed: int,
                 progress: bool, desc: str):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
        self.cfg, self.device, self.desc, self.progress = cfg, device, desc, progress
        self.inputs, self.manifest, self.train_rows, self.val_rows = inputs, manifest, train_rows, val_rows
        self.endpoints = tuple(cfg.endpoints)
        self.cuts = cuts_of(cfg)
        torch.manual_seed(seed)
        mean, std = regression_stats(manifest.iloc[train_rows], self.endpoints)
        self.model = model = FinetuneModel(backbone, self.endpoints, mean, std).to(device)
        self.split = split_backbone(model.backbone, cfg.mode)
        if cfg.channels_last:
            use_channels_last(model.backbone)
        self.targets = standardise_targets(manifest, self.endpoints, mean, std)  # (N, E) NaN = unknown
        self.groups = groups = build_groups(manifest, self.endpoints, train_rows, cfg.dro_groups, self.cuts)
        self.objective = build_objective(objective, len(groups.names), groups.counts, cfg.dro_eta,
                                         cfg.dro_adjustment, groups.names, groups.task).to(device)
        self.train_index = groups.index[train_rows]  # (n_train, E) group of each training label, -1 unknown
        if objective == "erm":
            self.probabilities, self.label_weight = None, None
        else:
            self.probabilities = balanced_row_probabilities(self.train_index, groups.task, groups.counts)
            self.label_weight, _ = importance_weights(self.train_index, groups.counts, self.probabilities)
        trainable = [p for m in self.split.tail_modules for p in m.parameters()]
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([{"params": list(model.heads.parameters()), "lr": cfg.lr},
                                            {"params": trainable, "lr": cfg.lr * cfg.backbone_lr_scale}],
                                           weight_decay=cfg.weight_decay, foreach=True)  # one fused update
        self.generator = torch.Generator().manual_seed(seed)
        self.val_targets, self.val_index = self.targets[val_rows].to(device), groups.index[val_rows]
        self.head_embedding: Tensor | None = None  # frozen embeddings of every row, for the heads-only epochs
        self.history: list[dict[str, Any]] = []
        self.best, self.best_state, self.best_epoch, self.best_worst = (2, np.inf), None, 0, float("nan")
        self.epoch = 0

    def _heads_only(self) -> bool:
        """Whether the next epoch trains the heads alone (the first ``head_epochs`` epochs)."""
        return self.epoch < self.cfg.head_epochs

    def _embedding(self, rows: np.ndarray) -> Tensor:
        """Frozen embeddings of ``rows`` (the backbone part as loaded), computed for every row on first use."""
        if self.head_embedding is None:
            self.model.eval()
            with torch.no_grad():
                self.head_embedding = apply_in_batches(self.split.tail, self.inputs, self.device, self.cfg.bf16,
                                                       self.cfg.channels_last).float()
        return self.head_embedding[rows].to(self.device)

    def _train_epoch(self) -> float:
        cfg, model, device, obj = self.cfg, self.model, self.device, self.objective
        heads_only = self._heads_only()
        model.train()
        model.backbone.eval()  # frozen stages keep their BatchNorm statistics
        for m in ([] if heads_only else self.split.tail_modules):
            m.train()
        obj.train()
        n = len(self.train_rows)
        batches = (_batches(n, cfg.batch_size, self.generator) if self.probabilities is None
                   else balanced_batches(self.probabilities, n, cfg.batch_size, self.generator))
        total, count = 0.0, 0
        for batch in batches:
            positions = batch.numpy()
            rows = self.train_rows[positions]
            if heads_only:
                raw = model.head_outputs(self._embedding(rows)).float()
            else:
                x = to_device(self.inputs[rows], device, cfg.channels_last)
                with autocast_context(device, cfg.bf16):
                    raw = model.head_outputs(self.split.tail(x)).float()
            losses, known = elementwise_loss(raw, self.targets[rows].to(device), model.is_continuous)
            if losses.numel() == 0:
                continue
            weight = None if self.label_weight is None else self.label_weight[positions].to(device)[known]
            loss = obj.loss(losses, self.train_index[positions].to(device)[known], weight)
            if cfg.head_l2 > 0:
                loss = loss + head_l2_penalty(model.heads, cfg.head_l2)
            if not torch.isfinite(loss):
                raise TrainingError(f"{self.desc}: non-finite loss at epoch {self.epoch + 1}; lower finetuning.lr "
                                    "or finetuning.dro_eta")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total, count = total + float(loss.detach()) * len(rows), count + len(rows)
        return total / max(count, 1)

    def _validation_outputs(self) -> Tensor:
        if self.epoch <= self.cfg.head_epochs and self.head_embedding is not None:  # the backbone part is unchanged
            with torch.no_grad():
                return self.model.head_outputs(self._embedding(self.val_rows)).cpu()
        return apply_in_batches(lambda z: self.model.head_outputs(self.split.tail(z)), self.inputs[self.val_rows],
                                self.device, self.cfg.bf16, self.cfg.channels_last)

    def advance(self, until_epoch: int) -> None:
        """Train (and score validation after each epoch) up to ``until_epoch``."""
        bar = tqdm(range(self.epoch + 1, until_epoch + 1), desc=self.desc, disable=not self.progress, leave=False)
        for epoch in bar:
            train_loss = self._train_epoch()
            self.epoch = epoch
            self.model.eval()
            raw_val = self._validation_outputs()
            val_losses, val_known = elementwise_loss(raw_val.to(self.device), self.val_targets, self.model.is_continuous)
            worst, per_group = worst_group_loss(val_losses.detach().cpu(), self.val_index[val_known.cpu()], self.groups,
                                                self.cfg.select_min_group_labels)
            entry = {"epoch": epoch, "phase": "heads" if epoch <= self.cfg.head_epochs else "backbone",
                     "train_loss": train_loss, "val_loss": float(val_losses.mean()),
                     "val_worst_group_loss": worst, "val_group_loss": per_group}
            if isinstance(self.objective, GroupDRO):
                entry["q"] = self.objective.q.detach().cpu().tolist()
            self.history.append(entry)
            key = _selection_key(worst, entry["val_loss"])
            if key < self.best:  # ties keep the earlier epoch
                self.best, self.best_epoch, self.best_worst = key, epoch, worst
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{worst:.3f}")

    def result(self) -> FitResult:
        """The model at the kept epoch (eval mode), with the history and its worst-site validation AUC."""
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        # the worst-site mean validation AUC of the kept model, for the record only (selection is on the loss)
        scores = self.model.to_output(self._validation_outputs().to(self.device)).cpu()
        auc_score, per_site = worst_site_mean_auc(self.manifest.iloc[self.val_rows], self.endpoints, scores, self.cuts)
        return FitResult(self.model, self.objective, self.history, self.best_epoch, self.groups,
                         val_worst_group_loss=self.best_worst, selection_key=self.best,
                         val_worst_site_auc=auc_score, val_site_auc=per_site)


def head_l2_penalty(heads: nn.Module, l2: float) -> Tensor:
    """``l2 / 2`` times the summed squares of the heads' weights (every parameter but biases; the LayerNorm's
    scale too, or it could grow to undo a shrunken linear layer): the coupled L2 of Sagawa et al. 2020."""
    return 0.5 * l2 * sum(p.float().pow(2).sum() for name, p in heads.named_parameters() if not name.endswith("bias"))


def fit(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray, val_rows: np.ndarray,
        cfg: FinetuningConfig, objective: str, device: torch.device, seed: int, progress: bool = True,
        desc: str = "finetune") -> FitResult:
    """Fine-tune ``backbone`` (modified in place) with heads on ``train_rows``, selecting the epoch on ``val_rows``.

    One point of the regularisation grid: ``cfg.weight_decay``, ``cfg.dro_eta`` and ``cfg.dro_adjustment``
    (:func:`search_fit` runs the whole grid). ERM sees every training row once per epoch in shuffled batches;
    reweighted ERM and group DRO see as many group-balanced draws (:mod:`nrfm.train.samplers`), with the sampler's
    importance weights in their group means. The kept epoch has the lowest worst-group validation loss
    (:func:`nrfm.train.finetune_data.worst_group_loss`).

    Args:
        inputs: (N, ...) inputs of the trainable part for every manifest row (see :func:`split_backbone`).
        manifest: the run's manifest (labels and sites of every row).
        train_rows, val_rows: integer row positions.
        objective: ``erm``, ``reweighted`` or ``dro``.
    """
    run = _Training(backbone, inputs, manifest, train_rows, val_rows, cfg, objective, device, seed, progress, desc)
    run.advance(cfg.epochs)
    return run.result()


def setting_label(objective: str, setting: dict[str, float]) -> str:
    """Short name of a grid point, e.g. ``weight_decay=0.01 eta=0.1 C=0`` (eta and C for group DRO only)."""
    label = f"weight_decay={setting['weight_decay']:g}"
    if setting.get("head_l2", 0.0):
        label += f" head_l2={setting['head_l2']:g}"
    if objective == "dro":
        label += f" eta={setting['dro_eta']:g} C={setting['dro_adjustment']:g}"
    return label


def search_fit(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray,
               val_rows: np.ndarray, cfg: FinetuningConfig, objective: str, device: torch.device, seed: int,
               progress: bool = True, desc: str = "finetune") -> FitResult:
    """:func:`fit` over the points of ``cfg.settings(objective)``; keep the lowest worst-group validation loss.

    Every point starts from its own copy of ``backbone`` (left unchanged) with the same seed, so the points of
    one objective see the same batches and initial heads. With ``cfg.search_rung_epochs`` = r (0 < r < epochs)
    and several points, the search is one round of successive halving (Jamieson & Talwalkar 2016): every point
    trains r epochs, only the point with the lowest worst-group validation loss so far trains on to
    ``cfg.epochs``, and it is the one kept (its kept epoch may be any of its epochs). With r = 0 every point trains
    all epochs and the lowest score wins. Ties keep the earlier point of the grid. The result carries the chosen
    ``setting`` and a ``search`` row per point (setting, epochs trained, best epoch, score).
    """
    if cfg.per_endpoint_selection and len(cfg.endpoints) > 1:
        # the per-endpoint search is made of search_fit calls: its module imports this one, so it is imported here
        from nrfm.train.finetune_endpoints import _search_per_endpoint
        return _search_per_endpoint(backbone, inputs, manifest, train_rows, val_rows, cfg, objective, device, seed,
                                    progress, desc)
    settings = cfg.settings(objective)
    rung = cfg.search_rung_epochs if 0 < cfg.search_rung_epochs < cfg.epochs and len(settings) > 1 else cfg.epochs
    runs, rows = [], []
    for setting in settings:
        label = setting_label(objective, setting)
        run = _Training(copy.deepcopy(backbone), inputs, manifest, train_rows, val_rows,
                        dataclasses.replace(cfg, **setting), objective, device, seed, progress, f"{desc} {label}")
        run.advance(rung)
        runs.append(run)
        used = setting if objective == "dro" else {**setting, "dro_eta": float("nan"), "dro_adjustment": float("nan")}
        rows.append({"setting": label, **used})
        leader = min(range(len(runs)), key=lambda k: (runs[k].best, k))
        for k, other in enumerate(runs):  # a point behind the leader never trains again: free its weights
            if k != leader:
                other.best_state = other.model = other.optimizer = None
    chosen = min(range(len(runs)), key=lambda k: (runs[k].best, k))
    runs[chosen].advance(cfg.epochs)
    best = runs[chosen].result()
    for k, (run, row) in enumerate(zip(runs, rows)):
        row.update({"epochs_trained": run.epoch, "best_epoch": run.best_epoch,
                    "val_worst_group_loss": run.best_worst, "chosen": k == chosen,
                    # no validation group with select_min_group_labels labels: the mean validation loss decided
                    "selected_on": "worst_group_loss" if run.best[0] == 0 else "mean_val_loss"})
    best.setting = {"setting": rows[chosen]["setting"], **settings[chosen]}
    best.search = [{"endpoint": ",".join(cfg.endpoints) if len(cfg.endpoints) == 1 else "all", **row} for row in rows]
    return best
