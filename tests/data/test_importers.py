"""Importers on miniature cohorts in each public layout (real headers and file names, 8x8x6 volumes)."""
from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nrfm.errors import DataError, ManifestError, NrfmError
from nrfm.data.importers import KINDS, import_cohort, merge_manifests
from nrfm.data.manifest import COLUMNS, read_manifest
from nrfm.data.validation import validate_manifest

SHAPE = (8, 8, 6)
NAN = math.nan


def volume(path: Path, seg: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(SHAPE, np.uint8 if seg else np.float32)
    data[2:6, 2:6, 1:5] = 1 if seg else 100.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=header).to_csv(path, index=False)
    return path


def check_row(df: pd.DataFrame, sid: str, **expected) -> None:
    row = df.set_index("subject_id").loc[sid]
    for key, value in expected.items():
        got = row[key]
        if isinstance(value, float) and math.isnan(value):
            assert isinstance(got, float) and math.isnan(got), (sid, key, got)
        else:
            assert got == value, (sid, key, got, value)


# ------------------------------------------------------------------------------------------- UCSF-PDGM
UCSF_HEADER = ["ID", "Sex", "Age at MRI", "WHO CNS Grade", "Final pathologic diagnosis (WHO 2021)", "MGMT status",
               "MGMT index", "1p/19q", "IDH", "1-dead 0-alive", "OS", "EOR", "Biopsy prior to imaging", "BraTS21 ID",
               "BraTS21 Segmentation Cohort", "BraTS21 MGMT Cohort"]


@pytest.fixture()
def ucsf(tmp_path: Path) -> Path:
    root = tmp_path / "PKG - UCSF-PDGM"
    write_table(root / "UCSF-PDGM-metadata_v5.csv", UCSF_HEADER, [
        ["UCSF-PDGM-004", "M", "66", "4", "Glioblastoma, IDH-wildtype", "unknown", "unknown", "intact", "wildtype",
         "1", "1303", "STR", "No", "BraTS2021_00496", "Training", "Training"],
        ["UCSF-PDGM-005", "F", "40", "2", "Oligodendroglioma, IDH-mutant, 1p/19q-codeleted", "Negative", "0",
         "Relative co-deletion", "IDH1 p.R132H", "0", "", "GTR", "No", "", "", ""],
        ["UCSF-PDGM-433", "F", "35", "3", "Astrocytoma, IDH-mutant", "POSITIVE", "9", "Co-deletion", "mutated (NOS)",
         "0", "500", "biopsy", "Yes", "", "", ""],
        ["UCSF-PDGM-433_FU007d", "F", "35", "3", "Astrocytoma, IDH-mutant", "POSITIVE", "9", "Co-deletion",
         "mutated (NOS)", "0", "500", "biopsy", "Yes", "", "", ""],
        ["UCSF-PDGM-010", "M", "70", "4", "Glioblastoma", "indeterminate", "unknown", "unknown", "IDH2 p.R172K",
         "1", "90", "STR", "No", "", "", ""],
        ["UCSF-PDGM-011", "M", "71", "4", "Glioblastoma", "negative", "0", "intact", "wildtype", "1", "60", "", "", "", "", ""],
    ])
    write_table(root / "UCSF-PDGM-metadata_v5_glossary.csv", ["column", "meaning"], [["ID", "exam id"]])
    images = root / "UCSF-PDGM-v3"
    for exam in ("UCSF-PDGM-0004", "UCSF-PDGM-0005", "UCSF-PDGM-0433", "UCSF-PDGM-0433_FU007d", "UCSF-PDGM-0010",
                 "UCSF-PDGM-0099"):
        folder = images / f"{exam}_nifti"
        for suffix in ("T1", "T1c", "T2", "FLAIR", "T1_bias", "SWI"):
            if not (exam == "UCSF-PDGM-0010" and suffix == "FLAIR"):
                volume(folder / f"{exam}_{suffix}.nii.gz")
        if exam != "UCSF-PDGM-0005":
            volume(folder / f"{exam}_tumor_segmentation.nii.gz", seg=True)
    return root


