"""The cohort at a glance: per-site table, example slices, intensity histograms, Kaplan-Meier by site.

Works the same for the synthetic default and an imported manifest (it reads only the canonical manifest,
the NIfTI files and, for synthetic cohorts, ``oracle_auc.csv``).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import pandas as pd

from nrfm.pipeline.context import RunContext
from nrfm.schema import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, CONTRASTS



def cohort_table(ctx: RunContext) -> pd.DataFrame:
    """One row per site and ``all``: exams, patients, splits, age, grade mix, marker prevalence, survival."""
    frame = ctx.manifest
    rows = []
    for site, part in [*frame.groupby("site"), ("all", frame)]:
        row = {"site": site, "exams": len(part), "patients": part["patient_id"].nunique()}
        for split in ("train", "val", "test"):
            row[split] = int((part["split"] == split).sum())
        row["age_median"] = float(part["age"].median()) if part["age"].notna().any() else np.nan
        row["grade4_%"] = 100 * float((part["grade"] == 4).mean()) if part["grade"].notna().any() else np.nan
        for endpoint in BINARY_ENDPOINTS:
            known = part[endpoint].dropna()
            row[f"{endpoint}_%pos"] = 100 * float(known.mean()) if len(known) else np.nan
            row[f"{endpoint}_%missing"] = 100 * (1 - len(known) / len(part))
        for endpoint in CONTINUOUS_ENDPOINTS:
            row[f"{endpoint}_median"] = float(part[endpoint].median()) if part[endpoint].notna().any() else np.nan
        row["os_events"] = int(part["os_event"].fillna(0).sum())
        row["os_median_days"] = km_median_os_days(part)
        rows.append(row)
    return pd.DataFrame(rows)


NOT_REACHED = "not reached"


def km_median_os_days(frame: pd.DataFrame) -> float | str:
    """Kaplan-Meier median overall survival in days, one exam per patient (its first with known survival).

    The plain median of follow-up times treats censored patients as deaths and is biased low; the KM median
    is the first time the survival estimate drops to 0.5 or below (lifelines ``median_survival_time_``).
    Returns :data:`NOT_REACHED` when the curve never gets there (too few deaths), NaN without survival data.
    """
    from lifelines import KaplanMeierFitter

    known = frame.dropna(subset=["os_days", "os_event"])
    if "patient_id" in known:
        known = known.drop_duplicates("patient_id")
    if known.empty:
        return np.nan
    kmf = KaplanMeierFitter().fit(known["os_days"].astype(float), known["os_event"].astype(int))
    median = float(kmf.median_survival_time_)
    return median if np.isfinite(median) else NOT_REACHED


def prevalence_long(ctx: RunContext) -> pd.DataFrame:
    """Tidy table site x endpoint: n known, n positive, prevalence, missing rate (for plots and tests)."""
    rows = []
    for site, part in ctx.manifest.groupby("site"):
        for endpoint in BINARY_ENDPOINTS:
            known = part[endpoint].dropna()
            rows.append({"site": site, "endpoint": endpoint, "n_known": len(known), "n_pos": int(known.sum()),
                         "prevalence": float(known.mean()) if len(known) else np.nan,
                         "missing_rate": 1 - len(known) / len(part)})
    return pd.DataFrame(rows)


def oracle_auc_table(ctx: RunContext) -> pd.DataFrame | None:
    """The synthetic cohort's Bayes-limit AUC per endpoint and site (None for real cohorts)."""
    path = ctx.cohort_dir / "oracle_auc.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    return table.pivot_table(index="endpoint", columns="site", values="auc").round(3)


def _canonical(path: str) -> np.ndarray:
    """A NIfTI file reoriented to RAS for display (no resampling)."""
    return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, dtype=np.float32)


def _example_rows(ctx: RunContext, per_site: int) -> pd.DataFrame:
    frame = ctx.manifest
    picks = []
    for _, part in frame.groupby("site"):
        with_seg = part[part["seg"].astype(str).str.len() > 0]
        picks.append((with_seg if len(with_seg) else part).head(per_site))
    return pd.concat(picks)


