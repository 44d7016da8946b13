"""Validating a manifest: every value, patient leaks across splits, small groups and (optionally) the images.

:func:`validate_manifest` never raises for the file's content: it returns a :class:`ValidationResult` with every
problem as a ``file:row:column: message`` line, where the row is the line number a user sees in an editor
(header = line 1), e.g. ``manifest.csv:7:idh: label value 2 in a binary marker; valid: 1, 0 or empty``, and a
per-site summary (:func:`site_summary`).

Example::

    result = validate_manifest(Path("cohort/manifest.csv"))
    print(result.format())
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.data.manifest import LineNumbers, _load_raw, _parse
from nrfm.data.splits import MIN_GROUP_TRAIN, MIN_SPLIT_PATIENTS, small_groups
from nrfm.errors import ManifestError
from nrfm.schema import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS, IMAGE_COLUMNS, SPLITS


@dataclass
class ValidationResult:
    """What :func:`validate_manifest` found. ``errors``/``warnings`` are ``file:row:column: message`` lines."""

    errors: list[str]
    warnings: list[str]
    summary: pd.DataFrame
    path: Path = field(default_factory=Path)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Per-site summary table, then every problem, then a one-line verdict (for the CLI)."""
        parts = []
        if not self.summary.empty:
            parts.append(_format_summary(self.summary))
        parts += [f"error: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
        verdict = "OK" if self.ok else "INVALID"
        parts.append(f"{self.path}: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)")
        return "\n".join(parts)


# -------------------------------------------------------------------------------------------- validation
def _check_values(df: pd.DataFrame, path: Path, lines: np.ndarray, errors: list[str], warnings: list[str]) -> None:
    first_line: dict[str, int] = {}
    for i, row in enumerate(df.itertuples(index=False)):
        at = f"{path}:{lines[i]}"
        sid = row.subject_id
        if not sid:
            errors.append(f"{at}:subject_id: empty subject id")
        elif sid in first_line:
            errors.append(f"{at}:subject_id: duplicate subject id {sid!r} (first on line {first_line[sid]})")
        else:
            first_line[sid] = int(lines[i])
        for col in ("patient_id", "site") + IMAGE_COLUMNS:
            if not getattr(row, col):
                errors.append(f"{at}:{col}: empty {col.replace('_', ' ')} (required)")
        if row.split not in SPLITS + ("",):
            errors.append(f"{at}:split: bad split value {row.split!r}; valid: train, val, test or empty")
        for col in BINARY_ENDPOINTS:
            v = getattr(row, col)
            if not np.isnan(v) and v not in (0.0, 1.0):
                errors.append(f"{at}:{col}: label value {v:g} in a binary marker; valid: 1, 0 or empty")
        for col in CONTINUOUS_ENDPOINTS:
            v = getattr(row, col)
            if not np.isnan(v) and not 0.0 <= v <= 100.0:
                errors.append(f"{at}:{col}: {v:g} is outside [0, 100] percent")
        if not np.isnan(row.age) and not 0 <= row.age <= 120:
            errors.append(f"{at}:age: {row.age:g} is not an age in years (0 to 120)")
        if not np.isnan(row.grade) and row.grade not in (1.0, 2.0, 3.0, 4.0):
            warnings.append(f"{at}:grade: {row.grade:g} is not a WHO CNS grade 1-4")
        if row.sex not in ("M", "F", ""):
            warnings.append(f"{at}:sex: {row.sex!r} is not M, F or empty")
        days, event = row.os_days, row.os_event
        if not np.isnan(days) and days <= 0:
            errors.append(f"{at}:os_days: survival time must be > 0 days, got {days:g}")
        if not np.isnan(event) and event not in (0.0, 1.0):
            errors.append(f"{at}:os_event: event must be 1 (death) or 0 (censored), got {event:g}")
        if np.isnan(days) != np.isnan(event):
            missing = "os_event" if np.isnan(event) else "os_days"
            errors.append(f"{at}:{missing}: os_days and os_event must be given together or both left empty")


def _check_leaks(df: pd.DataFrame, path: Path, lines: np.ndarray, errors: list[str], warnings: list[str]) -> None:
    split_lines: dict[str, dict[str, int]] = {}  # patient -> {split: first line}
    site_of: dict[str, str] = {}
    for i, row in enumerate(df.itertuples(index=False)):
        pid, at = row.patient_id, f"{path}:{lines[i]}"
        if pid and site_of.setdefault(pid, row.site) != row.site and site_of[pid] != "reported":
            warnings.append(f"{at}:site: patient {pid!r} appears at sites {site_of[pid]!r} and {row.site!r}; in "
                            "leave-one-site-out folds the exams at the held-out site are left out of its test set")
            site_of[pid] = "reported"
        if not pid or row.split not in SPLITS:
            continue
        seen = split_lines.setdefault(pid, {})
        other = next(((s, n) for s, n in seen.items() if s != row.split), None)
        if other:
            errors.append(f"{at}:split: patient {pid!r} is in {row.split} here and in {other[0]} on line {other[1]}; "
                          "splits must be made by patient")
        seen.setdefault(row.split, int(lines[i]))


def site_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per site and overall (``site == "all"``): exams, patients, and per endpoint the labelled count
    (``<ep>_n``), positives (``<ep>_pos``, binary) or median (``<ep>_median``, continuous) and the missing
    rate (``<ep>_missing``, fraction of exams); survival as ``os_n`` and ``os_events``."""
    rows = []
    groups = [(site, part) for site, part in df.groupby("site", sort=True)] + [("all", df)]
    for site, part in groups:
        rec: dict[str, object] = {"site": site, "exams": len(part), "patients": part["patient_id"].nunique()}
        for ep in ENDPOINTS:
            known = part[ep].dropna()
            rec[f"{ep}_n"] = len(known)
            if ep in BINARY_ENDPOINTS:
                rec[f"{ep}_pos"] = int((known == 1).sum())
            else:
                rec[f"{ep}_median"] = float(known.median()) if len(known) else np.nan
            rec[f"{ep}_missing"] = 1.0 - len(known) / len(part) if len(part) else np.nan
        has_os = part["os_days"].notna() & part["os_event"].notna()
        rec["os_n"] = int(has_os.sum())
        rec["os_events"] = int((part.loc[has_os, "os_event"] == 1).sum())
        rows.append(rec)
    return pd.DataFrame(rows)


def _format_summary(summary: pd.DataFrame) -> str:
    """One column per site (narrow whatever the number of endpoints): counts, then each endpoint."""
    table = {"exams": summary["exams"].astype(str), "patients": summary["patients"].astype(str)}
    for ep in ENDPOINTS:
        count = summary[f"{ep}_n"].astype(str)
        if ep in BINARY_ENDPOINTS:
            count = summary[f"{ep}_pos"].astype(str) + "/" + count
        table[ep] = count + " (" + (100 * summary[f"{ep}_missing"]).round().astype(int).astype(str) + "%)"
    table["os events/n"] = summary["os_events"].astype(str) + "/" + summary["os_n"].astype(str)
    frame = pd.DataFrame(table).T
    frame.columns = summary["site"].tolist()
    legend = "per site: binary markers positives/labelled (missing %), continuous labelled (missing %)"
    return legend + "\n" + frame.to_string()


def _small_group_warnings(df: pd.DataFrame, path: Path) -> list[str]:
    """``nrfm validate`` lines for every site and (site, class) group the small-group rule leaves out."""
    out = []
    for endpoint in BINARY_ENDPOINTS:
        table = small_groups(df, endpoint)
        for r in table.itertuples(index=False):
            if r.kind == "site" and endpoint == BINARY_ENDPOINTS[0]:
                out.append(f"{path}:{r.line}:site: site {r.site!r} has {r.count} patient(s), fewer than "
                           f"{MIN_SPLIT_PATIENTS} needed to split it: {r.action}")
            elif r.kind == "site_class":
                where = "train exams" if df["split"].isin(SPLITS).all() else "expected train exams"
                out.append(f"{path}:{r.line}:{endpoint}: site {r.site!r}, {endpoint}={r.label:g}: {r.count} {where}, "
                           f"fewer than {MIN_GROUP_TRAIN}: {r.action}")
    return out


def validate_manifest(path: Path, check_images: bool = True, progress: bool = True) -> ValidationResult:
    """Check a manifest and (optionally) every image it names; never raises for the file's content.

    Checks: required columns, unique subject ids, non-empty ids/site/image paths, split values, binary
    markers in {0, 1, empty}, continuous markers in [0, 100], age, survival time > 0 with event in {0, 1},
    one patient never in two splits; sites and (site, class) groups too small to split or to weight are
    warnings saying what will happen to them (:func:`nrfm.data.splits.small_groups`). With ``check_images``:
    each path exists and is a readable, complete, 3-D NIfTI with finite voxels; a subject's contrasts and mask
    share shape and affine (within :data:`nrfm.data.preprocessing.AFFINE_TOL_MM`); mask labels are in
    {0, 1, 2, 3, 4}. An all-zero tumour mask is a warning: the exam stays usable and its crop falls back to the
    brain centre.

    Returns:
        ValidationResult with ``errors``, ``warnings`` (``file:row:column: message``), the per-site
        :func:`site_summary` and ``ok``.
    """
    path = Path(path)
    errors: list[str] = []
    warnings: list[str] = []
    try:
        raw, lines, notes, sep = _load_raw(path)
    except ManifestError as err:
        return ValidationResult([str(err)], [], pd.DataFrame(), path)
    warnings += notes
    df = _parse(raw, path, lines, errors, sep=sep)
    _check_values(df, path, lines, errors, warnings)
    _check_leaks(df, path, lines, errors, warnings)
    if len(df) and not errors:
        df.attrs["lines"] = LineNumbers(int(n) for n in lines)
        warnings += _small_group_warnings(df, path)
    if check_images:
        from nrfm.data.preprocessing import check_subject_files  # MONAI itself is only imported to preprocess

        from tqdm import tqdm

        rows = df.to_dict("records")
        for i, row in tqdm(enumerate(rows), total=len(rows), desc="checking images", unit="exam", disable=not progress):
            for level, col, message in check_subject_files(row):
                (errors if level == "error" else warnings).append(f"{path}:{lines[i]}:{col}: {message}")
    summary = site_summary(df) if len(df) else pd.DataFrame()
    return ValidationResult(errors, warnings, summary, path)
