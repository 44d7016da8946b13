"""Preprocessing: LPS/anisotropic input comes out RAS at the configured spacing with the tumour in place,
z-score inside the brain, the content-keyed cache, and one-line errors for bad volumes."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

import nrfm.data.preprocessing as transforms
from nrfm.config import PreprocessingConfig
from nrfm.errors import DataError
from nrfm.data.manifest import IMAGE_COLUMNS
from nrfm.data.preprocessing import VolumeDataset, preprocess_subject, preprocessed_dataset

# LPS storage: voxel axes run to the patient's left, posterior and superior; 1.5 x 1.5 x 3 mm voxels.
LPS_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 25.0], [0, 0, 3.0, -18.0], [0, 0, 0, 1]])
LPS_SHAPE = (40, 36, 14)
TUMOUR_WORLD = np.array([8.0, -6.0, 3.0])  # RAS mm
MARKER_OFFSET = np.array([12.0, 0.0, 0.0])  # a bright spot 12 mm to the patient's right of the tumour, in t1c


def make_exam(folder: Path, sid: str, affine: np.ndarray = LPS_AFFINE, shape: tuple = LPS_SHAPE,
              seg_label: int = 1, with_seg: bool = True, seed: int = 0) -> dict[str, str]:
    """Ellipsoid brain, spherical tumour at TUMOUR_WORLD, contrast-specific intensities; files in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    world = apply_affine(affine, np.indices(shape).reshape(3, -1).T).reshape(shape + (3,))
    centre = apply_affine(affine, (np.array(shape) - 1) / 2)
    extent = np.abs(affine[:3, :3]).sum(0) * np.array(shape)
    brain = (((world - centre) / (0.45 * extent)) ** 2).sum(-1) <= 1
    tumour = np.linalg.norm(world - TUMOUR_WORLD, axis=-1) <= 5.0
    marker = np.linalg.norm(world - TUMOUR_WORLD - MARKER_OFFSET, axis=-1) <= 2.5
    row = {"subject_id": sid}
    for k, c in enumerate(IMAGE_COLUMNS):
        data = np.where(brain, rng.normal(200 + 100 * k, 20 + 10 * k, shape), 0).astype(np.float32)
        data[tumour & brain] += 80
        if c == "t1c":
            data[marker] = 2000
        row[c] = str(folder / f"{sid}_{c}.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), row[c])
    row["seg"] = ""
    if with_seg:
        row["seg"] = str(folder / f"{sid}_seg.nii.gz")
        nib.save(nib.Nifti1Image((tumour * seg_label).astype(np.uint8), affine), row["seg"])
    return row


def test_lps_anisotropic_volume_comes_out_ras_with_the_tumour_in_place(tmp_path: Path) -> None:
    cfg = PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), crop_size=(16, 16, 16), cache_dir=str(tmp_path / "c"))
    out = preprocess_subject(make_exam(tmp_path, "lps"), cfg)
    assert out["image"].shape == (4, 16, 16, 16) and out["image"].dtype == np.float32
    assert out["seg"].shape == (1, 16, 16, 16) and out["seg"].dtype == np.uint8 and out["brain"].dtype == bool
    np.testing.assert_allclose(out["affine"][:3, :3], np.diag([2.0, 2.0, 2.0]), atol=1e-6)  # RAS, 2 mm
    # the tumour's known world position maps to the crop centre (within a voxel) ...
    tumour_voxel = apply_affine(np.linalg.inv(out["affine"]), TUMOUR_WORLD)
    assert np.all(np.abs(tumour_voxel - 8) <= 1.0), tumour_voxel
    seg_centre = np.argwhere(out["seg"][0] > 0).mean(0)
    assert np.all(np.abs(seg_centre - tumour_voxel) <= 1.0)
    # ... and the marker 12 mm to the right is 6 voxels along +x (axis 0), nothing along y or z
    peak = np.array(np.unravel_index(np.argmax(out["image"][1]), (16, 16, 16)))
    np.testing.assert_allclose(peak - seg_centre, MARKER_OFFSET / 2.0, atol=1.0)
    assert bool(out["centred_on_mask"])


def test_zscore_inside_the_brain(tmp_path: Path) -> None:
    # crop larger than the resampled volume, so the whole brain is inside it
    cfg = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(32, 32, 32), cache_dir=str(tmp_path / "c"))
    out = preprocess_subject(make_exam(tmp_path, "z"), cfg)
    brain = out["brain"][0]
    raw = nib.load(make_exam(tmp_path / "again", "z")["t1"]).get_fdata()
    assert brain.sum() > 0.5 * (raw != 0).sum() * (1.5 * 1.5 * 3.0) / 27  # brain volume roughly preserved
    for c in range(4):
        inside = out["image"][c][brain].astype(np.float64)
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1.0) < 1e-4
        assert np.all(out["image"][c][~brain] == 0)


