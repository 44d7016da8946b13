"""3D augmentation views for self-supervised pretraining, one recipe per method.

A view is a random crop of a preprocessed volume (4, D, H, W) plus random flips and, for the joint-embedding
methods (BYOL, DINO, MoCo), photometric and geometric jitter: affine (rotation +-15 deg, scale +-10%),
intensity scale/shift, gamma, bias field, blur and Gaussian noise. MAE uses crops and flips only, as its
paper does. DINO gets two global crops of ``view_size`` and ``n_local_views`` local crops of
``local_view_size`` (multi-crop). The papers crop a random area and resize it (224 and 96 pixels); the kit
takes fixed-size 3D crops of the cached volume instead, because resampling every view costs more than
the small networks it feeds.

Where the work happens (``PretrainingConfig.batch_augment``):

* ``True`` (default): each DataLoader worker only crops and flips (MONAI ``RandSpatialCropd``/``RandFlipd``,
  about 1500 views/s per core); :class:`BatchAugment` applies the rest to the whole batch in torch on the
  training device (a few vectorised ops instead of ten Python transforms per view).
* ``False``: every transform runs per view in MONAI (``RandAffined``, ``RandScaleIntensityd``,
  ``RandShiftIntensityd``, ``RandAdjustContrastd``, ``RandBiasFieldd``, ``RandGaussianSmoothd``,
  ``RandGaussianNoised``): about 250 views/s per core, slower than the training step on 2 cores.

Determinism: every random draw of epoch ``e`` derives from ``(seed, e)``: the sampler's order, each item's
MONAI random state (from ``(seed, e, index)``, independent of worker and order) and the batch generator
(from ``(seed, e, step)``). A resumed epoch therefore sees exactly the views of an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandFlipd,
                              RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd,
                              RandSpatialCropd)
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from nrfm.config import SSL_METHODS, PretrainingConfig
from nrfm.errors import ConfigError

# augmentation strengths shared by the MONAI and the torch batch paths
P_AFFINE, ROTATE_RAD, SCALE = 0.8, math.radians(15.0), 0.1
P_INTENSITY, INTENSITY_SCALE, INTENSITY_SHIFT = 0.8, 0.2, 0.2
P_GAMMA, GAMMA_RANGE = 0.5, (0.7, 1.5)
P_BIAS, BIAS_COEFF = 0.5, 0.1
P_BLUR, BLUR_SIGMA = 0.5, (0.25, 1.0)
P_NOISE, NOISE_STD = 0.5, 0.1


@dataclass(frozen=True)
class ViewRecipe:
    """How many views a method needs and how strongly they are augmented."""

    n_global: int
    n_local: int
    strong: bool  # photometric and affine jitter (joint-embedding methods) or crops and flips only (MAE)


def view_recipe(method: str, cfg: PretrainingConfig) -> ViewRecipe:
    """The view recipe of ``method``; raises ValueError listing the valid names."""
    if method not in SSL_METHODS:
        raise ValueError(f"unknown SSL method {method!r}; valid: {list(SSL_METHODS)}")
    if method == "mae":
        return ViewRecipe(n_global=1, n_local=0, strong=False)
    return ViewRecipe(n_global=2, n_local=cfg.n_local_views if method == "dino" else 0, strong=True)


def check_view_sizes(cfg: PretrainingConfig, volume_size: Sequence[int], method: str, source: str = "<config>") -> None:
    """ConfigError if a crop of ``method`` is larger than the preprocessed volume."""
    recipe = view_recipe(method, cfg)
    wanted = [("view_size", cfg.view_size)] + ([("local_view_size", cfg.local_view_size)] if recipe.n_local else [])
    for key, size in wanted:
        if any(int(s) > int(v) for s, v in zip(size, volume_size)):
            raise ConfigError(f"{source}: pretraining.{key}: crop {list(size)} is larger than the preprocessed "
                              f"volume {list(volume_size)} (preprocessing.crop_size); use a smaller crop")


def _monai_pipeline(size: Sequence[int], strong: bool, full: bool) -> Compose:
    keys = ["image"]
    steps = [RandSpatialCropd(keys, roi_size=tuple(size), random_size=False)]
    steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    if strong and full:
        steps += [
            RandAffined(keys, prob=P_AFFINE, rotate_range=(ROTATE_RAD,) * 3, scale_range=(SCALE,) * 3,
                        padding_mode="zeros"),
            RandScaleIntensityd(keys, factors=INTENSITY_SCALE, prob=P_INTENSITY),
            RandShiftIntensityd(keys, offsets=INTENSITY_SHIFT, prob=P_INTENSITY),
            RandAdjustContrastd(keys, prob=P_GAMMA, gamma=GAMMA_RANGE),
            RandBiasFieldd(keys, prob=P_BIAS, coeff_range=(0.0, BIAS_COEFF), degree=2),
            RandGaussianSmoothd(keys, prob=P_BLUR, sigma_x=BLUR_SIGMA, sigma_y=BLUR_SIGMA, sigma_z=BLUR_SIGMA),
            RandGaussianNoised(keys, prob=P_NOISE, std=NOISE_STD),
        ]
    return Compose(steps)


def _item_seed(*parts: int) -> int:
    """A 32-bit seed from integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SampleViews:
    """Per-volume MONAI part of a recipe: (4, D, H, W) -> list of views (global crops first, then local).

    Args:
        recipe: the method's :class:`ViewRecipe`.
        view_size, local_view_size: crop sizes (voxels).
        full_monai: run the photometric/affine transforms here (True) or leave them to :class:`BatchAugment`.
    """

    def __init__(self, recipe: ViewRecipe, view_size: Sequence[int], local_view_size: Sequence[int],
                 full_monai: bool = False):
        self.recipe = recipe
        self.global_t = _monai_pipeline(view_size, recipe.strong, full_monai)
        self.local_t = _monai_pipeline(local_view_size, recipe.strong, full_monai)

    def __call__(self, image: Tensor, seed: int) -> list[Tensor]:
        rng = np.random.RandomState(seed)
        views = []
        for i in range(self.recipe.n_global + self.recipe.n_local):
            transform = self.global_t if i < self.recipe.n_global else self.local_t
            transform.set_random_state(seed=int(rng.randint(2 ** 31 - 1)))
            out = transform({"image": image})["image"]
            out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
            views.append(out.float().contiguous())
        return views


