"""Canonical manifest: reading (BOM, ';', CRLF), validation messages, per-site summary, splits, LOSO, leaks."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nrfm.errors import LeakageError, ManifestError
from nrfm.data.manifest import COLUMNS, IMAGE_COLUMNS, read_manifest
from nrfm.data.splits import assign_splits, check_no_patient_leak, loso_folds
from nrfm.data.validation import validate_manifest

REPO = Path(__file__).resolve().parents[2]
SHAPE = (8, 8, 6)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def make_exam(folder: Path, sid: str, seed: int = 0) -> dict[str, str]:
    """Four contrasts with a zero border (skull-stripped look) and a mask with a small tumour."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in IMAGE_COLUMNS:
        data = np.zeros(SHAPE, np.float32)
        data[1:7, 1:7, 1:5] = rng.uniform(50, 150, (6, 6, 4))
        paths[c] = write_nifti(folder / f"{sid}_{c}.nii.gz", data).name
    seg = np.zeros(SHAPE, np.uint8)
    seg[3:5, 3:5, 2:4] = [[[1, 2], [4, 4]], [[2, 2], [1, 4]]]
    paths["seg"] = write_nifti(folder / f"{sid}_seg.nii.gz", seg).name
    return paths


def write_csv(path: Path, rows: list[dict], sep: str = ",", bom: bool = False, crlf: bool = False,
              columns: tuple[str, ...] = COLUMNS) -> Path:
    text = pd.DataFrame(rows, columns=list(columns)).to_csv(index=False, sep=sep, lineterminator="\r\n" if crlf else "\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def cohort_rows(folder: Path, n: int = 4, images: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        sid = f"{i:05d}"
        paths = make_exam(folder / "img", sid, seed=i) if images else {c: f"{sid}_{c}.nii.gz" for c in IMAGE_COLUMNS + ("seg",)}
        rows.append({"subject_id": sid, "patient_id": f"P{i // 2:03d}", "site": "A" if i < 2 else "B", "split": "",
                     **{c: f"img/{p}" for c, p in paths.items()}, "age": 50 + i, "sex": "MF"[i % 2], "grade": 4,
                     "idh": i % 2, "mgmt": "", "ki67": 12.5, "os_days": 100 * (i + 1), "os_event": 1})
    return rows


@pytest.fixture()
def cohort(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = cohort_rows(tmp_path)
    return write_csv(tmp_path / "manifest.csv", rows), rows


# -------------------------------------------------------------------------------------------- reading
def test_bom_semicolons_and_crlf_are_read_like_a_plain_csv(tmp_path: Path, cohort) -> None:
    plain_path, rows = cohort
    plain = read_manifest(plain_path)
    for name, kwargs in {"bom": {"bom": True}, "semi": {"sep": ";"}, "crlf": {"crlf": True},
                         "all": {"bom": True, "sep": ";", "crlf": True}}.items():
        other = read_manifest(write_csv(tmp_path / f"{name}.csv", rows, **kwargs))
        pd.testing.assert_frame_equal(plain, other)
    assert list(plain.columns) == list(COLUMNS)
    assert plain["subject_id"].tolist() == ["00000", "00001", "00002", "00003"]  # zero padding kept
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in plain["t1"])
    assert plain["idh"].dtype == float and plain["mgmt"].isna().all() and plain["ki67"].tolist() == [12.5] * 4
    assert list(plain.attrs["lines"]) == [2, 3, 4, 5]


def test_blank_lines_keep_editor_line_numbers(tmp_path: Path, cohort) -> None:
    path, rows = cohort
    text = path.read_text().splitlines()
    path.write_text("\n".join(text[:2] + [""] + text[2:]) + "\n")
    assert list(read_manifest(path).attrs["lines"]) == [2, 4, 5, 6]


def test_row_lines_are_shared_not_copied_by_pandas_operations(tmp_path: Path, cohort) -> None:
    """pandas deep-copies DataFrame.attrs on every operation: the line numbers are immutable and not copied."""
    path, _ = cohort
    df = read_manifest(path)
    part = df[df["subject_id"] != "00000"].reset_index(drop=True)
    assert part.attrs["lines"] is df.attrs["lines"]
    assert part.attrs["source"] == str(path)


def test_missing_required_column(tmp_path: Path, cohort) -> None:
    _, rows = cohort
    path = write_csv(tmp_path / "m.csv", rows, columns=tuple(c for c in COLUMNS if c != "t1c"))
    with pytest.raises(ManifestError, match=rf"^{path}:1:t1c: required column missing"):
        read_manifest(path)
    result = validate_manifest(path)
    assert not result.ok and result.errors[0].startswith(f"{path}:1:t1c:")


def test_optional_column_absent_is_a_warning(tmp_path: Path, cohort) -> None:
    _, rows = cohort
    path = write_csv(tmp_path / "m.csv", rows, columns=tuple(c for c in COLUMNS if c != "tert"))
    assert read_manifest(path)["tert"].isna().all()
    result = validate_manifest(path, progress=False)
    assert result.ok and any(w.startswith(f"{path}:1:tert:") for w in result.warnings)


def test_text_in_a_numeric_column_names_row_and_column(tmp_path: Path, cohort) -> None:
    _, rows = cohort
    rows[1]["idh"] = "yes"
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ManifestError, match=rf"^{path}:3:idh: not a number: 'yes'"):
        read_manifest(path)


