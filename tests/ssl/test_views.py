"""Pretraining views: left-right flips only, and one augmentation distribution in the MONAI and torch paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, ks_2samp

from nrfm.ssl import views
from nrfm.ssl.views import BatchAugment, SampleViews, ViewRecipe

SIDE, VIEW = 20, (16, 16, 16)
PATHS = {"monai": {"full_monai": True}, "torch": {"torch_augment": True}}


def coordinate_volume() -> torch.Tensor:
    """(4, D, H, W) RAS volume: channel c holds the voxel's coordinate along spatial axis c (LR, AP, SI); 3: 1."""
    grid = torch.meshgrid(*[torch.arange(SIDE, dtype=torch.float32)] * 3, indexing="ij")
    return torch.stack([*grid, torch.ones(SIDE, SIDE, SIDE)])


def slope_sign(view: torch.Tensor, channel: int, axis: int) -> float:
    """Sign of the correlation between ``channel``'s values and the voxel index along spatial ``axis``."""
    index = torch.arange(view.shape[1 + axis], dtype=torch.float64).view([-1 if a == axis else 1 for a in range(3)])
    values = view[channel].double()
    centred = values - values.mean()
    return float(torch.sign((centred * (index - index.mean())).sum()))


def sample(path: str, strong: bool, n_items: int, seed0: int = 0) -> list[torch.Tensor]:
    recipe = ViewRecipe(n_global=2, n_local=0, strong=strong)
    maker = SampleViews(recipe, VIEW, (8, 8, 8), **PATHS[path])
    volume = coordinate_volume()
    return [v for i in range(n_items) for v in maker(volume, seed0 + i)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("strong", [False, True])
def test_views_keep_anterior_posterior_and_superior_inferior_orientation(path, strong):
    # crops, flips and (strong) rotation by at most 15 degrees never reverse the AP and SI coordinate ramps
    for view in sample(path, strong, n_items=40):
        assert slope_sign(view, channel=1, axis=1) == 1.0  # anterior stays anterior
        assert slope_sign(view, channel=2, axis=2) == 1.0  # superior stays superior


@pytest.mark.parametrize("path", list(PATHS))
def test_left_right_flips_happen_with_the_configured_probability(path, monkeypatch):
    out = sample(path, strong=False, n_items=150)
    flipped = sum(slope_sign(v, channel=0, axis=0) < 0 for v in out)
    assert binomtest(int(flipped), len(out), views.P_FLIP).pvalue > 1e-3
    for p in (0.0, 1.0):
        monkeypatch.setattr(views, "P_FLIP", p)
        flips = [slope_sign(v, channel=0, axis=0) < 0 for v in sample(path, strong=False, n_items=10)]
        assert all(flips) if p == 1.0 else not any(flips)


# ---- the two augmentation paths draw from one distribution ----------------------------------------------------
def test_bias_field_is_monais_for_the_same_coefficients():
    from monai.transforms import RandBiasField

    coeff = np.random.default_rng(1).uniform(-views.BIAS_COEFF, views.BIAS_COEFF, views.N_BIAS_TERMS)
    field = RandBiasField(degree=views.BIAS_DEGREE)._generate_random_field((12, 14, 16), views.BIAS_DEGREE,
                                                                           coeff.tolist())
    ours = BatchAugment._bias(torch.ones(1, 1, 12, 14, 16), torch.ones(1, dtype=torch.bool),
                              torch.tensor(coeff, dtype=torch.float32)[None])
    np.testing.assert_allclose(ours[0, 0].numpy(), np.exp(field), rtol=1e-5)


def test_blur_is_monais_gaussian_with_one_sigma_per_axis():
    from monai.transforms import GaussianSmooth

    images = torch.randn(3, 2, 12, 14, 16, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([[0.3, 0.7, 1.0], [0.25, 0.26, 0.5], [1.0, 1.0, 1.0]])
    on = torch.tensor([True, True, False])  # each sample its own kernels; a sample not drawn is left alone
    ours = BatchAugment._blur(images, on, sigmas)
    for i in range(2):
        reference = torch.as_tensor(GaussianSmooth(sigma=sigmas[i].tolist())(images[i]))
        torch.testing.assert_close(ours[i], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2], images[2])


def test_monai_and_torch_paths_draw_views_from_the_same_distribution():
    # per view: mean, SD, the relative brightness slope along each axis (bias field, flips) and the log
    # roughness (blur, noise, interpolation); KS test of each summary between the paths. The old mismatch
    # (MONAI bias coefficients in (0, 0.1), torch in (-0.1, 0.1)) gave slope p-values below 1e-10 here.
    rng = np.random.default_rng(0)
    volume = torch.from_numpy((2.0 + 0.5 * rng.normal(size=(2, SIDE, SIDE, SIDE))).astype(np.float32))
    recipe = ViewRecipe(n_global=2, n_local=0, strong=True)

    def summary(v: torch.Tensor) -> list[float]:
        v = v.double()
        mean = v.mean()
        row = [mean, v.std()]
        for axis in (1, 2, 3):
            half = v.shape[axis] // 2
            row.append((v.narrow(axis, half, half).mean() - v.narrow(axis, 0, half).mean()) / mean)
        grad = sum(v.diff(dim=axis).pow(2).mean() for axis in (1, 2, 3))
        return [float(x) for x in row] + [float(torch.log(grad / v.var()))]

    def summaries(path: str, seed0: int) -> np.ndarray:
        if path == "batch":  # augment_on: device: the loader crops and flips, BatchAugment jitters whole batches
            maker = SampleViews(recipe, VIEW, (8, 8, 8))
            gen = torch.Generator().manual_seed(seed0)
            views_ = [v for i in range(150) for v in maker(volume, seed0 + i)]
            batches = [BatchAugment()(torch.stack(views_[k:k + 20]), gen) for k in range(0, len(views_), 20)]
            return np.array([summary(v) for batch in batches for v in batch])
        maker = SampleViews(recipe, VIEW, (8, 8, 8), **PATHS[path])
        return np.array([summary(v) for i in range(150) for v in maker(volume, seed0 + i)])

    monai = summaries("monai", 0)
    names = ["mean", "sd", "slope_lr", "slope_ap", "slope_si", "log_roughness"]
    for path, seed0 in (("torch", 100_000), ("batch", 200_000)):
        other = summaries(path, seed0)
        pvalues = {name: ks_2samp(monai[:, j], other[:, j]).pvalue for j, name in enumerate(names)}
        assert min(pvalues.values()) > 1e-3, (path, pvalues)


def test_affine_is_affine_grid_then_grid_sample():
    # the cached-grid affine against torch's own affine_grid + grid_sample, per sample, non-cubic volume
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 2, 10, 12, 14, generator=gen)
    angles = (torch.rand(4, 3, generator=gen) - 0.5) * 2 * views.ROTATE_RAD
    scales = 1 + (torch.rand(4, 3, generator=gen) - 0.5) * 2 * views.SCALE
    on = torch.tensor([True, False, True, True])
    ours = BatchAugment._affine(images, on, angles, scales)
    for i in range(4):
        a, s = angles[i].double(), scales[i].double()
        c, n = a.cos(), a.sin()
        rx = torch.tensor([[1, 0, 0], [0, c[0], -n[0]], [0, n[0], c[0]]], dtype=torch.float64)
        ry = torch.tensor([[c[1], 0, n[1]], [0, 1, 0], [-n[1], 0, c[1]]], dtype=torch.float64)
        rz = torch.tensor([[c[2], -n[2], 0], [n[2], c[2], 0], [0, 0, 1]], dtype=torch.float64)
        matrix = (rz @ ry @ rx @ torch.diag(s)).float() if on[i] else torch.eye(3)
        if on[i]:  # the per-view path builds the same matrix in Python floats
            np.testing.assert_allclose(views._rotation_scale(a.tolist(), s.tolist()), matrix.numpy(), atol=1e-6)
        theta = torch.cat([matrix, torch.zeros(3, 1)], 1)[None]
        grid = torch.nn.functional.affine_grid(theta, [1, 2, 10, 12, 14], align_corners=False)
        reference = torch.nn.functional.grid_sample(images[i:i + 1], grid, mode="bilinear", padding_mode="zeros",
                                                     align_corners=False)[0]
        torch.testing.assert_close(ours[i], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], images[1])
