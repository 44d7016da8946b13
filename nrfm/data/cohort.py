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
from nrfm.synth.scenarios import group_dro_logistic
from nrfm.train.monitor import probe_balanced_accuracy



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
    """The synthetic cohort's latent-bound AUC per endpoint and site (None for real cohorts).

    A latent bound, not the best achievable: the oracle sees the generator's latents; a model sees only
    images, after noise, resampling and cues smaller than the pipeline's voxels.
    """
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


# ---- the synthetic cohort's scenario: the plant, its latent check, and the preprocessing-only baselines ----
def scenario_summary(ctx: RunContext) -> dict | None:
    """Scenario, smallest site, cue endpoint and ``latent_dro_gain`` from a synthetic cohort's cohort.json."""
    import json

    path = ctx.cohort_dir / "cohort.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if "scenario" not in info:
        return None
    plan, check = info["scenario_plan"], info["latent_dro_check"]
    return {"scenario": info["scenario"], "smallest_site": plan["smallest_site"], "cue": plan["cue"],
            "cue_endpoint": plan["cue_endpoint"], "affected_endpoints": plan["affected_endpoints"],
            "phenotype_shift": plan["phenotype_shift"], "hazard_shift": plan["hazard_shift"],
            "latent_dro_gain": info["latent_dro_gain"], "latent_check": check.get("per_endpoint", {})}


def test_set_table(ctx: RunContext) -> pd.DataFrame | None:
    """The fixed test set per site from a synthetic cohort's cohort.json: exams, survival events, reported
    positives per marker and the enrichment exams that lifted rare markers to the floor (None without one)."""
    import json

    path = ctx.cohort_dir / "cohort.json"
    if not path.is_file():
        return None
    rows = []
    for site in json.loads(path.read_text()).get("sites", []):
        test = site.get("test_set")
        if not test:
            return None
        name = site["template"]["name"]
        rows.append({"site": name, "test exams": test["exams"], "survival events": test["survival_events"],
                     **{f"{e} +": n for e, n in test["labelled_positives"].items()},
                     "enrichment exams": ", ".join(f"{e} {n}" for e, n in test.get("enrichment_exams", {}).items())})
    return pd.DataFrame(rows).set_index("site") if rows else None


def cue_by_site_table(ctx: RunContext) -> pd.DataFrame | None:
    """The plant: share of exams showing the cue, per site and label of the cue endpoint (synthetic only).

    Uses the labels the manifest reports (masked ones left out): what a model trained on it can see.
    """
    summary, oracle = scenario_summary(ctx), ctx.oracle
    if summary is None or oracle is None:
        return None
    endpoint = summary["cue_endpoint"]
    cue = oracle[oracle["endpoint"] == "artifact"].set_index("subject_id")["value"]
    frame = ctx.manifest[["subject_id", "site", "split", endpoint]].dropna(subset=[endpoint]).copy()
    frame["cue"] = frame["subject_id"].map(cue)
    table = (frame.groupby(["site", endpoint])["cue"].agg(["mean", "size"])
             .rename(columns={"mean": "cue_rate", "size": "n"}).reset_index())
    table = table.rename(columns={endpoint: "label"})
    table.insert(1, "endpoint", endpoint)
    return table


def cue_by_site_figure(ctx: RunContext) -> plt.Figure | None:
    """Bar chart of :func:`cue_by_site_table`: cue rate by label at each site (the smallest site marked)."""
    table, summary = cue_by_site_table(ctx), scenario_summary(ctx)
    if table is None:
        return None
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    plot = table.assign(label=table["label"].map({0.0: "negative", 1.0: "positive"}))
    sns.barplot(data=plot, x="site", y="cue_rate", hue="label", ax=ax)
    ax.set(ylim=(0, 1), ylabel="share of exams with the cue",
           title=f"{summary['scenario']}: ghost cue vs {summary['cue_endpoint'].upper()} label "
                 f"(smallest site: {summary['smallest_site']})")
    fig.tight_layout()
    return fig


def oracle_cindex_table(ctx: RunContext) -> pd.DataFrame | None:
    """C-index of the true log-hazard per site (a latent bound for survival models; synthetic only)."""
    path = ctx.cohort_dir / "oracle_cindex.csv"
    return pd.read_csv(path) if path.is_file() else None


def _intensity_features(volume: np.ndarray, brain: np.ndarray) -> list[float]:
    """Per contrast: mean, sd, five quantiles, and the mean absolute difference of neighbours along each
    axis (sharpness / noise) inside the brain."""
    feats = []
    for c in range(volume.shape[0]):
        v = volume[c]
        inside = v[brain]
        feats += [float(inside.mean()), float(inside.std()), *np.quantile(inside, [0.05, 0.25, 0.5, 0.75, 0.95])]
        for axis in range(3):
            diff = np.abs(np.diff(v, axis=axis))
            both = brain[tuple(slice(1, None) if a == axis else slice(None) for a in range(3))] & \
                brain[tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))]
            feats.append(float(diff[both].mean()) if both.any() else 0.0)
    return feats


