"""One self-supervised pretraining loop for BYOL, DINO, MAE and MoCo, with checkpoints and exact resume.

Per step: views from :mod:`nrfm.ssl.views` -> ``method(views)`` (the method's ``training_step``) under bf16
autocast (CPU and CUDA, ``pretraining.bf16``) with ``channels_last_3d`` tensors (``pretraining.channels_last``)
-> backward -> gradient clipping -> AdamW (no weight decay on norms and biases) with a linear warm-up and a
cosine decay of the learning rate ``pretraining.lr * method.lr_scale`` (lightly's ``cosine_warmup_schedule``,
per step). Losses accumulate on the device; the host reads them every
``SYNC_EVERY`` steps (progress bar and the non-finite check) and once per epoch, so the loop does not
synchronise on every step. A non-finite loss stops the run with a :class:`~nrfm.errors.TrainingError`
before anything is saved.

The fast path (each part a config switch, measured by ``nrfm bench``): bf16 autocast on CPU and CUDA,
``channels_last_3d``, views cropped and augmented in DataLoader workers from the preprocessed cache while
the step runs (:mod:`nrfm.ssl.views`), no per-step host synchronisation, and intra-op threads set to the
cores available per process (``threads: 0``). Under ``torchrun`` the loop runs DistributedDataParallel
with synced batch norm and rank-0-only output (:mod:`nrfm.train.distributed`); ``batch_size`` is the global batch.

Only TRAIN subjects are used: pretraining needs no labels, but the test subjects must stay unseen by every
fitted part of the pipeline, and val subjects score the representation monitor (:mod:`nrfm.train.monitor`).

Checkpoints (``<checkpoints>/<method>/``): ``last.pt`` after every epoch (model, optimiser, log; atomic
write) and ``backbone.pt`` when training has finished. Both record the method, the architecture and a
hash of every setting that changes the result, so a resume from another method, architecture or config
(or a corrupt file) is a one-line :class:`~nrfm.errors.CheckpointError`. Every random draw of an epoch
derives from ``(seed, epoch)``, so a run killed mid-epoch and resumed ends with exactly the weights and
losses of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from lightly.models.utils import get_weight_decay_parameters
from lightly.utils.scheduler import cosine_warmup_schedule
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nrfm.config import Config, SSL_METHODS
from nrfm.cores import usable_cores
from nrfm.errors import CheckpointError, ConfigError, RunError, TrainingError
from nrfm.files import atomic_torch_save, safe_torch_load
from nrfm.models.backbones import Backbone, backbone_arch, build_backbone, use_channels_last
from nrfm.pipeline.layout import PRETRAINED_FILE, RESUME_FILE
from nrfm.ssl import build_method
from nrfm.ssl.base import SSLMethod
from nrfm.train import distributed
from nrfm.train.monitor import RepresentationMonitor, autocast_context
from nrfm.ssl.views import (BatchAugment, EpochSampler, SampleViews, ViewDataset, _item_seed, batch_generator,
                        check_view_sizes, view_recipe)

CHECKPOINT_FORMAT = 1
SYNC_EVERY = 10  # steps between host reads of the running loss (progress bar, non-finite check)
LOG_COLUMNS = ["backbone", "epoch", "loss", "volumes_per_s"]


@dataclass
class PretrainResult:
    """Outcome of one method's pretraining: the per-epoch log (``pretrain.csv`` rows) and the final checkpoint."""

    method: str
    log: pd.DataFrame
    checkpoint: Path


