"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020, arXiv 2006.07733) on 3D volumes.

online = backbone -> projector g -> predictor q;  target = EMA copy of backbone -> projector (no predictor).
For two views v, v' of one subject the paper's loss is
``L = ||q(z) / |q(z)| - z' / |z'| ||^2 = 2 - 2 cos(q(z), z')``, symmetrised by swapping the views; the
target gets no gradient and follows ``xi <- m xi + (1 - m) theta`` with ``m`` cosine-scheduled to 1.

Departures from the paper (for short CPU runs on small crops): MLP hidden/output sizes come from the config
(paper 4096/256), the EMA starts at ``momentum_base`` (paper 0.996), and the returned loss is the mean of
the two directions (the paper sums them), so it lies in [0, 4].
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import Tensor, nn

from nrfm.config import PretrainingConfig
from nrfm.ssl.base import SSLMethod, fp32_loss
from nrfm.ssl.registry import register


@register
class BYOL(SSLMethod):
    """BYOL with a momentum target network.

    Args:
        backbone: a :class:`nrfm.models.backbones.Backbone` (``embed_dim`` attribute, ``embed`` method).
        hidden_dim: hidden size of projector and predictor MLPs.
        out_dim: projection size.
        momentum_base: EMA momentum at step 0 (cosine schedule to 1).
    """

    name = "byol"
    n_global_views = 2

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: PretrainingConfig) -> "BYOL":
        return cls(backbone, cfg.head_hidden_dim, cfg.head_out_dim, momentum_base=cfg.momentum_base)

    def __init__(self, backbone: nn.Module, hidden_dim: int = 4096, out_dim: int = 256, momentum_base: float = 0.996):
        super().__init__(backbone)
        if not 0.0 <= momentum_base < 1.0:
            raise ValueError(f"momentum_base must be in [0, 1), got {momentum_base}")
        self.momentum_base = momentum_base
        self.projection_head = BYOLProjectionHead(backbone.embed_dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    def on_step(self, step: int, total_steps: int) -> None:
        self.update_targets(step, total_steps, self.momentum_base)

    def online(self, x: Tensor) -> Tensor:
        """(B, 4, D, H, W) -> prediction p (B, out_dim)."""
        return self.prediction_head(self.projection_head(self.backbone.embed(x)))

    @torch.no_grad()
    def target(self, x: Tensor) -> Tensor:
        """(B, 4, D, H, W) -> target projection z' (B, out_dim), no gradient."""
        return self.projection_head_momentum(self.backbone_momentum.embed(x))

    def loss(self, p0: Tensor, z1: Tensor, p1: Tensor, z0: Tensor) -> Tensor:
        """Mean over both directions of ``2 - 2 cos(p, z')``, in float32."""
        with fp32_loss(p0):
            negative_cos = 0.5 * (self.criterion(p0.float(), z1.float()) + self.criterion(p1.float(), z0.float()))
            return 2.0 + 2.0 * negative_cos

    def training_step(self, views: Sequence[Tensor]) -> Tensor:
        x0, x1 = views[0], views[1]
        # one forward pass over both views (2B) keeps batch-norm statistics and the matmuls large
        both = torch.cat([x0, x1], dim=0)
        p0, p1 = self.online(both).chunk(2)
        z0, z1 = self.target(both).chunk(2)
        return self.loss(p0, z1, p1, z0)