def test_ucsf_pdgm_row_by_row(tmp_path: Path, ucsf: Path) -> None:
    out = ucsf / "manifest.csv"
    report = import_cohort("ucsf-pdgm", ucsf, out, progress=False)
    df = read_manifest(out)
    assert df["subject_id"].tolist() == ["UCSF-PDGM-0004", "UCSF-PDGM-0005", "UCSF-PDGM-0433", "UCSF-PDGM-0433_FU007d"]
    assert (report.n_rows, report.n_patients) == (4, 3)
    check_row(df, "UCSF-PDGM-0004", patient_id="UCSF-PDGM-0004", site="UCSF", split="", sex="M", age=66.0, grade=4.0,
              mgmt=NAN, codel_1p19q=0.0, idh=0.0, os_days=1303.0, os_event=1.0, source_ids="BraTS2021_00496")
    check_row(df, "UCSF-PDGM-0005", sex="F", grade=2.0, mgmt=0.0, codel_1p19q=1.0, idh=1.0, os_days=NAN, os_event=NAN,
              seg="")
    check_row(df, "UCSF-PDGM-0433", patient_id="UCSF-PDGM-0433", mgmt=1.0, codel_1p19q=1.0, idh=1.0, os_days=500.0,
              os_event=0.0)
    check_row(df, "UCSF-PDGM-0433_FU007d", patient_id="UCSF-PDGM-0433", grade=3.0, idh=1.0, os_days=NAN, os_event=NAN)
    row = df.set_index("subject_id").loc["UCSF-PDGM-0004"]
    assert row["t1"].endswith("UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_T1.nii.gz")  # not the _bias variant
    assert row["seg"].endswith("UCSF-PDGM-0004_tumor_segmentation.nii.gz")
    assert df[["egfr", "atrx", "tp53", "cdkn2ab", "tert", "ki67", "tp53_ihc"]].isna().all().all()
    # paths inside the manifest's folder are written relative to it
    assert pd.read_csv(out, dtype=str)["t1"].iloc[0] == "UCSF-PDGM-v3/UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_T1.nii.gz"
    dropped = dict(report.dropped)
    assert "missing FLAIR" in dropped["UCSF-PDGM-010"]
    assert "no image folder UCSF-PDGM-0011_nifti" in dropped["UCSF-PDGM-011"]
    assert "no row in UCSF-PDGM-metadata_v5.csv" in dropped["UCSF-PDGM-0099"]
    assert report.mapped["codel_1p19q"]["Relative co-deletion"] == "1 (1 rows)"
    assert report.mapped["idh"]["IDH1 p.R132H"] == "1 (1 rows)"
    assert any("UCSF-PDGM-0005: no tumour mask" in w for w in report.warnings)
    assert validate_manifest(out, progress=False).ok
    assert "ucsf-pdgm: wrote 4 exams of 3 patients" in report.format()


def test_source_table_with_bom_semicolons_and_crlf(tmp_path: Path, ucsf: Path) -> None:
    import_cohort("ucsf-pdgm", ucsf, tmp_path / "plain.csv", progress=False)
    meta = ucsf / "UCSF-PDGM-metadata_v5.csv"
    text = pd.read_csv(meta, dtype=str, keep_default_na=False).to_csv(index=False, sep=";", lineterminator="\r\n")
    meta.write_bytes(b"\xef\xbb\xbf" + text.encode())
    import_cohort("ucsf-pdgm", ucsf, tmp_path / "excel.csv", progress=False)
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "plain.csv"), read_manifest(tmp_path / "excel.csv"))


def test_relative_codeletion_policy_is_one_switch(tmp_path: Path, ucsf: Path, monkeypatch) -> None:
    import nrfm.data.importers.ucsf as ucsf_importer

    monkeypatch.setattr(ucsf_importer, "RELATIVE_CODELETION", NAN)
    import_cohort("ucsf-pdgm", ucsf, tmp_path / "strict.csv", progress=False)
    df = read_manifest(tmp_path / "strict.csv")
    check_row(df, "UCSF-PDGM-0005", codel_1p19q=NAN)
    check_row(df, "UCSF-PDGM-0433", codel_1p19q=1.0)


