"""Self-supervised methods on 3D backbones: BYOL, DINO, MAE, MoCo (one module each).

Every method is an :class:`SSLMethod`: an ``nn.Module`` holding the backbone being pretrained (``.backbone``),
its heads and, where the method has one, a momentum (EMA) copy. The training loop in :mod:`nrfm.pretrain`
only calls, per optimisation step::

    method.on_step(step, total_steps)      # momentum and temperature schedules, before the forward pass
    loss = method.training_step(views)      # views: list of (B, 4, D, H, W) tensors from nrfm.views
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

from nrfm.config import SSL_METHODS, PretrainingConfig


class SSLMethod(nn.Module):
    """Base class of the four methods.

    Attributes:
        name: the method name used in CSVs and checkpoints.
        n_global_views: global views per subject the method consumes (``views[:n_global_views]``).
        uses_local_views: whether it also consumes ``cfg.n_local_views`` local crops (DINO).
        lr_scale: multiplier of ``pretraining.lr`` for this method (the papers' base rates differ).
    """

    name: ClassVar[str] = ""
    lr_scale: ClassVar[float] = 1.0
    n_global_views: ClassVar[int] = 2
    uses_local_views: ClassVar[bool] = False

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


def build_method(name: str, backbone: nn.Module, cfg: PretrainingConfig) -> SSLMethod:
    """The SSL method ``name`` around ``backbone`` with heads sized from ``cfg``.

    Raises:
        ValueError: unknown name (lists the valid ones).
    """
    if name not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {name!r}; valid: {list(SSL_METHODS)}")
    if name == "byol":
        from nrfm.ssl.byol import BYOL

        return BYOL(backbone, cfg.head_hidden_dim, cfg.head_out_dim, momentum_base=cfg.momentum_base)
    if name == "dino":
        from nrfm.ssl.dino import DINO

        return DINO(backbone, cfg.head_hidden_dim, cfg.dino_out_dim, momentum_base=cfg.momentum_base,
                    warmup_teacher_temp=cfg.dino_warmup_teacher_temp, teacher_temp=cfg.dino_teacher_temp)
    if name == "moco":
        from nrfm.ssl.moco import MoCo

        return MoCo(backbone, cfg.head_hidden_dim, cfg.head_out_dim, memory_bank_size=cfg.moco_memory_bank,
                    momentum_base=cfg.momentum_base)
    from nrfm.ssl.mae import MAE

    return MAE(backbone, mask_ratio=cfg.mask_ratio, decoder_hidden_size=cfg.mae_decoder_hidden_size,
               decoder_layers=cfg.mae_decoder_layers, decoder_heads=cfg.vit_heads)


__all__ = ["SSLMethod", "build_method", "fp32_loss", "SSL_METHODS"]
