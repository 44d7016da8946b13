"""Overall survival of IDH-wildtype glioblastoma from fine-tuned embeddings: Cox (ERM) versus DRO Cox head.

NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416, survival analysis) reports per-site c-indices that rise
from ERM to DRO fine-tuning (CUIMC 0.592 -> 0.597, UPenn 0.647 -> 0.672, UCSF 0.600 -> 0.627).

Cohort, one row per PATIENT: IDH-wildtype (``idh == 0``) grade-4 tumours (grade may be unknown; a known grade
other than 4 is excluded) with ``os_days > 0`` and a known ``os_event``. Survival is timed from the baseline exam,
so a patient contributes exactly one exam, the first in manifest order that carries survival (the canonical
manifest has no exam date: the importers give survival only to the baseline exam, UPenn ``_11`` and the UCSF base
exam, and ``nrfm synth`` lists exam ``01`` before ``02``); later exams of that patient carry none. IDH and grade
are tumour properties, so a value missing on that exam is taken from the patient's other exams (first known value
in manifest order).

Features (identical for both objectives): the fine-tuned embedding reduced by a PCA fitted on the TRAINING
cohort subjects (``survival_pca_components``), plus age if ``survival_use_age`` (missing ages get the training
median), all standardized with training statistics.

The comparison, ``objective`` in ``metrics/survival.csv``:

* ``erm``: ERM-tuned embedding + lifelines ``CoxPHFitter(strata=["site"])``: one linear risk score, a baseline
  hazard per site, risk sets within each site (Efron ties), the per-site partial likelihoods simply summed.
* ``dro``: DRO-tuned embedding + :class:`DROCoxHead`, the same site-stratified Cox model (risk sets never mix
  sites), the per-site losses combined by :class:`nrfm.train.dro.GroupDRO` weights over sites instead of summed.

The site loss the DRO weights see is size-free (:func:`site_cox_losses`): the per-event log partial-likelihood
ratio against the null model (risk 0). The raw per-site negative log partial likelihood grows with the log of the
risk-set sizes and with the number of events, so on the default cohort the weights went to the biggest site
(CUIMC 0.01, UCSF 0.17, UPenn 0.82) for its size, not its difficulty.

Both use the same cohort, splits, features, site strata and L2 penalty grid, with the penalty chosen by the
validation c-index; both penalize ``penalizer * ||w||^2 / 2`` on standardized features (lifelines scales its
log-likelihood per subject, the DRO head per event: the validation choice absorbs the difference), so the only
differences are the embedding and the objective (sum of site likelihoods versus group DRO over sites).

Evaluation on the TEST cohort, per site and ``all``: Harrell's c-index (``lifelines.utils.concordance_index``
expects higher = longer survival, so it gets ``-risk``) with a percentile bootstrap CI, and the log-rank test
of predicted high versus low risk split at the TRAINING median risk. The test risk scores are written to
``artifacts/survival_risk_{backbone}_{objective}.csv`` (:func:`survival_risk_path`; columns
:data:`RISK_COLUMNS`), one row per test patient, for paired comparisons of the objectives.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from nrfm.eval import bootstrap
from nrfm.eval.site_invariance import load_embeddings
from nrfm.files import atomic_write_csv
from nrfm.train.dro import GroupDRO

SURVIVAL_COLUMNS = ("backbone", "objective", "site", "n", "events", "c_index", "ci_low", "ci_high", "logrank_p")
EXTRA_COLUMNS = ("note", "model", "penalizer", "n_train", "train_events", "n_features")
MODELS = {"erm": "coxph_site_strata", "dro": "dro_cox_head"}
RISK_COLUMNS = ("subject_id", "patient_id", "site", "os_days", "os_event", "risk", "high_risk")


# ---- cohort and features --------------------------------------------------------------------------------------
def survival_cohort(manifest: pd.DataFrame) -> np.ndarray:
    """Boolean mask (n_rows,): the survival exam of each IDH-wildtype grade-4 (or unknown grade) patient.

    One row per patient (see the module docstring): the patient's first exam in manifest order with
    ``os_days > 0`` and a known ``os_event``; IDH and grade come from that exam or, where missing there, from the
    patient's first exam that has them. Without a ``patient_id`` column every row is its own patient.
    """
    grade = pd.to_numeric(manifest["grade"], errors="coerce")
    days = pd.to_numeric(manifest["os_days"], errors="coerce")
    event = pd.to_numeric(manifest["os_event"], errors="coerce")
    idh = pd.to_numeric(manifest["idh"], errors="coerce")
    patient = (manifest["patient_id"].astype(str) if "patient_id" in manifest
               else pd.Series(np.arange(len(manifest)).astype(str), index=manifest.index))
    # tumour properties known on any exam of the patient fill the survival exam's gaps
    idh = idh.fillna(idh.groupby(patient).transform("first"))
    grade = grade.fillna(grade.groupby(patient).transform("first"))
    has_survival = (days > 0) & event.isin([0, 1])
    first = has_survival & (has_survival.astype(int).groupby(patient).cumsum() == 1)
    return ((idh == 0) & (grade.isna() | (grade == 4)) & first).to_numpy()


def survival_features(embedding: np.ndarray, age: np.ndarray | None, train: np.ndarray,
                      n_components: int) -> np.ndarray:
    """PCA of the embedding (+ age), fitted and standardized on the ``train`` rows only.

    Args:
        embedding: (n, D) embeddings of the cohort.
        age: (n,) ages or None; NaN ages get the training median.
        train: boolean (n,) training rows.
        n_components: PCs kept (capped by the training size and D).

    Returns:
        (n, p) standardized features.
    """
    from sklearn.decomposition import PCA

    k = int(min(n_components, train.sum() - 1, embedding.shape[1]))
    if k < 1:
        raise ValueError(f"too few training subjects ({int(train.sum())}) for a PCA")
    feats = PCA(n_components=k, random_state=0).fit(embedding[train]).transform(embedding)
    if age is not None:
        age = np.asarray(age, dtype=float)
        fill = np.nanmedian(age[train]) if np.isfinite(age[train]).any() else 0.0
        feats = np.column_stack([feats, np.where(np.isfinite(age), age, fill)])
    mean, std = feats[train].mean(0), feats[train].std(0)
    return (feats - mean) / np.where(std > 0, std, 1.0)


# ---- metrics --------------------------------------------------------------------------------------------------
def c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of a risk score (higher risk = shorter survival); NaN without comparable pairs."""
    from lifelines.utils import concordance_index

    try:
        return float(concordance_index(np.asarray(time, float), -np.asarray(risk, float), np.asarray(event, float)))
    except ZeroDivisionError:  # lifelines raises this when no pair is admissible
        return float("nan")


