"""3D backbones with four input channels (t1, t1c, t2, flair), shared by every stage after pretraining.

* BYOL, DINO and MoCo use MONAI's 3D ResNet (``resnet10`` or ``resnet18`` block layout) without the
  classifier: ``embed`` returns the globally average-pooled features of the last stage. The widths of the
  four stages are ``cnn_width * (1, 2, 4, 8)``; MONAI's default (Med3D, Chen et al. 2019) is ``64 * (1, 2, 4, 8)``.
  The kit's default width is smaller so that pretraining fits a CPU budget.
* MAE uses MONAI's 3D ``ViT`` encoder with fixed sine-cosine position embeddings. ``embed`` returns the
  mean of the patch tokens after the final LayerNorm (global average pooling, which He et al. 2022 use for
  fine-tuning). Because the position embedding is a fixed function of the patch grid, the encoder accepts
  any input whose sides are multiples of the patch size (pretraining on crops, embedding whole volumes).

``build_backbone(method, cfg, input_size)`` returns an untrained backbone: the random-init baseline of the
representation monitor and the starting point of pretraining.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import ViT
from monai.networks.nets.resnet import ResNet, ResNetBlock
from torch import Tensor, nn

from nrfm.config import PretrainingConfig
from nrfm.ssl.registry import method_class

N_INPUT_CHANNELS = 4
CNN_ARCHS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2]}
VIT_ARCH = "vit"


class SmallInputSafeConv3d(nn.Conv3d):
    """Conv3d that runs in float32 when an input side is smaller than the kernel, on CPU under autocast.

    With torch 2.14.1 on these CPUs, oneDNN's bf16 Conv3d backward returns garbage weight gradients (values
    up to 1e38, different on every call) and can corrupt the heap when a spatial side of the input is
    smaller than the kernel (e.g. a 3x3x3 convolution on a 2x2x2 map, which a ResNet stage reaches on
    24^3 crops). Such maps hold a handful of voxels, so computing them in float32 costs nothing; every
    other convolution keeps bf16. The shapes were checked against float64 for kernels 1, 3 and 7, strides 1
    and 2, sides 1-12, both memory formats.
    """

    def forward(self, x: Tensor) -> Tensor:
        small = any(s < k for s, k in zip(x.shape[2:], self.kernel_size))
        if small and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast(device_type="cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight, self.bias)
        return super().forward(x)


def _guard_small_convs(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if type(sub) is nn.Conv3d:
            sub.__class__ = SmallInputSafeConv3d  # same parameters and state dict, only forward differs
    return module


# Stages whose feature map is at most this many voxels per side keep the default (contiguous) memory format
# when a model is put in channels_last_3d (:func:`use_channels_last`).
CONTIGUOUS_STAGE_SIDE = 2


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)


def use_channels_last(module: nn.Module) -> nn.Module:
    """Put ``module`` in ``channels_last_3d``, except the ResNet stages whose feature maps are tiny.

    channels_last pays where feature maps are large and channels few (the stem and first stages). In the last
    stages (1-2 voxels per side on the kit's crops) the activations are tiny and the weights large, and
    oneDNN's weight gradient in channels_last comes back through a permuted copy of a weight-sized tensor
    (256 x 256 x 27 at width 32) that took longer than the stage's convolutions. Those stages (every
    :class:`ResNetBackbone` inside ``module``, side <= :data:`CONTIGUOUS_STAGE_SIDE` at its ``input_size``)
    keep contiguous weights and get contiguous inputs. Measured on one BYOL step (2 cores, bf16): about 15 %
    faster than channels_last throughout (benchmarks/README.md). Returns ``module``, changed in place.
    """
    module.to(memory_format=torch.channels_last_3d)
    for sub in module.modules():
        if isinstance(sub, ResNetBackbone):
            sizes = sub.stage_sizes()
            for name in ("layer1", "layer2", "layer3", "layer4"):
                stage = getattr(sub.net, name)
                if sizes[name] <= CONTIGUOUS_STAGE_SIDE:
                    stage.to(memory_format=torch.contiguous_format)
                    if not getattr(stage, "_nrfm_contiguous_input", False):
                        stage.register_forward_pre_hook(_contiguous_input)
                        stage._nrfm_contiguous_input = True
    return module


class Backbone(nn.Module):
    """Common interface: ``embed(x (B, 4, D, H, W)) -> (B, embed_dim)``, ``embed_dim``, ``gradcam_target()``.

    Attributes:
        embed_dim: size of the embedding.
        arch: architecture name recorded in checkpoints (``resnet10``, ``resnet18``, ``vit``).
        input_size: the spatial size the backbone was built for (the ViT needs multiples of its patch).
    """

    embed_dim: int
    arch: str
    input_size: tuple[int, int, int]

    def embed(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)

    def gradcam_target(self) -> tuple[nn.Module, Callable | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != N_INPUT_CHANNELS:
            raise ValueError(f"{type(self).__name__}: expected input of shape (B, {N_INPUT_CHANNELS}, D, H, W), "
                             f"got {tuple(x.shape)}")


class ResNetBackbone(Backbone):
    """MONAI 3D ResNet (basic blocks) with global average pooling and no classifier.

    Args:
        arch: ``resnet10`` (one block per stage) or ``resnet18`` (two).
        width: channels of the first stage; stages have ``width * (1, 2, 4, 8)`` channels.
        input_size: spatial size of the inputs used to pick the Grad-CAM layer.
        stem_stride: stride of the 7^3 stem convolution. 2 is the standard ResNet/Med3D stem (about 5x
            faster on 24^3 crops); 1 is MONAI's default and keeps twice the resolution in every stage.
    """

    def __init__(self, arch: str = "resnet10", width: int = 32, input_size: Sequence[int] = (32, 32, 32),
                 stem_stride: int = 2):
        super().__init__()
        if arch not in CNN_ARCHS:
            raise ValueError(f"unknown CNN architecture {arch!r}; valid: {sorted(CNN_ARCHS)}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.arch = arch
        self.input_size = tuple(int(s) for s in input_size)
        self.stem_stride = stem_stride
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.net = ResNet(ResNetBlock, CNN_ARCHS[arch], planes, spatial_dims=3, n_input_channels=N_INPUT_CHANNELS,
                          conv1_t_stride=stem_stride, feed_forward=False)
        _guard_small_convs(self.net)
        self.embed_dim = planes[-1] * ResNetBlock.expansion

    def embed(self, x: Tensor) -> Tensor:
        """(B, 4, D, H, W) -> (B, 8 * width)."""
        self._check_input(x)
        return self.net(x)

    def stage_sizes(self) -> dict[str, int]:
        """Smallest side of each stage's feature map at ``input_size``."""
        side = -(-min(self.input_size) // self.stem_stride)  # 7^3 stem convolution
        side = -(-side // 2)  # max pooling
        sizes = {"layer1": side}
        for name in ("layer2", "layer3", "layer4"):
            side = -(-side // 2)
            sizes[name] = side
        return sizes

    def gradcam_target(self) -> tuple[nn.Module, Callable | None]:
        """The deepest stage whose feature map has at least 8 voxels per side at ``input_size`` (else layer1).

        On the kit's small volumes the last stages are 1-4 voxels wide (32^3 with the stride-2 stem: layer4 is
        1^3, layer3 2^3, layer2 4^3, layer1 8^3). A class-activation map needs cells no coarser than an eighth of
        the crop to separate a tumour from its surroundings: on the default run's fine-tuned BYOL (IDH,
        predicted class) the CAM share in the tumour over its volume share was 1.42 at layer1 and 1.10 at layer2.
        At paper-scale crops (e.g. 128^3) the rule picks layer3 (8^3).
        """
        sizes = self.stage_sizes()
        name = next((n for n in ("layer4", "layer3", "layer2") if sizes[n] >= 8), "layer1")
        return getattr(self.net, name), None


def cached_sincos_embedding(cache: dict, grid: Sequence[int], dim: int, device: torch.device) -> Tensor:
    """(1, N, dim) fixed 3D sine-cosine position embedding of a patch grid, memoised in ``cache``."""
    key = (*grid, dim, hash(device))
    if key not in cache:
        with warnings.catch_warnings():  # MONAI calls torch.meshgrid without indexing=
            warnings.simplefilter("ignore", UserWarning)
            pos = build_sincos_position_embedding(list(grid), dim, spatial_dims=3).detach()
        cache[key] = pos.to(device)
    return cache[key]


class ViTBackbone(Backbone):
    """MONAI 3D ViT encoder on cubic patches with fixed sine-cosine position embeddings.

    Args:
        input_size: spatial size the encoder is built for; each side a multiple of ``patch_size``.
        patch_size: cubic patch side in voxels.
        hidden_size, num_layers, num_heads: transformer size (ViT-B is 768 / 12 / 12; the kit's default is tiny).
    """

    def __init__(self, input_size: Sequence[int] = (32, 32, 32), patch_size: int = 8, hidden_size: int = 192,
                 num_layers: int = 4, num_heads: int = 4):
        super().__init__()
        self.arch = VIT_ARCH
        self.input_size = tuple(int(s) for s in input_size)
        if any(s % patch_size for s in self.input_size):
            raise ValueError(f"ViT input size {self.input_size} must be a multiple of patch_size={patch_size}")
        if hidden_size % 6:
            raise ValueError(f"ViT hidden_size={hidden_size} must be a multiple of 6 (3D sine-cosine embedding)")
        self.patch_size = patch_size
        with warnings.catch_warnings():  # MONAI's sine-cosine table calls torch.meshgrid without indexing=
            warnings.simplefilter("ignore", UserWarning)
            self.vit = ViT(in_channels=N_INPUT_CHANNELS, img_size=self.input_size, patch_size=patch_size,
                           hidden_size=hidden_size, mlp_dim=4 * hidden_size, num_layers=num_layers,
                           num_heads=num_heads, proj_type="conv", pos_embed_type="sincos", classification=False,
                           qkv_bias=True)
        self.embed_dim = hidden_size
        self._pos_cache: dict[tuple[int, ...], Tensor] = {}

    def grid(self, spatial: Sequence[int]) -> tuple[int, int, int]:
        """Patch grid of an input of spatial size ``spatial``; raises ValueError if not a multiple of the patch."""
        if any(int(s) % self.patch_size for s in spatial):
            raise ValueError(f"ViT input of spatial size {tuple(spatial)}: each side must be a multiple of "
                             f"patch_size={self.patch_size}")
        return tuple(int(s) // self.patch_size for s in spatial)  # type: ignore[return-value]

    def position_embedding(self, grid: Sequence[int], device: torch.device) -> Tensor:
        """(1, N, hidden) fixed sine-cosine embedding of a patch grid (cached per grid and device)."""
        return cached_sincos_embedding(self._pos_cache, grid, self.embed_dim, device)

    def tokens(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """Patch tokens with position embedding: (B, 4, D, H, W) -> ((B, N, hidden), grid)."""
        self._check_input(x)
        grid = self.grid(x.shape[2:])
        tok = self.vit.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)
        return tok + self.position_embedding(grid, x.device).to(tok.dtype), grid

    def encode(self, tok: Tensor) -> Tensor:
        """Transformer blocks and final LayerNorm on any token subset: (B, n, hidden) -> (B, n, hidden)."""
        for block in self.vit.blocks:
            tok = block(tok)
        return self.vit.norm(tok)

    def embed(self, x: Tensor) -> Tensor:
        """(B, 4, D, H, W) -> (B, hidden): mean of the encoded patch tokens."""
        tok, _ = self.tokens(x)
        return self.encode(tok).mean(dim=1)

    def gradcam_target(self) -> tuple[nn.Module, Callable | None]:
        """Final LayerNorm; the transform maps its tokens (B, N, C) to a (B, C, gd, gh, gw) map."""
        patch = self.patch_size

        def tokens_to_grid(tokens: Tensor, spatial: Sequence[int] | None = None) -> Tensor:
            n = tokens.shape[1]
            grid = self.grid(spatial) if spatial is not None else None
            if grid is None:  # infer a cube from the token count when the caller does not pass the input size
                side = round(n ** (1 / 3))
                grid = (side, side, side) if side ** 3 == n else self.grid(self.input_size)
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

        tokens_to_grid.patch_size = patch  # type: ignore[attr-defined]
        return self.vit.norm, tokens_to_grid


def backbone_arch(method: str, cfg: PretrainingConfig) -> str:
    """Architecture name that ``build_backbone(method, cfg, ...)`` builds (recorded in checkpoints)."""
    return VIT_ARCH if method_class(method).architecture == "vit" else cfg.cnn_arch


def build_backbone(method: str, cfg: PretrainingConfig, input_size: Sequence[int]) -> Backbone:
    """Untrained backbone for an SSL method.

    Args:
        method: one of ``byol, dino, mae, moco`` (MAE gets the ViT, the others the ResNet).
        cfg: the pretraining settings (``cnn_arch``, ``cnn_width``, ``vit_*``).
        input_size: spatial size (D, H, W) of the volumes the backbone will embed.

    Raises:
        ValueError: unknown method (lists the valid ones) or an input size the ViT cannot tile.
    """
    arch = backbone_arch(method, cfg)
    if arch == VIT_ARCH:
        return ViTBackbone(input_size, cfg.vit_patch_size, cfg.vit_hidden_size, cfg.vit_layers, cfg.vit_heads)
    return ResNetBackbone(arch, cfg.cnn_width, input_size, cfg.cnn_stem_stride)
