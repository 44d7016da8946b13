"""Data-parallel training with ``torch.distributed``: process group, synced batch norm, DDP, rank-0 output.

Launch any stage with torchrun; every process runs the same command and this module reads torchrun's
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``::

    torchrun --nproc_per_node 4 -m nrfm pretrain --config configs/paper.yaml --run-dir reports/r1 --method byol
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint host0:29500 \\
        -m nrfm pretrain ...   # and --node_rank 1 on the second machine; the run folder on shared storage

The backend is NCCL when the run uses CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on CPU.
What changes under DDP (see :func:`nrfm.train.pretrain.train_method`):

* ``pretraining.batch_size`` stays the GLOBAL batch: each of the ``W`` processes takes ``batch_size / W``
  subjects per step, so a config means the same optimisation whatever the number of processes.
* Batch norm is synchronised across processes (:func:`convert_sync_batchnorm`: torch's ``SyncBatchNorm``
  on GPUs, :class:`SyncBatchNorm` here on CPU because torch's only runs on accelerators), as BYOL, DINO (ResNet) and
  SimCLR-style training do: statistics are those of the global batch, as in a single process.
* Losses see the global batch where they need it: DINO's centre is all-reduced by lightly's ``DINOLoss``
  (its ``center_mean`` averages over processes whenever a process group exists); MoCo's memory bank is
  built with ``gather_distributed=True``, so every process enqueues the keys of the whole global batch.
  BYOL's loss is a per-sample mean and MAE's a per-patch mean: the average over processes (DDP's gradient
  averaging) is the global-batch loss, no gather needed. MAE draws its masks from each process's own
  random stream (seeded by seed, epoch and rank), so an MAE run under DDP is equivalent in distribution,
  not bit for bit, to a single process.
* Initial weights come from the same seed on every rank (and DDP broadcasts rank 0's at wrap time);
  views are seeded per subject, so each subject gets the same views whichever process draws it.
* Only rank 0 writes checkpoints, logs, metrics and progress bars; the others wait at barriers.

Fine-tuning under torchrun runs on rank 0 only while the other ranks wait at a barrier (its inputs are
cached features of a few hundred subjects, seconds to minutes per run); see :mod:`nrfm.cli`.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# fine-tuning on rank 0 can keep the others at a barrier for a long time; the default (30 min) is too short
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info() -> DistInfo:
    """The current process's :class:`DistInfo` (a single process when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher) set ``WORLD_SIZE`` > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(use_cuda: bool) -> DistInfo:
    """Initialise the default process group from torchrun's environment (no-op without it).

    Args:
        use_cuda: the run trains on CUDA (NCCL, one GPU per process); otherwise gloo on CPU.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return info()


def teardown() -> None:
    """Destroy the default process group if this module's caller created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def session(use_cuda: bool) -> Iterator[DistInfo]:
    """``with session(use_cuda) as d:`` initialise from the environment and always tear down."""
    created = launched_by_torchrun() and not (dist.is_available() and dist.is_initialized())
    try:
        yield init_from_env(use_cuda)
    finally:
        if created:
            teardown()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if info().enabled:
        dist.barrier()


def process_device(device: torch.device) -> torch.device:
    """``cuda:LOCAL_RANK`` for CUDA runs under DDP, otherwise ``device`` unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and info().enabled:
        return torch.device("cuda", info().local_rank)
    return device


def all_reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over processes (a copy; ``value`` itself in a single process)."""
    d = info()
    if not d.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out)
    return out / d.world_size


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch on CPU processes (gloo); torch's ``nn.SyncBatchNorm`` is GPU-only.

    In training mode under a process group, the per-channel sum, sum of squares and count are all-reduced
    with the differentiable ``torch.distributed.nn.all_reduce`` (its backward all-reduces the gradients,
    as torch's CUDA kernel does), the input is normalised with the global mean and biased variance, and the
    running statistics get the unbiased variance, as ``F.batch_norm`` does. Otherwise (eval mode, a single
    process) it is plain batch norm. Same parameters, buffers and state dict as ``nn.BatchNorm*d``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and info().enabled):
            return super().forward(x)
        from torch.distributed.nn import functional as dist_nn

        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1.0))
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Every ``BatchNorm*d`` of ``module`` -> synced batch norm (same parameters, buffers and state dict).

    torch's ``nn.SyncBatchNorm`` for CUDA, :class:`SyncBatchNorm` for CPU processes.
    """
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for sub in module.modules():
        if isinstance(sub, _BatchNorm) and not isinstance(sub, (nn.SyncBatchNorm, SyncBatchNorm)):
            sub.__class__ = SyncBatchNorm  # same attributes; only the forward differs
    return module


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` under a process group, else ``module`` itself.

    Buffers are not re-broadcast on every forward: with synced batch norm, gathered MoCo keys and the
    all-reduced DINO centre they are identical on every rank already.
    """
    if not info().enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
