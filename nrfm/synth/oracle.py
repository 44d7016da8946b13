"""The synthetic cohort's ground truth, written next to its manifest.

``oracle.csv`` holds each subject's true probability (binary markers) or value (continuous markers);
``oracle_auc.csv`` the AUC those probabilities reach per endpoint and site, a *latent* bound (the generator's
latents, not what the images show at the pipeline's resolution); ``oracle_cindex.csv`` the c-index of the true
log-hazard per site; the held-out floor table counts test exams, events and labelled positives per site.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from nrfm.schema import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS


def oracle_table(exams: pd.DataFrame) -> pd.DataFrame:
    """Long table subject_id, endpoint, value: the true probability or value of every endpoint per exam."""
    cols = {e: exams[f"oracle_{e}"].round(6) for e in BINARY_ENDPOINTS}
    cols.update({e: exams[e].round(3) for e in CONTINUOUS_ENDPOINTS})
    cols["artifact"] = exams["artifact"]
    values = np.column_stack([np.asarray(v, dtype=float) for v in cols.values()])  # (exams, endpoints)
    return pd.DataFrame({"subject_id": np.repeat(exams["subject_id"].to_numpy(), len(cols)),
                         "endpoint": np.tile(list(cols), len(exams)), "value": values.ravel()})


def oracle_auc_table(exams: pd.DataFrame, site_names: list[str]) -> pd.DataFrame:
    """AUC of the oracle probability against the reported labels, per binary endpoint and site (+ ``all``).

    The oracle conditions on the generator's latents, so this is a *latent bound* (column ``bound``), not the
    best a model can achieve from the images: noise, resampling and sub-voxel cues lose information.
    ``n_test`` / ``n_pos_test`` / ``auc_test``: the same on the manifest's fixed test exams.
    """
    from sklearn.metrics import roc_auc_score

    def auc_of(sel):
        y, p = exams.loc[sel, e].to_numpy(), exams.loc[sel, f"oracle_{e}"].to_numpy()
        n_pos = int(y.sum())
        return int(len(y)), n_pos, round(float(roc_auc_score(y, p)) if 0 < n_pos < len(y) else math.nan, 4)

    test = exams["split"] == "test"
    rows = []
    for e in BINARY_ENDPOINTS:
        for site in list(site_names) + ["all"]:
            sel = exams[f"observed_{e}"] & ((exams["site"] == site) if site != "all" else True)
            n, n_pos, auc = auc_of(sel)
            n_t, n_pos_t, auc_t = auc_of(sel & test)
            rows.append({"endpoint": e, "site": site, "n": n, "n_pos": n_pos, "auc": auc, "bound": "latent",
                         "n_test": n_t, "n_pos_test": n_pos_t, "auc_test": auc_t})
    return pd.DataFrame(rows)


def oracle_cindex_table(exams: pd.DataFrame, site_names: list[str]) -> pd.DataFrame:
    """Harrell's c-index of the true log-hazard (the generator's linear predictor) per site (+ ``all``).

    One row per site and subset (``all`` patients, ``test`` patients), on each patient's survival exam:
    n, events, c_index. Like the oracle AUC, a latent bound for survival models.
    """
    from lifelines.utils import concordance_index

    surv = exams.dropna(subset=["os_days", "os_event"])
    rows = []
    for site in list(site_names) + ["all"]:
        part = surv if site == "all" else surv[surv["site"] == site]
        for subset, sub in (("all", part), ("test", part[part["split"] == "test"])):
            events = int(sub["os_event"].sum())
            c = (concordance_index(sub["os_days"], -sub["true_log_hazard"], sub["os_event"])
                 if events > 0 and len(sub) > 1 else math.nan)
            rows.append({"site": site, "subset": subset, "n": int(len(sub)), "events": events,
                         "c_index": round(float(c), 4), "bound": "latent"})
    return pd.DataFrame(rows)


def held_out_floor_table(exams: pd.DataFrame, site_names: list[str]) -> pd.DataFrame:
    """What the fixed test set can decide: per site, test exams, survival events, labelled positives per marker.

    ``exists`` = the marker is reported positive in at least one of the site's exams (any split): the rule of
    the test-set enrichment (:mod:`nrfm.synth.exams`), which lifts every such marker to the profile's floor.
    """
    rows = []
    for site in site_names:
        everything = exams[exams["site"] == site]
        part = everything[everything["split"] == "test"]
        for e in BINARY_ENDPOINTS:
            known = part[part[f"observed_{e}"]]
            rows.append({"site": site, "endpoint": e, "test_exams": int(len(part)),
                         "test_events": int(part["os_event"].fillna(0).sum()), "n_known": int(len(known)),
                         "n_pos": int(known[e].sum()), "prevalence": round(float(part[e].mean()), 4)
                         if len(part) else math.nan,
                         "enriched": int((part["enriched_for"] == e).sum()) if "enriched_for" in part else 0,
                         "exists": bool(((everything[e] == 1) & everything[f"observed_{e}"]).any())})
    table = pd.DataFrame(rows)
    return table