def test_refuses_to_overwrite_without_force(ucsf: Path) -> None:
    out = ucsf / "manifest.csv"
    out.write_text("precious\n")
    with pytest.raises(ManifestError, match="already exists; pass --force"):
        import_cohort("ucsf-pdgm", ucsf, out, progress=False)
    assert out.read_text() == "precious\n"
    import_cohort("ucsf-pdgm", ucsf, out, force=True, progress=False)
    assert len(read_manifest(out)) == 4


# ------------------------------------------------------------------------------------------- UPenn-GBM
UPENN_HEADER = ["ID", "Gender", "Age_at_scan_years", "Survival_from_surgery_days_UPDATED", "Survival_Status",
                "Survival_Censor", "IDH1", "MGMT", "KPS", "GTR_over90percent", "Time_since_baseline_preop",
                "PsP_TP_score"]


def upenn_cohort(root: Path, header: list[str], rows: list[list[str]]) -> Path:
    write_table(root / "UPENN-GBM_clinical_info_v2.1.csv" if "Survival_Status" in header
                else root / "UPENN-GBM_clinical_info_v1.0.csv", header, rows)
    nifti = root / "NIfTI-files"
    for exam in [r[header.index("ID")] for r in rows]:
        for suffix in ("T1", "T1GD", "T2", "FLAIR"):
            if exam != "UPENN-GBM-00005_11" or suffix != "T2":
                volume(nifti / "images_structural" / exam / f"{exam}_{suffix}.nii.gz")
        if exam.endswith("_11"):
            volume(nifti / "images_segm" / f"{exam}_segm.nii.gz", seg=True)
        volume(nifti / "automated_segm" / f"{exam}_automated_approx_segm.nii.gz", seg=True)
    return root


def test_upenn_gbm_row_by_row(tmp_path: Path) -> None:
    na = "Not Available"
    root = upenn_cohort(tmp_path / "UPENN-GBM", UPENN_HEADER, [
        ["UPENN-GBM-00001_11", "F", "52.16", "960", "Deceased", na, "Wildtype", "Methylated", "80", "Y", "0", na],
        ["UPENN-GBM-00001_21", "F", "52.16", "960", "Deceased", na, "Wildtype", "Methylated", na, na, "200", "1"],
        ["UPENN-GBM-00002_11", "M", "61", na, "Alive", "400", "NOS/NEC", na, "90", "N", "0", na],
        ["UPENN-GBM-00003_11", "M", "47", na, "Lost to Follow-up", "230", "Mutated", "Unmethylated", na, "Not Applicable", "0", na],
        ["UPENN-GBM-00004_11", "F", "70", "700", "Deceased - uncertain date of death", na, "Wildtype", "Indeterminate",
         na, na, "0", na],
        ["UPENN-GBM-00005_11", "F", "55", "100", "Deceased", na, "Wildtype", na, na, na, "0", na],
    ])
    out = tmp_path / "manifests" / "upenn.csv"
    report = import_cohort("upenn-gbm", root, out, progress=False)
    df = read_manifest(out)
    assert df["subject_id"].tolist() == ["UPENN-GBM-00001_11", "UPENN-GBM-00001_21", "UPENN-GBM-00002_11",
                                         "UPENN-GBM-00003_11", "UPENN-GBM-00004_11"]
    assert (report.n_rows, report.n_patients) == (5, 4)
    check_row(df, "UPENN-GBM-00001_11", patient_id="UPENN-GBM-00001", site="UPenn", sex="F", age=52.16, grade=4.0,
              idh=0.0, mgmt=1.0, os_days=960.0, os_event=1.0)
    check_row(df, "UPENN-GBM-00001_21", patient_id="UPENN-GBM-00001", idh=0.0, mgmt=1.0, os_days=NAN, os_event=NAN)
    check_row(df, "UPENN-GBM-00002_11", sex="M", idh=NAN, mgmt=NAN, os_days=400.0, os_event=0.0)
    check_row(df, "UPENN-GBM-00003_11", idh=1.0, mgmt=0.0, os_days=230.0, os_event=0.0)
    check_row(df, "UPENN-GBM-00004_11", mgmt=NAN, os_days=700.0, os_event=1.0)
    segs = df.set_index("subject_id")["seg"]
    assert segs["UPENN-GBM-00001_11"].endswith("images_segm/UPENN-GBM-00001_11_segm.nii.gz")  # expert first
    assert segs["UPENN-GBM-00001_21"].endswith("automated_segm/UPENN-GBM-00001_21_automated_approx_segm.nii.gz")
    assert Path(pd.read_csv(out, dtype=str)["t1"].iloc[0]).is_absolute()  # data outside the manifest's folder
    assert "missing T2" in dict(report.dropped)["UPENN-GBM-00005_11"]
    assert report.mapped["seg"] == {"automated (automated_segm)": "used (1 rows)", "expert (images_segm)": "used (4 rows)"}
    assert validate_manifest(out, progress=False).ok


