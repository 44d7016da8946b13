"""Can the models see the planted cue? A check to read before the DRO verdicts of a synthetic run.

The ``site-shift`` scenario (:mod:`nrfm.synth.scenarios`) plants a site-linked cue (a ghost artifact) that agrees with
the EGFR label at the large sites and is reversed at the smallest. Group DRO can only undo a shortcut the model
has taken: if a model's features do not carry the cue, ERM cannot lean on it and there is nothing for DRO to fix,
whatever the latent check (``latent_dro_gain``) says. :func:`cue_visibility` measures it directly: the 5-fold
cross-validated AUC (folds grouped by patient) of a logistic probe for the oracle's ``artifact`` flag (1 = the cue
is in the images) on each backbone's frozen pretrained embedding and on the handcrafted features, over every
exam of the run. 0.5 = the features do not carry the cue; near 1 = plainly visible.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from nrfm.errors import DataError, RunError
from nrfm.eval.site_invariance import load_embeddings
from nrfm.train.monitor import probe_auc

CUE = "artifact"  # the oracle's endpoint name for the planted cue


def cue_visibility(ctx, methods: Sequence[str], seed: int = 0) -> pd.DataFrame | None:
    """Rows: features (a backbone's pretrained embedding, or ``handcrafted``), cue_probe_auc, exams, note.

    None off synthetic data or for a cohort without the cue flag. Features whose artifact is missing are skipped
    with a note.
    """
    oracle = ctx.oracle
    if oracle is None or CUE not in set(oracle["endpoint"]):
        return None
    cue = oracle[oracle["endpoint"] == CUE].drop_duplicates("subject_id").set_index("subject_id")["value"]
    ids = ctx.manifest["subject_id"].astype(str)
    y = cue.reindex(ids).to_numpy(float)
    known = np.isfinite(y)
    groups = ctx.manifest["patient_id"].astype(str).to_numpy()
    rows = []

    def score(name: str, x: np.ndarray | None, note: str = "") -> None:
        auc = np.nan
        if x is not None:
            fill = np.nan_to_num(np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0)) if not np.isfinite(x).all() \
                else 0.0
            x = np.where(np.isfinite(x), x, fill)
            auc = probe_auc(x[known], y[known].astype(int), seed=seed, groups=groups[known])
        rows.append({"features": name, "cue_probe_auc": auc, "exams": int(known.sum()), "note": note})

    for method in methods:
        try:
            score(f"{method} (pretrained embedding)", load_embeddings(ctx, method, "pretrained"))
        except (RunError, DataError) as err:  # a missing or unreadable artifact: say so in the table, keep the others
            score(f"{method} (pretrained embedding)", None, f"not scored: {str(err).splitlines()[0][:120]}")
    path = ctx.layout.handcrafted_features()
    if path.is_file():
        table = pd.read_csv(path, dtype={"subject_id": str}).set_index("subject_id").reindex(ids)
        score("handcrafted features", table.to_numpy(float))
    return pd.DataFrame(rows, columns=["features", "cue_probe_auc", "exams", "note"])
