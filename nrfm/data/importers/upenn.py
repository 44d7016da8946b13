"""UPenn-GBM (TCIA; Bakas et al., Scientific Data 2022) -> canonical manifest.

Layout: ``UPENN-GBM_clinical_info_v2.1.csv`` (v1.0 also read) and ``NIfTI-files/images_structural/<ID>/<ID>_{T1,
T1GD,T2,FLAIR}.nii.gz``; masks ``NIfTI-files/images_segm/<ID>_segm.nii.gz`` (expert) else
``NIfTI-files/automated_segm/<ID>_automated_approx_segm.nii.gz``. One CSV row per exam: ``UPENN-GBM-00001_11`` is
the pre-operative baseline, ``_21`` a follow-up of the same patient (patient id = the part before ``_``).

Mappings: ``Gender`` M/F; ``IDH1`` Wildtype 0 / Mutated 1; ``MGMT`` Methylated 1 / Unmethylated 0; ``Not
Available``, ``Not Applicable``, ``Indeterminate``, ``NOS/NEC`` -> empty. ``grade`` is 4: the cohort is
glioblastoma only. Survival is timed from surgery before the baseline scan, so it is kept on ``_11`` exams only
(``_21`` rows get empty survival). v2.1: ``Survival_Status`` Deceased (also "uncertain date of death") -> event 1
with days from ``Survival_from_surgery_days_UPDATED``; Alive / Lost to Follow-up -> event 0 with days from
``Survival_Censor``; without a status, a value in the UPDATED column is read as a death and one in the censor
column as censoring. v1.0 has only ``Survival_from_surgery_days`` and no status: those times are taken as deaths
(the report warns; use v2.1 for censoring).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tqdm import tqdm

from nrfm.errors import DataError
from nrfm.data.importers.common import (ImportReport, ValueLog, check_root, column, find_dirs, find_files, find_nifti,
                                   norm, read_table, to_float, write_manifest)

SITE = "UPenn"
CSV_RE = re.compile(r"^UPENN-GBM_clinical_info.*\.csv$", re.I)
ID_RE = re.compile(r"^(UPENN-GBM-\d+)_(\d+)$", re.I)
CONTRASTS = {"t1": "T1", "t1c": "T1GD", "t2": "T2", "flair": "FLAIR"}
IDH = {"wildtype": 0.0, "wild type": 0.0, "wild-type": 0.0, "mutated": 1.0, "mutant": 1.0}
MGMT = {"methylated": 1.0, "unmethylated": 0.0}
BASELINE = "11"


class _Drop(Exception):
    pass


def _survival(rec: dict, col: dict, v1: bool) -> tuple[float, float, str]:
    """(days, event, how) for a baseline row."""
    if v1:
        days = to_float(rec[col["days_v1"]])
        return (days, 1.0, "v1.0 time read as a death") if not math.isnan(days) else (math.nan, math.nan, "unknown")
    status = norm(rec[col["status"]]) if col["status"] else ""
    died, censor = to_float(rec[col["days"]]), to_float(rec[col["censor"]]) if col["censor"] else math.nan
    if status.startswith("deceased") or status == "dead":
        return (died, 1.0, f"{status}: death") if not math.isnan(died) else (math.nan, math.nan, f"{status}: no days")
    if status in ("alive", "lost to follow-up", "lost to follow up", "lost to followup"):
        if math.isnan(censor):
            return math.nan, math.nan, f"{status}: no days"
        return censor, 0.0, f"{status}: censored"
    if not math.isnan(died):
        return died, 1.0, "no status, UPDATED days: death"
    if not math.isnan(censor):
        return censor, 0.0, "no status, censor days: censored"
    return math.nan, math.nan, "unknown"


def import_upenn_gbm(root: Path, out: Path, force: bool = False, progress: bool = True) -> ImportReport:
    """Build the canonical manifest of a UPenn-GBM download (see the module docstring for mappings)."""
    root = check_root(root, "UPenn-GBM")
    csvs = find_files(root, CSV_RE, max_depth=3)
    structural = find_dirs(root, re.compile(r"^images_structural$", re.I))
    if not csvs or not structural:
        raise DataError(f"{root}: not a UPenn-GBM folder: looked for UPENN-GBM_clinical_info*.csv (found {len(csvs)}) "
                        f"and NIfTI-files/images_structural/ (found {len(structural)}) up to 3 levels down")
    csvs.sort(key=lambda p: p.name)
    table_path, images = csvs[-1], structural[0]
    table = read_table(table_path)
    report = ImportReport(kind="upenn-gbm", out=Path(out))
    if len(csvs) > 1:
        report.warnings.append(f"several clinical CSVs found; using {table_path.name}")
    col = {"id": column(table, table_path, "ID"), "sex": column(table, table_path, "Gender", required=False),
           "age": column(table, table_path, "Age_at_scan_years", required=False),
           "idh": column(table, table_path, "IDH1", required=False),
           "mgmt": column(table, table_path, "MGMT", required=False),
           "days": column(table, table_path, "Survival_from_surgery_days_UPDATED", required=False),
           "status": column(table, table_path, "Survival_Status", required=False),
           "censor": column(table, table_path, "Survival_Censor", required=False),
           "days_v1": column(table, table_path, "Survival_from_surgery_days", required=False)}
    v1 = col["days"] is None and col["days_v1"] is not None
    if v1:
        report.warnings.append(f"{table_path.name}: v1.0 table without survival status: every survival time is "
                               "taken as an observed death (v2.1 has the censoring)")
    elif col["days"] is None:
        report.warnings.append(f"{table_path.name}: no survival column; survival left empty")
    segm, auto = images.parent / "images_segm", images.parent / "automated_segm"
    log, rows, seen = ValueLog(), [], set()
    for rec in tqdm(table.to_dict("records"), desc="upenn-gbm", unit="exam", disable=not progress):
        raw_id = rec[col["id"]]
        try:
            m = ID_RE.match(raw_id)
            if not m:
                raise _Drop(f"ID {raw_id!r} is not of the form UPENN-GBM-NNNNN_NN")
            exam, patient, visit = raw_id.upper(), m.group(1).upper(), m.group(2)
            if exam in seen:
                raise _Drop("duplicate row in the clinical CSV (first one kept)")
            seen.add(exam)
            folder = images / raw_id
            paths = {c: find_nifti(folder, f"{raw_id}_{s}") for c, s in CONTRASTS.items()}
            lacking = [CONTRASTS[c] for c, p in paths.items() if p is None]
            if lacking:
                raise _Drop(f"missing {', '.join(lacking)} (looked for {folder}/{raw_id}_{lacking[0]}.nii.gz)")
            seg = find_nifti(segm, f"{raw_id}_segm")
            log.record("seg", "expert (images_segm)" if seg else "automated (automated_segm)" if
                       find_nifti(auto, f"{raw_id}_automated_approx_segm") else "none", "used")
            seg = seg or find_nifti(auto, f"{raw_id}_automated_approx_segm")
            row = {"subject_id": exam, "patient_id": patient, "site": SITE, "split": "",
                   **{c: str(p) for c, p in paths.items()}, "seg": str(seg) if seg else "", "grade": 4.0}
            sex = norm(rec[col["sex"]]) if col["sex"] else ""
            row["sex"] = "M" if sex.startswith("m") else "F" if sex.startswith("f") else ""
            row["age"] = to_float(rec[col["age"]]) if col["age"] else math.nan
            for name, mapping in (("idh", IDH), ("mgmt", MGMT)):
                raw = rec[col[name]] if col[name] else ""
                row[name] = mapping.get(norm(raw), math.nan)
                log.record(name, raw, row[name])
            if visit != BASELINE:
                days, event, how = math.nan, math.nan, f"follow-up _{visit}: survival not timed from this scan"
            elif col["days"] is None and not v1:
                days, event, how = math.nan, math.nan, "unknown"
            else:
                days, event, how = _survival(rec, col, v1)
            if not math.isnan(days) and days <= 0:
                days, event, how = math.nan, math.nan, "time <= 0 days: unknown"
            row["os_days"], row["os_event"] = days, event
            log.record("survival", how, "event " + ("empty" if math.isnan(event) else f"{event:g}"))
            rows.append(row)
        except (_Drop, OSError, ValueError) as err:
            report.dropped.append((raw_id, str(err)))
    in_table = {r.upper() for r in table[col["id"]]}
    for folder in sorted(p for p in images.iterdir() if p.is_dir() and p.name.upper() not in in_table):
        report.dropped.append((folder.name, f"no row in {table_path.name}"))
    write_manifest(rows, out, force)
    report.n_rows, report.n_patients = len(rows), len({r["patient_id"] for r in rows})
    report.mapped = log.as_dict()
    return report
