"""Tumour readout: a backbone's feature map averaged over the crop and over each tumour sub-region.

A backbone's embedding is the global average of its last feature map (:mod:`nrfm.models.backbones`). On the kit's
32^3 crops most of that map is healthy brain, and the pretrained embeddings carry the tumour's size and location but
almost nothing of what is inside it: on the default run of 2026-12-05 (site-shift, seed 0) a ridge regression from the
frozen MoCo embedding recovered the generator's necrosis, oedema and T2-FLAIR-mismatch latents with cross-validated
R^2 of -0.01, 0.09 and -0.04. The tumour readout averages one stage's feature map over five regions instead
(:data:`REGIONS`: the whole crop, the lesion and the BraTS sub-regions necrotic core 1, oedema 2, enhancing 3/4) and
concatenates the five means: (B, 5 * C). Every cell of the map is weighted by the fraction of its voxels inside the
region, so a sub-region smaller than a cell still counts; an absent sub-region gives zeros. The same frozen MoCo layer
then recovered necrosis 0.29, oedema 0.68 (benchmarks/README.md has the whole comparison). This is masked average
pooling with the exam's own segmentation, which every cohort of the kit ships; the whole-crop mean keeps what a global
embedding sees (site, artefacts, atrophy), so the planted cue of the site-shift cohort stays readable.

Which stage: ResNet backbones pool the stage that Grad-CAM explains (:meth:`ResNetBackbone.gradcam_target`: the
deepest with at least 8 voxels per side; ``layer1`` on 32^3 crops); the ViT pools its encoded patch tokens.

The readout takes the segmentation as a fifth input channel: ``embed(x)`` with x (B, 5, D, H, W) = the four
contrasts and the label map, so every consumer of a fine-tuned model (Grad-CAM, the embeddings, the heads) keeps
the one-tensor interface; :func:`with_segmentation` builds that input.

Usage::

    from nrfm.models.readout import TumourReadout, with_segmentation
    model_backbone = TumourReadout(pretrained)            # embed_dim = 5 * channels of the pooled stage
    z = model_backbone.embed(with_segmentation(image, seg))
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nrfm.models.backbones import N_INPUT_CHANNELS, Backbone, ResNetBackbone, ViTBackbone

READOUTS = ("global", "tumour")
REGIONS = ("crop", "lesion", "necrotic", "oedema", "enhancing")
N_READOUT_CHANNELS = N_INPUT_CHANNELS + 1  # the four contrasts and the segmentation label map


def region_masks(seg: Tensor) -> Tensor:
    """(B, 1, D, H, W) BraTS label map -> (B, 5, D, H, W) float masks of :data:`REGIONS` (3 read as 4)."""
    seg = seg.round()
    return torch.cat([torch.ones_like(seg), seg > 0, seg == 1, seg == 2, seg >= 3], dim=1).to(torch.float32)


def cell_fractions(masks: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Fraction of each feature-map cell inside each region: (B, R, D, H, W) -> (B, R, *grid)."""
    return F.adaptive_avg_pool3d(masks, grid)


def region_means(features: Tensor, fractions: Tensor) -> Tensor:
    """Region-weighted means of a feature map: (B, C, d, h, w), (B, R, d, h, w) -> (B, R * C), region-major.

    Each cell counts with the fraction of its voxels in the region; a region with no voxel gives zeros.
    """
    weights = fractions.to(features.dtype)
    total = weights.sum(dim=(2, 3, 4), keepdim=True)
    weights = weights / total.clamp_min(1e-6)
    return torch.einsum("bcdhw,brdhw->brc", features, weights).flatten(1)


def with_segmentation(image: Tensor | np.ndarray, seg: Tensor | np.ndarray) -> Tensor:
    """Readout input: the (…, 4, D, H, W) contrasts and the (…, 1, D, H, W) label map stacked to 5 channels."""
    image = torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image, dtype=torch.float32)
    seg = torch.as_tensor(np.asarray(seg) if not isinstance(seg, Tensor) else seg, dtype=torch.float32)
    return torch.cat([image, seg], dim=-4)


