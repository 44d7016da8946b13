"""MAE: masked autoencoders (He et al., CVPR 2022, arXiv 2111.06377) on 3D volumes with a 3D ViT.

The volume is cut into cubic patches of ``p^3`` voxels x 4 channels; a random ``mask_ratio`` of them (0.75)
is dropped, the encoder (:class:`nrfm.models.backbones.ViTBackbone`) sees only the visible tokens, and a light
decoder gets the encoded tokens plus a shared mask token at every masked position (with fixed sine-cosine
position embeddings) and predicts each patch's voxels. The loss is the mean squared error on the masked
patches only, against per-patch normalised targets (the paper's "norm_pix_loss"):

``target = (x_patch - mean(x_patch)) / sqrt(var(x_patch) + 1e-6)``,  ``L = mean_{masked i} mean_j (pred_ij - target_ij)^2``

Masks come from lightly's ``random_token_mask`` (uniform without replacement, per sample).
Departures (CPU budget): encoder and decoder sizes from the config (paper ViT-B/16 with a 512-wide,
8-block decoder); patch side ``vit_patch_size`` voxels on crops of a few dozen voxels.
"""
from __future__ import annotations

from typing import Sequence

import torch
from lightly.models.utils import get_at_index, random_token_mask, set_at_index
from monai.networks.blocks import TransformerBlock
from torch import Tensor, nn

from nrfm.models.backbones import cached_sincos_embedding
from nrfm.config import PretrainingConfig
from nrfm.ssl.base import SSLMethod, fp32_loss
from nrfm.ssl.registry import register


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, D, H, W) -> (B, N, patch^3 * C) in the ViT's token order (raster over the patch grid)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // patch, patch, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # b, gd, gh, gw, pd, ph, pw, c
    return x.reshape(b, (d // patch) * (h // patch) * (w // patch), patch ** 3 * c)


def unpatchify(patches: Tensor, patch: int, grid: Sequence[int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: (B, N, patch^3 * C) -> (B, C, D, H, W)."""
    b = patches.shape[0]
    gd, gh, gw = grid
    x = patches.reshape(b, gd, gh, gw, patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, channels, gd * patch, gh * patch, gw * patch)


def normalized_pixel_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """MSE against per-patch normalised targets; pred and target are the masked patches (B, n_mask, P)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True, unbiased=True)  # as torch.Tensor.var in the MAE reference code
    target = (target - mean) / (var + eps).sqrt()
    return ((pred - target) ** 2).mean()


@register
class MAE(SSLMethod):
    """Masked autoencoder around a :class:`nrfm.models.backbones.ViTBackbone`.

    Args:
        backbone: the ViT encoder (``tokens``, ``encode``, ``patch_size``, ``embed_dim``).
        mask_ratio: fraction of patches masked.
        decoder_hidden_size, decoder_layers, decoder_heads: decoder transformer size.
    """

    name = "mae"
    n_global_views = 1

    architecture = "vit"
    strong_views = False  # crops and flips only, as in He et al. (2022)

    @classmethod
    def from_config(cls, backbone: nn.Module, cfg: PretrainingConfig) -> "MAE":
        return cls(backbone, mask_ratio=cfg.mask_ratio, decoder_hidden_size=cfg.mae_decoder_hidden_size,
                   decoder_layers=cfg.mae_decoder_layers, decoder_heads=cfg.vit_heads)

    def __init__(self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_hidden_size: int = 512,
                 decoder_layers: int = 8, decoder_heads: int = 16):
        super().__init__(backbone)
        if not hasattr(backbone, "tokens"):
            raise ValueError(f"MAE needs a ViT backbone, got {type(backbone).__name__}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.patch = backbone.patch_size
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(decoder_hidden_size, 4 * decoder_hidden_size, decoder_heads, qkv_bias=True)
            for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size)
        self.decoder_pred = nn.Linear(decoder_hidden_size, self.patch ** 3 * 4)
        self._pos_cache: dict[tuple, Tensor] = {}

    def _decoder_position(self, grid: Sequence[int], device: torch.device) -> Tensor:
        return cached_sincos_embedding(self._pos_cache, grid, self.decoder_hidden_size, device)

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode, decode: (B, 4, D, H, W) -> (pred (B, N, P), idx_keep (B, n_keep), idx_mask (B, n_mask))."""
        tokens, grid = self.backbone.tokens(x)
        b, n, _ = tokens.shape
        idx_keep, idx_mask = random_token_mask((b, n), mask_ratio=self.mask_ratio, mask_class_token=True,
                                               device=x.device)
        encoded = self.decoder_embed(self.backbone.encode(get_at_index(tokens, idx_keep)))
        full = self.mask_token.to(encoded.dtype).expand(b, n, -1).clone()
        full = set_at_index(full, idx_keep, encoded)
        full = full + self._decoder_position(grid, x.device).to(full.dtype)
        for block in self.decoder_blocks:
            full = block(full)
        return self.decoder_pred(self.decoder_norm(full)), idx_keep, idx_mask

    def loss(self, pred: Tensor, x: Tensor, idx_mask: Tensor) -> Tensor:
        """Normalised-pixel MSE on the masked patches, in float32."""
        with fp32_loss(pred):
            target = patchify(x.float(), self.patch)
            return normalized_pixel_loss(get_at_index(pred.float(), idx_mask), get_at_index(target, idx_mask))

    def training_step(self, views: Sequence[Tensor]) -> Tensor:
        x = views[0]
        pred, _, idx_mask = self.reconstruct(x)
        return self.loss(pred, x, idx_mask)
