"""Pieces every cohort importer shares: the report, spellings of unknown, file search and manifest writing."""
from __future__ import annotations

import io
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from nrfm.errors import DataError, ManifestError
from nrfm.files import atomic_write_text
from nrfm.data.manifest import COLUMNS, PATH_COLUMNS

# Lower-cased cell values that mean "unknown" across TCIA/BraTS/RSNA tables (seen or plausible spellings).
UNKNOWN = frozenset({"", "unknown", "unk", "not available", "not applicable", "n/a", "na", "nan", "none", "null",
                     "indeterminate", "nos/nec", "nos", "nec", "-", "--", "?", ".", "missing", "not assessed",
                     "not done", "not tested", "equivocal", "inconclusive", "pending"})
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def norm(value: Any) -> str:
    """Lower-case, trimmed, inner whitespace collapsed (``"  Co-Deletion "`` -> ``"co-deletion"``)."""
    return re.sub(r"\s+", " ", str(value if value is not None else "")).strip().lower()


def is_unknown(value: Any) -> bool:
    return norm(value) in UNKNOWN


def to_float(value: Any) -> float:
    """A number, or NaN for any spelling of unknown or anything that is not a number."""
    try:
        number = float(str(value).strip())
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


@dataclass
class ImportReport:
    """What an import (or merge) did: rows written, value mappings used, exams dropped and why."""

    kind: str
    out: Path
    n_rows: int = 0
    n_patients: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (exam or source id, reason)
    mapped: dict[str, dict[str, str]] = field(default_factory=dict)  # field -> {source value: "value (n rows)"}
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"{self.kind}: wrote {self.n_rows} exams of {self.n_patients} patients to {self.out}"]
        for name, table in self.mapped.items():
            lines.append(f"  {name}: " + "; ".join(f"{k!r} -> {v}" for k, v in table.items()))
        if self.dropped:
            lines.append(f"  dropped {len(self.dropped)}:")
            lines += [f"    {sid}: {why}" for sid, why in self.dropped]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


class ValueLog:
    """Counts which source value became which manifest value, per field, for the report."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def record(self, name: str, raw: Any, value: Any) -> None:
        shown = "empty" if value is None or (isinstance(value, float) and math.isnan(value)) else _cell(value)
        self.counts[name][(str(raw).strip(), str(shown))] += 1

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {name: {raw: f"{value} ({n} rows)" for (raw, value), n in sorted(c.items())}
                for name, c in self.counts.items()}


def check_root(root: Path, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the {what} download)")
    return root


def _breadth_first(root: Path, pattern: re.Pattern, max_depth: int, dirs: bool) -> list[Path]:
    """Entries under ``root`` (depth <= max_depth, hidden folders skipped) whose name matches, shallowest first.

    With ``dirs`` the matches are folders (and are not descended into); otherwise files.
    """
    found, level = [], [Path(root)]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                is_dir = entry.is_dir()
                if is_dir == dirs and pattern.match(entry.name):
                    found.append(Path(entry.path))
                elif is_dir and not entry.name.startswith("."):
                    nxt.append(Path(entry.path))
        level = nxt
    return found


def find_dirs(root: Path, pattern: re.Pattern, max_depth: int = 3) -> list[Path]:
    """Folders under ``root`` (depth <= max_depth) whose name matches; matched folders are not descended."""
    return _breadth_first(root, pattern, max_depth, dirs=True)


def find_files(root: Path, pattern: re.Pattern, max_depth: int = 3) -> list[Path]:
    """Files under ``root`` (depth <= max_depth) whose name matches, shallowest first."""
    return _breadth_first(root, pattern, max_depth, dirs=False)


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``.nii``, also matching a different letter case."""
    for suffix in NIFTI_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    try:
        names = {name.lower(): name for name in os.listdir(folder)}
    except OSError:
        return None
    for suffix in NIFTI_SUFFIXES:
        if f"{stem}{suffix}".lower() in names:
            return folder / names[f"{stem}{suffix}".lower()]
    return None


def read_table(path: Path) -> pd.DataFrame:
    """A source CSV as trimmed strings (ids keep zero padding), tolerant of a BOM and ';' separators."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = path.read_bytes().decode("latin-1")  # Excel exports on Windows
    header = text.replace("\r\n", "\n").split("\n", 1)[0]
    sep = ";" if header.count(";") > header.count(",") else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as err:
        raise ManifestError(f"{path}: not a readable CSV ({str(err).strip().splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.apply(lambda col: col.str.strip())


def column(frame: pd.DataFrame, path: Path, *names: str, required: bool = True) -> str | None:
    """The frame's column matching one of ``names`` case- and space-insensitively."""
    lookup = {norm(c).replace(" ", "_"): c for c in frame.columns}
    for name in names:
        key = norm(name).replace(" ", "_")
        if key in lookup:
            return lookup[key]
    if required:
        raise ManifestError(f"{path}:1:{names[0]}: column missing (found: {', '.join(frame.columns)})")
    return None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return str(int(value)) if value.is_integer() else f"{value:.10g}"
    return str(value)


def write_manifest(rows: Iterable[dict[str, Any]], out: Path, force: bool, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Write canonical rows atomically; paths inside ``out``'s folder are written relative to it.

    Raises:
        ManifestError: ``out`` exists and not ``force``. DataError: no rows to write.
    """
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ManifestError(f"{out}: already exists; pass --force (force=True) to overwrite it")
    frame = pd.DataFrame(list(rows), columns=list(COLUMNS) + list(extra))
    if frame.empty:
        raise DataError(f"{out}: nothing to write: no usable exams were found")
    folder = out.resolve().parent
    for col in PATH_COLUMNS:
        frame[col] = [_relative(p, folder) for p in frame[col].fillna("")]
    text = frame.apply(lambda col: col.map(_cell)).to_csv(index=False, lineterminator="\n")
    atomic_write_text(out, text)
    return frame


def _relative(path: str, folder: Path) -> str:
    if not path:
        return ""
    absolute = Path(path).resolve()
    try:
        return absolute.relative_to(folder).as_posix()
    except ValueError:
        return str(absolute)