@pytest.mark.parametrize("row, column, value, expected", [
    (1, "subject_id", "00000", ":3:subject_id: duplicate subject id '00000' (first on line 2)"),
    (2, "idh", 2, ":4:idh: label value 2 in a binary marker"),
    (0, "ki67", 150, ":2:ki67: 150 is outside [0, 100]"),
    (0, "tp53_ihc", -1, ":2:tp53_ihc: -1 is outside [0, 100]"),
    (3, "os_days", -5, ":5:os_days: survival time must be > 0 days, got -5"),
    (3, "os_days", 0, ":5:os_days: survival time must be > 0 days, got 0"),
    (0, "os_event", 2, ":2:os_event: event must be 1 (death) or 0 (censored), got 2"),
    (0, "os_event", "", ":2:os_event: os_days and os_event must be given together"),
    (1, "split", "training", ":3:split: bad split value 'training'"),
    (0, "t1", "", ":2:t1: empty t1 (required)"),
    (0, "age", -3, ":2:age: -3 is not an age"),
])
def test_value_errors_name_file_row_column(tmp_path: Path, row: int, column: str, value, expected: str) -> None:
    rows = cohort_rows(tmp_path, images=False)
    rows[row][column] = value
    path = write_csv(tmp_path / "m.csv", rows)
    result = validate_manifest(path, check_images=False)
    assert not result.ok
    assert [e for e in result.errors if e.startswith(f"{path}{expected}")], result.errors


def test_patient_in_two_splits(tmp_path: Path) -> None:
    rows = cohort_rows(tmp_path, images=False)
    rows[0]["split"], rows[1]["split"] = "train", "test"  # both exams of patient P000
    path = write_csv(tmp_path / "m.csv", rows)
    result = validate_manifest(path, check_images=False)
    assert result.errors == [f"{path}:3:split: patient 'P000' is in test here and in train on line 2; "
                             "splits must be made by patient"]
    with pytest.raises(LeakageError, match="patient 'P000' is in splits test, train"):
        check_no_patient_leak(read_manifest(path), where="m.csv")