class TumourReadout(Backbone):
    """A pretrained backbone read out by region (module docstring). Same weights; ``inner`` is the backbone.

    ``embed(x (B, 5, D, H, W)) -> (B, 5 * C)``; ``gradcam_target()`` is the pooled stage (ResNet) or the encoded
    tokens (ViT); ``finetune_split()`` freezes everything before the pooled stage (ResNet) or the last block (ViT),
    carrying the cell fractions of the regions with the frozen features.
    """

    def __init__(self, inner: Backbone):
        super().__init__()
        if not isinstance(inner, (ResNetBackbone, ViTBackbone)):
            raise TypeError(f"TumourReadout reads a ResNetBackbone or ViTBackbone, got {type(inner).__name__}")
        self.inner = inner
        self.arch = inner.arch if isinstance(inner, ResNetBackbone) else "vit"
        self.input_size = inner.input_size
        if isinstance(inner, ResNetBackbone):
            layer, _ = inner.gradcam_target()
            self.stage = next(n for n in ("layer1", "layer2", "layer3", "layer4") if getattr(inner.net, n) is layer)
            channels = layer[-1].bn2.num_features
        else:
            self.stage = "tokens"
            channels = inner.embed_dim
        self.embed_dim = len(REGIONS) * channels

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != N_READOUT_CHANNELS:
            raise ValueError(f"TumourReadout: expected input of shape (B, {N_READOUT_CHANNELS}, D, H, W) (four "
                             f"contrasts and the segmentation), got {tuple(x.shape)}")

    # ---- the feature map that is pooled ---------------------------------------------------------------------
    def _resnet_stem(self, image: Tensor) -> Tensor:
        net = self.inner.net
        self.inner._check_input(image)
        h = net.act(net.bn1(net.conv1(image)))
        return h if net.no_max_pool else net.maxpool(h)

    def _resnet_stages(self, h: Tensor, first: bool, last: bool) -> Tensor:
        names = ("layer1", "layer2", "layer3", "layer4")
        upto = names[:names.index(self.stage) + 1]
        for name in (upto[:-1] if first else ()) + ((upto[-1],) if last else ()):
            h = getattr(self.inner.net, name)(h)
        return h

    def _vit_map(self, tok: Tensor, grid: tuple[int, int, int]) -> Tensor:
        return tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], *grid)

    def feature_map(self, image: Tensor) -> Tensor:
        """(B, 4, D, H, W) -> (B, C, d, h, w): the map the readout pools."""
        if isinstance(self.inner, ResNetBackbone):
            return self._resnet_stages(self._resnet_stem(image), first=True, last=True)
        tok, grid = self.inner.tokens(image)
        return self._vit_map(self.inner.encode(tok), grid)

    def embed(self, x: Tensor) -> Tensor:
        self._check_input(x)
        image, seg = x[:, :N_INPUT_CHANNELS], x[:, N_INPUT_CHANNELS:]
        features = self.feature_map(image)
        return region_means(features, cell_fractions(region_masks(seg), tuple(features.shape[2:])))

    def gradcam_target(self) -> tuple[nn.Module, Callable | None]:
        return self.inner.gradcam_target()

    # ---- partial fine-tuning: frozen part and trained part ----------------------------------------------------
    def finetune_split(self):
        """``partial`` mode: the pooled stage (ResNet) or the last block (ViT) trains; the frozen features travel
        with the cell fractions of the regions at their grid (concatenated channels / token features)."""
        from nrfm.train.finetune_data import BackboneSplit  # here: finetune_data imports this module at its top

        regions = len(REGIONS)
        if isinstance(self.inner, ResNetBackbone):
            stage = getattr(self.inner.net, self.stage)

            def trunk(x: Tensor) -> Tensor:
                self._check_input(x)
                h = self._resnet_stages(self._resnet_stem(x[:, :N_INPUT_CHANNELS]), first=True, last=False)
                fractions = cell_fractions(region_masks(x[:, N_INPUT_CHANNELS:]), tuple(h.shape[2:]))
                return torch.cat([h, fractions.to(h.dtype)], dim=1)

            def tail(z: Tensor) -> Tensor:
                h, fractions = z[:, :-regions], z[:, -regions:].float()
                features = stage(h)
                return region_means(features, cell_fractions(fractions, tuple(features.shape[2:])))

            return BackboneSplit(trunk, tail, [stage])
        vit = self.inner.vit

        def vit_trunk(x: Tensor) -> Tensor:
            self._check_input(x)
            tok, grid = self.inner.tokens(x[:, :N_INPUT_CHANNELS])
            for block in vit.blocks[:-1]:
                tok = block(tok)
            fractions = cell_fractions(region_masks(x[:, N_INPUT_CHANNELS:]), grid).flatten(2).transpose(1, 2)
            return torch.cat([tok, fractions.to(tok.dtype)], dim=2)  # (B, N, hidden + R)

        def vit_tail(z: Tensor) -> Tensor:
            tok, fractions = z[..., :-regions], z[..., -regions:].float()
            tok = vit.norm(vit.blocks[-1](tok))  # (B, N, C)
            weights = fractions / fractions.sum(dim=1, keepdim=True).clamp_min(1e-6)  # (B, N, R)
            return torch.einsum("bnc,bnr->brc", tok.float(), weights).flatten(1).to(tok.dtype)

        return BackboneSplit(vit_trunk, vit_tail, [vit.blocks[-1], vit.norm])


def readout_backbone(backbone: nn.Module, readout: str) -> nn.Module:
    """``backbone`` as fine-tuning reads it: unchanged for ``global``, wrapped in :class:`TumourReadout` for ``tumour``
    (a backbone already wrapped is returned as it is)."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; valid: {list(READOUTS)}")
    if readout == "global" or isinstance(backbone, TumourReadout):
        return backbone
    return TumourReadout(backbone)


def uses_segmentation(model: nn.Module) -> bool:
    """Whether ``model`` (a backbone or a model with a ``backbone``) takes the segmentation as a fifth channel."""
    return isinstance(getattr(model, "backbone", model), TumourReadout)


def item_input(item: dict, segmentation: bool) -> Tensor:
    """(C, D, H, W) float32 input for a preprocessed dataset item: the image, and the label map with
    ``segmentation``."""
    if segmentation:
        return with_segmentation(np.asarray(item["image"]), np.asarray(item["seg"]))
    return torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)


def model_input(model: nn.Module, item: dict) -> Tensor:
    """(C, D, H, W) input of ``model`` for a preprocessed dataset item: the image, and the label map if it reads by
    region."""
    return item_input(item, uses_segmentation(model))
