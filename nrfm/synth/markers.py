"""Joint marker model, imaging phenotype latents, survival and the exact oracle posterior.

Generative model per patient at site *s* (every number below is in :data:`MODEL`, written to cohort.json):

1. Class: IDH-wildtype, IDH-mutant astrocytoma (non-codeleted) or IDH-mutant 1p/19q-codeleted
   oligodendroglioma, with P(IDH-mutant) and P(codel | IDH-mutant) from the site template. So 1p/19q
   codeletion never occurs without IDH mutation.
2. WHO grade 2/3/4 given the class (site template).
3. Six binary markers given (class, grade), from :data:`MARKER_P` (rows: class; columns: grade 2, 3, 4),
   independent except ATRX and TP53, which are jointly drawn in astrocytoma (:data:`ATRX_TP53_ASTRO`):
   ATRX loss and TP53 mutation mostly in astrocytomas, EGFR amplification and TERT promoter mutation mostly
   IDH-wildtype (TERT also in oligodendroglioma, as in real tumours), CDKN2A/B deletion only in grade-4
   IDH-wildtype and grade-4 IDH-mutant astrocytoma (WHO 2021); MGMT methylation 40-60 % in IDH-wildtype
   (site template), higher with IDH mutation.
4. Continuous: log Ki-67 ~ N(log median_grade, 0.6) with medians 3 / 6 / 27 % (grade 2 / 3 / 4);
   log TP53-IHC ~ N(log 35 %, 0.5) if TP53-mutant else N(log 5 %, 0.6); both clipped to [0.1, 100] %.
   Age ~ N(62, 11) IDH-wildtype, N(41, 12) IDH-mutant (clipped to [18, 90] in the manifest); sex M 58 %.
5. Twelve phenotype latents f = B x(c) + Gaussian noise, where x(c) = [1, astro, oligo, grade3, grade4,
   mgmt, egfr, atrx, tp53, cdkn2ab, tert] and :data:`FEATURES` gives each row of B (plus Ki-67, TP53-IHC
   and age terms for heterogeneity, margin and atrophy). synth_anatomy renders each latent into the
   image with a strictly monotone map (its docstring lists them). A scenario may shift B at one site
   (``SiteTemplate.phenotype_shift``, see :mod:`nrfm.synth.scenarios`).
6. Artifact (the scenario's cue): Bernoulli with P(artifact | label of the site's artifact endpoint).
7. Survival: Weibull proportional hazards, shape :data:`SURVIVAL` ``shape``, baseline median 450 days,
   log-hazard = 0.25 (age-60)/10 - 0.9 idh - 0.45 mgmt - 1.0 grade2 - 0.5 grade3 + 0.15 f_size
   + 0.2 f_necrosis (a scenario may change one weight at one site, ``SiteTemplate.hazard_shift``);
   censoring = min(Uniform administrative follow-up, Exponential loss) per site.

Oracle: because Ki-67, TP53-IHC and age enter the latents linearly in Gaussian form, each latent given
the discrete configuration c = (class, grade, six markers) is Gaussian with a closed-form mean and
variance. The posterior P(marker = 1 | latents, artifact, site) is then computed exactly by enumerating
all 3 x 3 x 2^6 = 576 configurations (:func:`oracle_posterior`). It conditions on what the generator put
into the image, so it is a *latent* bound: image noise, resampling to the pipeline's grid and sub-voxel
cues lose information, and a model seeing only the images can fall short of it.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from nrfm.config import BINARY_ENDPOINTS
from nrfm.synth.sites import SiteTemplate

CLASSES = ("idh_wildtype", "astrocytoma", "oligodendroglioma")
GRADES = (2, 3, 4)
SIX = ("mgmt", "egfr", "atrx", "tp53", "cdkn2ab", "tert")
# P(marker | class, grade): rows wildtype, astro, oligo; columns grade 2, 3, 4 (mgmt wildtype row is per site)
MARKER_P = {
    "mgmt": ((np.nan,) * 3, (0.80, 0.80, 0.80), (0.92, 0.92, 0.92)),
    "egfr": ((0.20, 0.20, 0.45), (0.03, 0.03, 0.03), (0.02, 0.02, 0.02)),
    "atrx": ((0.06, 0.06, 0.06), (0.70, 0.70, 0.70), (0.03, 0.03, 0.03)),
    "tp53": ((0.25, 0.25, 0.30), (0.80, 0.80, 0.80), (0.06, 0.06, 0.06)),
    # WHO 2021: CDKN2A/B homozygous deletion only in IDH-wildtype glioblastoma and (defining grade 4) in
    # IDH-mutant astrocytoma; absent elsewhere in this model.
    "cdkn2ab": ((0.0, 0.0, 0.55), (0.0, 0.0, 0.45), (0.0, 0.0, 0.0)),
    "tert": ((0.50, 0.50, 0.72), (0.05, 0.05, 0.05), (0.92, 0.92, 0.92)),
}
# ATRX loss and TP53 mutation travel together in IDH-mutant astrocytoma: joint P(atrx, tp53 | astrocytoma)
# with the marginals of MARKER_P (0.70, 0.80); independent given (class, grade) in the other classes.
ATRX_TP53_ASTRO = {(1, 1): 0.65, (1, 0): 0.05, (0, 1): 0.15, (0, 0): 0.15}
X_NAMES = ("one", "astro", "oligo", "grade3", "grade4") + SIX
# Phenotype latents: coefficients on x(c), noise sd, and the continuous-latent term (name, weight).
FEATURES = {
    "location": ({"astro": 0.4, "oligo": 1.0}, 1.0, None),  # + = frontal
    "size": ({"grade3": 0.2, "grade4": 0.4, "egfr": 0.2}, 1.0, None),
    "necrosis": ({"one": -1.6, "grade3": 0.5, "grade4": 1.6, "cdkn2ab": 0.6, "astro": -0.3, "oligo": -0.3}, 0.7, None),
    "enhancement": ({"one": -0.6, "grade3": 0.4, "grade4": 1.3, "astro": -0.6, "oligo": -0.4}, 0.7, None),
    "edema": ({"egfr": 0.7, "grade4": 0.4, "astro": -0.5, "oligo": -0.3}, 0.8, None),
    "mismatch": ({"astro": 1.0}, 0.9, None),  # T2-FLAIR mismatch
    "calcification": ({"oligo": 1.5}, 0.8, None),
    "heterogeneity": ({}, 0.6, ("ki67", 0.9)),  # enhancement heterogeneity
    "margin": ({"atrx": 0.5, "tp53": 0.4}, 0.8, ("tp53_ihc", 0.3)),  # sharper margin
    "core_t2": ({"mgmt": 0.4}, 1.0, None),  # MGMT: weak
    "core_t1": ({"tert": 0.4}, 1.0, None),  # TERT: weak
    "atrophy": ({}, 0.6, ("age", 0.6)),
}
KI67_MEDIAN = {2: 3.0, 3: 6.0, 4: 27.0}
KI67_LOG_SD = 0.6
TP53_IHC = {0: (5.0, 0.6), 1: (35.0, 0.5)}  # median %, log sd
AGE = {0: (62.0, 11.0), 1: (41.0, 12.0)}  # by IDH status: mean, sd (years)
SURVIVAL = {"shape": 1.4, "median_days": 450.0, "age_per_10y": 0.25, "idh": -0.9, "mgmt": -0.45,
            "grade2": -1.0, "grade3": -0.5, "size": 0.15, "necrosis": 0.2}
P_MALE = 0.58
# Standardisation of the continuous latents inside the phenotype (z = (log value - centre) / scale).
_Z = {"ki67": (np.log(10.0), 1.0), "tp53_ihc": (np.log(12.0), 1.0), "age": (55.0, 15.0)}
MODEL = {"marker_p": MARKER_P, "atrx_tp53_astrocytoma": {f"atrx{a}_tp53{t}": q for (a, t), q in ATRX_TP53_ASTRO.items()},
         "features": FEATURES, "ki67_median": KI67_MEDIAN, "ki67_log_sd": KI67_LOG_SD, "tp53_ihc": TP53_IHC, "age": AGE, "survival": SURVIVAL, "p_male": P_MALE, "latent_z": _Z}


def configurations(site: SiteTemplate) -> tuple[np.ndarray, np.ndarray]:
    """All (class, grade, six markers) configurations and their prior at ``site``.

    Returns:
        x: (C, 11) design rows [1, astro, oligo, g3, g4, mgmt, egfr, atrx, tp53, cdkn2ab, tert], C = 576.
        prior: (C,) probabilities summing to 1.
    """
    p_class = (1 - site.p_idh_mutant, site.p_idh_mutant * (1 - site.p_codel_given_idh),
               site.p_idh_mutant * site.p_codel_given_idh)
    rows, prior = [], []
    for k, g, bits in itertools.product(range(3), range(3), itertools.product((0, 1), repeat=6)):
        p = p_class[k] * site.grade_given_class[k][g]
        for name, b in zip(SIX, bits):
            if k == 1 and name in ("atrx", "tp53"):
                continue
            q = site.p_mgmt_idh_wildtype if (name == "mgmt" and k == 0) else MARKER_P[name][k][g]
            p *= q if b else 1 - q
        if k == 1:
            p *= ATRX_TP53_ASTRO[(bits[SIX.index("atrx")], bits[SIX.index("tp53")])]
        rows.append((1, k == 1, k == 2, g == 1, g == 2) + bits)
        prior.append(p)
    return np.asarray(rows, dtype=float), np.asarray(prior)


def site_features(site: SiteTemplate) -> dict:
    """:data:`FEATURES` with the site's phenotype shift applied (``site.phenotype_shift``: (latent, term, coef))."""
    if not site.phenotype_shift:
        return FEATURES
    out = {name: (dict(coef), noise, cont) for name, (coef, noise, cont) in FEATURES.items()}
    for latent, term, value in site.phenotype_shift:
        out[latent][0][term] = value
    return out


