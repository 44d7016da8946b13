"""BraTS 2021 (with the RSNA-MICCAI MGMT labels) and BraTS 2023 glioma -> canonical manifest.

BraTS 2021: ``BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz``, labels 0/1/2/4. The RSNA-MICCAI
``train_labels.csv`` (``BraTS21ID,MGMT_value``) fills ``mgmt``: ids are read as strings and zero-padded to 5 digits
(a spreadsheet may have stripped the zeros); the competition excluded cases 00109, 00123 and 00709, so their
labels are not used (the exams stay, unlabelled).
BraTS 2023 glioma: ``BraTS-GLI-NNNNN-TTT/BraTS-GLI-NNNNN-TTT-{t1n,t1c,t2w,t2f,seg}.nii.gz``; the exams
``-TTT`` (timepoints) of one ``NNNNN`` share a patient. Its label 3 (enhancing tumour) is read as 4 by
:mod:`nrfm.data.preprocessing`, so both releases come out with BraTS 2021 labels.
Institutions are not given per case, so the site is ``BraTS``. Validation/test cases without ``seg`` are kept
without a mask.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tqdm import tqdm

from nrfm.errors import DataError
from nrfm.data.importers.common import (ImportReport, ValueLog, check_root, column, find_dirs, find_nifti, read_table,
                                   to_float, write_manifest)

SITE = "BraTS"
RSNA_EXCLUDED = ("00109", "00123", "00709")
LAYOUTS = {
    "brats2021": (re.compile(r"^BraTS2021_(\d{5})$"), "_", {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"},
                  "BraTS2021_NNNNN/ holding BraTS2021_NNNNN_t1.nii.gz"),
    "brats2023": (re.compile(r"^BraTS-GLI-(\d{5})-(\d{3})$"), "-",
                  {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"},
                  "BraTS-GLI-NNNNN-TTT/ holding BraTS-GLI-NNNNN-TTT-t1n.nii.gz"),
}


def read_mgmt_labels(path: Path, report: ImportReport) -> dict[str, float]:
    """RSNA-MICCAI ``train_labels.csv`` -> {5-digit id: 0.0/1.0}, without the competition's excluded cases."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: MGMT label file not found (the RSNA-MICCAI train_labels.csv)")
    table = read_table(path)
    id_col, value_col = column(table, path, "BraTS21ID"), column(table, path, "MGMT_value")
    labels: dict[str, float] = {}
    for line, (raw_id, raw_value) in enumerate(zip(table[id_col], table[value_col]), start=2):
        digits = re.sub(r"\D", "", raw_id)
        value = to_float(raw_value)
        if not digits or value not in (0.0, 1.0):
            report.dropped.append((f"{path.name}:{line}", f"label row {raw_id!r},{raw_value!r} is not an id with 0/1"))
            continue
        case = f"{int(digits):05d}"
        if case in RSNA_EXCLUDED:
            report.dropped.append((f"BraTS2021_{case}",
                                   "MGMT label not used: case excluded by the RSNA-MICCAI challenge"))
            continue
        labels[case] = value
    return labels


def _wrong_folder(root: Path, kind: str) -> DataError:
    hint = ""
    for other, (pattern, *_rest) in LAYOUTS.items():
        if other != kind and find_dirs(root, pattern, max_depth=2):
            hint = f"; it holds {other} case folders: use `nrfm import {other}`"
    return DataError(f"{root}: no {kind} case folders ({LAYOUTS[kind][3]}) found up to 3 levels down; point --root "
                     f"at the folder that holds them{hint}")


def import_brats(kind: str, root: Path, out: Path, mgmt_labels: Path | None = None, force: bool = False,
                 progress: bool = True) -> ImportReport:
    """Build the canonical manifest of a BraTS 2021 or 2023 glioma download (``kind`` brats2021 | brats2023)."""
    pattern, sep, contrasts, _ = LAYOUTS[kind]
    root = check_root(root, kind)
    dirs = find_dirs(root, pattern)
    if not dirs:
        raise _wrong_folder(root, kind)
    report = ImportReport(kind=kind, out=Path(out))
    labels = read_mgmt_labels(mgmt_labels, report) if mgmt_labels else {}
    log, rows, matched = ValueLog(), [], set()
    for folder in tqdm(dirs, desc=kind, unit="exam", disable=not progress):
        exam = folder.name
        number = pattern.match(exam).group(1)
        paths = {c: find_nifti(folder, f"{exam}{sep}{s}") for c, s in contrasts.items()}
        lacking = [contrasts[c] for c, p in paths.items() if p is None]
        if lacking:
            where = folder / f"{exam}{sep}{lacking[0]}.nii.gz"
            report.dropped.append((exam, f"missing {', '.join(lacking)} (looked for {where})"))
            continue
        seg = find_nifti(folder, f"{exam}{sep}seg")
        log.record("seg", "present" if seg else "absent (kept without a mask)", "used")
        mgmt = labels.get(number, math.nan) if kind == "brats2021" else math.nan
        if labels:
            matched.add(number)
            log.record("mgmt", "train_labels.csv" if number in labels else "not in train_labels.csv", mgmt)
        rows.append({"subject_id": exam, "patient_id": exam if kind == "brats2021" else f"BraTS-GLI-{number}",
                     "site": SITE, "split": "", **{c: str(p) for c, p in paths.items()}, "seg": str(seg) if seg else "",
                     "mgmt": mgmt})
    unmatched = sorted(set(labels) - matched)
    if unmatched:
        report.warnings.append(f"{len(unmatched)} MGMT labels have no image folder (e.g. {', '.join(unmatched[:3])})")
    if kind == "brats2023":
        log.record("seg labels", "3 (enhancing tumour)", "read as 4 by nrfm.data.preprocessing")
    write_manifest(rows, out, force)
    report.n_rows, report.n_patients = len(rows), len({r["patient_id"] for r in rows})
    report.mapped = log.as_dict()
    return report
