"""Kaplan-Meier curves of predicted high versus low risk, per site, ERM versus DRO.

Reads ``artifacts/survival_risk_{method}_{objective}.csv`` written by :func:`nrfm.eval.survival.survival_table`
(one row per test patient, risk split at the training median) and the log-rank p-values of ``metrics/survival.csv``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from nrfm.errors import RunError
from nrfm.eval.survival import survival_risk_path


def _risk_frame(ctx, method: str, objective: str) -> pd.DataFrame:
    path = survival_risk_path(ctx, method, objective)
    if not path.is_file():
        raise RunError(f"{path}: survival risk scores not found; run nrfm.eval.survival.run_survival_stage first")
    frame = pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str})
    return frame[frame["split"] == "test"] if "split" in frame else frame  # older files held every split


def plot_kaplan_meier(ctx, method: str, objectives: Sequence[str] = ("erm", "dro"), save: bool = True):
    """Grid of KM curves: rows = objectives, columns = sites and ``all``; at-risk counts under each panel.

    Saved as ``figures/survival_km_{method}.png``. Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    table = ctx.read_metrics("survival")
    sites = list(ctx.sites) + ["all"]
    fig, axes = plt.subplots(len(objectives), len(sites), figsize=(3.6 * len(sites), 3.9 * len(objectives)),
                             squeeze=False)
    for r, objective in enumerate(objectives):
        frame = _risk_frame(ctx, method, objective)
        for c, site in enumerate(sites):
            ax = axes[r, c]
            part = frame if site == "all" else frame[frame["site"] == site]
            title = f"{method} {objective}: {site}"
            if table is not None:
                hit = table[(table["backbone"] == method) & (table["objective"] == objective) & (table["site"] == site)]
                if len(hit) and np.isfinite(hit["logrank_p"].iloc[0]):
                    title += f"\nlog-rank p = {hit['logrank_p'].iloc[0]:.3g}, c = {hit['c_index'].iloc[0]:.3f}"
                elif len(hit) and isinstance(hit["note"].iloc[0], str) and hit["note"].iloc[0]:
                    title += f"\n{hit['note'].iloc[0].split(':')[0]}"  # e.g. "2 events < survival_min_events=5"
            ax.set_title(title, fontsize=9)
            fitted = []
            for label, keep, colour in (("low risk", part["high_risk"] == 0, "C0"),
                                        ("high risk", part["high_risk"] == 1, "C3")):
                if keep.sum() == 0:
                    continue
                kmf = KaplanMeierFitter(label=label).fit(part.loc[keep, "os_days"], part.loc[keep, "os_event"])
                kmf.plot_survival_function(ax=ax, ci_show=False, color=colour)
                fitted.append(kmf)
            if fitted:
                add_at_risk_counts(*fitted, ax=ax, rows_to_show=["At risk"])
            else:
                ax.text(0.5, 0.5, "no test subjects\n(or model not fitted)", ha="center", va="center",
                        transform=ax.transAxes)
            ax.set_xlabel("days")
            ax.set_ylim(0, 1.05)
    fig.tight_layout()
    if save:
        ctx.save_figure(fig, f"survival_km_{method}")
    return fig
