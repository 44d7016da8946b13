"""Figures and tables of the fine-tuning stage (notebook 02 calls these and displays what they return).

* :func:`training_curves_figure`: training loss and worst-group validation loss per epoch, per objective.
* :func:`group_weights_figure`: group DRO's weights q over training (per endpoint; the groups it up-weights).
* :func:`roc_figure`: test ROC curves per site and endpoint, one curve per objective.
* :func:`molecular_paper_table`: rows endpoints, columns site x backbone x {ERM, reweighted, +DRO}, plus the
  oracle AUC.
* :func:`dro_deltas`: DRO minus ERM per backbone, site and endpoint with paired-bootstrap 95% CIs.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from nrfm.config import ENDPOINTS
from nrfm.eval.metrics import auc, binarize, paired_bootstrap
from nrfm.train.finetune import read_history
from nrfm.train.finetune_data import cuts_of

LABELS = {"erm": "ERM", "dro": "+DRO", "reweighted": "reweighted"}
COLORS = {"erm": "tab:blue", "dro": "tab:red", "reweighted": "tab:green"}


def _predictions(ctx, method: str, objective: str, protocol: str) -> pd.DataFrame | None:
    path = ctx.layout.predictions(method, objective, protocol)
    return pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str, "fold": str}) \
        if path.is_file() else None


def training_curves_figure(ctx, method: str, protocol: str = "pooled",
                           objectives: Sequence[str] = ("erm", "dro", "reweighted"), save: bool = True) -> plt.Figure:
    """Training loss (left) and worst-group validation loss (right) per epoch; the kept epoch is marked.

    Each objective's curve is its chosen regularisation setting (``metrics/finetune_selection.csv``).

    Saved as ``figures/finetune_curves_{method}_{protocol}.png``.
    """
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    histories = []
    for objective in objectives:
        history = read_history(ctx, method, objective, protocol)
        if history is None:
            continue
        histories.append(history)
        for k, (fold, run) in enumerate(history["folds"].items()):
            epochs = [e["epoch"] for e in run["epochs"]]
            label = f"{LABELS.get(objective, objective)}" + (f" (held out {fold})" if protocol == "loso" else "")
            style = dict(color=COLORS.get(objective), alpha=1.0 if k == 0 else 0.6, ls=["-", "--", ":", "-."][k % 4])
            ax_loss.plot(epochs, [e["train_loss"] for e in run["epochs"]], label=label, **style)
            ax_val.plot(epochs, [e["val_worst_group_loss"] for e in run["epochs"]], label=label, **style)
            best = run["best_epoch"]
            ax_val.plot([best], [run["epochs"][best - 1]["val_worst_group_loss"]], "o", color=COLORS.get(objective))
    ax_loss.set(xlabel="epoch", ylabel="training objective", title=f"{method}: training loss ({protocol})")
    per_endpoint = any(run.get("per_endpoint") for h in histories for run in h["folds"].values())
    ax_val.set(xlabel="epoch", ylabel="worst-group loss (val, mean over endpoints)",
               title=("each endpoint's chosen setting, averaged (dot = the epoch most endpoints kept)" if per_endpoint
                      else "model selection, chosen setting (dot = kept epoch)"))
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"finetune_curves_{method}_{protocol}")
    return fig


def group_weights_figure(ctx, method: str, protocol: str = "pooled", fold: str | None = None, top: int = 8,
                         save: bool = True) -> plt.Figure:
    """Group DRO's q_g after each epoch, relative to uniform within its endpoint (q_g x G_e; 1 = uniform); the
    ``top`` groups by final relative weight are labelled, others grey.

    Saved as ``figures/dro_group_weights_{method}_{protocol}.png``.
    """
    history = read_history(ctx, method, "dro", protocol)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if history is None:
        ax.text(0.5, 0.5, f"no group DRO run for {method} ({protocol})", ha="center", va="center")
        ax.set_axis_off()
        return fig
    fold = fold or next(iter(history["folds"]))
    run = history["folds"][fold]
    q = np.array([e["q"] for e in run["epochs"]])  # (epochs, G)
    if "group_task" in run:  # one q per endpoint: show q_g * G_e, the weight relative to uniform in its endpoint
        task = np.asarray(run["group_task"])
        q = q * np.bincount(task)[task]
    else:
        q = q * q.shape[1]
    epochs = np.array([e["epoch"] for e in run["epochs"]])
    order = np.argsort(q[-1])[::-1]
    uniform = 1.0
    for g in order[top:]:
        ax.plot(epochs, q[:, g], color="0.8", lw=0.8)
    for g in order[:top]:
        ax.plot(epochs, q[:, g], lw=1.8, label=f"{run['groups'][g]} (n={int(run['group_counts'][g])})")
    ax.axhline(uniform, color="k", ls=":", lw=1, label="uniform within the endpoint")
    ax.set(xlabel="epoch", ylabel="q_g x groups of its endpoint", yscale="log",
           title=f"{method}: group DRO weights ({protocol}, {fold}; groups endpoint|site|class)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"dro_group_weights_{method}_{protocol}")
    return fig


def roc_figure(ctx, method: str, protocol: str = "pooled", endpoints: Sequence[str] | None = None,
               objectives: Sequence[str] | None = None, save: bool = True) -> plt.Figure:
    """Test ROC curves, one panel per (endpoint, site), one curve per objective (AUC in the legend).

    Continuous endpoints are binarized at the configured cuts; ``objectives`` default to the configured ones.
    Saved as ``figures/roc_{method}_{protocol}.png``.
    """
    cuts = cuts_of(ctx.config.finetuning)
    objectives = tuple(objectives or ctx.config.finetuning.objectives)
    frames = {o: _predictions(ctx, method, o, protocol) for o in objectives}
    frames = {o: f[f["split"] == "test"] for o, f in frames.items() if f is not None}
    endpoints = list(endpoints or [e for e in ENDPOINTS if any(e in set(f["endpoint"]) for f in frames.values())])
    sites = sorted(set().union(*(set(f["site"]) for f in frames.values()))) if frames else []
    # shared axes: tick labels on the outer panels only (30 panels' worth of tick text dominated drawing time)
    fig, axes = plt.subplots(max(len(endpoints), 1), max(len(sites), 1), squeeze=False, sharex=True, sharey=True,
                             figsize=(2.6 * max(len(sites), 1), 2.4 * max(len(endpoints), 1)))
    for i, endpoint in enumerate(endpoints):
        for j, site in enumerate(sites):
            ax = axes[i, j]
            ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
            for objective, frame in frames.items():
                part = frame[(frame["endpoint"] == endpoint) & (frame["site"] == site)]
                y = binarize(endpoint, part["y_true"].to_numpy(), cuts)
                if len(np.unique(y)) < 2:
                    ax.text(0.5, 0.1, "single class", ha="center", fontsize=7)
                    continue
                fpr, tpr, _ = roc_curve(y, part["y_score"])
                ax.plot(fpr, tpr, color=COLORS.get(objective),
                        label=f"{LABELS.get(objective, objective)} {auc(y, part['y_score'].to_numpy()):.2f}")
            ax.set_title(f"{endpoint} @ {site}", fontsize=8)
            ax.tick_params(labelsize=6)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{method}: test ROC per site ({protocol})")
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"roc_{method}_{protocol}")
    return fig


def molecular_paper_table(ctx, protocol: str = "pooled", metric: str = "auc", sites: Sequence[str] | None = None,
                          with_ci: bool = True) -> pd.DataFrame:
    """The paper-style table from ``metrics/molecular.csv``: rows endpoints, columns (site, backbone, objective).

    Objectives in the order ERM, reweighted, +DRO (those the metrics hold).

    Cells are ``value [ci_low, ci_high]`` strings (``with_ci``) or numbers; an ``oracle`` column per site gives
    the synthetic cohort's Bayes-limit AUC on the same test subjects when it exists. Empty cells are metrics
    that are undefined (the ``note`` column of the CSV says why).
    """
    if metric not in ("auc", "balanced_accuracy"):
        raise ValueError(f"unknown metric {metric!r}; valid: ['auc', 'balanced_accuracy']")
    table = ctx.read_metrics("molecular")
    if table is None or table.empty:
        return pd.DataFrame()
    objectives = [o for o in ("erm", "reweighted", "dro") if o in set(table["objective"])]
    table = table[(table["protocol"] == protocol) & table["objective"].isin(objectives)]
    sites = list(sites or [s for s in table["site"].unique() if s != "worst"] + ["worst"])
    columns, cells = [], {}
    for site in sites:
        part = table[table["site"] == site]
        for backbone in sorted(part["backbone"].unique()):
            for objective in objectives:
                rows = part[(part["backbone"] == backbone) & (part["objective"] == objective)].set_index("endpoint")
                if rows.empty:
                    continue
                key = (site, backbone, LABELS[objective])
                columns.append(key)
                cells[key] = {e: _cell(r, metric, with_ci) for e, r in rows.iterrows()}
        if metric == "auc" and "oracle_auc" in part and part["oracle_auc"].notna().any():
            key = (site, "oracle", "")
            columns.append(key)
            cells[key] = part.groupby("endpoint")["oracle_auc"].first().round(3).to_dict()
    endpoints = [e for e in ENDPOINTS if e in set(table["endpoint"])]
    out = pd.DataFrame({k: [cells[k].get(e, "") for e in endpoints] for k in columns}, index=endpoints)
    out.columns = pd.MultiIndex.from_tuples(columns, names=["site", "backbone", "objective"])
    out.index.name = "endpoint"
    return out


def _cell(row: pd.Series, metric: str, with_ci: bool):
    value = row[metric]
    if not np.isfinite(value):
        return "" if with_ci else np.nan
    if not with_ci:
        return round(float(value), 3)
    low, high = row[f"{metric}_ci_low"], row[f"{metric}_ci_high"]
    return f"{value:.2f} [{low:.2f}, {high:.2f}]" if np.isfinite(low) else f"{value:.2f}"


def dro_deltas(ctx, protocol: str = "pooled", metric: str = "auc", n_boot: int | None = None,
               methods: Sequence[str] | None = None) -> pd.DataFrame:
    """DRO minus ERM per backbone, site (and ``all``) and endpoint, with paired-bootstrap 95% CIs.

    Both models are evaluated on the same resampled test subjects in each resample
    (:func:`nrfm.eval.metrics.paired_bootstrap`); ``balanced_accuracy`` uses each model's validation threshold,
    held fixed: a statement about these two fitted models (the verdicts re-pick both thresholds on resampled
    validation exams, :mod:`nrfm.eval.claims` rule 1b).
    Rows whose difference is undefined (a single class) say so in ``note``.
    """
    cuts, seed = cuts_of(ctx.config.finetuning), ctx.config.seed
    n_boot = n_boot or ctx.config.analyses.bootstrap
    methods = list(methods or ctx.config.pretraining.methods)
    rows = []
    for method in methods:
        erm, dro = _predictions(ctx, method, "erm", protocol), _predictions(ctx, method, "dro", protocol)
        if erm is None or dro is None:
            continue
        keys = ["subject_id", "endpoint", "fold"]
        both = erm[erm["split"] == "test"].merge(dro[dro["split"] == "test"][keys + ["y_score", "threshold"]],
                                                 on=keys, suffixes=("_erm", "_dro"))
        for endpoint, part in both.groupby("endpoint"):
            for site in [*sorted(part["site"].unique()), "all"]:
                cell = part if site == "all" else part[part["site"] == site]
                y = binarize(endpoint, cell["y_true"].to_numpy(), cuts)
                # balanced accuracy at each row's own (fold's) threshold: compare score - threshold with 0
                a = cell["y_score_erm"].to_numpy() - (cell["threshold_erm"].to_numpy() if metric != "auc" else 0)
                b = cell["y_score_dro"].to_numpy() - (cell["threshold_dro"].to_numpy() if metric != "auc" else 0)
                if np.isfinite(a).all() and np.isfinite(b).all():
                    result = paired_bootstrap(y, a, b, metric=metric, threshold_a=0.0, threshold_b=0.0,
                                              n_boot=n_boot, seed=seed)
                else:  # a fold without a validation threshold
                    result = {k: np.nan for k in ("a", "b", "delta", "ci_low", "ci_high")} | {"n_valid": 0}
                note = "" if np.isfinite(result["delta"]) else "single class or no threshold: difference undefined"
                if note == "" and not np.isfinite(result["ci_low"]):
                    note = f"only {result['n_valid']} bootstrap resamples had both classes: no CI"
                rows.append({"backbone": method, "protocol": protocol, "site": site, "endpoint": endpoint,
                             "metric": metric, "n": len(cell), "n_pos": int((y == 1).sum()), "erm": result["a"],
                             "dro": result["b"], "delta": result["delta"], "ci_low": result["ci_low"],
                             "ci_high": result["ci_high"], "note": note})
    return pd.DataFrame(rows)
