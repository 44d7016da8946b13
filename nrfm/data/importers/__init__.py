"""Importers: public cohort downloads -> the canonical manifest (``nrfm import KIND --root DIR --out CSV``).

Each importer reads the cohort's own table and file layout (``data_manifests/<cohort>.md``), reports which
source values it mapped to which label, which exams it dropped and why, keeps going past a single bad exam,
refuses to overwrite ``out`` unless ``force``, and writes the manifest atomically. :func:`merge_manifests` joins manifests without counting a patient twice.

Example::

    report = import_cohort("upenn-gbm", Path("~/data/UPENN-GBM"), Path("manifests/upenn.csv"))
    print(report.format())
"""
from __future__ import annotations

from pathlib import Path

from nrfm.errors import ManifestError, NrfmError
from nrfm.data.importers.brats import import_brats
from nrfm.data.importers.common import ImportReport
from nrfm.data.importers.merge import merge_manifests
from nrfm.data.importers.ucsf import import_ucsf_pdgm
from nrfm.data.importers.upenn import import_upenn_gbm

KINDS = ("ucsf-pdgm", "upenn-gbm", "brats2021", "brats2023")

__all__ = ["KINDS", "ImportReport", "UnknownCohortError", "import_cohort", "merge_manifests"]


class UnknownCohortError(NrfmError, ValueError):
    """An importer name that does not exist (lists the valid ones)."""


def import_cohort(kind: str, root: Path, out: Path, mgmt_labels: Path | None = None, force: bool = False,
                  progress: bool = True) -> ImportReport:
    """Import one public cohort into a canonical manifest.

    Args:
        kind: one of :data:`KINDS`.
        root: the downloaded cohort folder (the importer searches up to 3 levels down for its files).
        out: manifest to write; image paths inside its folder are written relative to it, others absolute.
        mgmt_labels: RSNA-MICCAI ``train_labels.csv`` (brats2021 only).
        force: overwrite an existing ``out``.
        progress: tqdm bar over exams.

    Raises:
        UnknownCohortError: unknown ``kind``. DataError: ``root`` is not that cohort (says what was looked
            for). ManifestError: ``out`` exists without ``force``, or a source table lacks a required column.
    """
    if kind not in KINDS:
        raise UnknownCohortError(f"unknown cohort {kind!r}; valid: {', '.join(KINDS)} (and `merge`)")
    if mgmt_labels is not None and kind != "brats2021":
        raise UnknownCohortError(f"--mgmt-labels applies to brats2021 only (the RSNA-MICCAI ids are BraTS 2021 "
                                 f"ids), not {kind}")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ManifestError(f"{out}: already exists; pass --force (force=True) to overwrite it")
    if kind == "ucsf-pdgm":
        return import_ucsf_pdgm(Path(root), out, force=force, progress=progress)
    if kind == "upenn-gbm":
        return import_upenn_gbm(Path(root), out, force=force, progress=progress)
    return import_brats(kind, Path(root), out, mgmt_labels=mgmt_labels, force=force, progress=progress)
