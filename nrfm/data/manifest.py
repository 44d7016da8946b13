"""The canonical manifest: schema, loading with dtype control, validation and patient-level splits.

One row per imaging exam (``data_manifests/README.md``). Every cohort,
real or synthetic, is described by this one table, so everything downstream reads :func:`read_manifest`.

Row numbers in messages are the line numbers a user sees in an editor (header = line 1), so a problem is
reported as ``manifest.csv:7:idh: label value 2 in a binary marker; valid: 1, 0 or empty``.

Example::

    result = validate_manifest(Path("cohort/manifest.csv"))
    print(result.format())
    df = assign_splits(read_manifest(Path("cohort/manifest.csv")), seed=0, endpoint="idh")
"""
from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.config import PROTOCOLS
from nrfm.errors import LeakageError, ManifestError
from nrfm.schema import MANIFEST_COLUMNS as COLUMNS
from nrfm.schema import (BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS, IMAGE_COLUMNS, NUMERIC_COLUMNS,
                         PATH_COLUMNS, REQUIRED_COLUMNS, SPLITS, STRING_COLUMNS, SURVIVAL_COLUMNS)
# Cells that mean "unknown" in a numeric column; anything else that is not a number is an error.
UNKNOWN_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null", "unknown"})


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


# ----------------------------------------------------------------------------------------------- reading
def _load_raw(path: Path) -> tuple[pd.DataFrame, np.ndarray, list[str], str]:
    """Read the CSV as strings.

    Returns (frame, editor line number of each row, notes on optional columns, the field separator)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        # utf-8-sig drops the byte-order mark Excel writes; newline normalisation handles CRLF and old-Mac CR.
        text = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8 CSV") from None
    header_line = text.split("\n", 1)[0]
    if not header_line.strip():
        raise ManifestError(f"{path}:1: the first line must be the header")
    sep = max((",", ";", "\t"), key=header_line.count)  # European Excel writes ';'
    header = [h.strip() for h in next(csv.reader([header_line], delimiter=sep))]
    canonical = {h.lower(): h for h in header}
    seen: set[str] = set()
    for name in header:
        key = name.lower() if name.lower() in COLUMNS else name
        if key in seen:
            raise ManifestError(f"{path}:1:{name}: column appears twice in the header")
        seen.add(key)
    missing = [c for c in REQUIRED_COLUMNS if c not in canonical]
    if missing:
        raise ManifestError(f"{path}:1:{missing[0]}: required column missing (required: {', '.join(REQUIRED_COLUMNS)})")
    try:
        raw = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except (pd.errors.ParserError, ValueError) as err:
        raise ManifestError(f"{path}: not a valid CSV ({str(err).strip().splitlines()[0]})") from None
    raw.columns = [h.lower() if h.lower() in COLUMNS else h for h in header]
    raw = raw.fillna("").apply(lambda col: col.str.strip())  # short rows give NaN for the missing cells
    lines = np.arange(len(raw)) + 2  # header is line 1
    keep = (raw != "").any(axis=1).to_numpy()  # blank lines are ignored but still counted
    raw, lines = raw.loc[keep].reset_index(drop=True), lines[keep]
    notes = [f"{path}:1:{c}: optional column absent; treated as empty" for c in COLUMNS if c not in raw.columns]
    for c in COLUMNS:
        if c not in raw.columns:
            raw[c] = ""
    extras = [c for c in raw.columns if c not in COLUMNS]
    return raw[list(COLUMNS) + extras], lines, notes, sep


def parse_number(text: str, sep: str) -> float:
    """One numeric cell of a manifest whose field separator is ``sep``; ValueError with the reason if refused.

    A decimal comma (``12,5``) is read only in a ``;``-separated file, where European spreadsheets write it and
    it cannot be a thousands separator. Thousands separators are refused everywhere (``1,200``, ``1.200,5``,
    ``1_200``): ``1,200`` is 1200 to one reader and 1.2 to another, and a silently wrong number is worse than
    an error. ``inf``/``nan`` spelled out are refused too (unknown is an empty cell).
    """
    if "_" in text:
        raise ValueError("digit grouping with '_' is not accepted; write the plain number")
    if "," in text:
        if sep != ";":
            raise ValueError(f"a comma in a number in a {sep!r}-separated file is a thousands separator or a "
                             "decimal comma, which cannot be told apart; write the plain number (1200 or 1.2); "
                             "decimal commas are read only in ';'-separated files")
        if text.count(",") > 1 or "." in text:
            raise ValueError("thousands separators are not accepted; write the plain number (e.g. 1200,5)")
        text = text.replace(",", ".")
    value = float(text)
    if not np.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _parse(raw: pd.DataFrame, path: Path, lines: np.ndarray, errors: list[str] | None, sep: str = ",") -> pd.DataFrame:
    """Convert to canonical dtypes; collect problems into ``errors`` or, if None, raise the first."""
    df = raw.copy()
    for col in NUMERIC_COLUMNS:
        values = np.full(len(df), np.nan)
        for i, text in enumerate(df[col]):
            if text.lower() in UNKNOWN_VALUES:
                continue
            try:
                values[i] = parse_number(text, sep)
            except ValueError as err:
                values[i] = np.nan
                reason = str(err) if "," in text or "_" in text else "leave empty for unknown"
                message = f"{path}:{lines[i]}:{col}: not a number: {text!r} ({reason})"
                if errors is None:
                    raise ManifestError(message) from None
                errors.append(message)
        df[col] = values
    df["split"] = df["split"].str.lower()
    folder = Path(path).resolve().parent
    for col in PATH_COLUMNS:
        df[col] = [os.path.normpath(folder / os.path.expanduser(p)) if p else "" for p in df[col]]
    return df


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest with canonical dtypes.

    ids, site, split, sex and paths stay strings (``"00123"`` keeps its zeros); age, grade, markers and
    survival are float with NaN for unknown. A UTF-8 BOM, ``;`` or tab separators and CRLF line endings are
    read as such; numbers follow :func:`parse_number` (decimal commas only in ``;`` files, no thousands
    separators). Paths come back absolute (relative ones are taken from the manifest's folder). Columns
    follow :data:`COLUMNS` (absent optional ones are added empty), then any extra columns in file order.
    ``df.attrs["lines"]`` holds each row's line number in the file, ``df.attrs["source"]`` the path.

    Raises:
        ManifestError: ``file:row:column: message`` for a missing required column, a duplicated column or a
            value that is not a number. Value ranges are checked by :func:`validate_manifest`.
    """
    raw, lines, _, sep = _load_raw(Path(path))
    df = _parse(raw, Path(path), lines, errors=None, sep=sep)
    df.attrs["lines"] = [int(n) for n in lines]
    df.attrs["source"] = str(path)
    return df


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


