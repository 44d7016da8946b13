"""The vocabulary every stage shares: contrasts, endpoints and the canonical manifest's columns.

Endpoint names are the same everywhere (manifest columns, CSVs, configs, notebooks). Adding an endpoint means
adding it here (binary or continuous), giving it a column in the importers' mappings
(``nrfm/data/importers/``) and, for the synthetic cohort, a marker in ``nrfm/synth/markers.py``.
"""
from __future__ import annotations

CONTRASTS = ("t1", "t1c", "t2", "flair")  # the four structural MRI contrasts, in channel order

BINARY_ENDPOINTS = ("mgmt", "idh", "codel_1p19q", "egfr", "atrx", "tp53", "cdkn2ab", "tert")
CONTINUOUS_ENDPOINTS = ("ki67", "tp53_ihc")  # percent of positive nuclei (also reported binarized)
ENDPOINTS = BINARY_ENDPOINTS + CONTINUOUS_ENDPOINTS

# The canonical manifest (data_manifests/README.md): one row per exam.
IMAGE_COLUMNS = CONTRASTS
PATH_COLUMNS = IMAGE_COLUMNS + ("seg",)  # seg: BraTS labels 1 necrotic core, 2 oedema, 4 enhancing
SURVIVAL_COLUMNS = ("os_days", "os_event")
MANIFEST_COLUMNS: tuple[str, ...] = (("subject_id", "patient_id", "site", "split") + PATH_COLUMNS
                                     + ("age", "sex", "grade") + ENDPOINTS + SURVIVAL_COLUMNS)
REQUIRED_COLUMNS = ("subject_id", "patient_id", "site") + IMAGE_COLUMNS
STRING_COLUMNS = ("subject_id", "patient_id", "site", "split") + PATH_COLUMNS + ("sex",)
NUMERIC_COLUMNS = ("age", "grade") + ENDPOINTS + SURVIVAL_COLUMNS
SPLITS = ("train", "val", "test")
