"""The tests of each claim, one row per comparison: molecular, survival, site-mixing and Grad-CAM claims.

Each ``*_rows`` function reads a run folder's artifacts (predictions, survival risks, embeddings, per-subject
Grad-CAM scores; the readers are at the top) and returns the rows of ``metrics/verdicts.csv`` for one kind of claim
of :data:`nrfm.eval.claims.CLAIMS`, before the family-wide decision (:func:`nrfm.eval.claims.decide`, which
applies Holm and words the verdicts by the rules of :mod:`nrfm.eval.claims`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.eval import bootstrap
from nrfm.eval.claims import CLAIMS, COMPARISONS, PAPER_CINDEX, ClaimSpec
from nrfm.eval.paired import paired_endpoint_mean
from nrfm.eval.site_invariance import pca_silhouette
from nrfm.pipeline.layout import RunLayout


# ---------------------------------------------------------------------------------------------- run inputs
def cohort_dir(run_dir: Path) -> Path | None:
    """The cohort folder of a run (``data/SOURCE`` names its manifest), or None."""
    source = Path(run_dir) / "data" / "SOURCE"
    if not source.is_file():
        return None
    return Path(source.read_text(encoding="utf-8").strip()).parent


def cohort_scenario(run_dir: Path) -> str:
    """``site-shift`` / ``no-shift`` (cohort.json), ``synthetic`` (a synthetic cohort without a scenario key:
    legacy, nothing declared planted) or ``imported``."""
    folder = cohort_dir(run_dir)
    if folder is None:
        return "imported"
    meta = folder / "cohort.json"
    if meta.is_file():
        scenario = json.loads(meta.read_text(encoding="utf-8")).get("scenario")
        if scenario:
            return str(scenario)
        return "synthetic"
    return "synthetic" if (folder / "oracle.csv").is_file() else "imported"


def read_oracle(run_dir: Path) -> pd.DataFrame | None:
    folder = cohort_dir(run_dir)
    path = folder / "oracle.csv" if folder else None
    return pd.read_csv(path, dtype={"subject_id": str}) if path and path.is_file() else None


def read_predictions(run_dir: Path, method: str, objective: str, protocol: str = "pooled") -> pd.DataFrame | None:
    path = RunLayout(Path(run_dir)).predictions(method, objective, protocol)
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str})


def read_manifest(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / "data" / "manifest.csv"
    return pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str}, low_memory=False) \
        if path.is_file() else None


def smallest_training_site(predictions: pd.DataFrame) -> str:
    """The site with the fewest TRAINING exams (the paper's CUIMC role); fixed before any test result."""
    train = predictions[predictions["split"] == "train"]
    return str(train.groupby("site")["subject_id"].nunique().sort_values(kind="stable").index[0])


def _binarize(frame: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """Continuous endpoints enter binary claims as y >= documented threshold (the score is the prediction)."""
    frame = frame.copy()
    for endpoint, cut in thresholds.items():
        rows = frame["endpoint"] == endpoint
        frame.loc[rows, "y_true"] = (frame.loc[rows, "y_true"] >= cut).astype(float)
    return frame


def _metrics(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = RunLayout(Path(run_dir)).metrics(name)
    return pd.read_csv(path) if path.is_file() else None


# ------------------------------------------------------------------------------------------ molecular claims
def oracle_mean_auc(oracle: pd.DataFrame | None, test: pd.DataFrame, endpoints: tuple[str, ...]) -> float:
    """The Bayes-limit AUC (mean over endpoints) on the same test subjects, from the synthetic oracle."""
    if oracle is None:
        return np.nan
    values = []
    for endpoint in endpoints:
        part = test[test["endpoint"] == endpoint].dropna(subset=["y_true"])
        truth = oracle[oracle["endpoint"] == endpoint].set_index("subject_id")["value"]
        part = part[part["subject_id"].isin(truth.index)]
        if part["y_true"].nunique() == 2:
            values.append(float(bootstrap.auc(part["y_true"].to_numpy(), truth.loc[part["subject_id"]].to_numpy(),
                                              np.ones((1, len(part)), dtype=np.int64))[0]))
    return float(np.mean(values)) if values else np.nan


def _comparison_row(claim: ClaimSpec, backbone: str, tested: str, baseline: str, site: str, result: dict,
                    n_boot: int, paper: tuple[float, float] | None = None, note: str = "",
                    min_distinct: float = 1.0) -> dict:
    paper_erm, paper_dro = paper if paper else (claim.paper_erm, claim.paper_dro)
    p_value = float("nan")
    if len(result.get("deltas", [])):
        p_value = bootstrap.p_greater_than_zero(claim.direction * np.asarray(result["deltas"], dtype=float),
                                                margin=claim.margin)
    if result.get("log10_distinct", np.inf) < np.log10(min_distinct):
        # the data-derived minimum sample (module rule 3): too few patients per stratum for any decision
        p_value = float("nan")
        note = "; ".join(n for n in (note, f"only {10 ** result['log10_distinct']:.0f} distinct resamples "
                                     f"(< family size / alpha = {min_distinct:.0f}): too few patients per stratum "
                                     "for a decision") if n)
    gain_known = baseline == "erm" and paper_erm is not None and np.isfinite(paper_erm)
    return {"claim": claim.text, "claim_key": claim.key, "backbone": backbone, "comparison": f"{tested}-{baseline}",
            "objective": tested, "site": site, "metric": claim.metric, "margin": claim.margin,
            "paper_erm": paper_erm if baseline == "erm" else np.nan,
            "paper_dro": paper_dro if baseline == "erm" else np.nan,
            "paper_delta": claim.direction * (paper_dro - paper_erm) if gain_known else np.nan,
            "baseline": result.get("a", np.nan), "value": result.get("b", np.nan), "delta": result.get("delta", np.nan),
            "ci_low": result.get("ci_low", np.nan), "ci_high": result.get("ci_high", np.nan),
            "p_value": p_value,
            "n_test": result.get("n", np.nan), "n_boot": n_boot, "note": note}


def molecular_rows(run_dir: Path, methods: list[str], thresholds: dict[str, float], n_boot: int,
                   oracle: pd.DataFrame | None = None, seed: int = 0, min_distinct: float = 1.0) -> list[dict]:
    """Molecular claims x backbones x comparisons (pooled protocol, test split, smallest training site)."""
    rows = []
    imported = cohort_scenario(run_dir) == "imported"
    for method in methods:
        frames = {o: read_predictions(run_dir, method, o) for o in {o for pair in COMPARISONS for o in pair}}
        if frames.get("erm") is None:
            continue
        site = smallest_training_site(frames["erm"])
        tests = {o: _binarize(f[f["split"] == "test"], thresholds) for o, f in frames.items() if f is not None}
        vals = {o: _binarize(f[f["split"] == "val"], thresholds) for o, f in frames.items() if f is not None}
        memo: dict = {}  # one backbone's resamples and per-objective values, shared by its comparisons
        for tested, baseline in COMPARISONS:
            if tested not in tests or baseline not in tests:
                continue
            a, b = tests[baseline], tests[tested]
            for claim in (c for c in CLAIMS if c.kind == "molecular" and not (imported and c.control_only)):
                where, note = site, ""
                val = {"val_a": vals[baseline], "val_b": vals[tested], "memo": memo}
                result = paired_endpoint_mean(a[a["site"] == site], b[b["site"] == site], claim.metric,
                                              claim.endpoints, n_boot, seed, **val)
                labelled = a[a["endpoint"].isin(claim.endpoints)]["y_true"].notna().any()
                if not labelled:
                    note = "no labelled test exams for " + ", ".join(claim.endpoints)
                elif not result["endpoints"] and len(claim.endpoints) == 1:
                    # a rare marker may have one class at the smallest site (test LABELS, not results, decide)
                    where, note = "all", f"single class at {site}; evaluated on all sites"
                    result = paired_endpoint_mean(a, b, claim.metric, claim.endpoints, n_boot, seed, **val)
                row = _comparison_row(claim, method, tested, baseline, where, result, n_boot,
                                      note="; ".join(n for n in (note, result["note"]) if n),
                                      min_distinct=min_distinct)
                scope = a if where == "all" else a[a["site"] == where]
                row["oracle"] = oracle_mean_auc(oracle, scope, claim.endpoints) if claim.metric == "auc" else np.nan
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- survival
def read_survival_risk(run_dir: Path, method: str, objective: str) -> pd.DataFrame | None:
    """``artifacts/survival_risk_{method}_{objective}.csv`` (subject_id, patient_id, site, os_days, os_event,
    risk; higher risk = shorter survival) restricted to TEST subjects (its ``split`` column, else the run's
    manifest), or None when absent."""
    path = RunLayout(Path(run_dir)).survival_risk(method, objective)
    if not path.is_file():
        return None
    frame = pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str})
    manifest = read_manifest(run_dir)
    for column in ("split", "patient_id"):  # older files lack patient_id: the run's manifest has it
        if column not in frame and manifest is not None and column in manifest:
            frame = frame.merge(manifest[["subject_id", column]], on="subject_id", how="left")
    if "patient_id" not in frame:
        frame["patient_id"] = frame["subject_id"]
    return frame[frame["split"] == "test"] if "split" in frame else frame


def survival_rows(run_dir: Path, methods: list[str], n_boot: int, seed: int = 0,
                  min_distinct: float = 1.0) -> list[dict]:
    """Paired c-index differences per backbone, comparison and site (patients whole, event strata)."""
    claim = next(c for c in CLAIMS if c.kind == "survival")
    table = _metrics(run_dir, "survival")
    rows = []
    for method in methods:
        risks = {o: read_survival_risk(run_dir, method, o) for o in {o for pair in COMPARISONS for o in pair}}
        for tested, baseline in COMPARISONS:
            a, b = risks.get(baseline), risks.get(tested)
            if a is None or b is None:
                listed = table[(table["backbone"] == method) & (table["objective"] == tested)] \
                    if table is not None and {"backbone", "objective"} <= set(table) else pd.DataFrame()
                if baseline == "erm" and not listed.empty:  # survival ran, but wrote no per-subject risks
                    for site in sorted(set(listed["site"].astype(str)) - {"all"}):
                        rows.append({**_comparison_row(claim, method, tested, baseline, site, {}, n_boot,
                                                       PAPER_CINDEX.get(site)),
                                     "verdict": "no paired data",
                                     "note": "no survival_risk artifact: per-subject risks needed for a paired test"})
                continue
            both = a.merge(b[["subject_id", "risk"]], on="subject_id", suffixes=("_a", "_b"))
            for site, part in both.groupby("site"):
                time, event = part["os_days"].to_numpy(float), part["os_event"].to_numpy(float)
                patients = part["patient_id"].astype(str).to_numpy()
                counts = bootstrap.draw(len(part), n_boot, seed, clusters=patients, strata=event)
                distinct = bootstrap.log10_distinct_resamples(len(part), patients, event)
                result = bootstrap.paired_difference(
                    lambda c: bootstrap.concordance(time, event, part["risk_a"].to_numpy(float), c),
                    lambda c: bootstrap.concordance(time, event, part["risk_b"].to_numpy(float), c),
                    counts, len(part))
                rows.append(_comparison_row(claim, method, tested, baseline, str(site),
                                            {**result.as_dict(), "deltas": result.deltas, "n": len(part),
                                             "log10_distinct": distinct}, n_boot, PAPER_CINDEX.get(str(site)),
                                            note=f"{int(event.sum())} events", min_distinct=min_distinct))
    return rows


# --------------------------------------------------------------------------------------------- site mixing
def _embeddings(run_dir: Path, method: str, objective: str, subjects: list[str]) -> np.ndarray | None:
    path = RunLayout(Path(run_dir)).embeddings(method, objective)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        position = {s: i for i, s in enumerate(np.asarray(data["subject_id"]).astype(str))}
        if any(s not in position for s in subjects):
            return None
        return np.asarray(data["embedding"], dtype=float)[[position[s] for s in subjects]]


def site_mixing_rows(run_dir: Path, methods: list[str], n_boot: int, pca_components: int = 10,
                     seed: int = 0, min_distinct: float = 1.0) -> list[dict]:
    """Paired difference of the mean silhouette width by site (test subjects, PCA fitted on training subjects);
    resamples: test patients whole, within site. Two objectives with the same embedding (a frozen backbone,
    ``finetuning.mode: linear``: only the heads differ) cannot differ here: that row has no p-value (not tested,
    outside the Holm family, verdict "not evaluable") and says why."""
    claim = next(c for c in CLAIMS if c.kind == "site_mixing")
    manifest = read_manifest(run_dir)
    if manifest is None or "split" not in manifest:
        return []
    train = manifest[manifest["split"] == "train"]
    test = manifest[manifest["split"] == "test"]
    sites = test["site"].astype(str).to_numpy()
    rows = []
    for method in methods:
        widths, embedded = {}, {}
        for objective in {o for pair in COMPARISONS for o in pair}:
            fit = _embeddings(run_dir, method, objective, train["subject_id"].tolist())
            score = _embeddings(run_dir, method, objective, test["subject_id"].tolist())
            if fit is not None and score is not None:
                embedded[objective] = (fit, score)
                try:
                    widths[objective] = pca_silhouette(fit, score, sites, pca_components)[1]
                except ValueError:
                    pass
        patients = test["patient_id"].astype(str).to_numpy()
        counts = bootstrap.draw(len(sites), n_boot, seed, clusters=patients, strata=sites)
        distinct = bootstrap.log10_distinct_resamples(len(sites), patients, sites)
        for tested, baseline in COMPARISONS:
            if tested in widths and baseline in widths and all(
                    np.array_equal(a, b) for a, b in zip(embedded[tested], embedded[baseline])):
                mean = float(widths[tested].mean())
                rows.append(_comparison_row(claim, method, tested, baseline, "all",
                                            {"a": mean, "b": mean, "delta": 0.0, "n": len(sites)}, n_boot,
                                            note=f"{tested} and {baseline} share one embedding (frozen backbone, "
                                                 "finetuning.mode: linear): the claim cannot differ, not tested"))
            elif tested in widths and baseline in widths:
                result = bootstrap.paired_difference(lambda c: bootstrap.mean(widths[baseline], c),
                                                     lambda c: bootstrap.mean(widths[tested], c), counts, len(sites))
                rows.append(_comparison_row(claim, method, tested, baseline, "all",
                                            {**result.as_dict(), "deltas": result.deltas, "n": len(sites),
                                             "log10_distinct": distinct}, n_boot,
                                            note="delta = silhouette difference (negative = sites mix more)",
                                            min_distinct=min_distinct))
    return rows


# ----------------------------------------------------------------------------------------------- Grad-CAM
def gradcam_rows(run_dir: Path, methods: list[str], n_boot: int, seed: int = 0, min_distinct: float = 1.0,
                 scenario: str = "imported") -> list[dict]:
    """Lesion enrichment = mean CAM share / mean volume share of the lesion (BraTS labels > 0; 1 = no preference)
    per backbone, objective and explained endpoint, tested against **both controls** of
    :mod:`nrfm.eval.gradcam`: the same maps scored against another subject's mask (``shuffled_mask_*``: a
    centre-heavy map scores above 1 there too) and the maps of a randomly initialised model (``random_init_*``).
    delta = enrichment - max(control enrichments), per bootstrap resample of the per-subject scores
    ``artifacts/gradcam_subjects_{backbone}_{objective}_{endpoint}.csv`` (test patients whole, within site); a
    focus is shown only when delta's CI lies above 0. Files without control columns test enrichment > 1 (said in
    the note). These rows join the Holm family. Without those files, the CI of ``metrics/gradcam.csv`` is shown
    and decides alone (outside the Holm family, said in the note)."""
    claim = next(c for c in CLAIMS if c.kind == "gradcam")
    manifest = read_manifest(run_dir)
    patient_of = manifest.set_index("subject_id")["patient_id"].astype(str) if manifest is not None else None
    rows = []
    for method in methods:
        for objective, endpoint, path in RunLayout(Path(run_dir)).gradcam_subject_files(method):
            scores = pd.read_csv(path, dtype={"subject_id": str, "site": str})
            scores = scores[scores["note"].fillna("").astype(str) == ""]
            patients = (scores["subject_id"].map(patient_of).fillna(scores["subject_id"]) if patient_of is not None
                        else scores["subject_id"]).astype(str).to_numpy()
            sites = scores["site"].astype(str).to_numpy()
            counts = bootstrap.draw(len(scores), n_boot, seed, clusters=patients, strata=sites)

            def enrichment(prefix: str):
                cam = scores[f"{prefix}cam_in_tumor"].to_numpy(float)
                volume = scores[f"{prefix}tumor_volume_fraction"].to_numpy(float)
                return lambda c: bootstrap.ratio_of_means(cam, volume, c)

            controls = [p for p in ("shuffled_mask_", "random_init_") if f"{p}cam_in_tumor" in scores
                        and scores[f"{p}cam_in_tumor"].notna().all()]
            main = enrichment("")
            reference = ((lambda c: np.max([enrichment(p)(c) for p in controls], axis=0)) if controls
                         else (lambda c: np.ones(c.shape[0]) if np.ndim(c) > 1 else 1.0))
            full = np.ones((1, len(scores)))
            point = float(main(full)[0]) if len(scores) else np.nan
            baseline = float(np.atleast_1d(reference(full))[0]) if len(scores) else np.nan
            deltas = main(counts) - reference(counts) if len(scores) else np.array([])
            low, high = bootstrap.percentile_ci(deltas)
            result = {"log10_distinct": bootstrap.log10_distinct_resamples(len(scores), patients, sites),
                      "deltas": deltas}
            against = (" and ".join(p.rstrip("_").replace("_", " ") for p in controls) if controls
                       else "1 (no control columns in this file)")
            row = _comparison_row(claim, method, objective, "", "all", result, n_boot, min_distinct=min_distinct,
                                  note=f"explained endpoint {endpoint}; value = CAM share / volume share of the "
                                       f"lesion (1 = no preference); delta = value - the larger control "
                                       f"enrichment ({against})")
            rows.append({**row, "comparison": objective, "metric": "cam lesion enrichment over controls",
                         "value": point, "baseline": baseline, "delta": point - baseline, "ci_low": float(low),
                         "ci_high": float(high), "n_test": len(scores), "paper_erm": np.nan, "paper_dro": np.nan,
                         "paper_delta": np.nan})
    if rows:
        return rows
    table = _metrics(run_dir, "gradcam")  # older runs: no per-subject file, the CI alone decides
    if table is None or table.empty or "lesion_enrichment_ci_low" not in table:
        return rows
    for (backbone, objective), part in table[table["site"] == "all"].groupby(["backbone", "objective"]):
        point, low, high = (float(part[c].iloc[0]) for c in
                            ("lesion_enrichment", "lesion_enrichment_ci_low", "lesion_enrichment_ci_high"))
        if not (np.isfinite(low) and np.isfinite(high)):
            verdict = "not evaluable"
        elif scenario == "imported":
            verdict = "reproduced" if low > 1 else "not reproduced" if high < 1 else "inconclusive"
        else:
            verdict = "lesion focus shown" if low > 1 else "lesion focus not shown"
        rows.append({"claim": claim.text, "claim_key": claim.key, "backbone": backbone, "comparison": objective,
                     "objective": objective, "site": "all", "metric": "cam lesion enrichment", "value": point,
                     "delta": point - 1, "ci_low": low, "ci_high": high, "verdict": verdict,
                     "n_test": float(part["n"].iloc[0]) if "n" in part else np.nan,
                     "note": "no per-subject Grad-CAM scores: the CI of metrics/gradcam.csv against 1 decides, "
                             "outside the Holm family"})
    return rows