def example_slices_figure(ctx: RunContext, per_site: int = 1) -> plt.Figure:
    """Axial slice through the tumour centre, per site and contrast, as stored (RAS view), tumour outlined."""
    rows = _example_rows(ctx, per_site)
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, (_, row) in enumerate(rows.iterrows()):
        seg = _canonical(row["seg"]) if str(row["seg"]) else None
        z = int(np.argwhere(seg > 0)[:, 2].mean()) if seg is not None and (seg > 0).any() else None
        for c, contrast in enumerate(CONTRASTS):
            image = _canonical(row[contrast])
            zz = z if z is not None else image.shape[2] // 2
            ax = axes[r, c]
            dx, dy = nib.as_closest_canonical(nib.load(row[contrast])).header.get_zooms()[:2]
            # rot90 puts the y axis (dy) vertically: the pixel aspect (height / width) is dy / dx, so thick
            # slices at the CUIMC-like site are drawn at their true size, not squashed
            ax.imshow(np.rot90(image[:, :, zz]), cmap="gray", aspect=float(dy) / float(dx))
            if seg is not None and seg.shape == image.shape:
                ax.contour(np.rot90(seg[:, :, zz] > 0), levels=[0.5], colors="tab:red", linewidths=0.8)
            zooms = nib.load(row[contrast]).header.get_zooms()[:3]
            ax.set_title(f"{row['site']} {contrast}\n{'x'.join(f'{z:.1f}' for z in zooms)} mm", fontsize=8)
            ax.axis("off")
    fig.suptitle("Example exams as stored (reoriented to RAS for display only); red: tumour outline", fontsize=10)
    fig.tight_layout()
    return fig


def intensity_histograms_figure(ctx: RunContext, per_site: int = 6, contrast: str = "t1c") -> plt.Figure:
    """Brain-voxel intensity histograms per site, raw (left) and after preprocessing (right)."""
    index = {c: i for i, c in enumerate(CONTRASTS)}[contrast]
    dataset = ctx.dataset()
    fig, (raw_ax, pre_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    for site, part in ctx.manifest.groupby("site"):
        raw, pre = [], []
        for i in part.index[:per_site]:
            image = np.asarray(nib.load(part.loc[i, contrast]).dataobj, dtype=np.float32)
            raw.append(image[image > 0].ravel())
            item = dataset[ctx.manifest.index.get_loc(i)]
            volume = np.asarray(item["image"][index])
            brain = np.asarray(item["brain"][0]).astype(bool)
            pre.append(volume[brain].ravel())
        raw_ax.hist(np.concatenate(raw), bins=80, density=True, histtype="step", label=site)
        pre_ax.hist(np.concatenate(pre), bins=80, density=True, histtype="step", label=site, range=(-4, 6))
    raw_ax.set(title=f"{contrast} as stored (scanner units)", xlabel="intensity", ylabel="density")
    pre_ax.set(title=f"{contrast} after preprocessing (z-score in brain, crop)", xlabel="z")
    raw_ax.legend()
    fig.tight_layout()
    return fig


def site_intensity_effect(ctx: RunContext, contrast: str = "t1c", per_site: int = 8) -> pd.DataFrame:
    """Share of the variance of subjects' mean brain intensity explained by site (eta squared), raw vs preprocessed.

    Scale-free, in [0, 1]: near 1 when scanners dominate the intensity, near 0 when preprocessing removed them.
    """
    index = CONTRASTS.index(contrast)
    dataset = ctx.dataset()
    records = []
    for site, part in ctx.manifest.groupby("site"):
        for i in part.index[:per_site]:
            image = np.asarray(nib.load(part.loc[i, contrast]).dataobj, dtype=np.float32)
            item = dataset[ctx.manifest.index.get_loc(i)]
            brain = np.asarray(item["brain"][0]).astype(bool)
            records.append({"site": site, "raw": float(image[image > 0].mean()),
                            "preprocessed": float(np.asarray(item["image"][index])[brain].mean())})
    table = pd.DataFrame(records)

    def eta_squared(column: str) -> float:
        total = ((table[column] - table[column].mean()) ** 2).sum()
        between = sum(len(g) * (g[column].mean() - table[column].mean()) ** 2 for _, g in table.groupby("site"))
        return float(between / total) if total > 0 else 0.0

    return pd.DataFrame([{"contrast": contrast, "stage": stage, "site_eta_squared": eta_squared(stage),
                          "subjects": len(table)} for stage in ("raw", "preprocessed")])


def km_by_site_figure(ctx: RunContext) -> plt.Figure:
    """Kaplan-Meier overall survival per site (all subjects with known survival)."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fig, ax = plt.subplots(figsize=(7, 4.2))
    fitters = []
    for site, part in ctx.manifest.dropna(subset=["os_days", "os_event"]).groupby("site"):
        kmf = KaplanMeierFitter(label=f"{site} (n={len(part)})")
        kmf.fit(part["os_days"] / 30.44, part["os_event"].astype(int))
        kmf.plot_survival_function(ax=ax, ci_show=False)
        fitters.append(kmf)
    if fitters:
        add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    ax.set(xlabel="months", ylabel="overall survival", title="Kaplan-Meier by site")
    fig.tight_layout()
    return fig


def prevalence_figure(ctx: RunContext) -> plt.Figure:
    """Marker prevalence (bars) and missing-label rate (dots) per site."""
    import seaborn as sns

    table = prevalence_long(ctx)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    sns.barplot(data=table, x="endpoint", y="prevalence", hue="site", ax=ax)
    ax.set(ylabel="share positive among known", title="Marker prevalence per site (missing labels excluded)")
    fig.tight_layout()
    return fig