def validate_manifest(path: Path, check_images: bool = True, progress: bool = True) -> ValidationResult:
    """Check a manifest and (optionally) every image it names; never raises for the file's content.

    Checks: required columns, unique subject ids, non-empty ids/site/image paths, split values, binary
    markers in {0, 1, empty}, continuous markers in [0, 100], age, survival time > 0 with event in {0, 1},
    one patient never in two splits; sites and (site, class) groups too small to split or to weight are
    warnings saying what will happen to them (:func:`small_groups`). With ``check_images``: each path exists and is a readable, complete,
    3-D NIfTI with finite voxels; a subject's contrasts and mask share shape and affine (within
    :data:`nrfm.data.preprocessing.AFFINE_TOL_MM`); mask labels are in {0, 1, 2, 3, 4}. An all-zero tumour mask is a
    warning: the exam stays usable and its crop falls back to the brain centre.

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
        df.attrs["lines"] = [int(n) for n in lines]
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


# ------------------------------------------------------------------------------------------------ splits
def check_no_patient_leak(df: pd.DataFrame, where: str = "manifest") -> None:
    """Raise :class:`LeakageError` if one ``patient_id`` has rows in two different (non-empty) splits."""
    assigned = df[df["split"].isin(SPLITS)]
    per_patient = assigned.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
    leaking = per_patient[per_patient.map(len) > 1]
    if len(leaking):
        pid, splits = leaking.index[0], leaking.iloc[0]
        subjects = assigned.loc[assigned["patient_id"] == pid, "subject_id"].tolist()
        more = f" (and {len(leaking) - 1} more patients)" if len(leaking) > 1 else ""
        raise LeakageError(f"{where}: patient {pid!r} is in splits {', '.join(splits)} "
                           f"(exams {', '.join(subjects)}){more}")


def assign_splits(df: pd.DataFrame, seed: int, endpoint: str = "idh",
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), min_val_patients: int = 0) -> pd.DataFrame:
    """Fill empty ``split`` values by patient, stratified by site and ``endpoint``, deterministic by seed.

    Rows that already have a split keep it; a patient's other exams follow it. The remaining patients of each
    site are grouped by their label (first known label over their exams; unknown is its own stratum),
    shuffled within the stratum, laid out stratum after stratum, and each position takes the split that is
    furthest below its target share so far (largest-deficit rounding): every stratum and the site as a whole
    get the fractions to within one patient. A site with >= 3 patients then gets at least one in each split;
    a site with fewer (:data:`MIN_SPLIT_PATIENTS`) cannot be split and is kept for evaluation only: its
    patients go to ``test`` (``nrfm validate`` warns about it, :func:`small_groups` lists it).

    A site whose manifest already marks test patients (a fixed held-out set, as ``nrfm synth`` writes) keeps
    exactly those as test: its other patients are split into train and val only, in the ratio of the train
    and val fractions, with at least ``min_val_patients`` in val (at most half of them), so that
    worst-group model selection has enough validation patients at a small site.

    Args:
        df: manifest as from :func:`read_manifest`.
        seed: random seed (same seed and table, same splits).
        endpoint: binary endpoint to stratify by.
        fractions: train, val, test shares (positive, summing to 1).
        min_val_patients: validation floor per site with a fixed test set (0 = none).

    Returns:
        A copy of ``df`` with ``split`` filled.

    Raises:
        ValueError: unknown endpoint or bad fractions. LeakageError: pre-assigned splits already leak.
    """
    if endpoint not in BINARY_ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; valid: {list(BINARY_ENDPOINTS)}")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three positive shares summing to 1, got {fractions}")
    check_no_patient_leak(df, where="manifest before assigning splits")
    out = df.copy()
    given = out[out["split"].isin(SPLITS)].groupby("patient_id")["split"].first()
    out.loc[out["split"] == "", "split"] = out["patient_id"].map(given).fillna("")
    todo = out[out["split"] == ""]
    rng = np.random.default_rng(seed)
    chosen: dict[str, str] = {}
    evaluation_only = set(evaluation_only_sites(out))
    fixed_test_sites = set(out.loc[df["split"] == "test", "site"])
    for site in sorted(todo["site"].unique()):
        part = todo[todo["site"] == site]
        if site in evaluation_only and site not in fixed_test_sites:  # too few patients to split: evaluation only
            chosen.update({pid: "test" for pid in part["patient_id"].unique()})
            continue
        target = np.asarray(fractions)
        if site in fixed_test_sites:  # the held-out set is given: only train and val among the rest
            n_rest = part["patient_id"].nunique()
            val = fractions[1] / (fractions[0] + fractions[1])
            if min_val_patients > 0 and n_rest > 0:
                val = max(val, min(0.5, min_val_patients / n_rest))
            target = np.array([1.0 - val, val, 0.0])
        labels = part.groupby("patient_id", sort=True)[endpoint].agg(
            lambda s: s.dropna().iloc[0] if s.notna().any() else -1.0)
        order: list[str] = []
        for stratum in sorted(labels.unique()):
            patients = sorted(labels.index[labels == stratum])
            order += [patients[k] for k in rng.permutation(len(patients))]
        counts = np.zeros(3)
        assignment: list[int] = []
        for t, _ in enumerate(order, start=1):
            k = int(np.argmax(target * t - counts))
            counts[k] += 1
            assignment.append(k)
        fixed = out.loc[(out["site"] == site) & (out["split"] != ""), ["patient_id", "split"]].drop_duplicates()
        total = counts + np.array([(fixed["split"] == s).sum() for s in SPLITS])
        if len(order) + len(fixed) >= 3 and site not in fixed_test_sites:
            for empty in [k for k in range(3) if total[k] == 0]:
                # move the last-placed patient of the fullest split that can spare one
                donors = [k for k in np.argsort(-total, kind="stable") if counts[k] > 0 and total[k] > 1]
                if not donors:
                    break
                pos = max(p for p, k in enumerate(assignment) if k == donors[0])
                counts[donors[0]] -= 1
                total[donors[0]] -= 1
                assignment[pos] = empty
                counts[empty] += 1
                total[empty] += 1
        chosen.update({pid: SPLITS[k] for pid, k in zip(order, assignment)})
    mask = out["split"] == ""
    out.loc[mask, "split"] = out.loc[mask, "patient_id"].map(chosen)
    return out


# ------------------------------------------------------------------------------------------- small groups
# The rule for groups too small to split or to weight, in one place (validate warns with it, assign_splits
# follows it, the DRO grouping can call small_groups):
#   * a site with fewer than MIN_SPLIT_PATIENTS patients cannot have a train, a validation and a test patient:
#     it is kept for evaluation only (every exam of it goes to the test split; it is never trained on);
#   * a (site, class) group of an endpoint with fewer than MIN_GROUP_TRAIN training exams is too small to
#     weight: it is left out of the DRO grouping (its exams still count in the ERM mean).
MIN_SPLIT_PATIENTS = 3
MIN_GROUP_TRAIN = 3
EVALUATION_ONLY = "kept for evaluation only: all its exams go to the test split and it is never trained on"
NOT_WEIGHTED = "left out of the DRO grouping (too few to weight; its exams still count in the ERM mean)"


def evaluation_only_sites(df: pd.DataFrame, min_patients: int = MIN_SPLIT_PATIENTS) -> list[str]:
    """Sites with fewer than ``min_patients`` patients: test split only (see :data:`EVALUATION_ONLY`)."""
    patients = df.groupby("site")["patient_id"].nunique()
    return sorted(str(s) for s in patients.index[patients < min_patients])


def small_groups(df: pd.DataFrame, endpoint: str | None = None, min_train: int = MIN_GROUP_TRAIN,
                 cuts: dict[str, float] | None = None, train_fraction: float = 0.6) -> pd.DataFrame:
    """What the small-group rule leaves out of splitting and of the DRO grouping.

    Args:
        df: a manifest (with or without splits).
        endpoint: report (site, class) groups of this endpoint (binary, or continuous with its cut in ``cuts``);
            None reports sites only.
        min_train: a group with fewer training exams than this (but at least one) is not weighted.
        cuts: binarization cut in percent per continuous endpoint.

    Returns:
        One row per site or group left out: ``kind`` (``site`` or ``site_class``), ``site``, ``endpoint``,
        ``label`` (class, NaN for sites), ``count`` (patients for a site; training exams for a group: the
        ``train`` rows when every row has a split, else the expected number, ``train_fraction`` of the
        labelled exams rounded down), ``line`` (first manifest line, when known) and ``action``.
    """
    columns = ["kind", "site", "endpoint", "label", "count", "line", "action"]
    lines = np.asarray(df.attrs.get("lines", np.arange(len(df)) + 2))
    rows = []
    excluded = evaluation_only_sites(df)
    patients = df.groupby("site")["patient_id"].nunique()
    for site in excluded:
        first = int(lines[np.flatnonzero(df["site"].to_numpy() == site)[0]])
        rows.append({"kind": "site", "site": site, "endpoint": "", "label": np.nan, "count": int(patients[site]),
                     "line": first, "action": EVALUATION_ONLY})
    if endpoint is not None:
        values = df[endpoint].to_numpy(dtype=float)
        if endpoint in CONTINUOUS_ENDPOINTS:
            if not cuts or endpoint not in cuts:
                raise ValueError(f"endpoint {endpoint!r} is continuous: give its cut in cuts")
            values = np.where(np.isnan(values), np.nan, (values >= cuts[endpoint]).astype(float))
        elif endpoint not in BINARY_ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; valid: {list(ENDPOINTS)}")
        has_splits = bool(df["split"].isin(SPLITS).all())
        in_train = df["split"].to_numpy() == "train"
        site_of = df["site"].to_numpy()
        for site in sorted(set(site_of) - set(excluded)):
            for label in (0.0, 1.0):
                members = np.flatnonzero((site_of == site) & (values == label))
                count = int(in_train[members].sum()) if has_splits else int(len(members) * train_fraction)
                if 0 < count < min_train:
                    rows.append({"kind": "site_class", "site": str(site), "endpoint": endpoint, "label": label,
                                 "count": count, "line": int(lines[members[0]]), "action": NOT_WEIGHTED})
    return pd.DataFrame(rows, columns=columns)


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


# ------------------------------------------------------------------------------------------------- folds
LOSO_PRETRAIN = ("unseen_only", "exclude")


@dataclass(frozen=True)
class Fold:
    """One fold of a protocol: integer row positions (into the manifest as given) of each role.

    ``notes`` say what the builder left out and why (also shown in tables); rows in no role are not used.
    A fold unpacks as ``name, train, val, test = fold``.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    notes: tuple[str, ...] = ()

    def __iter__(self):
        return iter((self.name, self.train, self.val, self.test))