def test_label_3_is_read_as_enhancing_4(tmp_path: Path) -> None:
    cfg = PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), crop_size=(16, 16, 16))
    out = preprocess_subject(make_exam(tmp_path, "b23", seg_label=3), cfg)
    assert set(np.unique(out["seg"]).tolist()) == {0, 4}


def test_cache_hit_miss_and_content_keying(tmp_path: Path) -> None:
    rows = [make_exam(tmp_path / "img", f"s{i}", seed=i) for i in range(3)]
    import pandas as pd

    df = pd.DataFrame(rows)
    cfg = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(16, 16, 16), cache_dir=str(tmp_path / "cache"))
    first = preprocessed_dataset(df, cfg, progress=False)
    assert first.n_computed == 3 and first.subject_ids == ["s0", "s1", "s2"] and len(first) == 3
    item = first[1]
    assert item["image"].shape == (4, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["seg"].dtype == torch.uint8 and item["brain"].dtype == torch.bool and item["index"] == 1
    np.testing.assert_array_equal(item["image"].numpy(), preprocess_subject(rows[1], cfg)["image"])
    assert torch.equal(first.image(1), item["image"]) and torch.equal(first.image(-2), item["image"])

    again = preprocessed_dataset(df, cfg, progress=False)  # warm: nothing recomputed, identical arrays
    assert again.n_computed == 0
    for i in range(3):
        for key in ("image", "seg", "brain"):
            assert torch.equal(first[i][key], again[i][key])

    # same bytes, new timestamp: the content hash still hits
    os.utime(rows[0]["t2"], ns=(1_000_000_000, 1_000_000_000))
    assert VolumeDataset(df, cfg, progress=False).n_computed == 0
    # changed file: only that exam is recomputed, and its output changes
    data = nib.load(rows[2]["flair"]).get_fdata().astype(np.float32)
    nib.save(nib.Nifti1Image(data ** 2, LPS_AFFINE), rows[2]["flair"])
    changed = VolumeDataset(df, cfg, progress=False)
    assert changed.n_computed == 1 and changed.keys[:2] == first.keys[:2] and changed.keys[2] != first.keys[2]
    # changed setting or transform version: everything misses
    other = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(8, 16, 16), cache_dir=cfg.cache_dir)
    assert VolumeDataset(df, other, progress=False).n_computed == 3
    version = transforms.TRANSFORM_VERSION
    try:
        transforms.TRANSFORM_VERSION = version + "-test"
        assert VolumeDataset(df, cfg, progress=False).n_computed == 3
    finally:
        transforms.TRANSFORM_VERSION = version
    # an entry removed while in use is rebuilt on access
    shutil.rmtree(Path(cfg.cache_dir) / "volumes" / first.keys[0])
    assert torch.equal(again[0]["image"], first[0]["image"])


def test_missing_mask_centres_on_the_brain_and_warns_once(tmp_path: Path) -> None:
    import pandas as pd

    rows = [make_exam(tmp_path, f"n{i}", with_seg=i == 1, seed=i) for i in range(2)]
    nib.save(nib.Nifti1Image(np.zeros(LPS_SHAPE, np.uint8), LPS_AFFINE), rows[1]["seg"])  # an empty mask
    cfg = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(16, 16, 16), cache_dir=str(tmp_path / "c"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = preprocessed_dataset(pd.DataFrame(rows), cfg, progress=False)
    messages = [str(w.message) for w in caught if "no tumour mask" in str(w.message)]
    assert messages == ["2 of 2 exams have no tumour mask (e.g. n0, n1); their crops are centred on the brain"]
    assert ds.centred_on_mask == [False, False] and int(ds[0]["seg"].sum()) == 0
    out = preprocess_subject(rows[0], cfg)
    brain_centre = apply_affine(LPS_AFFINE, (np.array(LPS_SHAPE) - 1) / 2)
    assert np.all(np.abs(apply_affine(np.linalg.inv(out["affine"]), brain_centre) - 8) <= 1.0)


@pytest.mark.parametrize("kind, fragment", [
    ("missing", "file not found (subject bad, column t2)"),
    ("not_nifti", "not a readable NIfTI file"),
    ("4d", "4-D volume of shape"),
    ("nan", "NaN or infinite voxels"),
    ("shape", "differs from t1's"),
    ("affine", "affine differs from t1's"),
    ("truncated", "not a readable NIfTI file"),
])
def test_bad_volumes_are_data_errors_naming_the_file(tmp_path: Path, kind: str, fragment: str) -> None:
    row = make_exam(tmp_path, "bad", shape=(12, 12, 8), affine=np.eye(4))
    target = row["t2"]
    if kind == "missing":
        os.remove(target)
    elif kind == "not_nifti":
        Path(target).write_bytes(b"\x1f\x8b not really gzip")
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((12, 12, 8, 3), np.float32), np.eye(4)), target)
    elif kind == "nan":
        data = np.ones((12, 12, 8), np.float32)
        data[3, 3, 3] = np.nan
        nib.save(nib.Nifti1Image(data, np.eye(4)), target)
    elif kind == "shape":
        nib.save(nib.Nifti1Image(np.ones((12, 12, 9), np.float32), np.eye(4)), target)
    elif kind == "affine":
        nib.save(nib.Nifti1Image(np.ones((12, 12, 8), np.float32), np.diag([1.0, 1.0, 1.1, 1.0])), target)
    elif kind == "truncated":
        Path(target).write_bytes(Path(target).read_bytes()[:-300])
    cfg = PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0), crop_size=(8, 8, 8), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as err:
        preprocess_subject(row, cfg)
    message = str(err.value)
    assert message.startswith(target) and fragment in message and "\n" not in message


