"""The run's verdict: measured ERM-versus-DRO differences beside the paper's published numbers.

The paper's numbers (Bhattacharya et al., arXiv 2509.15416) are quoted in :data:`PAPER_CLAIMS`; they are
never used in a computation except as the effect size a verdict is tested against. Every verdict is computed
from this run's predictions and metrics with a paired bootstrap over test subjects (the same resampled
subjects for ERM and DRO):

* ``reproduced``: the 95% CI of DRO minus ERM lies above zero (or, for a direction claim, on the paper's side);
* ``not reproduced``: the CI excludes the paper's effect size, i.e. its upper bound is below the paper's gain
  (this includes a CI entirely below zero);
* ``inconclusive``: the CI contains both zero and the paper's gain: this sample size cannot tell.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from nrfm.config import BINARY_ENDPOINTS


@dataclass(frozen=True)
class PaperClaim:
    key: str
    text: str
    metric: str  # bacc | auc | c_index | silhouette | cam
    endpoints: tuple[str, ...]
    site: str  # "rare" = the smallest test site (the paper's CUIMC), or a site name
    erm: float | None
    dro: float | None


PAPER_CLAIMS = (
    PaperClaim("bacc_rare_site", "DRO raises mean balanced accuracy at the third (smallest) site", "bacc",
               BINARY_ENDPOINTS, "rare", 0.744, 0.785),
    PaperClaim("auc_rare_site", "DRO raises mean AUC at the third (smallest) site", "auc",
               BINARY_ENDPOINTS, "rare", 0.656, 0.676),
    PaperClaim("auc_cdkn2ab", "DRO raises CDKN2A/2B AUC", "auc", ("cdkn2ab",), "rare", 0.73, 0.92),
    PaperClaim("auc_atrx", "DRO raises ATRX AUC", "auc", ("atrx",), "rare", 0.69, 0.82),
    PaperClaim("acc_ki67", "DRO raises Ki-67 (binarized) accuracy", "bacc", ("ki67",), "rare", 0.60, 0.69),
)
PAPER_CINDEX = {"CUIMC": (0.592, 0.597), "UPenn": (0.647, 0.672), "UCSF": (0.600, 0.627)}


MIN_TEST_SUBJECTS = 20  # below this a bootstrap CI is too coarse to call anything


def verdict(low: float, high: float, paper_gain: float | None, n: int | None = None) -> str:
    """Classify a DRO-minus-ERM CI against zero and the paper's gain (see module docstring)."""
    if not np.isfinite(low) or not np.isfinite(high) or (n is not None and n < MIN_TEST_SUBJECTS):
        return "inconclusive"
    if low > 0:
        return "reproduced"
    if paper_gain is not None and high < paper_gain:
        return "not reproduced"
    return "inconclusive"


def read_predictions(run_dir: Path, method: str, objective: str, protocol: str = "pooled") -> pd.DataFrame | None:
    path = Path(run_dir) / "artifacts" / f"predictions_{method}_{objective}_{protocol}.csv"
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"subject_id": str, "patient_id": str, "site": str})


def rare_site(predictions: pd.DataFrame) -> str:
    """The site with the fewest test subjects (the role CUIMC plays in the paper)."""
    test = predictions[predictions["split"] == "test"]
    return test.groupby("site")["subject_id"].nunique().sort_values(kind="stable").index[0]


def _endpoint_metric(metric: str, y: np.ndarray, score: np.ndarray, threshold: float) -> float:
    if len(np.unique(y)) < 2:
        return np.nan
    if metric == "auc":
        return roc_auc_score(y, score)
    return balanced_accuracy_score(y, score >= threshold)


def _binarize(frame: pd.DataFrame, thresholds: dict[str, float]) -> pd.DataFrame:
    """Continuous endpoints enter binary claims as y >= documented threshold (the score is the prediction)."""
    frame = frame.copy()
    for endpoint, cut in thresholds.items():
        rows = frame["endpoint"] == endpoint
        frame.loc[rows, "y_true"] = (frame.loc[rows, "y_true"] >= cut).astype(float)
    return frame