# ---------------------------------------------------------------------------------------------- images
def _break(kind: str, folder: Path, rows: list[dict]) -> tuple[str, str]:
    """Damage exam 0 in one way; returns (column, expected message fragment)."""
    t1 = folder / rows[0]["t1"]
    if kind == "missing":
        t1.unlink()
        return "t1", "file not found"
    if kind == "not_nifti":
        t1.write_text("subject,age\n1,2\n")
        return "t1", "not a readable NIfTI file"
    if kind == "truncated":
        raw = gzip.decompress(t1.read_bytes())
        t1.write_bytes(gzip.compress(raw[: len(raw) - 200]))
        return "t1", "truncated or corrupt NIfTI data"
    if kind == "shape":
        write_nifti(folder / rows[0]["t2"], np.ones((8, 8, 7), np.float32))
        return "t2", "shape (8, 8, 7) differs from t1's (8, 8, 6)"
    if kind == "affine":
        data = nib.load(str(folder / rows[0]["flair"])).get_fdata().astype(np.float32)
        write_nifti(folder / rows[0]["flair"], data, np.diag([1.0, 1.0, 1.2, 1.0]))
        return "flair", "affine differs from t1's"
    if kind == "4d":
        write_nifti(t1, np.ones(SHAPE + (2,), np.float32))
        return "t1", "4-D volume of shape (8, 8, 6, 2) where a 3-D volume is expected"
    if kind == "nan":
        data = np.ones(SHAPE, np.float32)
        data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
        write_nifti(t1, data)
        return "t1", "2 NaN or infinite voxels"
    if kind == "seg_label":
        write_nifti(folder / rows[0]["seg"], np.full(SHAPE, 5, np.uint8))
        return "seg", "mask labels [5] outside {0, 1, 2, 3, 4}"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "not_nifti", "truncated", "shape", "affine", "4d", "nan", "seg_label"])
def test_image_problems_are_one_line_errors(tmp_path: Path, kind: str) -> None:
    rows = cohort_rows(tmp_path, n=2)
    column, fragment = _break(kind, tmp_path, rows)
    path = write_csv(tmp_path / "m.csv", rows)
    result = validate_manifest(path, progress=False)
    assert len(result.errors) == 1, result.errors
    message = result.errors[0]
    assert message.startswith(f"{path}:2:{column}: {tmp_path / rows[0][column]}: ") and fragment in message
    assert "\n" not in message


def test_empty_tumour_mask_is_a_warning(tmp_path: Path) -> None:
    rows = cohort_rows(tmp_path, n=2)
    write_nifti(tmp_path / rows[1]["seg"], np.zeros(SHAPE, np.uint8))
    path = write_csv(tmp_path / "m.csv", rows)
    result = validate_manifest(path, progress=False)
    assert result.ok
    assert [w for w in result.warnings if w.startswith(f"{path}:3:seg:") and "empty tumour mask" in w]
    # the other warning: site A has one patient, too few to split (kept for evaluation only)
    assert [w for w in result.warnings if w.startswith(f"{path}:2:site: site 'A' has 1 patient")]
    assert "OK (0 errors, 2 warnings)" in result.format()


