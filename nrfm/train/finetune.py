"""Multi-task fine-tuning of a pretrained backbone on the ten endpoints with ERM, reweighted ERM or group DRO.

One linear head per endpoint (packed in one ``nn.Linear`` after a LayerNorm) on the backbone's embedding.
Binary endpoints use BCE-with-logits; Ki-67 and TP53-IHC are regressed on ``log1p(percent)`` standardised
with the training mean and SD (so the squared error of a constant prediction is about 1, the scale of a
chance-level BCE of 0.69, and group DRO sees comparable losses). Unknown labels are masked from the loss.

**Groups and the multi-task objective.** Each known label of a training subject is one loss element, and
each element belongs to one group ``(endpoint, site, class)`` (``dro_groups = site_class``; ``site``
drops the class, ``class`` drops the site); continuous endpoints take their class from the binarized
label (``>= ki67_threshold`` / ``tp53_ihc_threshold``). One :class:`~nrfm.train.dro.GroupDRO` runs over all
groups that have training examples, so q can move weight to, e.g., CDKN2A/B-positive subjects of the rare
site, exactly the imbalance the paper targets. ERM is the plain mean over all known elements.

**Modes** (``FinetuningConfig.mode``):

* ``partial`` (default): the backbone's early stages are frozen and their output is computed once per
  backbone; the last stage (ResNet ``layer4``; the last ViT block and final norm) and the heads are trained.
  DRO can therefore change the embedding (needed by the site-invariance analysis) while every run costs a
  fraction of full fine-tuning: the whole stage (4 backbones x {ERM, DRO} x pooled + LOSO) fits in minutes
  on 2 CPU cores. No augmentation (inputs are fixed features; the same for ERM and DRO).
* ``linear``: frozen backbone, heads only (embeddings identical to the pretrained ones).
* ``full``: every backbone weight is trained on the volumes (slow on a CPU; no augmentation).

The backbone is trained at ``lr * backbone_lr_scale``, the heads at ``lr`` (AdamW).

**Model selection** (the same rule for every objective: the fair comparison): after every epoch the
validation subjects are scored, and the epoch with the highest *worst-site mean AUC* is kept: for each site,
the mean AUC over endpoints with both classes in that site's validation labels (continuous endpoints
binarized), then the minimum over sites. Decision thresholds are then chosen on validation by Youden's J.

**Protocols.** ``pooled``: train on the train split of all sites, select on val, test on the test split
(reported per site). ``loso``: for each site, train on the other sites' train split, select on their val
split, and test on the held-out site's exams that neither fine-tuning nor pretraining saw: pretraining used
every site's train split, so with ``analyses.loso_pretrain = unseen_only`` (the default) only the held-out
site's val and test exams are scored, and an exam of a patient also scanned at a training site is left out
(:func:`nrfm.data.manifest.fold_rows`, the one fold builder).

**Staleness.** The pooled checkpoint and embeddings carry a fingerprint of the settings, labels, splits, seed
and pretrained weights they came from (:func:`finetune_fingerprint_inputs`); :func:`ensure_finetuned` reuses
them only when it matches and otherwise retrains, naming what changed.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
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
from torch.nn import functional as F
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS, OBJECTIVES, PROTOCOLS, FinetuningConfig
from nrfm.train.dro import GroupDRO, build_objective
from nrfm.errors import CheckpointError, ConfigError, TrainingError
from nrfm.files import atomic_torch_save, atomic_write_bytes, atomic_write_csv, atomic_write_json, safe_torch_load
from nrfm.train.finetune_data import (GroupSpec, apply_in_batches, autocast, build_groups, cuts_of, frozen_inputs,
                                to_device, regression_stats, split_backbone, standardise_targets,
                                youden_thresholds, worst_site_mean_auc)
from nrfm.data.manifest import Fold, fold_rows
from nrfm.eval.metrics import molecular_table

CHECKPOINT_FORMAT = 1
logger = logging.getLogger(__name__)


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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Shuffled index batches; a last batch of one is merged into the previous one (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=generator)
    batches = list(perm.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


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


def fit(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray, val_rows: np.ndarray,
        cfg: FinetuningConfig, objective: str, device: torch.device, seed: int, progress: bool = True,
        desc: str = "finetune") -> FitResult:
    """Fine-tune ``backbone`` (modified in place) with heads on ``train_rows``, selecting on ``val_rows``.

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
                          groups.names).to(device)
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
    history, best, best_state, best_epoch = [], -np.inf, None, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        model.backbone.eval()  # frozen stages keep their BatchNorm statistics
        for m in split.tail_modules:
            m.train()
        obj.train()
        total, count = 0.0, 0
        for batch in _batches(len(train_rows), cfg.batch_size, generator):
            rows = train_rows[batch.numpy()]
            x = to_device(inputs[rows], device, cfg.channels_last)
            with autocast(device, cfg.bf16):
                raw = model.head_outputs(split.tail(x)).float()
            losses, known = elementwise_loss(raw, targets[rows].to(device), model.is_continuous)
            if losses.numel() == 0:
                continue
            loss = obj.loss(losses, groups.index[rows].to(device)[known])
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
        score, per_site = worst_site_mean_auc(val_y, endpoints, model.to_output(raw_val.to(device)).cpu(), cuts)
        val_losses, _ = elementwise_loss(raw_val.to(device), targets[val_rows].to(device), model.is_continuous)
        entry = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": float(val_losses.mean()),
                 "val_worst_site_auc": score, "val_site_auc": per_site}
        if isinstance(obj, GroupDRO):
            entry["q"] = obj.q.detach().cpu().tolist()
        history.append(entry)
        # NaN (no site evaluable) never beats a number; then the first epoch with the lowest val loss wins
        key = score if np.isfinite(score) else -1e9 - entry["val_loss"]
        if key > best:
            best, best_epoch = key, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val=f"{score:.3f}")
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, obj, history, best_epoch, groups)


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
    """The folds of a protocol, from :func:`nrfm.data.manifest.fold_rows` (the one fold builder).

    Each :class:`~nrfm.data.manifest.Fold` unpacks as ``(fold name, train rows, val rows, test rows)``; its ``notes``
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
    from nrfm.train.pretrain import pretraining_subjects

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
                       backbone: nn.Module | None = None) -> FinetuneResult:
    """Fine-tune one pretrained backbone with one objective under one protocol; write artifacts and metrics.

    Writes ``artifacts/predictions_{method}_{objective}_{protocol}.csv``, ``artifacts/history_...json``, and
    for ``pooled`` also ``checkpoints/{method}/finetune_{objective}_pooled.pt`` and the embeddings
    ``artifacts/embeddings_{method}_{objective}.npz`` (and ``..._pretrained.npz``) of every manifest row; merges
    the rows of :func:`nrfm.eval.metrics.molecular_table` into ``metrics/molecular.csv``.

    Args:
        ctx: the run context. method: SSL method (backbone name). objective: erm | reweighted | dro.
        protocol: pooled | loso. backbone: use this pretrained backbone instead of
            ``nrfm.train.pretrain.ensure_pretrained(ctx, method)`` (tests, custom backbones).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {list(OBJECTIVES)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    start = time.perf_counter()
    cfg, device, manifest = ctx.config.finetuning, ctx.device, ctx.manifest.reset_index(drop=True)
    if backbone is None:
        from nrfm.train.pretrain import ensure_pretrained  # the pretraining stage is needed only here

        backbone = ensure_pretrained(ctx, method, progress=progress)
    backbone = backbone.to(device).eval()
    split = split_backbone(backbone, cfg.mode)
    inputs = frozen_inputs(ctx, method, backbone, split, progress)
    if protocol == "pooled":
        emb = apply_in_batches(lambda z: split.tail(z), inputs, device, cfg.bf16, cfg.channels_last)
        _write_embeddings(ctx.artifacts_dir / f"embeddings_{method}_pretrained.npz", manifest, emb)
    endpoints, frames, history, checkpoint, notes = tuple(cfg.endpoints), [], {}, None, []
    folds = _fold_rows(manifest, protocol, _loso_pretrained_subjects(ctx, protocol))
    notes += [n for f in folds for n in f.notes]
    fingerprint = finetune_fingerprint_inputs(ctx, method, objective, backbone)
    for k, (fold, train, val, test) in enumerate(folds):
        result = fit(copy.deepcopy(backbone), inputs, manifest, train, val, cfg, objective, device,
                     seed=ctx.config.seed + k, progress=progress, desc=f"{method}/{objective}/{fold}")
        tail = split_backbone(result.model.backbone, cfg.mode).tail
        raw = apply_in_batches(lambda z: result.model.head_outputs(tail(z)), inputs, device, cfg.bf16,
                               cfg.channels_last)
        outputs = _scores(result.model, result.model.to_output(raw.to(device)).cpu())
        thresholds = youden_thresholds(manifest.iloc[val], endpoints, outputs[val], cuts_of(cfg))
        frames.append(_predictions(manifest, outputs, fold, train, val, test, endpoints, thresholds, ctx.config.seed))
        history[fold] = {"epochs": result.history, "best_epoch": result.best_epoch, "groups": result.groups.names,
                         "group_counts": result.groups.counts.tolist()}
        if protocol == "pooled":
            emb = apply_in_batches(tail, inputs, device, cfg.bf16, cfg.channels_last)
            _write_embeddings(ctx.artifacts_dir / f"embeddings_{method}_{objective}.npz", manifest, emb,
                              _sha256(fingerprint))
            checkpoint = ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt"
            atomic_torch_save(checkpoint, {
                "format": CHECKPOINT_FORMAT, "method": method, "objective": objective, "mode": cfg.mode,
                "arch": getattr(backbone, "arch", type(backbone).__name__), "endpoints": list(endpoints),
                "model": {k2: v.cpu() for k2, v in result.model.state_dict().items()},
                "objective_state": {k2: v.cpu() for k2, v in result.objective.state_dict().items()},
                "groups": result.groups.names, "best_epoch": result.best_epoch,
                "config_sha256": ctx.config.sha256(), "fingerprint": _sha256(fingerprint),
                "fingerprint_inputs": json.dumps(fingerprint, sort_keys=True)})
    predictions = pd.concat(frames, ignore_index=True)
    pred_path = atomic_write_csv(ctx.artifacts_dir / f"predictions_{method}_{objective}_{protocol}.csv", predictions)
    atomic_write_json(ctx.artifacts_dir / f"history_{method}_{objective}_{protocol}.json",
                      {"method": method, "objective": objective, "protocol": protocol, "mode": cfg.mode,
                       "config_sha256": ctx.config.sha256(), "folds": history})
    table = molecular_table(predictions, method, objective, protocol, ctx.config.seed, cuts_of(cfg),
                            n_boot=ctx.config.analyses.bootstrap, oracle=ctx.oracle, endpoints=endpoints)
    if protocol == "loso":
        table["note"] = ["; ".join(n for n in (note, LOSO_NOTE) if n) for note in table["note"]]
    ctx.write_metrics("molecular", table, key_columns=["backbone", "objective", "protocol", "seed", "site", "endpoint"])
    notes += sorted({n for n in table["note"] if n})
    return FinetuneResult(method, objective, protocol, table, pred_path, history, checkpoint,
                          time.perf_counter() - start, notes)


# ------------------------------------------------------------------------------------- artifact fingerprints
def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameter and buffer values (names included): the upstream artifact's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finetune_fingerprint_inputs(ctx, method: str, objective: str, backbone: nn.Module) -> dict[str, Any]:
    """Everything a pooled fine-tuned model depends on, as a JSON-able dict (its sha256 is the fingerprint).

    The fine-tuning settings (but not which objectives and protocols to run), the preprocessing settings (but
    not the cache folder), the cohort's split settings, the seed, the subjects with their patients, sites,
    splits and labels, and the pretrained backbone's weights (the upstream artifact).
    """
    cfg = ctx.config
    tuning = {k: v for k, v in dataclasses.asdict(cfg.finetuning).items() if k not in ("objectives", "protocols")}
    columns = ["subject_id", "patient_id", "site", "split", *cfg.finetuning.endpoints]
    table = ctx.manifest[columns].astype(str).to_csv(index=False)
    return json.loads(json.dumps({
        "method": method, "objective": objective, "seed": cfg.seed, "finetuning": tuning,
        "preprocessing": {k: v for k, v in dataclasses.asdict(cfg.preprocessing).items() if k != "cache_dir"},
        "cohort": {"split_endpoint": cfg.cohort.split_endpoint, "split_fractions": cfg.cohort.split_fractions},
        "manifest_sha256": hashlib.sha256(table.encode()).hexdigest(),
        "pretrained_backbone_sha256": weights_sha256(backbone)}, default=list))


def _sha256(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprint input dicts, with old -> new for short values."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            short = all(len(json.dumps(v)) <= 40 for v in (a, b))
            out.append(f"{prefix}{key}" + (f" ({json.dumps(a)} -> {json.dumps(b)})" if short else ""))
    return out


def _stale_reason(ctx, method: str, objective: str, inputs: dict[str, Any]) -> str:
    """Why the pooled model and embeddings of ``method``/``objective`` must be rebuilt ('' if they are current)."""
    path = ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt"
    emb = ctx.artifacts_dir / f"embeddings_{method}_{objective}.npz"
    if not path.is_file():
        return f"{path.name} missing"
    if not emb.is_file():
        return f"{emb.name} missing"
    try:
        ckpt = safe_torch_load(path)
    except CheckpointError as err:
        return f"{path.name} unreadable ({err})"
    if ckpt.get("fingerprint") != _sha256(inputs):
        old = ckpt.get("fingerprint_inputs")
        if not old:
            return f"{path.name} has no fingerprint (made by an older nrfm)"
        return f"{path.name} was made with other settings: " + ", ".join(changed_settings(json.loads(old), inputs))
    try:
        with np.load(emb, allow_pickle=False) as data:
            stored = str(data["fingerprint"]) if "fingerprint" in data.files else ""
    except (OSError, ValueError) as err:
        return f"{emb.name} unreadable ({err})"
    if stored != _sha256(inputs):
        return f"{emb.name} does not belong to {path.name}"
    return ""


def load_finetuned(ctx, method: str, objective: str, backbone: nn.Module | None = None) -> FinetuneModel:
    """The pooled-protocol fine-tuned model of ``method`` and ``objective`` (weights_only load), in eval mode.

    Args:
        backbone: an untrained backbone of the right architecture to load into (default:
            ``nrfm.models.backbones.build_backbone(method, ctx.config.pretraining, crop_size)``).

    Raises:
        CheckpointError: not a fine-tuning checkpoint of ``method``, weights that do not fit, or a checkpoint
            made with other settings than this run's (call :func:`ensure_finetuned` to rebuild it).
    """
    path = ctx.checkpoints_dir / method / f"finetune_{objective}_pooled.pt"
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
        from nrfm.models.backbones import build_backbone

        backbone = build_backbone(method, ctx.config.pretraining, ctx.config.preprocessing.crop_size)
    model = FinetuneModel(backbone, tuple(ckpt["endpoints"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit a {ckpt.get('arch')} backbone of this config "
                              f"({str(err).splitlines()[0][:160]})") from None
    return model.eval()


def ensure_finetuned(ctx, method: str, progress: bool = True, backbone: nn.Module | None = None) -> list[str]:
    """Fine-tune (pooled protocol) each configured objective whose model or embeddings are missing or stale.

    Later stages call this, so a notebook run on its own (or after ``--only``) computes what it needs. A model
    is reused only if its fingerprint (:func:`finetune_fingerprint_inputs`: settings, labels, splits, seed and
    the pretrained weights) matches this run; otherwise it is retrained and a warning names what changed.

    Args:
        backbone: the pretrained backbone (default: ``nrfm.train.pretrain.ensure_pretrained(ctx, method)``).

    Returns:
        The objectives that were (re)trained.
    """
    if backbone is None:
        from nrfm.train.pretrain import ensure_pretrained

        backbone = ensure_pretrained(ctx, method, progress=progress)
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
    path = ctx.artifacts_dir / f"history_{method}_{objective}_{protocol}.json"
    return json.loads(path.read_text()) if path.is_file() else None