def test_upenn_v1_table_without_status(tmp_path: Path) -> None:
    header = ["ID", "Age_at_scan_years", "Gender", "Survival_from_surgery_days", "MGMT", "IDH1", "KPS"]  # other order
    root = upenn_cohort(tmp_path / "UPENN-GBM", header, [
        ["UPENN-GBM-00001_11", "52", "F", "960", "Methylated", "Wildtype", "80"],
        ["UPENN-GBM-00002_11", "61", "M", "Not Available", "Unmethylated", "Wildtype", "80"],
    ])
    report = import_cohort("upenn-gbm", root, tmp_path / "v1.csv", progress=False)
    df = read_manifest(tmp_path / "v1.csv")
    check_row(df, "UPENN-GBM-00001_11", os_days=960.0, os_event=1.0, mgmt=1.0, age=52.0)
    check_row(df, "UPENN-GBM-00002_11", os_days=NAN, os_event=NAN, mgmt=0.0)
    assert any("v1.0 table without survival status" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------------ BraTS
def brats2021_cohort(root: Path) -> Path:
    data = root / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021"
    for case in ("00000", "00002", "00109", "00496", "00500"):
        name = f"BraTS2021_{case}"
        for suffix in ("t1", "t1ce", "t2", "flair"):
            volume(data / name / f"{name}_{suffix}.nii.gz")
        if case != "00500":  # a validation-style case without a mask
            volume(data / name / f"{name}_seg.nii.gz", seg=True)
    return root


def test_brats2021_with_rsna_labels(tmp_path: Path) -> None:
    root = brats2021_cohort(tmp_path / "brats21")
    labels = write_table(tmp_path / "train_labels.csv", ["BraTS21ID", "MGMT_value"],
                         [["00000", "1"], ["2", "0"], ["00109", "1"], ["496", "1"], ["00800", "0"]])
    report = import_cohort("brats2021", root, tmp_path / "b21.csv", mgmt_labels=labels, progress=False)
    df = read_manifest(tmp_path / "b21.csv")
    assert df["subject_id"].tolist() == [f"BraTS2021_{c}" for c in ("00000", "00002", "00109", "00496", "00500")]
    assert (df["patient_id"] == df["subject_id"]).all() and (df["site"] == "BraTS").all()
    assert df["mgmt"].tolist()[:4] == [1.0, 0.0, pytest.approx(NAN, nan_ok=True), 1.0] and math.isnan(df["mgmt"].iloc[4])
    assert df["t1c"].iloc[0].endswith("BraTS2021_00000_t1ce.nii.gz") and df["seg"].iloc[4] == ""
    assert "excluded by the RSNA-MICCAI challenge" in dict(report.dropped)["BraTS2021_00109"]
    assert any("1 MGMT labels have no image folder (e.g. 00800)" in w for w in report.warnings)
    assert validate_manifest(tmp_path / "b21.csv", progress=False).ok


def test_brats2023_naming_and_timepoints(tmp_path: Path) -> None:
    root = tmp_path / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData"
    for exam in ("BraTS-GLI-00000-000", "BraTS-GLI-00000-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"):
        for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
            if exam != "BraTS-GLI-00003-000" or suffix != "t2f":
                volume(root / exam / f"{exam}-{suffix}.nii.gz", seg=suffix == "seg")
    report = import_cohort("brats2023", root, tmp_path / "b23.csv", progress=False)
    df = read_manifest(tmp_path / "b23.csv")
    assert df["subject_id"].tolist() == ["BraTS-GLI-00000-000", "BraTS-GLI-00000-001", "BraTS-GLI-00002-000"]
    assert df["patient_id"].tolist() == ["BraTS-GLI-00000", "BraTS-GLI-00000", "BraTS-GLI-00002"]
    row = df.iloc[0]
    assert [Path(row[c]).name for c in ("t1", "t1c", "t2", "flair", "seg")] == [
        f"BraTS-GLI-00000-000-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg")]
    assert "missing t2f" in dict(report.dropped)["BraTS-GLI-00003-000"]
    assert "read as 4" in report.mapped["seg labels"]["3 (enhancing tumour)"]