def cox_partial_nll_per_sample(risk, time, event, groups):
    """Per-subject Breslow negative log partial likelihood with risk sets inside each group (site).

    ``l_i = event_i * (log sum_{j: g_j = g_i, t_j >= t_i} exp(r_j) - r_i)``; censored subjects contribute 0 but
    sit in the risk sets. Summed over a group this is that group's stratified Cox negative log partial
    likelihood (Breslow 1974 ties); with distinct event times it equals lifelines' (Efron) value.

    Args:
        risk: (n,) float tensor, the linear predictor.
        time, event, groups: (n,) tensors (event 0/1, groups int).

    Returns:
        (n,) tensor of per-subject losses (differentiable in ``risk``).
    """
    import torch

    out = torch.zeros_like(risk)
    for g in torch.unique(groups):
        idx = torch.nonzero(groups == g).flatten()
        order = torch.argsort(time[idx], descending=True, stable=True)
        idx = idx[order]
        r, t = risk[idx], time[idx]
        cumulative = torch.logcumsumexp(r, dim=0)  # position k: log sum exp over the k+1 longest times
        # the risk set of i is every subject with t >= t_i: in descending order, all positions up to the last
        # one tied with t_i (Breslow keeps tied subjects in each other's risk sets)
        n_at_risk = len(t) - torch.searchsorted(t.flip(0).contiguous(), t, right=False)
        out = out.index_copy(0, idx, event[idx].to(risk.dtype) * (cumulative[n_at_risk - 1] - r))
    return out


