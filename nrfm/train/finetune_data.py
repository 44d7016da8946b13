"""Labels, groups and validation scores for :mod:`nrfm.train.finetune` (multi-task, unknown labels masked).

* Targets: binary endpoints 0/1, continuous ones ``(log1p(percent) - mean) / sd`` with the training split's
  mean and SD; unknown labels are NaN and never enter a loss.
* Groups: one group per ``(endpoint, site, class)`` seen in training (``site_class``), or per
  ``(endpoint, site)`` (``site``) or ``(endpoint, class)`` (``class``); the class of a continuous endpoint is
  its binarized label. Groups are enumerated from the training labels, so none is empty. Each group belongs to
  its endpoint (``GroupSpec.task``): group DRO keeps one q per endpoint.
* Model selection: the worst-group validation loss (see :func:`worst_group_loss`), the same rule for every
  objective, epoch and regularisation setting; the worst-site mean validation AUC
  (:func:`worst_site_mean_auc`) is logged for reference only.
* Inputs of the trainable part: where the frozen part of a backbone ends (:func:`split_backbone`) and its
  output for every subject, computed once per backbone and cached (:func:`frozen_inputs`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nrfm.config import CONTINUOUS_ENDPOINTS, FinetuningConfig
from nrfm.data.splits import MIN_GROUP_TRAIN
from nrfm.errors import CheckpointError, DataError, TrainingError
from nrfm.eval.metrics import binarize, rank_auc, youden_threshold
from nrfm.files import atomic_torch_save, safe_torch_load
from nrfm.models.backbones import ResNetBackbone, ViTBackbone
from nrfm.models.readout import item_input
from nrfm.train.monitor import autocast_context

GROUPINGS = ("site_class", "site", "class")


def cuts_of(cfg: FinetuningConfig) -> dict[str, float]:
    """Binarization cuts (percent) of the continuous endpoints."""
    return {"ki67": cfg.ki67_threshold, "tp53_ihc": cfg.tp53_ihc_threshold}


def load_volumes(dataset, progress: bool = True, segmentation: bool = False) -> Tensor:
    """(N, 4, D, H, W) float32 images of every dataset item, in order; (N, 5, D, H, W) with the label map as a fifth
    channel when ``segmentation`` (the tumour readout's input, :mod:`nrfm.models.readout`)."""
    images = []
    for i in tqdm(range(len(dataset)), desc="volumes", disable=not progress, leave=False):
        image = item_input(dataset[i], segmentation)
        if images and image.shape != images[0].shape:
            raise DataError(f"dataset item {i}: image shape {tuple(image.shape)} differs from item 0's "
                            f"{tuple(images[0].shape)}; fine-tuning needs one crop size")
        images.append(image)
    if not images:
        raise DataError("the dataset is empty: nothing to fine-tune on")
    return torch.stack(images)


def regression_stats(train: pd.DataFrame, endpoints: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(E,) mean and SD of ``log1p(percent)`` over known training labels (0 / 1 for binary endpoints)."""
    mean, std = torch.zeros(len(endpoints)), torch.ones(len(endpoints))
    for j, endpoint in enumerate(endpoints):
        if endpoint in CONTINUOUS_ENDPOINTS:
            values = np.log1p(train[endpoint].dropna().to_numpy(dtype=float).clip(min=0))
            if len(values) >= 2 and values.std() > 0:
                mean[j], std[j] = float(values.mean()), float(values.std())
    return mean, std


def standardise_targets(frame: pd.DataFrame, endpoints: Sequence[str], mean: Tensor, std: Tensor) -> Tensor:
    """(N, E) float32 training targets; NaN where the label is unknown."""
    out = np.full((len(frame), len(endpoints)), np.nan, dtype=np.float32)
    for j, endpoint in enumerate(endpoints):
        y = frame[endpoint].to_numpy(dtype=float)
        if endpoint in CONTINUOUS_ENDPOINTS:
            y = (np.log1p(y.clip(min=0)) - float(mean[j])) / float(std[j])
        out[:, j] = y
    return torch.from_numpy(out)


@dataclass
class GroupSpec:
    """Groups of the loss elements.

    Attributes:
        names: G names ``endpoint|site|class`` (``*`` where the grouping drops a part).
        counts: (G,) training labels per group (all > 0).
        index: (N, E) int64 group of each (row, endpoint) label; -1 if unknown or in no training group.
        task: (G,) int64 endpoint of each group, numbered 0..T-1 over the endpoints that have a group (groups
            of one endpoint are contiguous).
        task_names: T endpoint names, in task order.
    """

    names: list[str]
    counts: Tensor
    index: Tensor
    task: Tensor
    task_names: list[str]


def build_groups(frame: pd.DataFrame, endpoints: Sequence[str], train_rows: np.ndarray, grouping: str,
                 cuts: Mapping[str, float], min_train: int = MIN_GROUP_TRAIN) -> GroupSpec:
    """Enumerate the groups present in the training labels and index every (row, endpoint) label.

    The small-group rule of :mod:`nrfm.data.splits` (what ``nrfm validate`` announces): a (site, class) group
    with fewer than ``min_train`` training labels is too small to weight on its own, so it is merged with the
    other small groups of the same endpoint and class into ``<endpoint>|small|<class>``. Its labels still
    train every objective and are still scored; only the group weighting changes.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; valid: {list(GROUPINGS)}")
    sites = frame["site"].astype(str).to_numpy()
    in_train = np.zeros(len(frame), dtype=bool)
    in_train[train_rows] = True
    keys = np.empty((len(frame), len(endpoints)), dtype=object)
    for j, endpoint in enumerate(endpoints):
        y = frame[endpoint].to_numpy(dtype=float)
        cls = binarize(endpoint, y, cuts)
        for i in range(len(frame)):
            if np.isfinite(y[i]):
                site = sites[i] if grouping != "class" else "*"
                label = str(int(cls[i])) if grouping != "site" else "*"
                keys[i, j] = f"{endpoint}|{site}|{label}"
    if grouping == "site_class" and min_train > 1:
        tally_all: dict[str, int] = {}
        for k in keys[in_train].ravel():
            if k is not None:
                tally_all[k] = tally_all.get(k, 0) + 1
        small = {k for k, n in tally_all.items() if n < min_train}
        for i, j in np.ndindex(keys.shape):
            if keys[i, j] in small:
                endpoint, _, label = keys[i, j].split("|")
                keys[i, j] = f"{endpoint}|small|{label}"
    train_keys = [k for k in keys[in_train].ravel() if k is not None]
    names = sorted(set(train_keys), key=lambda k: (list(endpoints).index(k.split("|")[0]), k))
    position = {name: g for g, name in enumerate(names)}
    index = np.vectorize(lambda k: position.get(k, -1) if k is not None else -1, otypes=[np.int64])(keys)
    tally = {}
    for k in train_keys:
        tally[k] = tally.get(k, 0) + 1
    counts = torch.tensor([tally[n] for n in names], dtype=torch.float32)
    task_names = list(dict.fromkeys(n.split("|")[0] for n in names))
    task = torch.tensor([task_names.index(n.split("|")[0]) for n in names], dtype=torch.long)
    return GroupSpec(names, counts, torch.from_numpy(index.reshape(len(frame), len(endpoints))), task, task_names)


def worst_group_loss(losses: Tensor, group_idx: Tensor, groups: GroupSpec,
                     min_labels: int = 1) -> tuple[float, dict[str, float]]:
    """Model-selection score: mean over endpoints of the worst group's mean validation loss (lower is better).

    For each endpoint, the mean loss of each of its (training-defined) groups over the validation labels in that
    group; groups with fewer than ``min_labels`` validation labels are left out (one subject's loss is too noisy
    to pick a model on); the endpoint's score is its worst group's loss. The endpoints' scores are averaged with
    equal weights, the same combination as :class:`nrfm.train.dro.GroupDRO`'s objective: one maximum over all groups
    would pick the endpoint with the largest loss scale (squared error of the continuous endpoints against BCE)
    instead of the worst site or class within each endpoint.

    Args:
        losses: (M,) validation losses of the known labels; group_idx: (M,) their group (-1 = no training
            group: ignored); groups: the training groups; min_labels: fewest validation labels per group.

    Returns:
        (score, {group name: mean loss} of the groups used); score NaN if no group has ``min_labels`` labels.
    """
    keep = group_idx >= 0
    losses, group_idx = losses[keep].double().cpu(), group_idx[keep].long().cpu()
    n_groups = len(groups.names)
    counts = torch.bincount(group_idx, minlength=n_groups)
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add(0, group_idx, losses)
    per_group, worst = {}, {}
    for g in torch.nonzero(counts >= max(min_labels, 1)).flatten().tolist():
        value = float(sums[g] / counts[g])
        per_group[groups.names[g]] = value
        task = int(groups.task[g])
        worst[task] = max(worst.get(task, -np.inf), value)
    return (float(np.mean(list(worst.values()))) if worst else float("nan")), per_group


def youden_thresholds(val: pd.DataFrame, endpoints: Sequence[str], scores: Tensor,
                      cuts: Mapping[str, float]) -> dict[str, float]:
    """Per endpoint, Youden's-J threshold on the validation scores (NaN if validation has a single class)."""
    out = {}
    for j, endpoint in enumerate(endpoints):
        y = val[endpoint].to_numpy(dtype=float)
        known = np.isfinite(y)
        out[endpoint] = youden_threshold(binarize(endpoint, y[known], cuts), scores[known, j].numpy())
    return out


def worst_site_mean_auc(val: pd.DataFrame, endpoints: Sequence[str], scores: Tensor,
                        cuts: Mapping[str, float]) -> tuple[float, dict[str, float]]:
    """Model-selection score: min over sites of the mean validation AUC over evaluable endpoints.

    An endpoint is evaluable at a site when that site's known validation labels have both classes
    (continuous endpoints binarized). Returns (score, {site: mean AUC}); the score is NaN when no site has an
    evaluable endpoint.
    """
    per_site = {}
    sites = val["site"].astype(str).to_numpy()
    for site in sorted(set(sites)):
        values = []
        for j, endpoint in enumerate(endpoints):
            y = val[endpoint].to_numpy(dtype=float)
            keep = (sites == site) & np.isfinite(y)
            value = rank_auc(binarize(endpoint, y[keep], cuts), scores[keep, j].numpy())
            if np.isfinite(value):
                values.append(value)
        if values:
            per_site[site] = float(np.mean(values))
    return (min(per_site.values()) if per_site else float("nan")), per_site


# ------------------------------------------------------------------------------ inputs of the trainable part
@dataclass
class BackboneSplit:
    """``tail(trunk(x)) == backbone.embed(x)``; ``tail_modules`` are trained in ``partial`` mode."""

    trunk: Callable[[Tensor], Tensor]
    tail: Callable[[Tensor], Tensor]
    tail_modules: list[nn.Module]


def split_backbone(backbone: nn.Module, mode: str) -> BackboneSplit:
    """Where the frozen part ends for ``mode`` (``linear``, ``partial`` or ``full``).

    ``partial`` needs to know the architecture: a backbone may provide ``finetune_split() -> BackboneSplit``;
    otherwise the kit's ResNet and ViT backbones are split before their last stage / block.
    """
    if mode == "linear":
        return BackboneSplit(backbone.embed, lambda z: z, [])
    if mode == "full":
        return BackboneSplit(lambda x: x, backbone.embed, [backbone])
    if mode != "partial":
        raise ValueError(f"unknown fine-tuning mode {mode!r}; valid: ['full', 'linear', 'partial']")
    if hasattr(backbone, "finetune_split"):
        return backbone.finetune_split()
    if isinstance(backbone, ResNetBackbone):
        net = backbone.net

        def trunk(x: Tensor) -> Tensor:
            backbone._check_input(x)
            x = net.act(net.bn1(net.conv1(x)))
            x = x if net.no_max_pool else net.maxpool(x)
            return net.layer3(net.layer2(net.layer1(x)))

        def tail(h: Tensor) -> Tensor:
            return net.avgpool(net.layer4(h)).flatten(1)

        return BackboneSplit(trunk, tail, [net.layer4])
    if isinstance(backbone, ViTBackbone):
        blocks = backbone.vit.blocks

        def vit_trunk(x: Tensor) -> Tensor:
            tok, _ = backbone.tokens(x)
            for block in blocks[:-1]:
                tok = block(tok)
            return tok

        def vit_tail(tok: Tensor) -> Tensor:
            return backbone.vit.norm(blocks[-1](tok)).mean(dim=1)

        return BackboneSplit(vit_trunk, vit_tail, [blocks[-1], backbone.vit.norm])
    raise TrainingError(f"fine-tuning mode 'partial' does not know how to split a {type(backbone).__name__}; "
                        "set finetuning.mode to 'full' or 'linear'")


@torch.no_grad()
def apply_in_batches(fn: Callable[[Tensor], Tensor], inputs: Tensor, device: torch.device, bf16: bool,
                     channels_last: bool, batch_size: int = 64) -> Tensor:
    """``fn`` over ``inputs`` in batches, float32 result on the CPU."""
    out = []
    for start in range(0, len(inputs), batch_size):
        x = to_device(inputs[start:start + batch_size], device, channels_last)
        with autocast_context(device, bf16):
            out.append(fn(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def to_device(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if channels_last and x.ndim == 5 else x


def _content_keys(dataset, segmentation: bool = False) -> list[str]:
    """One content hash per dataset item: the preprocessing cache's keys (input files' bytes and every
    preprocessing setting) when the dataset has them, else a hash of each item's image (in-memory datasets), and of
    its label map too with ``segmentation``."""
    keys = getattr(dataset, "keys", None)
    if keys is not None and not callable(keys):
        return [str(k) for k in keys]
    parts = ("image", "seg") if segmentation else ("image",)

    def digest(item) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(np.ascontiguousarray(np.asarray(item[part], dtype=np.float32)).tobytes())
        return h.hexdigest()

    return [digest(dataset[i]) for i in range(len(dataset))]


def _fingerprint(backbone: nn.Module, manifest: pd.DataFrame, cfg: FinetuningConfig, preprocessing: Mapping,
                 content: Sequence[str]) -> str:
    """Hash of the backbone weights, the subjects, the inputs' content and the settings that change the frozen
    features (fine-tuning mode, readout and precision, every preprocessing setting but the cache folder)."""
    settings = {k: v for k, v in preprocessing.items() if k != "cache_dir"}
    digest = hashlib.sha256(json.dumps([cfg.mode, cfg.readout, cfg.bf16, cfg.channels_last, settings,
                                        manifest["subject_id"].astype(str).tolist(), list(content)],
                                       sort_keys=True, default=list).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def frozen_inputs(ctx, method: str, backbone: nn.Module, split: BackboneSplit, progress: bool = True) -> Tensor:
    """(N, ...) output of the frozen part for every manifest row; the volumes themselves in ``full`` mode.

    The frozen features do not depend on the objective or the protocol, so they are computed once per backbone
    and cached under ``artifacts/cache/`` (keyed by the backbone's weights, the subjects, the inputs' content
    hashes and every preprocessing and fine-tuning setting that changes them).
    """
    cfg = ctx.config.finetuning
    manifest = ctx.manifest.reset_index(drop=True)
    segmentation = cfg.readout == "tumour"
    if cfg.mode == "full":
        return load_volumes(ctx.dataset(progress=progress), progress, segmentation)
    dataset = ctx.dataset(progress=progress)
    key = _fingerprint(backbone, manifest, cfg, dataclasses.asdict(ctx.config.preprocessing),
                       _content_keys(dataset, segmentation))[:16]
    path = ctx.layout.feature_cache(method, cfg.mode, key)
    if path.is_file():
        try:
            return safe_torch_load(path)["inputs"]
        except (CheckpointError, KeyError):
            pass  # a damaged cache entry is recomputed and overwritten
    volumes = load_volumes(dataset, progress, segmentation)
    inputs = apply_in_batches(split.trunk, volumes, ctx.device, cfg.bf16, cfg.channels_last)
    atomic_torch_save(path, {"inputs": inputs})
    return inputs