def marker_latents(endpoints) -> dict[str, list[str]]:
    """Per endpoint, the latent columns (``f_<name>``) whose mean its label shifts in :data:`FEATURES`."""
    return {e: [f"f_{name}" for name, (coef, _, _) in FEATURES.items() if e in coef] for e in endpoints}


def feature_moments(x: np.ndarray, features: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean (C, F) and sd (F,) of the latents given configurations ``x``, continuous latents integrated out."""
    col = {n: i for i, n in enumerate(X_NAMES)}
    idh = x[:, col["astro"]] + x[:, col["oligo"]]
    means, sds = [], []
    for coef, noise, cont in (features or FEATURES).values():
        mean = sum(w * x[:, col[n]] for n, w in coef.items()) + np.zeros(len(x))
        var = noise ** 2
        if cont is not None:
            name, w = cont
            centre, scale = _Z[name]
            if name == "ki67":
                med = np.log(KI67_MEDIAN[2]) + x[:, col["grade3"]] * np.log(2.0) + x[:, col["grade4"]] * np.log(9.0)
                mu, sd = med, KI67_LOG_SD
            elif name == "tp53_ihc":
                t = x[:, col["tp53"]]
                mu = np.log(TP53_IHC[0][0]) * (1 - t) + np.log(TP53_IHC[1][0]) * t
                sd = np.sqrt(TP53_IHC[0][1] ** 2 * (1 - t) + TP53_IHC[1][1] ** 2 * t)
            else:
                mu = AGE[0][0] * (1 - idh) + AGE[1][0] * idh
                sd = np.sqrt(AGE[0][1] ** 2 * (1 - idh) + AGE[1][1] ** 2 * idh)
            mean = mean + w * (mu - centre) / scale
            var = var + (w * sd / scale) ** 2
        means.append(mean)
        sds.append(np.sqrt(var) * np.ones(len(x)))
    return np.stack(means, 1), np.stack(sds, 1)


def _endpoint_columns(x: np.ndarray) -> dict[str, np.ndarray]:
    col = {n: i for i, n in enumerate(X_NAMES)}
    out = {"idh": x[:, col["astro"]] + x[:, col["oligo"]], "codel_1p19q": x[:, col["oligo"]]}
    out.update({n: x[:, col[n]] for n in SIX})
    return out


def sample_patients(site: SiteTemplate, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw ``n`` patients at ``site``: markers, grade, clinical covariates, latents, artifact, survival.

    Columns: the eight binary endpoints, grade, ki67, tp53_ihc (true values, %), age, sex, one column per
    phenotype latent (``f_<name>``), ``artifact`` (0/1), os_days, os_event.
    """
    x, prior = configurations(site)
    idx = rng.choice(len(prior), size=n, p=prior / prior.sum())
    xs = x[idx]
    ends = _endpoint_columns(xs)
    col = {nm: i for i, nm in enumerate(X_NAMES)}
    grade = 2 + xs[:, col["grade3"]] + 2 * xs[:, col["grade4"]]
    log_ki = np.log([KI67_MEDIAN[int(g)] for g in grade]) + KI67_LOG_SD * rng.standard_normal(n)
    t = ends["tp53"].astype(int)
    log_p53 = np.log([TP53_IHC[v][0] for v in t]) + np.array([TP53_IHC[v][1] for v in t]) * rng.standard_normal(n)
    idh = ends["idh"].astype(int)
    age = np.array([AGE[v][0] for v in idh]) + np.array([AGE[v][1] for v in idh]) * rng.standard_normal(n)
    cont = {"ki67": log_ki, "tp53_ihc": log_p53, "age": age}
    df = pd.DataFrame({k: v.astype(int) for k, v in ends.items()})[list(BINARY_ENDPOINTS)]
    df["grade"] = grade.astype(int)
    df["ki67"] = np.clip(np.exp(log_ki), 0.1, 100.0)
    df["tp53_ihc"] = np.clip(np.exp(log_p53), 0.1, 100.0)
    df["age_latent"] = age
    df["age"] = np.clip(np.round(age), 18, 90).astype(int)
    df["sex"] = np.where(rng.random(n) < P_MALE, "M", "F")
    for name, (coef, noise, contribution) in site_features(site).items():
        value = sum(w * xs[:, col[c]] for c, w in coef.items()) + noise * rng.standard_normal(n)
        if contribution is not None:
            cname, w = contribution
            centre, scale = _Z[cname]
            value = value + w * (cont[cname] - centre) / scale
        df[f"f_{name}"] = value
    label = df[site.artifact_endpoint].to_numpy()
    df["artifact"] = (rng.random(n) < np.where(label == 1, site.artifact_p[1], site.artifact_p[0])).astype(int)
    df["os_days"], df["os_event"] = sample_survival(df, site, rng)
    return df


def site_survival(site: SiteTemplate | None) -> dict:
    """:data:`SURVIVAL` with the site's hazard shift applied (``site.hazard_shift``: (term, weight) pairs)."""
    out = dict(SURVIVAL)
    if site is not None:
        out.update(dict(site.hazard_shift))
    return out


def log_hazard(df: pd.DataFrame, site: SiteTemplate | None = None) -> np.ndarray:
    """Linear predictor of the Weibull proportional-hazards survival model (see :data:`SURVIVAL`)."""
    s = site_survival(site)
    return (s["age_per_10y"] * (df["age_latent"] - 60.0) / 10.0 + s["idh"] * df["idh"] + s["mgmt"] * df["mgmt"]
            + s["grade2"] * (df["grade"] == 2) + s["grade3"] * (df["grade"] == 3) + s["size"] * df["f_size"]
            + s["necrosis"] * df["f_necrosis"]).to_numpy(dtype=float)


def sample_survival(df: pd.DataFrame, site: SiteTemplate, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Weibull PH event times, censored by site follow-up; returns (os_days >= 1, os_event 0/1)."""
    k, median = SURVIVAL["shape"], SURVIVAL["median_days"]
    lam = np.log(2.0) / median ** k  # baseline hazard H0(t) = lam t^k, so median(lp = 0) = median_days
    n = len(df)
    event_t = (-np.log(rng.random(n)) / (lam * np.exp(log_hazard(df, site)))) ** (1.0 / k)
    censor_t = np.minimum(rng.uniform(*site.censor_days, size=n), rng.exponential(site.loss_mean_days, size=n))
    days = np.maximum(1, np.ceil(np.minimum(event_t, censor_t))).astype(int)
    return days, (event_t <= censor_t).astype(int)


def oracle_posterior(df: pd.DataFrame, site: SiteTemplate) -> pd.DataFrame:
    """Exact P(marker = 1 | phenotype latents, artifact, site) for the eight binary endpoints.

    Args:
        df: rows from :func:`sample_patients` (needs the ``f_*`` latents and ``artifact``).
        site: the site whose prior and artifact model generated the rows.
    Returns:
        (N, 8) DataFrame with one probability column per binary endpoint, same index as ``df``.
    """
    x, prior = configurations(site)
    keep = prior > 0
    x, prior = x[keep], prior[keep]
    mean, sd = feature_moments(x, site_features(site))  # (C, F)
    f = df[[f"f_{n}" for n in FEATURES]].to_numpy(dtype=float)  # (N, F)
    ends = _endpoint_columns(x)
    label = ends[site.artifact_endpoint]
    p_art = np.where(label == 1, site.artifact_p[1], site.artifact_p[0])
    art = df["artifact"].to_numpy()[:, None]
    ind = np.stack([ends[e] for e in BINARY_ENDPOINTS], 1)  # (C, 8)
    out = np.empty((len(df), len(BINARY_ENDPOINTS)))
    for lo in range(0, len(df), 1024):  # chunks keep the (rows, C, F) array small
        z = (f[lo:lo + 1024, None, :] - mean[None]) / sd[None]
        logpost = -0.5 * (z ** 2).sum(-1) - np.log(sd).sum(-1)[None] + np.log(prior)[None]
        logpost += np.log(np.where(art[lo:lo + 1024] == 1, p_art[None], 1 - p_art[None]))
        logpost -= logpost.max(1, keepdims=True)
        post = np.exp(logpost)
        out[lo:lo + 1024] = (post @ ind) / post.sum(1, keepdims=True)
    return pd.DataFrame(out, columns=list(BINARY_ENDPOINTS), index=df.index)


def marginal_prevalence(site: SiteTemplate) -> dict[str, float]:
    """Configured prevalence of each binary endpoint (and grade shares) at ``site``, from the prior."""
    x, prior = configurations(site)
    out = {e: float(prior @ v) for e, v in _endpoint_columns(x).items()}
    col = {n: i for i, n in enumerate(X_NAMES)}
    out["grade4"] = float(prior @ x[:, col["grade4"]])
    out["grade3"] = float(prior @ x[:, col["grade3"]])
    return {k: out[k] for k in (*BINARY_ENDPOINTS, "grade3", "grade4")}