def site_cox_losses(risk, time, event, groups):
    """Size-free per-subject Cox losses whose per-site mean is that site's per-event log-likelihood ratio.

    For site s with d_s events and n_s subjects, returns ``l_i * n_s / d_s`` where ``l_i`` is subject i's
    :func:`cox_partial_nll_per_sample` minus its value at the null model (risk 0, i.e. ``event_i * log |R_i|``).
    Averaged over the site (as :class:`nrfm.train.dro.GroupDRO` does) this is
    ``(NLL_s(model) - NLL_s(null)) / d_s = -(1/d_s) sum_{events i} [r_i - log mean_{j in R_i} exp(r_j)]``.

    Why this form: the raw per-site NLL is ``sum_{events} [log sum_{R_i} exp(r_j) - r_i]``, whose null value
    ``sum_{events} log |R_i|`` grows with the number of events and the log of the risk-set sizes: a site ten times
    larger has a larger loss at equal ranking quality, and group DRO, which up-weights the largest loss, then
    chases site size. Subtracting the null value turns each event's term into the log of a risk-set *mean*
    (size-free), and dividing by d_s makes it a per-event average, so sites of equal difficulty score alike
    whatever their size and event rate. 0 = no better than the null model, negative = better; a site with no
    event gets 0 (it carries no ranking information).

    Args:
        risk: (n,) float tensor, the linear predictor.
        time, event, groups: (n,) tensors (event 0/1, groups int).

    Returns:
        (n,) tensor (differentiable in ``risk``).
    """
    import torch

    per = cox_partial_nll_per_sample(risk, time, event, groups)
    null = cox_partial_nll_per_sample(torch.zeros_like(risk), time, event, groups)
    counts = torch.bincount(groups.long()).to(risk.dtype)
    events = torch.zeros_like(counts).index_add(0, groups.long(), event.to(risk.dtype))
    scale = torch.where(events > 0, counts / events.clamp(min=1), torch.zeros_like(counts))
    return (per - null) * scale[groups.long()]


class DROCoxHead:
    """Linear Cox risk score trained with group DRO over sites (per-site partial likelihoods).

    Each step computes :func:`site_cox_losses` on the whole training set (full batch: survival cohorts are
    small), lets :class:`nrfm.train.dro.GroupDRO` average it per site (site loss L_s = per-event log partial-likelihood
    ratio against the null model, size-free) and update its site weights q, and descends on
    ``sum_s q_s L_s + penalizer ||w||^2 / 2`` with Adam.

    Args:
        penalizer: L2 strength (lifelines' scale).
        steps: full-batch optimisation steps.
        lr: Adam learning rate.
        eta: GroupDRO step size over sites.
        seed: torch seed (the start is w = 0, so only ties in the optimiser's arithmetic depend on it).

    Attributes (after ``fit``):
        coef_: (p,) weights; group_weights_: (n_sites,) final q; loss_history_: robust loss per step.
    """

    def __init__(self, penalizer: float = 0.1, steps: int = 300, lr: float = 0.05, eta: float = 0.01, seed: int = 0):
        if penalizer < 0 or steps < 1 or lr <= 0 or eta <= 0:
            raise ValueError(f"need penalizer >= 0, steps >= 1, lr > 0, eta > 0; got {penalizer}, {steps}, {lr}, {eta}")
        self.penalizer, self.steps, self.lr, self.eta, self.seed = penalizer, steps, lr, eta, seed

    def fit(self, X: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray) -> "DROCoxHead":
        """Fit on (n, p) features, (n,) times, events and integer site indices in [0, n_sites)."""
        import torch

        torch.manual_seed(self.seed)
        x = torch.as_tensor(X, dtype=torch.float64)
        t = torch.as_tensor(time, dtype=torch.float64)
        e = torch.as_tensor(event, dtype=torch.float64)
        g = torch.as_tensor(groups, dtype=torch.long)
        n_groups = int(g.max()) + 1
        dro = GroupDRO(n_groups, eta=self.eta).train()
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([w], lr=self.lr)
        self.loss_history_ = []
        for _ in range(self.steps):
            opt.zero_grad()
            loss = dro.loss(site_cox_losses(x @ w, t, e, g), g) + 0.5 * self.penalizer * (w * w).sum()
            loss.backward()
            opt.step()
            self.loss_history_.append(float(loss.detach()))
        self.coef_ = w.detach().numpy().copy()
        self.group_weights_ = dro.q.detach().numpy().copy()
        return self

    def predict_risk(self, X: np.ndarray) -> np.ndarray:
        """(n, p) -> (n,) linear risk score (higher = shorter expected survival)."""
        return np.asarray(X, dtype=float) @ self.coef_


def _fit_coxph(X: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray, penalizer: float):
    """lifelines Cox model stratified by site (a baseline hazard per site, risk sets within sites)."""
    from lifelines import CoxPHFitter

    names = [f"x{i}" for i in range(X.shape[1])]
    frame = pd.DataFrame(X, columns=names).assign(T=time, E=event, site=np.asarray(groups))
    model = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E", strata=["site"])
    return lambda Z: np.asarray(Z, float) @ model.params_[names].to_numpy()