def fold_rows(df: pd.DataFrame, protocol: str, pretrained_subjects: "set[str] | list[str] | None" = None) -> list[Fold]:
    """The folds of ``pooled`` or ``loso``: the one fold builder every stage uses.

    ``pooled``: one fold, the manifest's train / val / test splits. ``loso``: one fold per site, in site order:
    train on the other sites' ``train`` rows, select on their ``val`` rows, test on the held-out site's rows,
    except

    * an exam of a patient who also has exams used for training or validation in this fold (a patient scanned
      at two sites): left out of the test set, with a warning naming the patient, so no patient is ever on
      both sides of a fold;
    * with ``pretrained_subjects`` (``analyses.loso_pretrain = unseen_only``): an exam of a patient any of
      whose exams self-supervised pretraining used; the fold scores only what pretraining never saw, and a
      note gives the count.

    The other sites' ``test`` rows are not used (the held-out site is the only test set).

    Raises:
        ValueError: unknown protocol. ManifestError: rows without a split; loso with fewer than two sites.
        LeakageError: a patient in two splits (pooled), or on both sides of a fold (never after the rules above).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    split, site = df["split"].astype(str).to_numpy(), df["site"].astype(str).to_numpy()
    patient = df["patient_id"].astype(str).to_numpy()
    if not np.isin(split, SPLITS).all():
        n = int((~np.isin(split, SPLITS)).sum())
        raise ManifestError(f"{n} rows have no split; call assign_splits before building folds")
    check_no_patient_leak(df, where="manifest")
    if protocol == "pooled":
        return [Fold("pooled", *(np.flatnonzero(split == s) for s in SPLITS))]
    sites = sorted(set(site))
    if len(sites) < 2:
        raise ManifestError(f"leave-one-site-out needs at least two sites, found {sites}")
    seen = None
    if pretrained_subjects is not None:
        seen = set(patient[np.isin(df["subject_id"].astype(str).to_numpy(), [str(s) for s in pretrained_subjects])])
    folds = []
    for held in sites:
        train = np.flatnonzero((split == "train") & (site != held))
        val = np.flatnonzero((split == "val") & (site != held))
        candidates = np.flatnonzero(site == held)
        used = set(patient[train]) | set(patient[val])
        notes = []
        cross = candidates[np.isin(patient[candidates], list(used))]
        for pid in sorted(set(patient[cross])):
            others = sorted(set(site[(patient == pid) & (site != held)]))
            exams = ", ".join(df["subject_id"].astype(str).to_numpy()[cross[patient[cross] == pid]])
            message = (f"leave-one-site-out fold holding out {held!r}: patient {pid!r} also has exams at "
                       f"{', '.join(others)} used for training or validation; its exams at {held} ({exams}) are "
                       "left out of the test set")
            warnings.warn(message, stacklevel=2)
            notes.append(message)
        test = np.setdiff1d(candidates, cross)
        if seen is not None:
            pretrained = test[np.isin(patient[test], list(seen))]
            test = np.setdiff1d(test, pretrained)
            notes.append(f"held-out site {held}: {len(test)} of {len(candidates)} exams scored, those pretraining "
                         f"never saw ({len(pretrained)} pretraining exams left out; analyses.loso_pretrain=unseen_only)")
        if not len(test):
            notes.append(f"held-out site {held}: no exam left to score after the rules above")
        both = set(patient[test]) & used
        if both:  # the rule above makes this impossible; kept as the guarantee's last line
            raise LeakageError(f"leave-one-site-out fold holding out {held!r}: patients {sorted(both)} on both sides")
        folds.append(Fold(held, train, val, test, tuple(notes)))
    return folds


def loso_folds(df: pd.DataFrame, pretrained_subjects: "set[str] | list[str] | None" = None) -> list[tuple[str, pd.DataFrame]]:
    """Leave-one-site-out folds as frames: one ``(held_out_site, frame)`` per site, in site order.

    Built by :func:`fold_rows` (the rules there): in each frame ``split`` is the row's role in the fold
    (``train``, ``val``, ``test``) and empty for rows the fold does not use (the other sites' test rows,
    exams of patients seen on the training side or, with ``pretrained_subjects``, in pretraining).

    Raises:
        ManifestError: fewer than two sites, or rows without a split.
    """
    out = []
    for fold in fold_rows(df, "loso", pretrained_subjects):
        frame = df.copy()
        role = np.full(len(frame), "", dtype=object)
        for name in SPLITS:
            role[getattr(fold, name)] = name
        frame["split"] = role
        check_no_patient_leak(frame, where=f"leave-one-site-out fold holding out {fold.name!r}")
        out.append((fold.name, frame))
    return out