def test_synthetic_and_imported_exams_come_out_alike(tmp_path: Path) -> None:
    """Synthetic sites (each with its own orientation and spacing) and an imported BraTS-layout exam stored in LPS
    go through one dataset: same shapes, RAS at the configured spacing, tumour at the crop centre."""
    import pandas as pd

    from nrfm.data.importers import import_cohort
    from nrfm.data.manifest import read_manifest
    from nrfm.synth.generate import generate_cohort

    generate_cohort(tmp_path / "synth", profile="smoke", seed=0, sites="UCSF:1,UPenn:1,CUIMC:1", progress=False,
                    workers=1)
    case = tmp_path / "brats" / "BraTS2021_00007"
    row = make_exam(case, "tmp")
    for column, suffix in zip(("t1", "t1c", "t2", "flair", "seg"), ("t1", "t1ce", "t2", "flair", "seg")):
        os.rename(row[column], case / f"BraTS2021_00007_{suffix}.nii.gz")
    import_cohort("brats2021", tmp_path / "brats", tmp_path / "brats.csv", progress=False)
    df = pd.concat([read_manifest(tmp_path / "synth" / "manifest.csv"), read_manifest(tmp_path / "brats.csv")],
                   ignore_index=True)
    cfg = PreprocessingConfig(spacing_mm=(4.0, 4.0, 4.0), crop_size=(16, 16, 16), cache_dir=str(tmp_path / "c"))
    ds = preprocessed_dataset(df, cfg, progress=False)
    assert len(ds) == 4 and ds.subject_ids[-1] == "BraTS2021_00007" and all(ds.centred_on_mask)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (4, 16, 16, 16) and item["seg"].shape == (1, 16, 16, 16)
        np.testing.assert_allclose(ds.affine(i)[:3, :3], np.diag([4.0, 4.0, 4.0]), atol=1e-5)
        tumour = np.argwhere(item["seg"][0].numpy() > 0)
        assert np.all(np.abs((tumour.min(0) + tumour.max(0)) / 2 - 8) <= 1.0)


def test_parallel_build_writes_the_serial_cache(tmp_path: Path, monkeypatch) -> None:
    """Many exams are preprocessed by a thread per core; the cache entries equal the serial loop's."""
    import pandas as pd

    from nrfm.data import preprocessing

    df = pd.DataFrame([make_exam(tmp_path / "img", f"s{i}", seed=i) for i in range(4)])
    serial_cfg = PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(16, 16, 16),
                                     cache_dir=str(tmp_path / "serial"))
    serial = VolumeDataset(df, serial_cfg, progress=False)
    monkeypatch.setattr(preprocessing, "PARALLEL_MIN_EXAMS", 2)
    monkeypatch.setattr(preprocessing.os, "cpu_count", lambda: 2)
    parallel = VolumeDataset(df, PreprocessingConfig(spacing_mm=(3.0, 3.0, 3.0), crop_size=(16, 16, 16),
                                                     cache_dir=str(tmp_path / "parallel")), progress=False)
    assert parallel.n_computed == 4 and parallel.keys == serial.keys
    for i in range(4):
        for key in ("image", "seg", "brain"):
            assert torch.equal(serial[i][key], parallel[i][key])
