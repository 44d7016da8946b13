"""Merge canonical manifests, keeping a patient that is in more than one cohort once.

The link between cohorts comes from the sources themselves: a row's extra column ``source_ids`` lists, separated
by ``;``, the ids the same exam has in other cohorts (UCSF-PDGM's ``BraTS21 ID`` gives ``BraTS2021_NNNNN``).
When another manifest has a row with that subject id, the row that declares the link is kept (its cohort has
the richer clinical table) and the other is dropped; markers, age, sex, grade and survival the kept row lacks
are filled from the dropped one, and other exams of the dropped row's patient are moved to the kept patient so
no person can land in two splits. UPenn-GBM and BraTS 2021 also share patients (about 447) but no published
column maps them: the report warns and they stay separate.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from nrfm.config import ENDPOINTS
from nrfm.errors import ManifestError
from nrfm.data.importers.common import ImportReport, write_manifest
from nrfm.data.manifest import COLUMNS, read_manifest
from nrfm.data.splits import check_no_patient_leak

FILLABLE = ("age", "sex", "grade") + ENDPOINTS


def _missing(value: object) -> bool:
    return value == "" or value is None or (isinstance(value, float) and math.isnan(value))


def merge_manifests(paths: list[Path], out: Path, force: bool = False) -> ImportReport:
    """Concatenate manifests and de-duplicate exams linked through ``source_ids`` (see module docstring).

    Raises:
        ManifestError: no inputs, or one subject id in two inputs. LeakageError: kept splits would leak.
    """
    if not paths:
        raise ManifestError("merge: no manifests given")
    report = ImportReport(kind="merge", out=Path(out))
    rows: list[dict] = []
    origin: dict[str, tuple[Path, int]] = {}
    extras: list[str] = []
    for path in paths:
        frame = read_manifest(Path(path))
        extras += [c for c in frame.columns if c not in COLUMNS and c not in extras]
        for line, rec in zip(frame.attrs["lines"], frame.to_dict("records")):
            sid = rec["subject_id"]
            if sid in origin:
                first = origin[sid]
                raise ManifestError(f"{path}:{line}:subject_id: subject id {sid!r} is also on line {first[1]} of "
                                    f"{first[0]}; subject ids must be unique across the merged manifests")
            origin[sid] = (Path(path), line)
            rows.append(rec)
        report.mapped.setdefault("inputs", {})[str(path)] = f"{len(frame)} exams"
    index = {r["subject_id"]: i for i, r in enumerate(rows)}
    dropped: set[int] = set()
    patient_alias: dict[str, str] = {}
    filled = conflicts = 0
    for i, row in enumerate(rows):
        if i in dropped:
            continue
        for other_id in [s.strip() for s in str(row.get("source_ids", "") or "").split(";") if s.strip()]:
            j = index.get(other_id)
            if j is None or j == i or j in dropped:
                continue
            other = rows[j]
            for col in FILLABLE:
                if _missing(row[col]) and not _missing(other[col]):
                    row[col], filled = other[col], filled + 1
                elif not _missing(row[col]) and not _missing(other[col]) and row[col] != other[col]:
                    conflicts += 1
            if _missing(row["os_days"]) and not _missing(other["os_days"]):
                row["os_days"], row["os_event"], filled = other["os_days"], other["os_event"], filled + 1
            dropped.add(j)
            patient_alias[other["patient_id"]] = row["patient_id"]
            report.dropped.append((other_id, f"same exam as {row['subject_id']} ({origin[row['subject_id']][0].name} "
                                             "source_ids); kept once"))
    kept = [r for i, r in enumerate(rows) if i not in dropped]
    for r in kept:
        r["patient_id"] = patient_alias.get(r["patient_id"], r["patient_id"])
    report.mapped["duplicates"] = {"exams dropped": str(len(dropped)), "values filled from duplicates": str(filled),
                                   "conflicting values (kept row wins)": str(conflicts)}
    sites = {r["site"] for r in kept}
    ids = [r["subject_id"] for r in kept]
    if "UPenn" in sites and any(s.startswith("BraTS2021_") for s in ids):
        report.warnings.append("UPenn-GBM and BraTS 2021 share about 447 patients but no column maps them: "
                               "they are counted separately (drop one cohort's overlap for a strict analysis)")
    if any(s.startswith("BraTS2021_") for s in ids) and any(s.startswith("BraTS-GLI-") for s in ids):
        report.warnings.append("both BraTS 2021 and BraTS 2023 glioma exams are present; the 2023 set holds largely "
                               "the same cases under new ids, so patients are likely counted twice")
    check_no_patient_leak(pd.DataFrame(kept, columns=list(COLUMNS) + extras), where=f"merged manifest {out}")
    write_manifest(kept, out, force, extra=tuple(extras))
    report.n_rows, report.n_patients = len(kept), len({r["patient_id"] for r in kept})
    return report
