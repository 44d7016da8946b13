"""The fine-tuning stage: one pretrained backbone, objective and protocol -> predictions, models, metrics.

Multi-task fine-tuning of a pretrained backbone on the ten endpoints with ERM, reweighted ERM or group DRO:
the model, the loss, the batches, the modes and the model selection are described and implemented in
:mod:`nrfm.train.finetune_fit`; the artifacts' fingerprints in :mod:`nrfm.train.fingerprints`. This module
runs the folds of a protocol, writes the artifacts and metrics, and loads or rebuilds the pooled models.

**Protocols.** ``pooled``: train on the train split of all sites, select on val, test on the test split
(reported per site). ``loso``: for each site, train on the other sites' train split, select on their val
split, and test on the held-out site's exams that neither fine-tuning nor pretraining saw: pretraining used
every site's train split, so with ``analyses.loso_pretrain = unseen_only`` (the default) only the held-out
site's val and test exams are scored, and an exam of a patient also scanned at a training site is left out
(:func:`nrfm.data.splits.fold_rows`, the one fold builder).

**Staleness.** The pooled checkpoint and embeddings carry a fingerprint of the settings, labels, splits, seed
and pretrained weights they came from (:func:`nrfm.train.fingerprints.finetune_fingerprint_inputs`);
:func:`ensure_finetuned` reuses them only when it matches and otherwise retrains, naming what changed.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from nrfm.config import OBJECTIVES, PROTOCOLS
from nrfm.data.splits import Fold, fold_rows
from nrfm.errors import CheckpointError, ConfigError, TrainingError
from nrfm.eval.metrics import molecular_table
from nrfm.files import atomic_torch_save, atomic_write_bytes, atomic_write_csv, atomic_write_json, safe_torch_load
from nrfm.models.backbones import build_backbone
from nrfm.models.readout import readout_backbone
from nrfm.train.finetune_data import apply_in_batches, cuts_of, frozen_inputs, split_backbone, youden_thresholds
from nrfm.train.finetune_fit import FinetuneModel, search_fit
from nrfm.train.fingerprints import _sha256, _stale_reason, changed_settings, finetune_fingerprint_inputs
from nrfm.train.pretrain import pretrained_backbone, pretraining_subjects

CHECKPOINT_FORMAT = 1
logger = logging.getLogger(__name__)


def _write_selection(ctx, method: str, objective: str, protocol: str, rows: list[dict[str, Any]]) -> None:
    """Replace this (backbone, objective, protocol)'s rows of ``metrics/finetune_selection.csv``."""
    frame = pd.DataFrame(rows, columns=SELECTION_COLUMNS)
    path = ctx.layout.metrics("finetune_selection")
    if path.is_file() and path.stat().st_size > 0:
        old = pd.read_csv(path, dtype={"backbone": str, "objective": str, "protocol": str, "fold": str})
        stale = (old["backbone"] == method) & (old["objective"] == objective) & (old["protocol"] == protocol)
        frame = pd.concat([old[~stale], frame], ignore_index=True)
    if "endpoint" not in frame:  # a table written before per-endpoint selection: its rows were joint
        frame["endpoint"] = "all"
    frame["endpoint"] = frame["endpoint"].fillna("all")
    frame = frame.sort_values(["backbone", "objective", "protocol", "fold", "endpoint", "setting"], kind="stable")
    atomic_write_csv(path, frame.reset_index(drop=True))


SELECTION_COLUMNS = ["backbone", "objective", "protocol", "fold", "endpoint", "setting", "weight_decay", "head_l2",
                     "dro_eta", "dro_adjustment", "epochs_trained", "best_epoch", "val_worst_group_loss", "chosen",
                     "selected_on"]


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


