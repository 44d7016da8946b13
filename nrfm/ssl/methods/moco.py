"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297; He et al., CVPR 2020) on 3D volumes.

query = backbone -> 2-layer MLP projection;  key = EMA copy (no gradient, shuffled batch norm).
With q, k+ L2-normalised and a queue of K negatives n_j, the InfoNCE loss is

``L = -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_j exp(q.n_j / tau))``,  ``tau = 0.2``

computed by lightly's ``NTXentLoss(memory_bank_size=(K, dim))``, which enqueues the keys after each call.

Choice: v2 with a memory bank (the paper's design and the one the kit's DDP path keeps, since lightly's
memory bank gathers keys across processes), symmetrised over the two views as in MoCo v3 and lightly's
examples. Departures for the CPU budget: projection sizes from the config (paper 2048/128), a queue of
``memory_bank_size`` keys (paper 65536) which must stay below the number of training subjects so that a
subject's own key from the previous epoch has left the queue, and an EMA that starts at ``momentum_base``
(paper fixed 0.999) and follows a cosine to 1 because runs are a few hundred steps long.
``memory_bank_size = 0`` uses the other samples of the batch as negatives (SimCLR-style NT-Xent).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import batch_shuffle, batch_unshuffle, deactivate_requires_grad
from torch import Tensor, nn

from nrfm.config import PretrainingConfig
from nrfm.ssl.base import SSLMethod, fp32_loss
from nrfm.ssl.registry import register


@register
class MoCo(SSLMethod):
    """MoCo v2 with a queue of negatives and a momentum key encoder.

    Args:
        backbone: a :class:`nrfm.models.backbones.Backbone`.
        hidden_dim, out_dim: projection MLP sizes.
        memory_bank_size: number of queued negative keys (0 = in-batch negatives).
        temperature: InfoNCE temperature (paper 0.2).
        momentum_base: key-encoder EMA momentum at step 0 (cosine to 1).
    """

    name = "moco"
    n_global_views = 2

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: PretrainingConfig) -> "MoCo":
        return cls(backbone, cfg.head_hidden_dim, cfg.head_out_dim, memory_bank_size=cfg.moco_memory_bank,
                   momentum_base=cfg.momentum_base)

    def __init__(self, backbone: nn.Module, hidden_dim: int = 2048, out_dim: int = 128, memory_bank_size: int = 4096,
                 temperature: float = 0.2, momentum_base: float = 0.999):
        super().__init__(backbone)
        if memory_bank_size < 0:
            raise ValueError(f"memory_bank_size must be >= 0, got {memory_bank_size}")
        if not 0.0 <= momentum_base < 1.0:
            raise ValueError(f"momentum_base must be in [0, 1), got {momentum_base}")
        self.momentum_base = momentum_base
        self.projection_head = MoCoProjectionHead(backbone.embed_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        bank = (memory_bank_size, out_dim) if memory_bank_size > 0 else 0
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=bank)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    def on_step(self, step: int, total_steps: int) -> None:
        self.update_targets(step, total_steps, self.momentum_base)

    def query(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone.embed(x))

    @torch.no_grad()
    def key(self, x: Tensor) -> Tensor:
        """Keys with shuffled batch norm (He et al.): BN statistics cannot leak which sample is the positive."""
        shuffled, order = batch_shuffle(x)
        k = self.projection_head_momentum(self.backbone_momentum.embed(shuffled))
        return batch_unshuffle(k, order)

    def loss(self, q0: Tensor, k1: Tensor, q1: Tensor, k0: Tensor) -> Tensor:
        """Symmetrised InfoNCE in float32: both directions in one call, so both read the queue as it was before
        this step (two calls would let the second direction meet its own subject's key, enqueued by the first,
        among its negatives), then both key sets are enqueued. The mean over the 2B queries is
        0.5 * (InfoNCE(q0, k1) + InfoNCE(q1, k0))."""
        with fp32_loss(q0):
            return self.criterion(torch.cat([q0, q1]).float(), torch.cat([k1, k0]).float())

    def training_step(self, views: Sequence[Tensor]) -> Tensor:
        x0, x1 = views[0], views[1]
        q0, q1 = self.query(torch.cat([x0, x1], dim=0)).chunk(2)
        k0, k1 = self.key(x0), self.key(x1)
        return self.loss(q0, k1, q1, k0)

    # lightly registers the queue as a non-persistent buffer; a resumed run needs it to continue exactly
    def get_extra_state(self) -> Any:
        bank = self.criterion.memory_bank
        if bank.size[0] == 0:
            return {}
        return {"bank": bank.bank.detach().clone(), "bank_ptr": bank.bank_ptr.detach().clone()}

    def set_extra_state(self, state: Any) -> None:
        if state:
            bank = self.criterion.memory_bank
            bank.bank = state["bank"].to(bank.bank.device)
            bank.bank_ptr = state["bank_ptr"].to(bank.bank_ptr.device)