def fit_risk_model(objective: str, X: np.ndarray, time: np.ndarray, event: np.ndarray, groups: np.ndarray,
                   train: np.ndarray, val: np.ndarray, penalizers: Sequence[float], cfg) -> tuple:
    """Fit the objective's model for each penalizer on ``train``; keep the best validation c-index.

    Ties and an undefined validation c-index go to the largest penalizer (the most conservative model); a
    penalizer whose fit does not converge is left out (said in the note).

    Returns:
        (risk function (n, p) -> (n,), chosen penalizer, note).

    Raises:
        ValueError: no penalizer gave a converged fit.
    """
    import warnings

    from lifelines.exceptions import ConvergenceError

    if objective not in MODELS:
        raise ValueError(f"unknown survival objective {objective!r}; valid: {list(MODELS)}")

    best, note, failed = None, "", []
    for pen in sorted(penalizers, reverse=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lifelines' convergence chatter on tiny cohorts
            try:
                if objective == "erm":
                    risk_fn = _fit_coxph(X[train], time[train], event[train], groups[train], pen)
                else:
                    head = DROCoxHead(pen, cfg.survival_dro_steps, cfg.survival_dro_lr, cfg.survival_dro_eta)
                    risk_fn = head.fit(X[train], time[train], event[train], groups[train]).predict_risk
            except (ConvergenceError, np.linalg.LinAlgError):
                failed.append(pen)
                continue
        if not np.isfinite(risk_fn(X)).all():
            failed.append(pen)
            continue
        score = c_index(time[val], event[val], risk_fn(X[val])) if val.any() else float("nan")
        if best is None or (np.isfinite(score) and (not np.isfinite(best[2]) or score > best[2])):
            best = (risk_fn, pen, score)
    if best is None:
        raise ValueError(f"the fit did not converge for any penalizer in {list(penalizers)}")
    if not np.isfinite(best[2]):
        note = f"validation c-index undefined: penalizer {best[1]} (largest that converged) used"
    if failed:
        note = "; ".join(x for x in (note, f"no convergence with penalizer(s) {failed}") if x)
    return best[0], best[1], note


# ---- evaluation -----------------------------------------------------------------------------------------------
def evaluate_risk(time: np.ndarray, event: np.ndarray, risk: np.ndarray, threshold: float, min_events: int,
                  n_boot: int, seed: int = 0) -> dict:
    """c-index with bootstrap CI and the log-rank p of risk > ``threshold`` versus the rest, for one site."""
    from lifelines.statistics import logrank_test

    n, events = len(time), int(np.sum(event))
    row = {"n": n, "events": events, "c_index": np.nan, "ci_low": np.nan, "ci_high": np.nan, "logrank_p": np.nan}
    if events < min_events:
        row["note"] = f"{events} events < survival_min_events={min_events}: no c-index or log-rank test"
        return row
    notes = []
    row["c_index"] = c_index(time, event, risk)
    # the resamples of metrics.bootstrap_ci(c_index, ...), scored all at once (the same numbers, tested)
    row["ci_low"], row["ci_high"] = bootstrap.percentile_ci(
        bootstrap.concordance(time, event, risk, bootstrap.draw(n, n_boot, seed)))
    if not np.isfinite(row["c_index"]):
        notes.append("no comparable pairs")
    elif not np.isfinite(row["ci_low"]):
        notes.append("too few bootstrap resamples with comparable pairs for a CI")
    high = risk > threshold
    if high.all() or (~high).all():
        notes.append(f"all test subjects fell in the {'high' if high.all() else 'low'} risk group: no log-rank test")
    else:
        row["logrank_p"] = float(logrank_test(time[high], time[~high], event[high], event[~high]).p_value)
    row["note"] = "; ".join(notes)
    return row


def survival_risk_path(ctx, method: str, objective: str):
    """``artifacts/survival_risk_{method}_{objective}.csv``: test risk scores, columns :data:`RISK_COLUMNS`."""
    return ctx.layout.survival_risk(method, objective)


def survival_risk_table(ctx, method: str, objective: str) -> tuple[pd.DataFrame, dict]:
    """Fit the objective's model and score every cohort patient (one survival exam each).

    Returns:
        (frame of cohort exams: subject_id, patient_id, site, split, os_days, os_event, risk, high_risk; fit info
        dict with penalizer, threshold (training median risk), n_train, train_events, n_features and note).
    """
    cfg = ctx.config.analyses
    man = ctx.manifest
    keep = survival_cohort(man)
    cohort = man[keep].reset_index(drop=True)
    emb = load_embeddings(ctx, method, objective)[keep]
    split = cohort["split"].to_numpy()
    train, val = split == "train", split == "val"
    time = pd.to_numeric(cohort["os_days"]).to_numpy(float)
    event = pd.to_numeric(cohort["os_event"]).to_numpy(float)
    site_index = {s: i for i, s in enumerate(sorted(cohort["site"].astype(str).unique()))}
    groups = cohort["site"].astype(str).map(site_index).to_numpy()
    info = {"n_train": int(train.sum()), "train_events": int(event[train].sum()), "penalizer": np.nan,
            "threshold": np.nan, "n_features": 0, "note": ""}
    patient = cohort["patient_id"] if "patient_id" in cohort else cohort["subject_id"]
    frame = cohort[["subject_id", "site", "split"]].assign(patient_id=patient.astype(str), os_days=time,
                                                          os_event=event, risk=np.nan, high_risk=np.nan)
    frame = frame[["subject_id", "patient_id", "site", "split", "os_days", "os_event", "risk", "high_risk"]]
    if info["train_events"] < cfg.survival_min_events:
        info["note"] = (f"not fitted: {info['train_events']} training events < "
                        f"survival_min_events={cfg.survival_min_events}")
        return frame, info
    age = pd.to_numeric(cohort["age"], errors="coerce").to_numpy(float) if cfg.survival_use_age else None
    try:
        X = survival_features(emb, age, train, cfg.survival_pca_components)
        risk_fn, pen, note = fit_risk_model(objective, X, time, event, groups, train, val, cfg.survival_penalizers,
                                            cfg)
    except ValueError as err:
        info["note"] = f"not fitted: {err}"
        return frame, info
    risk = risk_fn(X)
    threshold = float(np.median(risk[train]))
    info.update(penalizer=pen, threshold=threshold, n_features=X.shape[1], note=note)
    return frame.assign(risk=risk, high_risk=(risk > threshold).astype(float)), info


def survival_table(ctx, methods: Sequence[str], objectives: Sequence[str] | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Rows backbone, objective, site (each site and ``all``): n, events, c_index, CI, logrank_p (+ extras).

    Also writes the TEST risk scores to :func:`survival_risk_path` (columns :data:`RISK_COLUMNS`, one row per
    test patient; risk NaN when the model was not fitted), read by the Kaplan-Meier figure and by paired
    comparisons of the objectives.
    """
    cfg = ctx.config.analyses
    objectives = tuple(objectives or [o for o in MODELS if o in ctx.config.finetuning.objectives])
    rows = []
    for method in tqdm(list(methods), desc="survival", disable=not progress):
        for objective in objectives:
            frame, info = survival_risk_table(ctx, method, objective)
            test = frame[frame["split"] == "test"]
            atomic_write_csv(survival_risk_path(ctx, method, objective), test[list(RISK_COLUMNS)])
            for site in list(ctx.sites) + ["all"]:
                part = test if site == "all" else test[test["site"] == site]
                base = {"backbone": method, "objective": objective, "site": site, "model": MODELS[objective],
                        **{k: info[k] for k in ("penalizer", "n_train", "train_events", "n_features")}}
                if np.isnan(info["threshold"]):
                    res = {"n": len(part), "events": int(part["os_event"].sum()), "c_index": np.nan,
                           "ci_low": np.nan, "ci_high": np.nan, "logrank_p": np.nan, "note": info["note"]}
                elif len(part) == 0:
                    res = {"n": 0, "events": 0, "c_index": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                           "logrank_p": np.nan, "note": "no IDH-wildtype glioblastoma test subject with survival"}
                else:
                    res = evaluate_risk(part["os_days"].to_numpy(), part["os_event"].to_numpy(),
                                        part["risk"].to_numpy(), info["threshold"], cfg.survival_min_events,
                                        cfg.bootstrap, seed=ctx.config.seed)
                    res["note"] = "; ".join(x for x in (info["note"], res["note"]) if x)
                rows.append({**base, **res})
    return pd.DataFrame(rows, columns=list(SURVIVAL_COLUMNS + EXTRA_COLUMNS))


def run_survival_stage(ctx, methods: Sequence[str], progress: bool = True) -> pd.DataFrame:
    """Compute :func:`survival_table` and merge it into ``metrics/survival.csv``."""
    table = survival_table(ctx, methods, progress=progress)
    ctx.write_metrics("survival", table, ["backbone", "objective", "site"])
    return table
