"""Handcrafted radiomics-style features on planted volumes: volumes, intensities, shape and location."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nrfm.eval.handcrafted import CONTRASTS, FIRST_ORDER, REGIONS, feature_table, first_order, handcrafted_features, \
    surface_area_mm2

SHAPE = (24, 24, 24)


def planted_exam(radius_core: int = 3, radius_lesion: int = 6, centre=(12, 12, 12), oedema_flair: float = 2.0,
                 enhancing_t1c: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(4, 24, 24, 24) image and seg: necrotic ball (1) inside an enhancing shell (4) inside oedema (2)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"))
    r = np.sqrt(((grid - np.array(centre).reshape(3, 1, 1, 1)) ** 2).sum(0))
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[r <= radius_lesion] = 2
    seg[r <= radius_core + 1] = 4
    seg[r <= radius_core] = 1
    image = rng.normal(0.0, 0.1, size=(4,) + SHAPE)
    image[3][seg == 2] += oedema_flair      # FLAIR-bright oedema
    image[1][seg == 4] += enhancing_t1c     # enhancing rim on T1c
    image[1][seg == 1] -= 1.0               # dark necrosis on T1c
    return image.astype(np.float32), seg


def test_first_order_matches_numpy_and_scipy():
    values = np.random.default_rng(1).gamma(2.0, size=500)
    out = first_order(values)
    assert out["mean"] == pytest.approx(values.mean()) and out["std"] == pytest.approx(values.std())
    assert [out["p10"], out["p50"], out["p90"]] == pytest.approx(np.percentile(values, [10, 50, 90]).tolist())
    assert out["skewness"] == pytest.approx(stats.skew(values))
    assert out["kurtosis"] == pytest.approx(stats.kurtosis(values))  # Fisher: 0 for a Gaussian
    assert all(np.isnan(v) for v in first_order(np.array([])).values())
    constant = first_order(np.full(5, 2.0))
    assert constant["std"] == 0.0 and np.isnan(constant["skewness"]) and np.isnan(constant["kurtosis"])


def test_volumes_fractions_and_intensities_are_the_planted_ones():
    image, seg = planted_exam()
    spacing = (2.0, 2.0, 3.0)
    f = handcrafted_features(image, seg, spacing)
    voxel_ml = 12.0 / 1000
    counts = {"necrotic": (seg == 1).sum(), "oedema": (seg == 2).sum(), "enhancing": (seg == 4).sum()}
    for region, count in counts.items():
        assert f[f"volume_ml_{region}"] == pytest.approx(count * voxel_ml)
        assert f[f"fraction_{region}"] == pytest.approx(count / (seg > 0).sum())
    assert f["volume_ml_lesion"] == pytest.approx((seg > 0).sum() * voxel_ml)
    core = counts["enhancing"] + counts["necrotic"]
    assert f["enhancing_fraction_of_core"] == pytest.approx(counts["enhancing"] / core)
    assert f["flair_oedema_mean"] == pytest.approx(2.0, abs=0.03)
    assert f["flair_necrotic_mean"] == pytest.approx(0, abs=0.05)
    assert f["t1c_enhancing_p50"] == pytest.approx(3.0, abs=0.03)
    assert f["t1c_necrotic_mean"] == pytest.approx(-1, abs=0.05)
    assert f["t1_lesion_std"] == pytest.approx(0.1, abs=0.02)
    assert f["lesion_components"] == 1.0 and 0 < f["lesion_extent"] <= 1 and 0.5 < f["lesion_sphericity"] <= 1.0
    expected = {f"{c}_{r}_{s}" for c in CONTRASTS for r in REGIONS for s in FIRST_ORDER}
    assert expected <= set(f)


def test_planted_group_differences_are_recovered():
    # larger oedema and brighter enhancement in group B: the features that should differ do, the others do not
    a = [handcrafted_features(*planted_exam(radius_lesion=5, enhancing_t1c=2.0, seed=s), (3, 3, 3)) for s in range(4)]
    b = [handcrafted_features(*planted_exam(radius_lesion=8, enhancing_t1c=3.0, seed=s), (3, 3, 3)) for s in range(4)]
    mean = lambda rows, key: np.mean([r[key] for r in rows])  # noqa: E731
    assert mean(b, "volume_ml_oedema") > 2 * mean(a, "volume_ml_oedema")
    assert mean(b, "t1c_enhancing_mean") - mean(a, "t1c_enhancing_mean") == pytest.approx(1.0, abs=0.05)
    assert mean(b, "volume_ml_necrotic") == pytest.approx(mean(a, "volume_ml_necrotic"))
    assert mean(b, "flair_oedema_mean") == pytest.approx(mean(a, "flair_oedema_mean"), abs=0.05)


def test_surface_of_a_box_counts_its_faces():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 2:6, 2:7] = True  # 3 x 4 x 5 voxels
    spacing = (1.0, 2.0, 3.0)
    expected = 2 * (4 * 5 * (2 * 3) + 3 * 5 * (1 * 3) + 3 * 4 * (1 * 2))
    assert surface_area_mm2(mask, spacing) == pytest.approx(expected)
    seg = mask.astype(np.uint8) * 2
    f = handcrafted_features(np.zeros((4, 10, 10, 10)), seg, spacing)
    assert f["lesion_surface_to_volume_per_mm"] == pytest.approx(expected / (60 * 6.0))
    assert f["lesion_extent"] == 1.0


def test_location_in_world_and_brain_coordinates():
    image, seg = planted_exam(centre=(6, 12, 18))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-36.0, -50.0, -20.0)
    brain = np.zeros(SHAPE, bool)
    brain[0:24, 4:20, 0:24] = True
    f = handcrafted_features(image, seg[None], (3, 3, 3), brain=brain[None], affine=affine)
    centroid = [f["centroid_lr_mm"], f["centroid_ap_mm"], f["centroid_si_mm"]]
    assert centroid == pytest.approx([-18.0, -14.0, 34.0], abs=0.3)
    assert f["centroid_abs_lr_mm"] == pytest.approx(18.0, abs=0.3)
    assert [f["centroid_lr_brain"], f["centroid_ap_brain"], f["centroid_si_brain"]] == \
        pytest.approx([6 / 23, 8 / 15, 18 / 23], abs=0.02)


def test_empty_lesion_gives_nans_with_the_same_keys():
    image, seg = planted_exam()
    full = handcrafted_features(image, seg, (3, 3, 3), brain=np.ones(SHAPE, bool), affine=np.eye(4))
    empty = handcrafted_features(image, np.zeros_like(seg), (3, 3, 3), brain=np.ones(SHAPE, bool), affine=np.eye(4))
    assert list(full) == list(empty)
    assert empty["volume_ml_lesion"] == 0.0 and empty["lesion_components"] == 0.0
    assert np.isnan(empty["flair_lesion_mean"]) and np.isnan(empty["centroid_lr_mm"])


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"image \(4, 8, 8, 8\).*seg \(8, 8, 9\)"):
        handcrafted_features(np.zeros((4, 8, 8, 8)), np.zeros((8, 8, 9)), (1, 1, 1))
    with pytest.raises(ValueError, match="3 channels but contrasts"):
        handcrafted_features(np.zeros((3, 8, 8, 8)), np.zeros((8, 8, 8)), (1, 1, 1))


def test_feature_table_has_one_row_per_item_indexed_by_subject():
    items = []
    for s in range(3):
        image, seg = planted_exam(radius_lesion=4 + s, seed=s)
        items.append({"image": image, "seg": seg[None], "brain": np.ones((1,) + SHAPE, bool)})
    table = feature_table(items, (3, 3, 3), subject_ids=["a", "b", "c"])
    assert table.index.tolist() == ["a", "b", "c"] and table.index.name == "subject_id"
    assert table["volume_ml_oedema"].is_monotonic_increasing and "centroid_lr_brain" in table
    with pytest.raises(ValueError, match="2 subject_ids for a dataset of 3"):
        feature_table(items, (3, 3, 3), subject_ids=["a", "b"])