class ViewDataset(Dataset):
    """Views of the subjects ``indices`` of a preprocessed dataset; items are addressed by ``(epoch, index)``.

    ``base[i]["image"]`` is a (4, D, H, W) volume. Item ``(e, i)`` returns ``{"views": [...], "index": i}``
    with random draws from ``(seed, e, i)`` only.
    """

    def __init__(self, base: Dataset, sample_views: SampleViews, seed: int):
        self.base = base
        self.sample_views = sample_views
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        image = self.base[int(index)]["image"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return {"views": self.sample_views(image, _item_seed(self.seed, epoch, index)), "index": int(index)}


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for a shuffled pass over ``indices``; the order depends on ``(seed, epoch)`` only.

    ``num_replicas``/``rank`` split each epoch between data-parallel processes (every rank sees
    ``len(indices) // num_replicas`` items); ``drop_last`` trims the epoch to whole batches so batch-norm
    never sees a batch of one.
    """

    def __init__(self, indices: Sequence[int], seed: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = True):
        self.indices = np.asarray(indices, dtype=int)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.num_replicas, self.rank, self.drop_last = int(num_replicas), int(rank), drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_rank = len(self.indices) // self.num_replicas
        return (per_rank // self.batch_size) * self.batch_size if self.drop_last else per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng(_item_seed(self.seed, self.epoch, 7919)).permutation(self.indices)
        per_rank = len(self.indices) // self.num_replicas
        mine = order[self.rank * per_rank:(self.rank + 1) * per_rank][:len(self)]
        return iter([(self.epoch, int(i)) for i in mine])


def batch_generator(seed: int, epoch: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of :class:`BatchAugment` for one step (on the batch's device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_item_seed(seed, epoch, step, 104729))
    return gen


class BatchAugment:
    """Photometric and affine jitter of a batch of views in torch, each sample with its own draws.

    Same transforms and strengths as the MONAI path: affine (bilinear ``grid_sample``), intensity
    scale/shift, gamma on the min-max range (as ``RandAdjustContrast``), a multiplicative ``exp`` of a
    degree-2 polynomial bias field, separable Gaussian blur and Gaussian noise.
    """

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """(B, C, D, H, W) float -> augmented copy of the same shape."""
        b, c = x.shape[:2]
        dev, dt = x.device, x.dtype

        def uniform(lo: float, hi: float, *shape: int) -> Tensor:
            return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=dev, dtype=torch.float32)

        def chosen(p: float) -> Tensor:
            return torch.rand(b, generator=generator, device=dev) < p

        x = x.float()
        x = self._affine(x, chosen(P_AFFINE), uniform(-ROTATE_RAD, ROTATE_RAD, b, 3), uniform(1 - SCALE, 1 + SCALE, b, 3))
        on = chosen(P_INTENSITY).view(b, 1, 1, 1, 1)
        x = torch.where(on, x * (1 + uniform(-INTENSITY_SCALE, INTENSITY_SCALE, b, 1, 1, 1, 1)), x)
        on = chosen(P_INTENSITY).view(b, 1, 1, 1, 1)
        x = torch.where(on, x + uniform(-INTENSITY_SHIFT, INTENSITY_SHIFT, b, 1, 1, 1, 1), x)
        x = self._gamma(x, chosen(P_GAMMA), uniform(*GAMMA_RANGE, b))
        x = self._bias(x, chosen(P_BIAS), uniform(-BIAS_COEFF, BIAS_COEFF, b, 10))
        x = self._blur(x, chosen(P_BLUR), uniform(*BLUR_SIGMA, b))
        noise_std = uniform(0.0, NOISE_STD, b) * chosen(P_NOISE)
        noise = torch.randn(x.shape, generator=generator, device=dev, dtype=torch.float32)
        x = x + noise * noise_std.view(b, 1, 1, 1, 1)
        return x.to(dt)

    @staticmethod
    def _affine(x: Tensor, on: Tensor, angles: Tensor, scales: Tensor) -> Tensor:
        cos, sin = angles.cos(), angles.sin()
        one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
        rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(-1, 3, 3)
        ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(-1, 3, 3)
        rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
        matrix = rz @ ry @ rx @ torch.diag_embed(1.0 / scales)
        matrix = torch.where(on.view(-1, 1, 1), matrix, torch.eye(3, device=x.device).expand_as(matrix))
        theta = torch.cat([matrix, torch.zeros(x.shape[0], 3, 1, device=x.device)], dim=2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(on.view(-1, 1, 1, 1, 1), out, x)

    @staticmethod
    def _gamma(x: Tensor, on: Tensor, gamma: Tensor) -> Tensor:
        flat = x.flatten(1)
        lo, hi = flat.min(1).values.view(-1, 1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1, 1)
        span = (hi - lo).clamp_min(1e-6)
        out = ((x - lo) / span).clamp_min(0).pow(gamma.view(-1, 1, 1, 1, 1)) * span + lo
        return torch.where(on.view(-1, 1, 1, 1, 1), out, x)

    @staticmethod
    def _bias(x: Tensor, on: Tensor, coeff: Tensor) -> Tensor:
        d, h, w = x.shape[2:]
        axes = [torch.linspace(-1, 1, n, device=x.device) for n in (d, h, w)]
        zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
        terms = torch.stack([torch.ones_like(zz), zz, yy, xx, zz * zz, yy * yy, xx * xx, zz * yy, zz * xx, yy * xx])
        field = torch.einsum("bt,tdhw->bdhw", coeff * on.view(-1, 1), terms).exp()
        return x * field.unsqueeze(1)

    @staticmethod
    def _blur(x: Tensor, on: Tensor, sigma: Tensor, radius: int = 2) -> Tensor:
        b, c = x.shape[:2]
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)
        identity = (offsets == 0).float().expand_as(kernel)
        kernel = torch.where(on.view(-1, 1), kernel, identity).repeat_interleave(c, dim=0)  # (B*C, k)
        y = x.reshape(1, b * c, *x.shape[2:])
        for dim in range(3):
            shape = [b * c, 1, 1, 1, 1]
            shape[2 + dim] = 2 * radius + 1
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
            y = F.conv3d(F.pad(y, pad, mode="replicate"), kernel.view(shape), groups=b * c)
        return y.view_as(x)