# ------------------------------------------------------------------------------------- wrong input, merge
def test_wrong_folder_says_what_it_looked_for(tmp_path: Path, ucsf: Path) -> None:
    with pytest.raises(DataError, match=r"not a UPenn-GBM folder: looked for UPENN-GBM_clinical_info\*\.csv \(found 0\)"):
        import_cohort("upenn-gbm", ucsf, tmp_path / "x.csv", progress=False)
    with pytest.raises(DataError, match=r"not a UCSF-PDGM folder: looked for UCSF-PDGM-metadata\*\.csv"):
        import_cohort("ucsf-pdgm", tmp_path / "PKG - UCSF-PDGM" / "UCSF-PDGM-v3" / "UCSF-PDGM-0004_nifti",
                      tmp_path / "x.csv", progress=False)
    brats21 = brats2021_cohort(tmp_path / "b")
    with pytest.raises(DataError, match=r"no brats2023 case folders .* it holds brats2021 case folders"):
        import_cohort("brats2023", brats21, tmp_path / "x.csv", progress=False)
    with pytest.raises(DataError, match="not a folder"):
        import_cohort("brats2021", tmp_path / "nowhere", tmp_path / "x.csv", progress=False)
    assert not (tmp_path / "x.csv").exists()


def test_unknown_kind_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(NrfmError, match="unknown cohort 'tcga'; valid: ucsf-pdgm, upenn-gbm, brats2021, brats2023"):
        import_cohort("tcga", tmp_path, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="--mgmt-labels applies to brats2021 only"):
        import_cohort("brats2023", tmp_path, tmp_path / "x.csv", mgmt_labels=tmp_path / "l.csv")
    assert KINDS == ("ucsf-pdgm", "upenn-gbm", "brats2021", "brats2023")


def test_bad_label_file_is_named(tmp_path: Path) -> None:
    root = brats2021_cohort(tmp_path / "b")
    bad = write_table(tmp_path / "labels.csv", ["id", "value"], [["1", "1"]])
    with pytest.raises(ManifestError, match=rf"^{bad}:1:BraTS21ID: column missing"):
        import_cohort("brats2021", root, tmp_path / "x.csv", mgmt_labels=bad, progress=False)


def test_merge_keeps_a_patient_once(tmp_path: Path, ucsf: Path) -> None:
    import_cohort("ucsf-pdgm", ucsf, tmp_path / "ucsf.csv", progress=False)
    labels = write_table(tmp_path / "train_labels.csv", ["BraTS21ID", "MGMT_value"], [["00496", "1"], ["00000", "0"]])
    import_cohort("brats2021", brats2021_cohort(tmp_path / "b"), tmp_path / "b21.csv", mgmt_labels=labels, progress=False)
    out = tmp_path / "merged" / "all.csv"
    report = merge_manifests([tmp_path / "ucsf.csv", tmp_path / "b21.csv"], out)
    df = read_manifest(out)
    assert list(df.columns) == list(COLUMNS) + ["source_ids"]
    assert "BraTS2021_00496" not in set(df["subject_id"]) and len(df) == 4 + 4
    assert "same exam as UCSF-PDGM-0004" in dict(report.dropped)["BraTS2021_00496"]
    check_row(df, "UCSF-PDGM-0004", mgmt=1.0, idh=0.0)  # MGMT unknown in UCSF, filled from the RSNA label
    assert report.mapped["duplicates"]["exams dropped"] == "1" and report.n_patients == 3 + 4
    assert validate_manifest(out, progress=False).ok
    with pytest.raises(ManifestError, match=r"b21.csv:2:subject_id: subject id 'BraTS2021_00000' is also on line 2"):
        merge_manifests([tmp_path / "b21.csv", tmp_path / "b21.csv"], tmp_path / "twice.csv")