def _wide(frame: pd.DataFrame, endpoints: tuple[str, ...]) -> tuple[list[str], dict]:
    frame = frame[frame["endpoint"].isin(endpoints)].dropna(subset=["y_true"])
    subjects = sorted(frame["subject_id"].unique())
    per_endpoint = {}
    for endpoint, part in frame.groupby("endpoint"):
        part = part.set_index("subject_id")
        per_endpoint[endpoint] = (part["y_true"].to_dict(), part["y_score"].to_dict(), float(part["threshold"].iloc[0]))
    return subjects, per_endpoint


def _mean_metric(metric: str, subjects: list[str], wide: dict) -> float:
    values = []
    for y_map, s_map, threshold in wide.values():
        chosen = [s for s in subjects if s in y_map]
        if len(chosen) < 2:
            continue
        y = np.array([y_map[s] for s in chosen])
        s = np.array([s_map[s] for s in chosen])
        values.append(_endpoint_metric(metric, y, s, threshold))
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else np.nan


def paired_bootstrap(erm: pd.DataFrame, dro: pd.DataFrame, metric: str, endpoints: tuple[str, ...],
                     n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean-over-endpoints metric for ERM and DRO on the same test subjects, and the CI of their difference.

    Both frames are test predictions of one site (long format). Subjects are resampled with replacement;
    endpoints with a single class in a resample are left out of that resample's mean.
    """
    subjects, erm_wide = _wide(erm, endpoints)
    _, dro_wide = _wide(dro, endpoints)
    point_erm, point_dro = _mean_metric(metric, subjects, erm_wide), _mean_metric(metric, subjects, dro_wide)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        sample = list(rng.choice(subjects, size=len(subjects), replace=True)) if subjects else []
        deltas.append(_mean_metric(metric, sample, dro_wide) - _mean_metric(metric, sample, erm_wide))
    deltas = np.array([d for d in deltas if np.isfinite(d)])
    low, high = (np.percentile(deltas, [2.5, 97.5]) if len(deltas) >= 10 else (np.nan, np.nan))
    return {"erm": point_erm, "dro": point_dro, "delta": point_dro - point_erm, "ci_low": float(low),
            "ci_high": float(high), "n": len(subjects), "evaluable_endpoints": len(erm_wide)}


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
            values.append(roc_auc_score(part["y_true"], truth.loc[part["subject_id"]].to_numpy()))
    return float(np.mean(values)) if values else np.nan


def molecular_verdicts(run_dir: Path, methods: list[str], thresholds: dict[str, float], n_boot: int,
                       oracle: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per paper claim and backbone (pooled protocol, test split), with a computed verdict."""
    rows = []
    for method in methods:
        erm, dro = read_predictions(run_dir, method, "erm"), read_predictions(run_dir, method, "dro")
        if erm is None or dro is None:
            continue
        erm = _binarize(erm[erm["split"] == "test"], thresholds)
        dro = _binarize(dro[dro["split"] == "test"], thresholds)
        site = rare_site(erm)
        for claim in PAPER_CLAIMS:
            where = site if claim.site == "rare" else claim.site
            result = paired_bootstrap(erm[erm["site"] == where], dro[dro["site"] == where], claim.metric,
                                      claim.endpoints, n_boot=n_boot, seed=seed)
            note = ""
            if not np.isfinite(result["delta"]):
                # a rare marker may have one class only at the smallest site: fall back to all sites, say so
                where = "all"
                result = paired_bootstrap(erm, dro, claim.metric, claim.endpoints, n_boot=n_boot, seed=seed)
                note = "single class at the smallest site; evaluated on all sites"
            gain = (claim.dro - claim.erm) if claim.erm is not None else None
            if result["n"] < MIN_TEST_SUBJECTS:
                note = "; ".join(filter(None, [note, f"only {result['n']} test subjects (< {MIN_TEST_SUBJECTS})"]))
            oracle_auc = (oracle_mean_auc(oracle, erm if where == "all" else erm[erm["site"] == where],
                                          claim.endpoints) if claim.metric == "auc" else np.nan)
            rows.append({"claim": claim.text, "backbone": method, "site": where, "metric": claim.metric,
                         "paper_erm": claim.erm, "paper_dro": claim.dro, "paper_delta": gain,
                         "erm": result["erm"], "dro": result["dro"], "delta": result["delta"],
                         "ci_low": result["ci_low"], "ci_high": result["ci_high"], "oracle": oracle_auc,
                         "n_test": result["n"],
                         "verdict": verdict(result["ci_low"], result["ci_high"], gain, result["n"]),
                         "note": note})
    return pd.DataFrame(rows)


def direction_verdicts(table: pd.DataFrame | None, value: str, low: str, high: str, group: str,
                       better: Callable[[float, float], bool], claim: str) -> pd.DataFrame:
    """Verdicts for claims stated as a direction (e.g. lower silhouette with DRO) from per-objective CIs.

    Reproduced when DRO's CI lies entirely on the better side of ERM's point value; not reproduced when it
    lies entirely on the worse side; inconclusive otherwise.
    """
    rows = []
    if table is None or table.empty:
        return pd.DataFrame(rows)
    for key, part in table.groupby(group):
        by = part.set_index("stage" if "stage" in part else "objective")
        if "erm" not in by.index or "dro" not in by.index:
            continue
        erm, dro = by.loc["erm"], by.loc["dro"]
        if not np.isfinite(dro[value]) or not np.isfinite(erm[value]):
            result = "inconclusive"
        elif better(dro[high], erm[value]) and better(dro[low], erm[value]):
            result = "reproduced"
        elif not better(dro[high], erm[value]) and not better(dro[low], erm[value]):
            result = "not reproduced"
        else:
            result = "inconclusive"
        rows.append({"claim": claim, "backbone": key, "site": "all", "metric": value, "erm": erm[value],
                     "dro": dro[value], "delta": dro[value] - erm[value], "ci_low": dro[low] - erm[value],
                     "ci_high": dro[high] - erm[value], "verdict": result,
                     "note": "CI of the DRO value minus the ERM point value"})
    return pd.DataFrame(rows)


def find_runs(run_dir: Path) -> list[Path]:
    """The run itself, or for a sweep folder its child runs (``runs/*``) that have metrics."""
    run_dir = Path(run_dir)
    children = sorted(p.parent for p in run_dir.glob("runs/*/metrics"))
    return children or [run_dir]


def collect_metrics(run_dir: Path, name: str) -> pd.DataFrame | None:
    """``metrics/<name>.csv`` of a run, or of every child run of a sweep with a ``run`` column added."""
    frames = []
    for run in find_runs(run_dir):
        path = run / "metrics" / f"{name}.csv"
        if path.is_file():
            frame = pd.read_csv(path)
            frame.insert(0, "run", run.name)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def spread(frame: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over runs (seeds) of each metric, per key."""
    grouped = frame.groupby(keys)[values]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_sd")).join(
        grouped.size().rename("runs"))
    return out.reset_index()


def site_invariance_verdicts(table: pd.DataFrame | None) -> pd.DataFrame:
    """Paper: DRO-tuned embeddings mix sites more, i.e. a lower PCA-silhouette by site than ERM-tuned ones."""
    if table is None or table.empty or "pca_silhouette_ci_low" not in table:
        return pd.DataFrame()
    return direction_verdicts(table, "pca_silhouette_site", "pca_silhouette_ci_low", "pca_silhouette_ci_high",
                              "backbone", lambda a, b: a < b,
                              "DRO embeddings mix sites more (lower PCA-silhouette by site)")


def survival_verdicts(table: pd.DataFrame | None) -> pd.DataFrame:
    """Paper: DRO raises the c-index at every site (CUIMC 0.592->0.597, UPenn 0.647->0.672, UCSF 0.600->0.627)."""
    rows = []
    if table is None or table.empty:
        return pd.DataFrame(rows)
    for (backbone, site), part in table[table["site"] != "all"].groupby(["backbone", "site"]):
        by = part.set_index("objective")
        if "erm" not in by.index or "dro" not in by.index:
            continue
        erm, dro = by.loc["erm"], by.loc["dro"]
        paper = PAPER_CINDEX.get(str(site))
        if not (np.isfinite(erm["c_index"]) and np.isfinite(dro["c_index"])):
            result, note = "inconclusive", "c-index not computable at this site (see survival table)"
        elif dro.get("n", MIN_TEST_SUBJECTS) < MIN_TEST_SUBJECTS:
            result, note = "inconclusive", f"only {int(dro['n'])} test patients (< {MIN_TEST_SUBJECTS})"
        elif dro["ci_low"] > erm["c_index"]:
            result, note = "reproduced", ""
        elif dro["ci_high"] < erm["c_index"]:
            result, note = "not reproduced", ""
        else:
            result, note = "inconclusive", ""
        rows.append({"claim": "DRO raises the survival c-index at each site", "backbone": backbone, "site": site,
                     "metric": "c_index", "paper_erm": paper[0] if paper else np.nan,
                     "paper_dro": paper[1] if paper else np.nan,
                     "paper_delta": (paper[1] - paper[0]) if paper else np.nan, "erm": erm["c_index"],
                     "dro": dro["c_index"], "delta": dro["c_index"] - erm["c_index"],
                     "ci_low": dro["ci_low"] - erm["c_index"], "ci_high": dro["ci_high"] - erm["c_index"],
                     "n_test": dro.get("n", np.nan), "verdict": result,
                     "note": note or "CI of the DRO c-index minus the ERM point value"})
    return pd.DataFrame(rows)


def gradcam_verdicts(table: pd.DataFrame | None) -> pd.DataFrame:
    """Paper: Grad-CAM attends to tumour and peritumoral tissue. Measured as the lesion enrichment of the test
    subjects of all sites: the mean share of CAM mass in tumour + peritumoral ring over the mean share of the volume
    they occupy (1 = no preference), with its bootstrap CI over subjects (``nrfm.eval.gradcam.summarise_scores``).
    Reproduced when the CI lies above 1, not reproduced when it lies below 1, inconclusive otherwise."""
    rows = []
    if table is None or table.empty:
        return pd.DataFrame(rows)
    for (backbone, objective), part in table.groupby(["backbone", "objective"]):
        overall = part[part["site"] == "all"]
        sites = part[part["site"] != "all"]
        if overall.empty or "lesion_enrichment_ci_low" not in part:
            point = low = high = np.nan
        else:
            point, low, high = (float(overall[c].iloc[0]) for c in
                                ("lesion_enrichment", "lesion_enrichment_ci_low", "lesion_enrichment_ci_high"))
        result = ("reproduced" if low > 1 else "not reproduced" if high < 1 else "inconclusive")
        per_site = ", ".join(f"{s} {v:.2f}" for s, v in zip(sites["site"], sites.get("lesion_enrichment", []))
                             if np.isfinite(v))
        rows.append({"claim": "Grad-CAM concentrates on tumour and peritumoral tissue", "backbone": backbone,
                     "site": "all", "metric": f"CAM lesion enrichment ({objective})", "erm": np.nan, "dro": np.nan,
                     "delta": point, "ci_low": low, "ci_high": high,
                     "n_test": float(overall["n"].iloc[0]) if len(overall) and "n" in overall else np.nan,
                     "verdict": result,
                     "note": "delta column = CAM share / volume share of tumour + peritumoral ring (1 = no preference)"
                             + (f"; per site: {per_site}" if per_site else "")})
    return pd.DataFrame(rows)


VERDICT_COLUMNS = ["claim", "backbone", "site", "metric", "paper_erm", "paper_dro", "paper_delta", "erm", "dro",
                   "delta", "ci_low", "ci_high", "oracle", "n_test", "verdict", "note"]


def all_verdicts(run_dir: Path, methods: list[str], thresholds: dict[str, float], n_boot: int,
                 oracle: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """Every claim's verdict for one run, in one table (written to metrics/verdicts.csv by the summary notebook)."""
    metrics = lambda name: (pd.read_csv(Path(run_dir) / "metrics" / f"{name}.csv")
                            if (Path(run_dir) / "metrics" / f"{name}.csv").is_file() else None)
    parts = [molecular_verdicts(run_dir, methods, thresholds, n_boot, oracle, seed),
             site_invariance_verdicts(metrics("site_invariance")), survival_verdicts(metrics("survival")),
             gradcam_verdicts(metrics("gradcam"))]
    table = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(
        not p.empty for p in parts) else pd.DataFrame(columns=VERDICT_COLUMNS)
    return table.reindex(columns=VERDICT_COLUMNS)


def verdict_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per claim: how many backbones (and sites) reproduced, did not, or could not tell."""
    if table.empty:
        return table
    return table.pivot_table(index="claim", columns="verdict", values="backbone", aggfunc="count",
                             fill_value=0).reset_index()
