"""The two scenarios of the synthetic cohort and the latent-level check of what each plants.

The cohort is a controlled experiment: the two scenarios have the same sites, sizes, populations, label
prevalences, scanners and protocol distributions; only the planted mechanism differs.

``site-shift`` (default): the minority-group structure group DRO is built for (Sagawa et al. 2020,
Waterbirds), in medical form.

- A salient, site-linked cue: a ghost artifact (a copy of the head shifted by half the phase-encoding field
  of view, :data:`nrfm.synth.anatomy.GHOST`: it survives cropping and z-scoring, and the pretrained embeddings
  carry it, see notebook 02's cue check). At every site except the smallest it agrees with the EGFR label in most exams
  (P(cue | EGFR amplified) = 0.85, P(cue | not) = 0.15); at the smallest site it is reversed (0.15 / 0.85).
  ERM on the pooled training data leans on it and loses at the smallest site; a model that weights the
  (site x class) groups cannot ignore the smallest site's groups, where the cue misleads.
- A phenotype that differs at the smallest site: EGFR amplification widens the oedema everywhere else
  (+0.7 on the oedema latent) and not there (0); its other sign, a larger tumour, stays.
- Survival: the hazard weight of tumour size is 0.15 everywhere else and 0.6 at the smallest site.

``no-shift``: the same cue at the same per-site rate, independent of every label; the same phenotype and
hazard model at every site.

"Smallest site" = the site with the fewest patients left for training (its patients in the site spec minus
its fixed test set; the last one on a tie): the smallest training site, which the claims name. With one
site there is no minority: the cue agrees with the label there (site-shift) or not (no-shift).

Before rendering, :func:`latent_dro_check` fits an ERM and a group-DRO logistic model (Sagawa et al. 2020,
Algorithm 1, full batch, groups = site x label) on the non-test exams' latents (the latents the marker's
phenotype drives, for EGFR size and oedema, and the cue; true labels, since missingness is not part of
the plant) for each affected marker and scores both on the smallest site's test exams. ``latent_dro_gain`` = mean over the
affected markers of AUC(DRO) - AUC(ERM) there; it is written to cohort.json.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pandas as pd

from nrfm.errors import ConfigError
from nrfm.synth.sites import SiteTemplate

SCENARIOS = ("site-shift", "no-shift")
CUE_ENDPOINT = "egfr"
CUE_AGREEMENT = 0.85  # P(cue | label 1) = P(no cue | label 0) where the cue agrees with the label
PHENOTYPE_SHIFT = (("edema", "egfr", 0.0),)  # at the smallest site: EGFR amplification without extra oedema
HAZARD_SHIFT = (("size", 0.6),)  # at the smallest site
AFFECTED = ("egfr",)


def check_scenario(scenario: str) -> str:
    if scenario not in SCENARIOS:
        raise ConfigError(f"scenario: unknown scenario {scenario!r}; valid: {list(SCENARIOS)}")
    return scenario


def smallest_site(site_list: list[tuple[SiteTemplate, int]], test: Mapping[str, int] | None = None) -> str | None:
    """Name of the site with the fewest patients left for training, its patients minus its fixed test set
    ``test[name]`` (last on a tie); None for a single site."""
    if len(site_list) < 2:
        return None
    left = [(s.name, n - (test or {}).get(s.name, 0)) for s, n in site_list]
    fewest = min(n for _, n in left)
    return [name for name, n in left if n == fewest][-1]


def apply_scenario(site_list: list[tuple[SiteTemplate, int]], scenario: str, prevalence: dict[str, float],
                   test: Mapping[str, int] | None = None) -> tuple[list[tuple[SiteTemplate, int]], dict]:
    """Site templates with the scenario's cue, phenotype and hazard model; and a description of the plant.

    Args:
        site_list: (template, patients) pairs from :func:`nrfm.synth.sites.parse_site_spec`.
        scenario: ``site-shift`` or ``no-shift``.
        prevalence: configured prevalence of :data:`CUE_ENDPOINT` per site name (sets the cue rate, the
            same in both scenarios).
        test: fixed test patients per site name (:func:`nrfm.synth.exams.fixed_test_counts`): the plant goes to
            the site with the fewest patients left for training.
    """
    check_scenario(scenario)
    small = smallest_site(site_list, test)
    out = []
    for site, n in site_list:
        pi = prevalence[site.name]
        agree = CUE_AGREEMENT if site.name != small else 1.0 - CUE_AGREEMENT
        p_label = (1.0 - agree, agree)  # P(cue | label 0), P(cue | label 1)
        if scenario == "site-shift":
            new = replace(site, artifact_endpoint=CUE_ENDPOINT, artifact_p=p_label,
                          phenotype_shift=PHENOTYPE_SHIFT if site.name == small else (),
                          hazard_shift=HAZARD_SHIFT if site.name == small else ())
        else:  # the same marginal cue rate, label-free
            rate = round(float(p_label[0] * (1 - pi) + p_label[1] * pi), 4)
            new = replace(site, artifact_endpoint=CUE_ENDPOINT, artifact_p=(rate, rate), phenotype_shift=(),
                          hazard_shift=())
        out.append((new, n))
    plan = {"name": scenario, "smallest_site": small, "cue": "ghost artifact (oracle.csv 'artifact')",
            "cue_endpoint": CUE_ENDPOINT, "affected_endpoints": list(AFFECTED),
            "cue_p": {s.name: {"p_if_label0": s.artifact_p[0], "p_if_label1": s.artifact_p[1]} for s, _ in out},
            "phenotype_shift": {s.name: [list(t) for t in s.phenotype_shift] for s, _ in out if s.phenotype_shift},
            "hazard_shift": {s.name: [list(t) for t in s.hazard_shift] for s, _ in out if s.hazard_shift}}
    return out, plan


def group_dro_logistic(x: np.ndarray, y: np.ndarray, groups: np.ndarray, dro: bool, l2: float = 1e-2,
                        steps: int = 1500, lr: float = 0.5, eta: float = 0.005) -> np.ndarray:
    """Full-batch logistic regression; ``dro``: the group DRO objective of Sagawa et al. 2020 (Algorithm 1).

    Returns the weights (bias last). ERM minimises the mean loss; group DRO keeps weights q over the groups,
    q_g <- q_g exp(eta loss_g) renormalised after each step, and descends sum_g q_g loss_g.
    """
    xb = np.column_stack([x, np.ones(len(x))])
    w = np.zeros(xb.shape[1])
    ids, inv = np.unique(groups, return_inverse=True)
    counts = np.bincount(inv, minlength=len(ids)).astype(float)
    q = np.full(len(ids), 1.0 / len(ids))
    for _ in range(steps):
        z = xb @ w
        p = 1.0 / (1.0 + np.exp(-z))
        loss = np.logaddexp(0.0, z) - y * z
        if dro:
            group_loss = np.bincount(inv, weights=loss, minlength=len(ids)) / counts
            q = q * np.exp(eta * group_loss)
            q /= q.sum()
            weight = (q / counts)[inv]
        else:
            weight = np.full(len(y), 1.0 / len(y))
        grad = xb.T @ (weight * (p - y))
        grad[:-1] += l2 * w[:-1]
        w -= lr * grad
    return w


def latent_dro_check(exams: pd.DataFrame, plan: dict, latent_columns: list[str]) -> dict:
    """ERM vs group DRO on the latents, fitted on non-test exams and scored on the smallest site's test exams.

    Args:
        exams: the generator's exam table (labels, ``observed_<endpoint>``, ``f_*`` latents, ``artifact``,
            ``site``, ``split``).
        plan: from :func:`apply_scenario`.
        latent_columns: per affected endpoint, the latent columns its phenotype drives (the cue ``artifact``
            is added): a small model, so that with few minority-site exams the two fits differ by the plant,
            not by noise.
    Returns:
        {"latent_dro_gain": float or None, "per_endpoint": {endpoint: {"erm_auc", "dro_auc", "n", "n_pos"}}}
    """
    from sklearn.metrics import roc_auc_score

    small = plan["smallest_site"]
    if small is None:
        return {"latent_dro_gain": None, "per_endpoint": {}}
    per, gains = {}, []
    for e in plan["affected_endpoints"]:
        cols = list(latent_columns[e]) + ["artifact"]
        known = np.ones(len(exams), bool)  # the generator's true labels: missingness is not part of the plant
        train = known & (exams["split"] != "test").to_numpy()
        test = known & (exams["split"] == "test").to_numpy() & (exams["site"] == small).to_numpy()
        y_test = exams.loc[test, e].to_numpy(int)
        if train.sum() < 10 or not 0 < y_test.sum() < len(y_test):
            continue
        x = exams[cols].to_numpy(float)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
        x = (x - mu) / sd
        y = exams[e].to_numpy(float)
        groups = (exams["site"] + ":" + exams[e].astype(int).astype(str)).to_numpy()
        row = {"n": int(test.sum()), "n_pos": int(y_test.sum()), "features": cols}
        for name, dro in (("erm_auc", False), ("dro_auc", True)):
            w = group_dro_logistic(x[train], y[train], groups[train], dro)
            row[name] = round(float(roc_auc_score(y_test, x[test] @ w[:-1])), 4)
        per[e] = row
        gains.append(row["dro_auc"] - row["erm_auc"])
    return {"latent_dro_gain": round(float(np.mean(gains)), 4) if gains else None, "per_endpoint": per,
            "model": "logistic regression on the standardised latents the marker drives and the cue, L2 0.01; group DRO over "
                     "(site x label) groups, eta 0.005 (Sagawa et al. 2020, Algorithm 1, full batch); "
                     "fitted on non-test exams, scored on the smallest site's test exams"}