def test_summary_matches_a_direct_count(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = cohort_rows(tmp_path, n=12, images=False)
    for r in rows:
        r["site"] = rng.choice(["A", "B", "C"])
        r["idh"] = rng.choice([0, 1, ""])
        r["mgmt"] = rng.choice([0, 1, ""])
        r["os_event"] = rng.choice([0, 1])
    path = write_csv(tmp_path / "m.csv", rows)
    summary = validate_manifest(path, check_images=False).summary.set_index("site")
    raw = pd.DataFrame(rows)
    for site, part in list(raw.groupby("site")) + [("all", raw)]:
        assert summary.loc[site, "exams"] == len(part)
        assert summary.loc[site, "patients"] == part["patient_id"].nunique()
        for ep in ("idh", "mgmt"):
            labelled = part[ep].astype(str) != ""
            assert summary.loc[site, f"{ep}_n"] == labelled.sum()
            assert summary.loc[site, f"{ep}_pos"] == (part[ep].astype(str) == "1").sum()
            assert summary.loc[site, f"{ep}_missing"] == pytest.approx(1 - labelled.mean())
        assert summary.loc[site, "os_events"] == (part["os_event"] == 1).sum()


# ---------------------------------------------------------------------------------------------- splits
def _split_cohort(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        site = ["A", "B", "C"][p % 3]
        idh = rng.choice([0.0, 1.0, np.nan], p=[0.6, 0.25, 0.15])
        for exam in range(1 + (p % 4 == 0)):  # every fourth patient has a follow-up exam
            rows.append({c: "" for c in COLUMNS} | {"subject_id": f"S{p}_{exam}", "patient_id": f"P{p}",
                                                    "site": site, "idh": idh})
    return pd.DataFrame(rows)


def test_assign_splits_by_patient_stratified_and_deterministic() -> None:
    df = _split_cohort()
    a, b = assign_splits(df, seed=5), assign_splits(df, seed=5)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].eq(assign_splits(df, seed=6)["split"]).all()
    check_no_patient_leak(a)
    patients = a.drop_duplicates("patient_id")
    for site, part in patients.groupby("site"):
        counts = part["split"].value_counts()
        assert abs(counts["train"] - 0.6 * len(part)) <= 1.5 and abs(counts["test"] - 0.2 * len(part)) <= 1.5
        for label, stratum in part.groupby(part["idh"].fillna(-1)):  # missing label is its own stratum
            share = stratum["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
            expected = np.array([0.6, 0.2, 0.2]) * len(stratum)
            assert np.all(np.abs(share.to_numpy() - expected) <= 1.0 + 1e-9), (site, label, share)


def test_assign_splits_fills_only_empty_and_follows_the_patient() -> None:
    df = _split_cohort(n_patients=12)
    df.loc[df["patient_id"] == "P0", "split"] = ["test", ""]  # P0 has two exams, one pre-assigned
    df.loc[df["patient_id"] == "P1", "split"] = "val"
    out = assign_splits(df, seed=0)
    assert out.loc[out["patient_id"] == "P0", "split"].tolist() == ["test", "test"]
    assert out.loc[out["patient_id"] == "P1", "split"].tolist() == ["val"]
    assert out["split"].isin(["train", "val", "test"]).all()


def test_every_site_with_three_patients_gets_each_split() -> None:
    df = pd.DataFrame([{c: "" for c in COLUMNS} | {"subject_id": f"S{i}", "patient_id": f"P{i}", "site": f"site{i // 3}",
                                                   "idh": float(i % 2)} for i in range(9)])
    for seed in range(5):
        out = assign_splits(df, seed=seed)
        for _, part in out.groupby("site"):
            assert sorted(part["split"]) == ["test", "train", "val"]
    with pytest.raises(ValueError, match="unknown endpoint 'ki67'"):
        assign_splits(df, seed=0, endpoint="ki67")


def test_loso_folds_hold_out_each_site() -> None:
    df = assign_splits(_split_cohort(), seed=1)
    folds = loso_folds(df)
    assert [site for site, _ in folds] == ["A", "B", "C"]
    for site, fold in folds:
        held = fold["site"] == site
        assert (fold.loc[held, "split"] == "test").all()
        assert set(fold.loc[~held, "split"]) <= {"train", "val", ""}
        # other sites: train and val unchanged, their test rows unused (the held-out site is the only test set)
        assert (fold.loc[~held, "split"] == df.loc[~held, "split"].replace("test", "")).all()
    with pytest.raises(ManifestError, match="at least two sites"):
        loso_folds(df[df["site"] == "A"])
    with pytest.raises(ManifestError, match="call assign_splits"):
        loso_folds(_split_cohort())


def test_example_manifest_in_data_manifests_is_valid() -> None:
    path = REPO / "data_manifests" / "example_manifest.csv"
    result = validate_manifest(path, check_images=False)
    assert result.ok, result.errors
    df = read_manifest(path)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS) and len(df) >= 3


def test_short_rows_decimal_commas_and_infinity(tmp_path: Path) -> None:
    rows = cohort_rows(tmp_path, n=2, images=False)
    rows[0]["ki67"] = "12,5"  # decimal comma from a European spreadsheet (';' separated)
    path = write_csv(tmp_path / "m.csv", rows, sep=";")
    text = path.read_text().splitlines()
    text[2] = ";".join(text[2].split(";")[:9])  # row cut short after `seg`: the rest is empty
    path.write_text("\n".join(text) + "\n")
    df = read_manifest(path)
    assert df["ki67"].iloc[0] == 12.5 and df[["age", "os_days"]].iloc[1].isna().all()
    rows[1]["os_days"] = "inf"
    result = validate_manifest(write_csv(tmp_path / "inf.csv", rows), check_images=False)
    assert [e for e in result.errors if ":3:os_days: not a number: 'inf'" in e]