def site_probe_baseline(ctx: RunContext, per_site: int = 60, seed: int = 0) -> pd.DataFrame:
    """The preprocessing-only baseline for site invariance: how well simple intensity features of the
    preprocessed volumes (per contrast: mean, sd, quantiles, neighbour differences inside the brain) predict
    the site, with the same cross-validated logistic probe the embeddings analysis uses.

    Returns one row: site_probe_bacc, chance (1 / sites), subjects, features. Site effects that a z-score
    removes would give chance; the synthetic cohort's per-exam protocols are meant to leave the site
    detectable but not perfectly.
    """
    dataset = ctx.dataset()
    rows, sites = [], []
    for site, part in ctx.manifest.groupby("site"):
        for i in part.index[:per_site]:
            item = dataset[ctx.manifest.index.get_loc(i)]
            brain = np.asarray(item["brain"][0]).astype(bool)
            rows.append(_intensity_features(np.asarray(item["image"], dtype=np.float32), brain))
            sites.append(site)
    x, y = np.asarray(rows), np.asarray(sites)
    bacc = probe_balanced_accuracy(x, y, seed=seed) if len(set(sites)) > 1 else float("nan")
    return pd.DataFrame([{"stage": "preprocessed intensities", "site_probe_bacc": bacc,
                          "chance": 1.0 / max(1, len(set(sites))), "subjects": len(y), "features": x.shape[1]}])


def _ghost_score(volume: np.ndarray, axis: int) -> float:
    """Correlation of the brain's intensities with the image shifted by half the field of view along ``axis``
    (where both are inside the brain): an N/2 ghost adds a copy of the image at that shift and raises it."""
    shifted = np.roll(volume, volume.shape[axis] // 2, axis=axis)
    both = (volume > 0) & (shifted > 0)
    if both.sum() < 50:
        return float("nan")
    return float(np.corrcoef(volume[both], shifted[both])[0, 1])


def image_plant_check(ctx: RunContext) -> pd.DataFrame | None:
    """The plant seen in the images, not the latents (synthetic cohorts with a scenario only).

    Three hand-made features per exam from the stored images: the ghost score along the site's phase-encoding
    axis (the cue, :func:`_ghost_score`), oedema and tumour-core volume from the label map (the EGFR phenotype).
    An ERM and a
    group-DRO logistic model (as in the generator's latent check) are fitted on the run's train and val exams
    and scored on the smallest site's test exams. Returns one row per objective: endpoint, site, n, n_pos,
    auc; plus ``cue_detection_auc``, the ghost score's AUC for the true cue.
    """
    import json

    from sklearn.metrics import roc_auc_score

    summary, oracle = scenario_summary(ctx), ctx.oracle
    if summary is None or oracle is None or summary["smallest_site"] is None:
        return None
    info = json.loads((ctx.cohort_dir / "cohort.json").read_text())
    phase = {s["template"]["name"]: s["template"]["phase_axis"] for s in info["sites"]}
    endpoint, small = summary["cue_endpoint"], summary["smallest_site"]
    rows = []
    for row in ctx.manifest.itertuples():
        image = nib.load(row.t1)
        volume = np.asarray(image.dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(row.seg).dataobj)
        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
        rows.append({"subject_id": row.subject_id, "site": row.site, "split": row.split,
                     "label": getattr(row, endpoint),
                     "ghost": _ghost_score(volume, phase[row.site]),
                     "edema": np.log1p((seg == 2).sum() * voxel_ml), "core": np.log1p(np.isin(seg, (1, 4)).sum() * voxel_ml)})
    frame = pd.DataFrame(rows).dropna(subset=["ghost"])
    cue = oracle[oracle["endpoint"] == "artifact"].set_index("subject_id")["value"]
    truth = frame["subject_id"].map(cue)
    cue_auc = float(roc_auc_score(truth, frame["ghost"])) if truth.nunique() == 2 else float("nan")
    labelled = frame.dropna(subset=["label"])
    train = labelled[labelled["split"] != "test"]
    test = labelled[(labelled["split"] == "test") & (labelled["site"] == small)]
    cols = ["ghost", "edema", "core"]
    centre, scale = train[cols].mean(), train[cols].std() + 1e-9
    groups = (train["site"] + ":" + train["label"].astype(int).astype(str)).to_numpy()
    out = []
    for objective, dro in (("erm", False), ("dro", True)):
        auc = float("nan")
        if len(train) >= 10 and test["label"].nunique() == 2:
            w = group_dro_logistic(((train[cols] - centre) / scale).to_numpy(), train["label"].to_numpy(float),
                                   groups, dro)
            auc = float(roc_auc_score(test["label"], ((test[cols] - centre) / scale).to_numpy() @ w[:-1]))
        out.append({"objective": objective, "endpoint": endpoint, "site": small, "n": len(test),
                    "n_pos": int(test["label"].sum()), "auc": auc, "cue_detection_auc": cue_auc})
    return pd.DataFrame(out)
