"""UCSF-PDGM (TCIA; Calabrese et al., Radiology: AI 2022) -> canonical manifest.

Layout: ``UCSF-PDGM-metadata_v*.csv`` and ``UCSF-PDGM-NNNN[_FU...]_nifti/UCSF-PDGM-NNNN[_FU...]_{T1,T1c,T2,FLAIR,
tumor_segmentation}.nii.gz``. The metadata pads ids to 3 digits (``UCSF-PDGM-004``), the folders to 4
(``UCSF-PDGM-0004``): ids are matched by number. Follow-up exams (``_FU...``) share the base exam's patient.

Value mappings (case- and space-insensitive; every spelling of unknown -> empty):
``MGMT status`` positive 1 / negative 0; ``1p/19q`` intact 0 / co-deletion 1 / relative co-deletion
:data:`RELATIVE_CODELETION` (1: counted as codeleted; the FISH call is a reduced 1p/19q ratio rather than an
absolute loss, so a strict analysis may prefer unknown; the report lists how many rows it concerns);
``IDH`` wildtype 0, anything else named (mutated (NOS), ``IDH1 p.R132H``, ``IDH2 p.R172K``, ...) 1;
``1-dead 0-alive`` -> os_event and ``OS`` -> os_days (both empty when OS is blank or not > 0, and on follow-up
exams, so that a patient enters survival analyses once). The diagnosis text encodes IDH and 1p/19q and is never
read. ``BraTS21 ID`` goes to the extra column ``source_ids`` (``BraTS2021_NNNNN``) so that
:func:`nrfm.data.importers.merge_manifests` can de-duplicate.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from tqdm import tqdm

from nrfm.errors import DataError
from nrfm.data.importers.common import (ImportReport, ValueLog, check_root, column, find_dirs, find_files, find_nifti,
                                   is_unknown, norm, read_table, to_float, write_manifest)

SITE = "UCSF"
ID_RE = re.compile(r"^UCSF-PDGM-(\d+)(_FU\w+?)?$", re.I)
DIR_RE = re.compile(r"^UCSF-PDGM-(\d+)(_FU\w+?)?_nifti$", re.I)
META_RE = re.compile(r"^UCSF-PDGM-metadata.*\.csv$", re.I)
CONTRASTS = {"t1": "T1", "t1c": "T1c", "t2": "T2", "flair": "FLAIR"}
RELATIVE_CODELETION = 1.0
CODELETION = {"intact": 0.0, "no co-deletion": 0.0, "co-deletion": 1.0, "codeletion": 1.0, "codeleted": 1.0,
              "co-deleted": 1.0}
MGMT = {"positive": 1.0, "methylated": 1.0, "negative": 0.0, "unmethylated": 0.0}


class _Drop(Exception):
    pass


def _idh(text: str) -> float:
    value = norm(text)
    if is_unknown(value):
        return math.nan
    return 0.0 if "wild" in value or value in ("wt", "idh-wt") else 1.0


def _lookup(table: dict[str, float], text: str) -> float:
    return table.get(norm(text), math.nan)


def _codeletion(text: str) -> float:
    value = norm(text)
    return RELATIVE_CODELETION if value.startswith("relative") else CODELETION.get(value, math.nan)


def _brats_id(text: str) -> str:
    digits = re.sub(r"\D", "", text.replace("2021", "", 1) if "brats" in text.lower() else text)
    return f"BraTS2021_{int(digits):05d}" if digits and not is_unknown(text) else ""


def _metadata(root: Path) -> tuple[Path, list[str]]:
    metas = [p for p in find_files(root, META_RE, max_depth=2) if "glossary" not in p.name.lower()]
    if not metas:
        return Path(), []
    def version(p: Path) -> int:
        found = re.search(r"_v(\d+)", p.name, re.I)
        return int(found.group(1)) if found else -1
    metas.sort(key=version)
    notes = [f"several metadata files found; using the newest, {metas[-1].name}"] if len(metas) > 1 else []
    return metas[-1], notes


def import_ucsf_pdgm(root: Path, out: Path, force: bool = False, progress: bool = True) -> ImportReport:
    """Build the canonical manifest of a UCSF-PDGM download (see the module docstring for mappings)."""
    root = check_root(root, "UCSF-PDGM")
    meta, notes = _metadata(root)
    dirs = find_dirs(root, DIR_RE)
    if not meta.name or not dirs:
        raise DataError(f"{root}: not a UCSF-PDGM folder: looked for UCSF-PDGM-metadata*.csv (found "
                        f"{'1' if meta.name else 'none'}) and UCSF-PDGM-NNNN_nifti/ image folders (found {len(dirs)}) "
                        "up to 3 levels down")
    folders = {}
    for d in dirs:
        m = DIR_RE.match(d.name)
        folders[(int(m.group(1)), (m.group(2) or "").lower())] = d
    table = read_table(meta)
    col = {name: column(table, meta, *aliases, required=name == "id") for name, aliases in {
        "id": ("ID",), "sex": ("Sex",), "age": ("Age at MRI",), "grade": ("WHO CNS Grade",),
        "mgmt": ("MGMT status",), "codel": ("1p/19q",), "idh": ("IDH",), "dead": ("1-dead 0-alive",),
        "os": ("OS",), "brats": ("BraTS21 ID",)}.items()}
    report = ImportReport(kind="ucsf-pdgm", out=Path(out), warnings=notes)
    report.warnings += [f"{meta.name}: column {k!r} absent; left empty" for k, v in col.items() if v is None]
    log, rows, seen = ValueLog(), [], set()
    get = lambda rec, key: rec[col[key]] if col[key] else ""  # noqa: E731
    for rec in tqdm(table.to_dict("records"), desc="ucsf-pdgm", unit="exam", disable=not progress):
        raw_id = rec[col["id"]]
        try:
            m = ID_RE.match(raw_id)
            if not m:
                raise _Drop(f"ID {raw_id!r} is not of the form UCSF-PDGM-NNN")
            key = (int(m.group(1)), (m.group(2) or "").lower())
            if key in seen:
                raise _Drop("duplicate row in the metadata CSV (first one kept)")
            seen.add(key)
            folder = folders.get(key)
            if folder is None:
                raise _Drop(f"no image folder UCSF-PDGM-{key[0]:04d}{m.group(2) or ''}_nifti under {root}")
            exam = folder.name[: -len("_nifti")]
            paths = {c: find_nifti(folder, f"{exam}_{s}") for c, s in CONTRASTS.items()}
            lacking = [CONTRASTS[c] for c, p in paths.items() if p is None]
            if lacking:
                raise _Drop(f"missing {', '.join(lacking)} (looked for {folder}/{exam}_{lacking[0]}.nii.gz)")
            seg = find_nifti(folder, f"{exam}_tumor_segmentation")
            if seg is None:
                report.warnings.append(f"{exam}: no tumour mask; kept (its crop will centre on the brain)")
            row = {"subject_id": exam, "patient_id": f"UCSF-PDGM-{key[0]:04d}", "site": SITE, "split": "",
                   **{c: str(p) for c, p in paths.items()}, "seg": str(seg) if seg else ""}
            sex = norm(get(rec, "sex"))
            row["sex"] = "M" if sex.startswith("m") else "F" if sex.startswith("f") else ""
            row["age"] = to_float(get(rec, "age"))
            grade = to_float(get(rec, "grade"))
            row["grade"] = grade if grade in (1.0, 2.0, 3.0, 4.0) else math.nan
            row["mgmt"] = _lookup(MGMT, get(rec, "mgmt"))
            row["codel_1p19q"] = _codeletion(get(rec, "codel"))
            row["idh"] = _idh(get(rec, "idh"))
            for name, key in (("mgmt", "mgmt"), ("codel_1p19q", "codel"), ("idh", "idh")):
                log.record(name, get(rec, key), row[name])
            days, event = to_float(get(rec, "os")), to_float(get(rec, "dead"))
            if m.group(2):  # survival is counted from the first exam; a follow-up would count the patient twice
                days = event = math.nan
                log.record("survival", "follow-up exam", "unknown")
            elif math.isnan(days) or days <= 0 or event not in (0.0, 1.0):
                if not (math.isnan(days) and math.isnan(event)):
                    log.record("survival", f"OS={get(rec, 'os')}, 1-dead 0-alive={get(rec, 'dead')}", "unknown")
                days = event = math.nan
            row["os_days"], row["os_event"] = days, event
            row["source_ids"] = _brats_id(get(rec, "brats"))
            rows.append(row)
        except (_Drop, OSError, ValueError) as err:
            report.dropped.append((raw_id, str(err)))
    for key, folder in sorted(folders.items()):
        if key not in seen:
            report.dropped.append((folder.name[: -len("_nifti")], f"no row in {meta.name}"))
    write_manifest(rows, out, force, extra=("source_ids",))
    report.n_rows, report.n_patients = len(rows), len({r["patient_id"] for r in rows})
    report.mapped = log.as_dict()
    return report
