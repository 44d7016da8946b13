"""The interface of a self-supervised method (one subclass per module in ``nrfm/ssl/methods/``).

Every method is an :class:`SSLMethod`: an ``nn.Module`` holding the backbone being pretrained (``.backbone``),
its heads and, where the method has one, a momentum (EMA) copy. The training loop in :mod:`nrfm.train.pretrain`
only calls, per optimisation step::

    method.on_step(step, total_steps)      # momentum and temperature schedules, before the forward pass
    loss = method.training_step(views)      # views: list of (B, 4, D, H, W) tensors from nrfm.ssl.views
    loss.backward()
    method.after_backward(step, total_steps)

lightly provides the losses, heads, ``update_momentum``, ``deactivate_requires_grad`` and
``cosine_schedule``; it is written for 2D images, so the 3D views and the wiring to 3D backbones live here.
Losses are computed in float32 with autocast disabled (bf16 logits would make softmax and cosine
similarities noisy); the backbone and heads run under whatever autocast the loop enables.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar, Sequence

import torch
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn

from nrfm.config import PretrainingConfig


class SSLMethod(nn.Module):
    """Base class of the four methods.

    Attributes:
        name: the method name used in CSVs and checkpoints.
        n_global_views: global views per subject the method consumes (``views[:n_global_views]``).
        uses_local_views: whether it also consumes ``cfg.n_local_views`` local crops (DINO).
        lr_scale: multiplier of ``pretraining.lr`` for this method (the papers' base rates differ).
        architecture: ``cnn`` (the 3D ResNet of ``pretraining.cnn_arch``) or ``vit`` (the 3D ViT).
        strong_views: photometric and affine jitter on the views (joint-embedding methods) or crops and
            flips only (MAE).
    """

    name: ClassVar[str] = ""
    lr_scale: ClassVar[float] = 1.0
    n_global_views: ClassVar[int] = 2
    uses_local_views: ClassVar[bool] = False
    architecture: ClassVar[str] = "cnn"
    strong_views: ClassVar[bool] = True

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: PretrainingConfig) -> "SSLMethod":  # pragma: no cover
        """The method around ``backbone`` with heads and schedules from the pretraining config."""
        raise NotImplementedError

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.momentum = 1.0  # current EMA momentum (methods with a momentum encoder update it in on_step)

    def training_step(self, views: Sequence[Tensor]) -> Tensor:  # pragma: no cover - abstract
        """Scalar loss of one batch of views (each (B, 4, D, H, W))."""
        raise NotImplementedError

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """Same as :meth:`training_step` (so that DistributedDataParallel can wrap the method)."""
        return self.training_step(views)

    def on_step(self, step: int, total_steps: int) -> None:
        """Update schedules (momentum, temperatures) before step ``step`` of ``total_steps``."""

    def after_backward(self, step: int, total_steps: int) -> None:
        """Hook between ``backward`` and the optimiser step (e.g. DINO freezes its last layer early on)."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) module pairs updated by EMA; empty for methods without a momentum encoder."""
        return []

    def update_targets(self, step: int, total_steps: int, base: float) -> None:
        """EMA step ``target = m * target + (1 - m) * online`` with m cosine-scheduled from ``base`` to 1."""
        self.momentum = cosine_schedule(step, max(total_steps, 1), base, 1.0)
        for online, target in self.momentum_pairs():
            update_momentum(online, target, m=self.momentum)


def fp32_loss(reference: Tensor):
    """Context that disables autocast on the device of ``reference`` so that a loss runs in float32."""
    device_type = reference.device.type
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


__all__ = ["SSLMethod", "fp32_loss"]
