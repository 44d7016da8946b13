"""The canonical manifest: its columns, and reading it with dtype control and cleaned cells.

One row per imaging exam (``data_manifests/README.md``). Every cohort,
real or synthetic, is described by this one table, so everything downstream reads :func:`read_manifest`.
Checking a manifest's values is :mod:`nrfm.data.validation`; splitting it by patient and building the folds of a
protocol is :mod:`nrfm.data.splits`.

Row numbers in messages are the line numbers a user sees in an editor (header = line 1), so a problem is
reported as ``manifest.csv:7:age: not a number: 'abc' (leave empty for unknown)``.

Example::

    df = read_manifest(Path("cohort/manifest.csv"))
    df.attrs["lines"][0]  # the first row's line in the file
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.errors import ManifestError
from nrfm.schema import MANIFEST_COLUMNS as COLUMNS
from nrfm.schema import (BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS, IMAGE_COLUMNS, NUMERIC_COLUMNS,  # noqa: F401
                         PATH_COLUMNS, REQUIRED_COLUMNS, SPLITS, STRING_COLUMNS, SURVIVAL_COLUMNS)  # (re-exported)


class LineNumbers(tuple):
    """Each row's line in the manifest file (``df.attrs["lines"]``). pandas deep-copies ``DataFrame.attrs`` on
    nearly every operation; as a list of a thousand ints that took 6 of the 35 s of one fine-tuning stage. Immutable,
    so a deep copy is the object itself."""

    def __deepcopy__(self, memo) -> "LineNumbers":
        return self


# Cells that mean "unknown" in a numeric column; anything else that is not a number is an error.
UNKNOWN_VALUES = frozenset({"", "na", "n/a", "nan", "none", "null", "unknown"})


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
            value that is not a number. Value ranges are checked by
            :func:`nrfm.data.validation.validate_manifest`.
    """
    raw, lines, _, sep = _load_raw(Path(path))
    df = _parse(raw, Path(path), lines, errors=None, sep=sep)
    df.attrs["lines"] = LineNumbers(int(n) for n in lines)
    df.attrs["source"] = str(path)
    return df
