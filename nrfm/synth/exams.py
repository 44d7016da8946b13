"""The exam table of a synthetic cohort: patients, exams, reported labels, the fixed test set and its enrichment.

:func:`exam_table` draws each site's patients (:func:`nrfm.synth.markers.sample_patients`), marks a fixed
number of them (:func:`fixed_test_counts`) ``split = test`` at random, adds follow-up exams (no survival on them,
as the importers do), the oracle posteriors and which labels are reported (missing at random per site and
endpoint, except 1p/19q, tested mainly in IDH-mutant tumours).

**Test-set enrichment** (``test_min_positives`` = k > 0). A random test set of realistic size holds few
positives of a rare marker (1p/19q at UCSF: about 7 of 160 patients; IDH mutation at a glioblastoma-only site:
about 2), too few for an AUC to decide anything. For each site and binary marker that occurs there (at least one
reported positive among the site's patients) with fewer than k reported positives among the test exams, patients
are drawn from the same site model conditional on that marker being positive (rejection sampling from
:func:`~nrfm.synth.markers.sample_patients` with a generator of their own, so the rest of the cohort is
unchanged) and added to the test set, one exam each, with that label reported, until k is reached (at most
:data:`MAX_ENRICHMENT_DRAWS` draws per site and marker). Their ``enriched_for`` column names the marker. This
changes the test prevalence of those markers (AUC and balanced accuracy do not depend on it; predictive values
would) and never the training data; ``cohort.json`` records what was added.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

from nrfm.config import BINARY_ENDPOINTS, ENDPOINTS
from nrfm.synth.markers import log_hazard, oracle_posterior, sample_patients
from nrfm.synth.sites import SiteTemplate

MIN_NON_TEST_SHARE = 0.15  # a site's fixed test set never takes more than 85 % of its patients
CODEL_TESTED_IDH_MUTANT = 0.92  # 1p/19q is tested mainly in IDH-mutant tumours (missing not at random)
CODEL_TESTED_IDH_WILDTYPE_MAX = 0.2  # ... and in at most this share of IDH-wildtype ones
MAX_ENRICHMENT_DRAWS = 200_000  # candidate patients drawn per site and marker before giving up
_BATCH = 512


def _finish(exams: pd.DataFrame, site: SiteTemplate, seed: int, key: int, rng: np.random.Generator) -> pd.DataFrame:
    """Subject ids, scan seeds, oracle posteriors, reported-label flags and the true log-hazard of ``exams``."""
    exams["subject_id"] = exams["patient_id"] + "_" + exams["exam"].map("{:02d}".format)
    exams["site"] = site.name
    exams["scan_seed"] = [[seed, key, int(i), int(e)] for i, e in zip(exams["patient_index"], exams["exam"])]
    post = oracle_posterior(exams, site)
    for e in BINARY_ENDPOINTS:
        exams[f"oracle_{e}"] = post[e].to_numpy()
    for e in ENDPOINTS:  # reported labels: missing at random per site and endpoint, except 1p/19q (below)
        exams[f"observed_{e}"] = rng.random(len(exams)) >= site.missing[e]
    tested = np.where(exams["idh"] == 1, CODEL_TESTED_IDH_MUTANT,
                      min(CODEL_TESTED_IDH_WILDTYPE_MAX, 1.0 - site.missing["codel_1p19q"]))
    exams["observed_codel_1p19q"] = rng.random(len(exams)) < tested
    exams["true_log_hazard"] = log_hazard(exams, site)
    return exams


def _patients(site: SiteTemplate, pats: pd.DataFrame, start: int, seed: int, key: int) -> pd.DataFrame:
    n = len(pats)
    pats = pats.reset_index(drop=True)
    pats["patient_id"] = [f"{site.name}-{i:04d}" for i in range(start + 1, start + n + 1)]
    pats["patient_index"] = np.arange(start, start + n)
    pats["tumour_seed"] = [[seed, key, i, 0] for i in range(start, start + n)]
    return pats


def enrichment_exams(site: SiteTemplate, exams: pd.DataFrame, seed: int, key: int, floor: int) -> pd.DataFrame:
    """Test-only exams that lift each occurring marker to ``floor`` reported test positives (module docstring)."""
    rng = np.random.default_rng([seed, key, 2])
    test = exams["split"] == "test"
    found, start = [], int(exams["patient_index"].max()) + 1 if len(exams) else 0
    for e in BINARY_ENDPOINTS:
        reported = (exams[e] == 1) & exams[f"observed_{e}"]
        deficit = floor - int((reported & test).sum())
        if not reported.any() or deficit <= 0:
            continue
        drawn = 0
        while deficit > 0 and drawn < MAX_ENRICHMENT_DRAWS:
            candidates = sample_patients(site, _BATCH, rng)
            drawn += _BATCH
            hits = candidates[candidates[e] == 1].head(deficit)
            found.append(hits.assign(enriched_for=e))
            deficit -= len(hits)
    if not found:
        return exams.iloc[:0]
    pats = _patients(site, pd.concat(found, ignore_index=True), start, seed, key)
    pats["split"], pats["exam"] = "test", 1
    out = _finish(pats, site, seed, key, rng)
    for e in BINARY_ENDPOINTS:  # the label the patient was drawn for is reported
        out.loc[out["enriched_for"] == e, f"observed_{e}"] = True
    return out


def fixed_test_size(n: int, wanted: int) -> int:
    """How many of a site's ``n`` patients are marked ``split = test`` when ``wanted`` are asked for: at most
    ``wanted``, leaving at least five and :data:`MIN_NON_TEST_SHARE` of them for train/val (which matters for
    small ``--sites`` counts)."""
    return min(int(wanted), max(n - max(5, math.ceil(MIN_NON_TEST_SHARE * n)), 0)) if wanted else 0


def fixed_test_counts(sites: list[tuple[SiteTemplate, int]], test_per_site: int = 0,
                      test_by_site: Mapping[str, int] | None = None) -> dict[str, int]:
    """Fixed test patients per site name: ``test_by_site`` where it names the site, else ``test_per_site``,
    capped by :func:`fixed_test_size`."""
    by_site = dict(test_by_site or {})
    return {s.name: fixed_test_size(n, by_site.get(s.name, test_per_site)) for s, n in sites}


def exam_table(sites: list[tuple[SiteTemplate, int]], seed: int, test_per_site: int = 0,
               test_min_positives: int = 0, test_by_site: Mapping[str, int] | None = None) -> tuple[pd.DataFrame, list]:
    """Patients and their exams for every site, with oracle posteriors, generator seeds and the test split.

    ``test_per_site`` patients of each site (``test_by_site[name]`` for the sites it names; both capped by
    :func:`fixed_test_size`) are marked ``split = test`` at random; the others get an empty split. Survival is
    reported on each patient's first exam only (as the importers do: follow-up exams carry none).
    ``test_min_positives``: the enrichment of the module docstring.
    """
    frames = []
    n_tests = fixed_test_counts(sites, test_per_site, test_by_site)
    for site, n in sites:
        key = zlib.crc32(site.name.encode("utf-8"))
        rng = np.random.default_rng([seed, key])
        pats = _patients(site, sample_patients(site, n, rng), 0, seed, key)
        n_test = n_tests[site.name]
        test = np.zeros(n, bool)
        test[np.random.default_rng([seed, key, 1]).permutation(n)[:n_test]] = True
        pats["split"] = np.where(test, "test", "")
        followup = rng.random(n) < site.followup_fraction
        fu = pats[followup].copy()
        label = fu[site.artifact_endpoint].to_numpy()
        fu["artifact"] = (rng.random(len(fu)) < np.where(label == 1, site.artifact_p[1], site.artifact_p[0])).astype(int)
        fu["os_days"], fu["os_event"] = np.nan, np.nan
        pats["exam"], fu["exam"] = 1, 2
        exams = pd.concat([pats, fu]).sort_values(["patient_id", "exam"], kind="stable").reset_index(drop=True)
        exams = _finish(exams, site, seed, key, rng)
        exams["enriched_for"] = ""
        if test_min_positives and n_test:
            exams = pd.concat([exams, enrichment_exams(site, exams, seed, key, test_min_positives)], ignore_index=True)
        frames.append(exams)
    return pd.concat(frames, ignore_index=True), [s for s, _ in sites]