def _fold_rows(manifest: pd.DataFrame, protocol: str, pretrained_subjects: list[str] | None = None) -> list[Fold]:
    """The folds of a protocol, from :func:`nrfm.data.splits.fold_rows` (the one fold builder).

    Each :class:`~nrfm.data.splits.Fold` unpacks as ``(fold name, train rows, val rows, test rows)``; its ``notes``
    say which held-out exams were left out (patients on the training side, exams pretraining saw).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    if protocol == "loso" and manifest["site"].nunique() < 2:
        raise TrainingError(f"protocol loso needs at least two sites, the manifest has {sorted(set(manifest['site']))}")
    return fold_rows(manifest, protocol, pretrained_subjects if protocol == "loso" else None)


def _loso_pretrained_subjects(ctx, protocol: str) -> list[str] | None:
    """The exams a LOSO fold must not score (``analyses.loso_pretrain = unseen_only``): those pretraining saw."""
    if protocol != "loso":
        return None
    if ctx.config.analyses.loso_pretrain != "unseen_only":  # the config check refuses 'exclude' already
        raise ConfigError(f"{ctx.config.source}: analyses.loso_pretrain: {ctx.config.analyses.loso_pretrain!r} "
                          "is not implemented; use 'unseen_only'")
    return pretraining_subjects(ctx.manifest)


LOSO_NOTE = "loso: only held-out exams that pretraining never saw are scored (analyses.loso_pretrain=unseen_only)"


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


def _write_embeddings(path, manifest: pd.DataFrame, embedding: Tensor, fingerprint: str = "") -> None:
    buffer = io.BytesIO()
    np.savez(buffer, subject_id=np.asarray(manifest["subject_id"].astype(str).tolist(), dtype=str),
             embedding=embedding.numpy().astype(np.float32), fingerprint=np.asarray(fingerprint))
    atomic_write_bytes(path, buffer.getvalue())


def run_finetune_stage(ctx, method: str, objective: str, protocol: str, progress: bool = True,
                       backbone: nn.Module | None = None, label: str | None = None) -> FinetuneResult:
    """Fine-tune one pretrained backbone with one objective under one protocol; write artifacts and metrics.

    Writes ``artifacts/predictions_{method}_{objective}_{protocol}.csv``, ``artifacts/history_...json``, and
    for ``pooled`` also ``checkpoints/{method}/finetune_{objective}_pooled.pt`` and the embeddings
    ``artifacts/embeddings_{method}_{objective}.npz`` (and ``..._pretrained.npz``) of every manifest row; merges
    the rows of :func:`nrfm.eval.metrics.molecular_table` into ``metrics/molecular.csv``.

    Args:
        ctx: the run context. method: SSL method (backbone name). objective: erm | reweighted | dro.
        protocol: pooled | loso. backbone: use this pretrained backbone instead of
            :func:`nrfm.train.pretrain.pretrained_backbone` (tests, custom backbones, baselines).
        label: write the results under this name instead of ``objective`` (a baseline trained with that
            objective, e.g. ``scratch``); a labelled fit writes predictions, history and metrics rows only (no
            checkpoint or embeddings: later stages read the pretrained backbone's models).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    start = time.perf_counter()
    cfg, device, manifest = ctx.config.finetuning, ctx.device, ctx.manifest.reset_index(drop=True)
    if backbone is None:
        backbone = pretrained_backbone(ctx, method)
    pretrained = backbone.to(device).eval()
    backbone = readout_backbone(pretrained, cfg.readout)
    split = split_backbone(backbone, cfg.mode)
    inputs = frozen_inputs(ctx, method, backbone, split, progress)
    name = label or objective
    keep_models = protocol == "pooled" and label is None
    if keep_models:
        emb = apply_in_batches(lambda z: split.tail(z), inputs, device, cfg.bf16, cfg.channels_last)
        _write_embeddings(ctx.layout.embeddings(method, "pretrained"), manifest, emb)
    endpoints, frames, history, checkpoint, notes = tuple(cfg.endpoints), [], {}, None, []
    folds = _fold_rows(manifest, protocol, _loso_pretrained_subjects(ctx, protocol))
    notes += [n for f in folds for n in f.notes]
    fingerprint = finetune_fingerprint_inputs(ctx, method, objective, pretrained)
    selection: list[dict[str, Any]] = []
    for k, (fold, train, val, test) in enumerate(folds):
        result = search_fit(backbone, inputs, manifest, train, val, cfg, objective, device,
                            seed=ctx.config.seed + k, progress=progress, desc=f"{method}/{name}/{fold}")
        selection += [{"backbone": method, "objective": name, "protocol": protocol, "fold": fold, **row}
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
                         "val_worst_site_auc": result.val_worst_site_auc, "val_site_auc": result.val_site_auc,
                         "per_endpoint": result.per_endpoint}
        if keep_models:
            emb = apply_in_batches(tail, inputs, device, cfg.bf16, cfg.channels_last)
            _write_embeddings(ctx.layout.embeddings(method, objective), manifest, emb,
                              _sha256(fingerprint))
            checkpoint = ctx.layout.finetuned_model(method, objective)
            atomic_torch_save(checkpoint, {
                "format": CHECKPOINT_FORMAT, "method": method, "objective": objective, "mode": cfg.mode,
                "arch": getattr(backbone, "arch", type(backbone).__name__), "endpoints": list(endpoints),
                "model": {k2: v.cpu() for k2, v in result.model.state_dict().items()},
                "objective_state": {k2: v.cpu() for k2, v in result.objective.state_dict().items()},
                "groups": result.groups.names, "best_epoch": result.best_epoch,
                "config_sha256": ctx.config.sha256(), "fingerprint": _sha256(fingerprint),
                "fingerprint_inputs": json.dumps(fingerprint, sort_keys=True)})
    _write_selection(ctx, method, name, protocol, selection)
    predictions = pd.concat(frames, ignore_index=True)
    pred_path = atomic_write_csv(ctx.layout.predictions(method, name, protocol), predictions)
    atomic_write_json(ctx.layout.history(method, name, protocol),
                      {"method": method, "objective": name, "trained_with": objective, "protocol": protocol,
                       "mode": cfg.mode, "config_sha256": ctx.config.sha256(), "folds": history})
    table = molecular_table(predictions, method, name, protocol, ctx.config.seed, cuts_of(cfg),
                            n_boot=ctx.config.analyses.bootstrap, oracle=ctx.oracle, endpoints=endpoints)
    if protocol == "loso":
        table["note"] = ["; ".join(n for n in (note, LOSO_NOTE) if n) for note in table["note"]]
    ctx.write_metrics("molecular", table, key_columns=["backbone", "objective", "protocol", "seed", "site", "endpoint"])
    notes += sorted({n for n in table["note"] if n})
    return FinetuneResult(method, name, protocol, table, pred_path, history, checkpoint,
                          time.perf_counter() - start, notes)


def reuse_stage_outputs(ctx, source: str, method: str, name: str, protocol: str) -> FinetuneResult:
    """Record ``source``'s finished (``name``, ``protocol``) fine-tuning as ``method``'s, without training again.

    Only for a fit whose result cannot differ: the same architecture, the same (random) weights, inputs, settings
    and seed, as the from-scratch baseline of the ResNet methods (:func:`nrfm.eval.baselines.run_baselines`).
    Predictions, history (with ``reused_from``), selection rows and ``molecular.csv`` rows are copied, renamed.
    """
    start = time.perf_counter()
    predictions = pd.read_csv(ctx.layout.predictions(source, name, protocol),
                              dtype={"subject_id": str, "patient_id": str, "site": str, "fold": str})
    pred_path = atomic_write_csv(ctx.layout.predictions(method, name, protocol), predictions)
    history = json.loads(ctx.layout.history(source, name, protocol).read_text())
    atomic_write_json(ctx.layout.history(method, name, protocol), {**history, "method": method, "reused_from": source})
    selection = ctx.read_metrics("finetune_selection")
    mine = selection[(selection["backbone"] == source) & (selection["objective"] == name)
                     & (selection["protocol"] == protocol)]
    _write_selection(ctx, method, name, protocol, mine.assign(backbone=method).to_dict("records"))
    molecular = ctx.read_metrics("molecular")
    table = molecular[(molecular["backbone"] == source) & (molecular["objective"] == name)
                      & (molecular["protocol"] == protocol)].assign(backbone=method)
    ctx.write_metrics("molecular", table, key_columns=["backbone", "objective", "protocol", "seed", "site", "endpoint"])
    return FinetuneResult(method, name, protocol, table, pred_path, history["folds"], None,
                          time.perf_counter() - start, [f"the same fit as {source}'s (identical network and data)"])


# ------------------------------------------------------------------------------------------ pooled models
def load_finetuned(ctx, method: str, objective: str, backbone: nn.Module | None = None) -> FinetuneModel:
    """The pooled-protocol fine-tuned model of ``method`` and ``objective`` (weights_only load), in eval mode.

    Args:
        backbone: an untrained backbone of the right architecture to load into (default:
            ``nrfm.models.backbones.build_backbone(method, ctx.config.pretraining, crop_size)``).

    Raises:
        CheckpointError: not a fine-tuning checkpoint of ``method``, weights that do not fit, or a checkpoint
            made with other settings than this run's (call :func:`ensure_finetuned` to rebuild it).
    """
    path = ctx.layout.finetuned_model(method, objective)
    ckpt = safe_torch_load(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("method") != method:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint of {method!r} (method {ckpt.get('method')!r}, "
                              f"format {ckpt.get('format')!r})")
    if not ckpt.get("fingerprint_inputs"):
        raise CheckpointError(f"{path}: no settings fingerprint (made by an older nrfm); run "
                              "nrfm.train.finetune.ensure_finetuned to rebuild it")
    old = json.loads(ckpt["fingerprint_inputs"])
    # the settings part; the upstream backbone is checked by ensure_finetuned, which has the pretrained weights
    current = finetune_fingerprint_inputs(ctx, method, objective, nn.Identity())
    changed = [c for c in changed_settings(old, current) if not c.startswith("pretrained_backbone_sha256")]
    if changed:
        raise CheckpointError(f"{path}: fine-tuned with other settings than this run ({', '.join(changed)}); run "
                              "nrfm.train.finetune.ensure_finetuned to rebuild it")
    if backbone is None:
        backbone = build_backbone(method, ctx.config.pretraining, ctx.config.preprocessing.crop_size)
    model = FinetuneModel(readout_backbone(backbone, ctx.config.finetuning.readout), tuple(ckpt["endpoints"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit a {ckpt.get('arch')} backbone of this config "
                              f"({str(err).splitlines()[0][:160]})") from None
    return model.eval()


def ensure_finetuned(ctx, method: str, progress: bool = True, backbone: nn.Module | None = None) -> list[str]:
    """Fine-tune (pooled protocol) each configured objective whose model or embeddings are missing or stale.

    Later stages call this, so a notebook run on its own (or after ``--only``) computes what it needs. A model
    is reused only if its fingerprint (:func:`~nrfm.train.fingerprints.finetune_fingerprint_inputs`: settings,
    labels, splits, seed and the pretrained weights) matches this run; otherwise it is retrained and a warning
    names what changed.

    Args:
        backbone: the pretrained backbone (default: :func:`nrfm.train.pretrain.pretrained_backbone`).

    Returns:
        The objectives that were (re)trained.
    """
    if backbone is None:
        backbone = pretrained_backbone(ctx, method)
    rebuilt = []
    for objective in ctx.config.finetuning.objectives:
        reason = _stale_reason(ctx, method, objective, finetune_fingerprint_inputs(ctx, method, objective, backbone))
        if reason:
            logger.warning("fine-tuning %s/%s again: %s", method, objective, reason)
            run_finetune_stage(ctx, method, objective, "pooled", progress=progress, backbone=backbone)
            rebuilt.append(objective)
    return rebuilt


def read_history(ctx, method: str, objective: str, protocol: str = "pooled") -> dict[str, Any] | None:
    """The training history written by :func:`run_finetune_stage` (None if that run has not happened)."""
    path = ctx.layout.history(method, objective, protocol)
    return json.loads(path.read_text()) if path.is_file() else None