def pretrain_fingerprint(cfg: Config, method: str, train_ids: Sequence[str]) -> str:
    """sha256 of everything that changes a pretraining result (not worker/thread counts or the method list)."""
    pre = dataclasses.asdict(cfg.pretraining)
    for key in ("methods", "num_workers", "threads", "augment_on"):
        pre.pop(key)
    data = {"method": method, "seed": cfg.seed, "pretraining": pre,
            "preprocessing": {k: v for k, v in dataclasses.asdict(cfg.preprocessing).items() if k != "cache_dir"},
            "train_subjects": sorted(map(str, train_ids))}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def available_cores() -> int:
    """Cores this process may use (its CPU affinity, else ``os.cpu_count``), shared among local DDP ranks."""
    return max(1, usable_cores() // distributed.info().local_world_size)


def configure_threads(threads: int, num_workers: int) -> int:
    """Set torch intra-op threads: ``threads`` or, if 0, this process's share of the cores minus its loader workers.

    Each loader worker keeps one core busy while the step runs; giving the step those cores as well
    oversubscribes them, and OpenMP threads that spin-wait for a descheduled sibling make a bf16 step
    several times slower (measured on 2 cores: 120 ms with 1 thread beside a worker, 1-4 s with 2).
    """
    n = threads or max(1, available_cores() - num_workers)
    torch.set_num_threads(n)
    return n


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # views are per-sample work; intra-op threads in workers would fight the trainer


def make_loader(dataset: Dataset, indices: Sequence[int], method: str, cfg: Config,
                device: torch.device, num_replicas: int = 1, rank: int = 0) -> tuple[DataLoader, EpochSampler]:
    """DataLoader of ``(views, index)`` batches over ``indices`` and its :class:`EpochSampler` (call ``set_epoch``).

    ``pretraining.batch_size`` is the global batch; each of ``num_replicas`` processes loads its share.
    """
    pcfg = cfg.pretraining
    if pcfg.batch_size % num_replicas:
        raise ConfigError(f"{cfg.source}: pretraining.batch_size: {pcfg.batch_size} (the global batch) must be a "
                          f"multiple of the {num_replicas} processes")
    local_batch = pcfg.batch_size // num_replicas
    sample_views = SampleViews(view_recipe(method, pcfg), pcfg.view_size_of(method), pcfg.local_view_size,
                               full_monai=not pcfg.batch_augment,
                               torch_augment=pcfg.batch_augment and pcfg.augment_on == "loader")
    sampler = EpochSampler(indices, cfg.seed, local_batch, num_replicas, rank)
    workers = pcfg.num_workers
    loader = DataLoader(ViewDataset(dataset, sample_views, cfg.seed), batch_size=local_batch, sampler=sampler,
                        num_workers=workers, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def _note(scores: dict[str, float], prefix: str = "") -> str:
    """Why a monitor column is empty (a split without two classes), appended to ``prefix``."""
    empty = [name for name, value in scores.items() if not np.isfinite(value)]
    reason = f"{', '.join(empty)}: a class has fewer than 2 train + val subjects" if empty else ""
    return "; ".join(part for part in (prefix, reason) if part)


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Global RNGs (masks, batch shuffles) for one epoch, from (seed, epoch) and, for ranks > 0, the rank."""
    s = _item_seed(seed, epoch, 31337, *([rank] if rank else []))
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def build_optimizer(method: SSLMethod, cfg: Config) -> torch.optim.AdamW:
    """The pretraining optimizer: AdamW, no weight decay on norms and biases (as in the DINO/MAE reference code)."""
    decay, no_decay = get_weight_decay_parameters([method])
    return torch.optim.AdamW([{"params": [p for p in decay if p.requires_grad]},
                              {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}],
                             lr=cfg.pretraining.lr, weight_decay=cfg.pretraining.weight_decay,
                             fused=_fused_adamw(method))


def _fused_adamw(module: torch.nn.Module) -> bool | None:
    """``fused=True`` for AdamW where torch has the fused kernel (CPU and CUDA): one pass over all parameters
    instead of a dozen small ops per tensor (the optimizer step was about a tenth of a BYOL step on 2 cores)."""
    return True if all(p.device.type in ("cpu", "cuda") for p in module.parameters()) else None


def _load_checkpoint(path: Path, method: str, arch: str, fingerprint: str) -> dict:
    ckpt = safe_torch_load(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an nrfm pretraining checkpoint (format {ckpt.get('format')!r})")
    if ckpt.get("method") != method or ckpt.get("arch") != arch:
        raise CheckpointError(f"{path}: checkpoint of method {ckpt.get('method')!r} / architecture "
                              f"{ckpt.get('arch')!r}, cannot resume {method!r} / {arch!r}; use another run folder")
    if ckpt.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: checkpoint was made with other settings (pretraining, preprocessing, seed "
                              f"or train subjects differ); use a new run folder or delete it to start over")
    return ckpt


def _load_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(err).splitlines()[0][:160]})") from None


def train_method(method_name: str, cfg: Config, dataset: Dataset, manifest: pd.DataFrame, checkpoint_dir: Path,
                 device: torch.device | str = "cpu", progress: bool = True,
                 step_callback: Callable[[int, int], None] | None = None) -> PretrainResult:
    """Pretrain ``method_name`` on the train subjects of ``manifest``, resuming from ``checkpoint_dir/last.pt``.

    Args:
        method_name: ``byol``, ``dino``, ``mae`` or ``moco``.
        cfg: the run config (``seed``, ``preprocessing``, ``pretraining``).
        dataset: preprocessed volumes in manifest row order (``item["image"]`` is (4, D, H, W)).
        manifest: the run's manifest with ``split``, ``site`` and the monitor endpoint.
        checkpoint_dir: folder of this method's checkpoints.
        device: training device.
        progress: tqdm progress bar.
        step_callback: called as ``f(epoch, step)`` after every optimisation step (tests use it to interrupt).

    Returns:
        :class:`PretrainResult` with one log row per epoch (epoch 0 = the random-init monitor baseline).
    """
    pcfg, device = cfg.pretraining, distributed.process_device(torch.device(device))
    checkpoint_dir = Path(checkpoint_dir)
    arch = backbone_arch(method_name, pcfg)
    train_idx = np.flatnonzero(pretraining_rows(manifest))
    if len(train_idx) < pcfg.batch_size:
        raise TrainingError(f"{cfg.source}: pretraining.batch_size: {pcfg.batch_size} is larger than the "
                            f"{len(train_idx)} train subjects")
    volume = tuple(int(s) for s in dataset[int(train_idx[0])]["image"].shape[1:])
    check_view_sizes(pcfg, volume, method_name, cfg.source)
    if arch == "vit" and any(s % pcfg.vit_patch_size for s in volume):
        raise ConfigError(f"{cfg.source}: preprocessing.crop_size: {list(volume)} must be a multiple of "
                          f"pretraining.vit_patch_size={pcfg.vit_patch_size} for mae")
    fingerprint = pretrain_fingerprint(cfg, method_name, manifest["subject_id"].iloc[train_idx])
    threads_before = torch.get_num_threads()
    configure_threads(pcfg.threads, pcfg.num_workers)
    try:
        return _train(method_name, cfg, dataset, manifest, checkpoint_dir, device, progress, step_callback,
                      arch, train_idx, volume, fingerprint)
    finally:
        torch.set_num_threads(threads_before)


def _train(method_name: str, cfg: Config, dataset: Dataset, manifest: pd.DataFrame, checkpoint_dir: Path,
           device: torch.device, progress: bool, step_callback: Callable[[int, int], None] | None, arch: str,
           train_idx: np.ndarray, volume: tuple[int, ...], fingerprint: str) -> PretrainResult:
    pcfg = cfg.pretraining
    dinfo = distributed.info()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed view sizes: pick the fastest convolution once

    torch.manual_seed(cfg.seed)  # initial weights (and MoCo's initial queue) depend on the seed only, on every rank
    backbone = build_backbone(method_name, pcfg, volume)
    method = build_method(method_name, backbone, pcfg)
    if dinfo.enabled:
        method = distributed.convert_sync_batchnorm(method, device)
        for module in method.modules():  # lightly's MoCo memory bank / NT-Xent: keys of the global batch
            if hasattr(module, "gather_distributed"):
                module.gather_distributed = True
    method = method.to(device)
    if pcfg.channels_last:
        method = use_channels_last(method)
    optimizer = build_optimizer(method, cfg)
    monitor = RepresentationMonitor(dataset, manifest, pcfg.monitor_endpoint, pcfg.monitor_c, device, pcfg.bf16,
                                    pcfg.channels_last, seed=cfg.seed)
    loader, sampler = make_loader(dataset, train_idx, method_name, cfg, device, dinfo.world_size, dinfo.rank)
    steps_per_epoch = len(sampler) // (pcfg.batch_size // dinfo.world_size)
    epochs = pcfg.epochs_of(method_name)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(pcfg.warmup_epochs * steps_per_epoch, total_steps)
    recipe = view_recipe(method_name, pcfg)
    on_device = pcfg.batch_augment and pcfg.augment_on == "device"
    augment = BatchAugment() if (recipe.strong and on_device) else None

    last = checkpoint_dir / RESUME_FILE
    rows: list[dict] = []
    start_epoch = 0
    if last.is_file():
        ckpt = _load_checkpoint(last, method_name, arch, fingerprint)
        _load_state(method, ckpt["model"], last)
        optimizer.load_state_dict(ckpt["optimizer"])
        rows, start_epoch = list(ckpt["log"]), int(ckpt["epoch"])
    elif dinfo.is_main:  # the monitor and the log are rank 0's; the other ranks wait at the barrier below
        scores = monitor(method.backbone)
        rows.append({"backbone": method_name, "epoch": 0, "loss": float("nan"), "volumes_per_s": float("nan"),
                     **scores, "epoch_seconds": 0.0,
                     "note": _note(scores, "random initialisation (before training): monitor baseline, no loss")})
    distributed.barrier()
    model = distributed.wrap_ddp(method, device)

    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, disable=not (progress and dinfo.is_main),
               desc=f"pretrain {method_name}", unit="step")
    method.train()
    for epoch in range(start_epoch, epochs):
        _seed_epoch(cfg.seed, epoch, dinfo.rank)
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for step_in_epoch, batch in enumerate(loader):
            step = epoch * steps_per_epoch + step_in_epoch
            lr = cosine_warmup_schedule(step, total_steps, pcfg.lr * method.lr_scale, 0.0, warmup_steps, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            views = [v.to(device, non_blocking=True) for v in batch["views"]]
            if augment is not None:
                # one stream per (step, rank): ranks must not draw the same jitter for their different samples
                gen = batch_generator(cfg.seed, epoch, step * dinfo.world_size + dinfo.rank, device)
                views = [augment(v, gen) for v in views]
            if pcfg.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last_3d) for v in views]
            method.on_step(step, total_steps)
            with autocast_context(device, pcfg.bf16):
                loss = model(views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(step, total_steps)
            if pcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in method.parameters() if p.requires_grad], pcfg.grad_clip)
            optimizer.step()
            loss_sum += loss.detach().float()
            bar.update(1)
            if (step_in_epoch + 1) % SYNC_EVERY == 0 or step_in_epoch + 1 == steps_per_epoch:
                running = distributed.all_reduce_mean(loss_sum / (step_in_epoch + 1)).item()
                if not np.isfinite(running):
                    raise TrainingError(f"{method_name}: non-finite loss at epoch {epoch + 1}, step {step_in_epoch + 1}"
                                        f" (lr {lr:.2e}); the last good checkpoint is {last}; lower pretraining.lr "
                                        f"or set pretraining.bf16: false")
                bar.set_postfix(epoch=epoch + 1, loss=f"{running:.4f}")
            if step_callback is not None:
                step_callback(epoch, step_in_epoch)
        seconds = time.perf_counter() - t0
        epoch_loss = float(distributed.all_reduce_mean(loss_sum / steps_per_epoch).item())
        if dinfo.is_main:
            scored = (epoch + 1) % pcfg.monitor_every == 0 or epoch + 1 == epochs
            scores = monitor(method.backbone) if scored else dict.fromkeys(monitor.columns, float("nan"))
            rows.append({"backbone": method_name, "epoch": epoch + 1, "loss": epoch_loss,
                         "volumes_per_s": steps_per_epoch * pcfg.batch_size / seconds, **scores,
                         "epoch_seconds": seconds,
                         "note": _note(scores) if scored else "monitor not scored this epoch (monitor_every)"})
            atomic_torch_save(last, {"format": CHECKPOINT_FORMAT, "method": method_name, "arch": arch,
                                     "fingerprint": fingerprint, "epoch": epoch + 1, "model": method.state_dict(),
                                     "optimizer": optimizer.state_dict(), "log": rows})
        distributed.barrier()
    bar.close()
    final = checkpoint_dir / PRETRAINED_FILE
    if dinfo.is_main:
        atomic_torch_save(final, {"format": CHECKPOINT_FORMAT, "method": method_name, "arch": arch,
                                  "fingerprint": fingerprint, "epoch": epochs, "input_size": list(volume),
                                  "model": method.backbone.state_dict(), "log": rows})
    distributed.barrier()  # every rank may read the final checkpoint once this returns
    return PretrainResult(method_name, pd.DataFrame(rows), final)


def load_backbone(path: str | Path, cfg: Config, method: str) -> Backbone:
    """The pretrained backbone stored by :func:`train_method` (CheckpointError if foreign or corrupt)."""
    path = Path(path)
    ckpt = safe_torch_load(path)
    arch = backbone_arch(method, cfg.pretraining)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "input_size" not in ckpt:
        raise CheckpointError(f"{path}: not an nrfm pretrained-backbone checkpoint")
    if ckpt.get("method") != method or ckpt.get("arch") != arch:
        raise CheckpointError(f"{path}: backbone of method {ckpt.get('method')!r} / architecture "
                              f"{ckpt.get('arch')!r}, expected {method!r} / {arch!r}")
    backbone = build_backbone(method, cfg.pretraining, ckpt["input_size"])
    _load_state(backbone, ckpt["model"], path)
    return backbone.eval()


# ---- stage entry points for the notebooks --------------------------------------------------------------------
def pretraining_rows(manifest: pd.DataFrame) -> np.ndarray:
    """(N,) bool: the exams self-supervised pretraining trains on (every site's train split).

    Later stages ask this, not the split column, which exams pretraining saw (e.g. the leave-one-site-out
    folds score only the held-out exams outside this set).
    """
    return manifest["split"].astype(str).to_numpy() == "train"


def pretraining_subjects(manifest: pd.DataFrame) -> list[str]:
    """subject_id of every exam pretraining trains on (:func:`pretraining_rows`), in manifest order."""
    return [str(s) for s in manifest["subject_id"].to_numpy()[pretraining_rows(manifest)]]


def _train_ids(ctx) -> list[str]:
    return pretraining_subjects(ctx.manifest)


def run_pretraining_stage(ctx, method: str, progress: bool = True) -> PretrainResult:
    """Train (or resume, or just reload) ``method`` for the run ``ctx``; merge its rows into ``metrics/pretrain.csv``."""
    if method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {method!r}; valid: {list(SSL_METHODS)}")
    folder = ctx.layout.checkpoints_dir(method)
    final = ctx.layout.pretrained_backbone(method)
    if final.is_file():
        ckpt = safe_torch_load(final)
        expected = pretrain_fingerprint(ctx.config, method, _train_ids(ctx))
        if ckpt.get("fingerprint") != expected or ckpt.get("method") != method:
            raise CheckpointError(f"{final}: pretrained with other settings or another method; use a new run folder")
        result = PretrainResult(method, pd.DataFrame(ckpt["log"]), final)
    else:
        result = train_method(method, ctx.config, ctx.dataset(progress=progress), ctx.manifest, folder, ctx.device,
                              progress=progress)
        if distributed.info().enabled:  # only rank 0 kept the log; every rank returns the same result
            result = PretrainResult(method, pd.DataFrame(safe_torch_load(final)["log"]), final)
    if distributed.info().is_main:
        ctx.write_metrics("pretrain", result.log, ["backbone", "epoch"])
        if not ctx.config.report.keep_resume_state:  # backbone.pt holds what later stages need
            ctx.layout.drop_resume_state(method)
    distributed.barrier()
    return result


def pretrained_backbone(ctx, method: str) -> Backbone:
    """The pretrained backbone of ``method`` from this run folder, checked against this run's settings.

    Later stages read it; they never pretrain. :func:`nrfm.pipeline.stages.require` runs the pretraining stage
    first when a notebook runs on its own.
    """
    path = ctx.layout.pretrained_backbone(method)
    if not path.is_file():
        raise RunError(f"{path}: no pretrained {method} backbone in this run; run the pretraining stage first "
                       "(notebook 01_pretrain; `nrfm run --only` and the notebooks run it for you)")
    ckpt = safe_torch_load(path)
    if ckpt.get("fingerprint") != pretrain_fingerprint(ctx.config, method, _train_ids(ctx)):
        raise CheckpointError(f"{path}: pretrained with other settings than this run's; use a new run folder")
    return load_backbone(path, ctx.config, method).to(distributed.process_device(ctx.device))


def ensure_pretrained(ctx, method: str, progress: bool = True) -> Backbone:
    """The pretrained backbone of ``method`` (pretraining first, or resuming, if its final checkpoint is missing)."""
    result = run_pretraining_stage(ctx, method, progress=progress)
    return load_backbone(result.checkpoint, ctx.config, method).to(distributed.process_device(ctx.device))


def random_init_monitor(ctx, method: str) -> dict[str, float]:
    """Monitor scores of a randomly initialised backbone of ``method``'s architecture (seeded by ``ctx.config.seed``)."""
    pcfg = ctx.config.pretraining
    dataset = ctx.dataset()
    torch.manual_seed(ctx.config.seed)
    backbone = build_backbone(method, pcfg, tuple(dataset[0]["image"].shape[1:])).to(ctx.device)
    monitor = RepresentationMonitor(dataset, ctx.manifest, pcfg.monitor_endpoint, pcfg.monitor_c, ctx.device,
                                    pcfg.bf16, pcfg.channels_last, seed=ctx.config.seed)
    return monitor(backbone)
