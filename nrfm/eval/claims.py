"""The run's verdicts: paired objective comparisons, Holm-adjusted, worded for the cohort they ran on.

The paper's numbers (Bhattacharya et al., arXiv 2509.15416) are quoted in :data:`CLAIMS`; they enter no
computation except as the effect size an imported-cohort verdict is compared with. The rules, as data that the
notebooks print (:func:`rule_table`, :func:`wording_table`):

1. **Paired tests.** Every claim compares two fine-tuning objectives on the same test subjects with the one
   bootstrap of the kit (:mod:`nrfm.eval.bootstrap`): patients drawn whole, the same resample scores both objectives,
   percentile 95% CI of the difference and a one-sided bootstrap p-value for "the gain is > 0". Comparisons
   (:data:`COMPARISONS`): DRO - ERM and DRO - reweighted. Molecular claims score the claim's endpoints on the
   smallest TRAINING site (:func:`smallest_training_site`, fixed before any test result is seen); survival
   claims the per-subject risks of ``artifacts/survival_risk_{backbone}_{objective}.csv`` per site (c-index;
   without that file: "no paired data"); the site-mixing claim the per-subject silhouette widths of the
   ``embeddings_{backbone}_{objective}.npz`` test subjects (PCA fitted on training subjects).
2. **Multiplicity.** Holm's step-down procedure (Holm 1979) over the family of every test of the run
   (claims x backbones x comparisons x survival sites, and the Grad-CAM tests) with a finite p; ``adjusted_p`` in
   ``verdicts.csv``; a gain is declared where ``adjusted_p < ALPHA`` (one-sided 0.025, so before adjustment the
   rule equals "the 95% CI lies above zero"). The verdicts use at least :func:`nrfm.eval.bootstrap.resamples_for_holm`
   resamples so that the smallest possible p can pass Holm's first step.
3. **No fixed minimum sample; a minimum derived from the data.** Small samples give wide CIs and large
   p-values; the CI and Holm decide. Below that, a bootstrap over very few patients is degenerate (one patient
   per class: a single possible resample, a zero-width CI whatever the data): a comparison is "not evaluable"
   when its resampling scheme has fewer distinct resamples (:func:`nrfm.eval.bootstrap.log10_distinct_resamples`,
   product over strata of C(2k-1, k) for k patients) than family size / ``ALPHA``, the resolution Holm needs
   (about five patients per class and stratum for a family of ~70). An undefined resample (no comparable
   pair, one class) makes the CI and p NaN ("not evaluable"); it is never dropped.
4. **Attribution.** A gain is attributed to DRO (row ``comparison = dro vs erm+reweighted``) only when DRO beats
   ERM AND beats reweighted, both Holm-adjusted (intersection-union test: its p is the larger adjusted p). A
   run without a reweighted model (older configs) says so and attributes on DRO - ERM alone.
5. **Wording** (:data:`WORDING`): on the synthetic ``site-shift`` scenario a claim is a positive control
   ("planted gain detected" / "planted gain not detected"); on ``no-shift`` a negative control ("no gain where
   none was planted" / "gain reported where none was planted", a false positive); on an imported cohort the
   paper's claim ("reproduced" / "not reproduced" when the CI excludes the paper's gain / "inconclusive").
6. **Grad-CAM** is not a comparison: per backbone and objective, lesion enrichment (CAM share over volume share
   of tumour + peritumoral ring) tested against 1 from the per-subject scores (``gradcam_subjects_*`` artifacts),
   in the same Holm family; older runs without those files: the CI of ``metrics/gradcam.csv`` against 1, outside
   the family (said in the note).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nrfm.config import BINARY_ENDPOINTS, load_config
from nrfm.eval import bootstrap
from nrfm.eval.site_invariance import pca_silhouette
from nrfm.files import atomic_write_csv
from nrfm.pipeline.context import open_run
from nrfm.pipeline.layout import RunLayout
from nrfm.pipeline.provenance import describe_context

ALPHA = 0.025  # one-sided, family-wise (Holm)
COMPARISONS = (("dro", "erm"), ("dro", "reweighted"))  # (objective tested, baseline): gain = first - second
ATTRIBUTION = "dro vs erm+reweighted"


@dataclass(frozen=True)
class ClaimSpec:
    """One paper claim and how it is tested."""

    key: str
    text: str
    kind: str  # molecular | survival | site_mixing | gradcam
    metric: str  # bacc | auc | c_index | silhouette | cam
    endpoints: tuple[str, ...] = ()
    site: str = "smallest training site"  # | each site | all
    paper_erm: float | None = None
    paper_dro: float | None = None
    direction: int = 1  # +1: higher is better; -1: lower is better (silhouette)

    @property
    def paper_gain(self) -> float | None:
        return None if self.paper_erm is None else self.direction * (self.paper_dro - self.paper_erm)


PAPER_CINDEX = {"CUIMC": (0.592, 0.597), "UPenn": (0.647, 0.672), "UCSF": (0.600, 0.627)}
CLAIMS = (
    ClaimSpec("bacc_rare_site", "DRO raises mean balanced accuracy at the smallest site", "molecular", "bacc",
              BINARY_ENDPOINTS, paper_erm=0.744, paper_dro=0.785),
    ClaimSpec("auc_rare_site", "DRO raises mean AUC at the smallest site", "molecular", "auc", BINARY_ENDPOINTS,
              paper_erm=0.656, paper_dro=0.676),
    ClaimSpec("auc_cdkn2ab", "DRO raises CDKN2A/2B AUC", "molecular", "auc", ("cdkn2ab",), paper_erm=0.73,
              paper_dro=0.92),
    ClaimSpec("auc_atrx", "DRO raises ATRX AUC", "molecular", "auc", ("atrx",), paper_erm=0.69, paper_dro=0.82),
    ClaimSpec("acc_ki67", "DRO raises Ki-67 (binarized) balanced accuracy", "molecular", "bacc", ("ki67",),
              paper_erm=0.60, paper_dro=0.69),
    ClaimSpec("cindex_site", "DRO raises the survival c-index at each site", "survival", "c_index", (),
              "each site"),
    ClaimSpec("site_mixing", "DRO embeddings mix sites more (lower PCA-silhouette by site)", "site_mixing",
              "silhouette", (), "all", direction=-1),
    ClaimSpec("gradcam_lesion", "Grad-CAM concentrates on tumour and peritumoral tissue", "gradcam", "cam", (),
              "all"),
)
PAPER_CLAIMS = CLAIMS  # the earlier name

WORDING = {  # (scenario, gain declared) -> verdict
    ("site-shift", True): "planted gain detected", ("site-shift", False): "planted gain not detected",
    ("no-shift", True): "gain reported where none was planted",
    ("no-shift", False): "no gain where none was planted",
    ("synthetic", True): "gain detected", ("synthetic", False): "no gain detected",  # legacy: no scenario key
    ("imported", True): "reproduced", ("imported", False): "inconclusive",  # "not reproduced": CI below the gain
}
CONTROL = {("site-shift", True): "true positive", ("site-shift", False): "false negative",
           ("no-shift", True): "false positive", ("no-shift", False): "true negative"}
TONE = {"planted gain detected": "good", "no gain where none was planted": "good", "reproduced": "good",
        "planted gain not detected": "bad", "gain reported where none was planted": "bad",
        "not reproduced": "bad", "lesion focus shown": "good", "lesion focus not shown": "bad"}
VERDICTS = frozenset(WORDING.values()) | {"not reproduced", "not evaluable", "no paired data", "lesion focus shown",
                                          "lesion focus not shown"}
VERDICT_COLUMNS = ["claim", "claim_key", "backbone", "comparison", "objective", "site", "metric", "scenario",
                   "paper_erm", "paper_dro", "paper_delta", "baseline", "value", "delta", "ci_low", "ci_high",
                   "p_value", "adjusted_p", "gain_declared", "verdict", "control", "oracle", "n_test", "n_boot",
                   "note"]


def rule_table() -> pd.DataFrame:
    """The claim specs as a table (what is tested, where, against which paper numbers)."""
    frame = pd.DataFrame([{**asdict(c), "endpoints": ", ".join(c.endpoints), "paper_gain": c.paper_gain}
                          for c in CLAIMS])
    frame["test"] = frame["kind"].map({
        "molecular": "paired bootstrap of the mean metric over the endpoints, per comparison; Holm",
        "survival": "paired bootstrap of the c-index difference per site (survival_risk files); Holm",
        "site_mixing": "paired bootstrap of the mean silhouette width difference (test subjects); Holm",
        "gradcam": "bootstrap of the lesion enrichment against 1 per objective (per-subject scores); Holm"})
    return frame


def wording_table() -> pd.DataFrame:
    """Scenario x decision -> verdict wording (and, for the synthetic controls, what a correct answer is)."""
    return pd.DataFrame([{"scenario": s, "gain declared (Holm-adjusted)": g, "verdict": v,
                          "control outcome": CONTROL.get((s, g), "")} for (s, g), v in WORDING.items()])


def verdict_tone(verdict: str) -> str:
    """good | bad | neutral, for colouring a verdict."""
    return TONE.get(str(verdict), "neutral")


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


# ------------------------------------------------------------------------------------------ molecular claims
def paired_endpoint_mean(a: pd.DataFrame, b: pd.DataFrame, metric: str, endpoints: tuple[str, ...], n_boot: int,
                         seed: int = 0) -> dict:
    """Mean-over-endpoints metric of objectives A and B on the same test exams, and the paired difference B - A.

    Endpoints with a single class (or, for ``bacc``, a NaN threshold of either model: no decision rule) are not
    scored at all and are named in the note. Patients are drawn whole; one endpoint: within class strata;
    several: a resample lacking a class of a scored endpoint is redrawn (:func:`nrfm.eval.bootstrap.draw`).
    """
    keys = ["subject_id", "endpoint"]
    both = a[a["endpoint"].isin(endpoints)].dropna(subset=["y_true"]).merge(
        b[keys + ["y_score", "threshold"]], on=keys, suffixes=("_a", "_b"))
    subjects = sorted(both["subject_id"].unique())
    pos = {s: i for i, s in enumerate(subjects)}
    patients = both.groupby("subject_id")["patient_id" if "patient_id" in both else "subject_id"].first()
    clusters = patients.loc[subjects].astype(str).to_numpy()
    scored, skipped, labels = [], [], []
    for endpoint, part in both.groupby("endpoint"):
        y = np.full(len(subjects), np.nan)
        y[part["subject_id"].map(pos).to_numpy()] = part["y_true"].to_numpy(dtype=float)
        thresholds = (float(part["threshold_a"].iloc[0]), float(part["threshold_b"].iloc[0]))
        if np.unique(y[np.isfinite(y)]).size < 2:
            skipped.append(f"{endpoint} (single class)")
            continue
        if metric == "bacc" and not np.isfinite(thresholds).all():
            skipped.append(f"{endpoint} (no validation threshold)")
            continue
        arrays = []
        for side in ("a", "b"):
            s = np.zeros(len(subjects))
            s[part["subject_id"].map(pos).to_numpy()] = part[f"y_score_{side}"].to_numpy(dtype=float)
            arrays.append(s)
        scored.append((endpoint, y, arrays, thresholds))
        labels.append(y)
    nan = float("nan")
    out = {"a": nan, "b": nan, "delta": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, "n": len(subjects),
           "endpoints": [e for e, *_ in scored], "deltas": np.array([]),
           "note": ("not scored: " + ", ".join(skipped)) if skipped else ""}
    if not scored:
        return out
    strata = labels[0] if len(labels) == 1 else None
    out["log10_distinct"] = bootstrap.log10_distinct_resamples(len(subjects), clusters, strata)
    counts = bootstrap.draw(len(subjects), n_boot, seed, clusters=clusters, strata=strata,
                            both_classes=labels if len(labels) > 1 else ())

    def statistic(side: int):
        def value(c: np.ndarray) -> np.ndarray:
            per = [bootstrap.auc(y, s[side], c) if metric == "auc" else
                   bootstrap.balanced_accuracy(y, s[side], t[side], c) for _, y, s, t in scored]
            return np.mean(per, axis=0)
        return value

    result = bootstrap.paired_difference(statistic(0), statistic(1), counts, len(subjects))
    return {**out, **{k: v for k, v in result.as_dict().items() if k != "n_boot"}, "deltas": result.deltas}


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
        p_value = bootstrap.p_greater_than_zero(claim.direction * np.asarray(result["deltas"], dtype=float))
    if result.get("log10_distinct", np.inf) < np.log10(min_distinct):
        # the data-derived minimum sample (module rule 3): too few patients per stratum for any decision
        p_value = float("nan")
        note = "; ".join(n for n in (note, f"only {10 ** result['log10_distinct']:.0f} distinct resamples "
                                     f"(< family size / alpha = {min_distinct:.0f}): too few patients per stratum "
                                     "for a decision") if n)
    gain_known = baseline == "erm" and paper_erm is not None and np.isfinite(paper_erm)
    return {"claim": claim.text, "claim_key": claim.key, "backbone": backbone, "comparison": f"{tested}-{baseline}",
            "objective": tested, "site": site, "metric": claim.metric,
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
    for method in methods:
        frames = {o: read_predictions(run_dir, method, o) for o in {o for pair in COMPARISONS for o in pair}}
        if frames.get("erm") is None:
            continue
        site = smallest_training_site(frames["erm"])
        tests = {o: _binarize(f[f["split"] == "test"], thresholds) for o, f in frames.items() if f is not None}
        for tested, baseline in COMPARISONS:
            if tested not in tests or baseline not in tests:
                continue
            a, b = tests[baseline], tests[tested]
            for claim in (c for c in CLAIMS if c.kind == "molecular"):
                where, note = site, ""
                result = paired_endpoint_mean(a[a["site"] == site], b[b["site"] == site], claim.metric,
                                              claim.endpoints, n_boot, seed)
                labelled = a[a["endpoint"].isin(claim.endpoints)]["y_true"].notna().any()
                if not labelled:
                    note = "no labelled test exams for " + ", ".join(claim.endpoints)
                elif not result["endpoints"] and len(claim.endpoints) == 1:
                    # a rare marker may have one class at the smallest site (test LABELS, not results, decide)
                    where, note = "all", f"single class at {site}; evaluated on all sites"
                    result = paired_endpoint_mean(a, b, claim.metric, claim.endpoints, n_boot, seed)
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
    resamples: test patients whole, within site."""
    claim = next(c for c in CLAIMS if c.kind == "site_mixing")
    manifest = read_manifest(run_dir)
    if manifest is None or "split" not in manifest:
        return []
    train = manifest[manifest["split"] == "train"]
    test = manifest[manifest["split"] == "test"]
    sites = test["site"].astype(str).to_numpy()
    rows = []
    for method in methods:
        widths = {}
        for objective in {o for pair in COMPARISONS for o in pair}:
            fit = _embeddings(run_dir, method, objective, train["subject_id"].tolist())
            score = _embeddings(run_dir, method, objective, test["subject_id"].tolist())
            if fit is not None and score is not None:
                try:
                    widths[objective] = pca_silhouette(fit, score, sites, pca_components)[1]
                except ValueError:
                    pass
        patients = test["patient_id"].astype(str).to_numpy()
        counts = bootstrap.draw(len(sites), n_boot, seed, clusters=patients, strata=sites)
        distinct = bootstrap.log10_distinct_resamples(len(sites), patients, sites)
        for tested, baseline in COMPARISONS:
            if tested in widths and baseline in widths:
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


# ---------------------------------------------------------------------------------------------- decisions
def decide(table: pd.DataFrame, scenario: str, alpha: float = ALPHA) -> pd.DataFrame:
    """Holm over the pairwise comparisons, the DRO attribution rows, and the worded verdicts (module rules)."""
    table = table.reindex(columns=VERDICT_COLUMNS).copy()
    table["scenario"] = scenario
    table["gain_declared"] = table["gain_declared"].astype(object)
    table["verdict"] = table["verdict"].astype(object)
    table["control"] = table["control"].astype(object)
    pairwise = table["comparison"].isin([f"{t}-{b}" for t, b in COMPARISONS])
    cam = table["claim_key"] == "gradcam_lesion"
    tested = pairwise | (cam & table["verdict"].isna())  # Grad-CAM rows decided by a CI alone keep their verdict
    table.loc[tested, "adjusted_p"] = bootstrap.holm(table.loc[tested, "p_value"].to_numpy(float))
    table.loc[tested, "gain_declared"] = table.loc[tested, "adjusted_p"] < alpha
    attribution = []
    dro_erm = table[table["comparison"] == "dro-erm"]
    for _, row in dro_erm.iterrows():
        other = table[(table["comparison"] == "dro-reweighted") & (table["claim_key"] == row["claim_key"])
                      & (table["backbone"] == row["backbone"]) & (table["site"] == row["site"])]
        new = row.copy()
        new["comparison"], new["p_value"] = ATTRIBUTION, np.nan
        if other.empty:
            new["note"] = "; ".join(n for n in (str(row["note"]) if pd.notna(row["note"]) else "",
                                                "no reweighted model in this run: attributed on DRO - ERM alone") if n)
        else:
            both = [float(row["adjusted_p"]), float(other["adjusted_p"].iloc[0])]
            new["adjusted_p"] = max(both) if np.isfinite(both).all() else np.nan
            new["gain_declared"] = bool(row["gain_declared"]) and bool(other["gain_declared"].iloc[0])
            new["note"] = "intersection-union test: DRO beats ERM and reweighted (p = larger adjusted p)"
        attribution.append(new)
    if attribution:
        table = pd.concat([table, pd.DataFrame(attribution)], ignore_index=True)
    for i, row in table.iterrows():
        if isinstance(row["verdict"], str):  # "no paired data", or a Grad-CAM CI-only verdict
            continue
        if not np.isfinite(row["adjusted_p"]):
            table.at[i, "verdict"], table.at[i, "gain_declared"] = "not evaluable", np.nan
            continue
        gain = bool(row["gain_declared"])
        if row["claim_key"] == "gradcam_lesion":
            table.at[i, "verdict"] = (("reproduced" if gain else "not reproduced" if row["ci_high"] < 1 else
                                       "inconclusive") if scenario == "imported"
                                      else "lesion focus shown" if gain else "lesion focus not shown")
            continue
        verdict = WORDING.get((scenario, gain), WORDING[("synthetic", gain)])
        if scenario == "imported" and not gain and np.isfinite(row["paper_delta"]) \
                and row["ci_high"] < row["paper_delta"]:  # the data exclude the paper's gain
            verdict = "not reproduced"
        table.at[i, "verdict"] = verdict
        table.at[i, "control"] = CONTROL.get((scenario, gain), "")
    return table[VERDICT_COLUMNS]


def _metrics(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = RunLayout(Path(run_dir)).metrics(name)
    return pd.read_csv(path) if path.is_file() else None


def all_verdicts(run_dir: Path, methods: list[str], thresholds: dict[str, float], n_boot: int,
                 oracle: pd.DataFrame | None = None, seed: int = 0, pca_components: int = 10,
                 scenario: str | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """Every claim's verdict for one run (``metrics/verdicts.csv``, columns :data:`VERDICT_COLUMNS`).

    ``n_boot`` is raised to :func:`nrfm.eval.bootstrap.resamples_for_holm` of the largest possible family, so that
    Holm can reject at all.
    """
    scenario = scenario or cohort_scenario(run_dir)
    manifest = read_manifest(run_dir)
    n_sites = manifest["site"].nunique() if manifest is not None else 3
    present = [pair for pair in COMPARISONS if any(all(RunLayout(Path(run_dir)).predictions(m, o, "pooled")
                                                      .is_file() for o in pair) for m in methods)]
    family = len(methods) * (max(len(present), 1) * (sum(c.kind == "molecular" for c in CLAIMS) + n_sites + 1)
                             + len({o for pair in present for o in pair}))  # + one Grad-CAM test per objective
    n_boot = max(int(n_boot), bootstrap.resamples_for_holm(family, alpha))
    least = family / alpha  # rule 3: a bootstrap with fewer distinct resamples cannot reach Holm's first step
    rows = (molecular_rows(run_dir, methods, thresholds, n_boot, oracle, seed, least)
            + survival_rows(run_dir, methods, n_boot, seed, least)
            + site_mixing_rows(run_dir, methods, n_boot, pca_components, seed, least)
            + gradcam_rows(run_dir, methods, n_boot, seed, least, scenario))
    return decide(pd.DataFrame(rows, columns=VERDICT_COLUMNS), scenario, alpha)


def verdict_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per claim and comparison: how many backbones (and sites) got each verdict."""
    if table.empty:
        return table
    return table.pivot_table(index=["claim", "comparison"], columns="verdict", values="backbone", aggfunc="count",
                             fill_value=0).reset_index()


# -------------------------------------------------------------------------------------- notebook 06 helpers
def find_runs(run_dir: Path) -> list[Path]:
    """The run itself, or for a sweep folder its child runs (``runs/*``) that have metrics."""
    run_dir = Path(run_dir)
    children = sorted(p.parent for p in run_dir.glob("runs/*/metrics"))
    return children or [run_dir]


def collect_metrics(run_dir: Path, name: str) -> pd.DataFrame | None:
    """``metrics/<name>.csv`` of a run, or of every child run of a sweep with a ``run`` column added."""
    frames = []
    for run in find_runs(run_dir):
        path = RunLayout(run).metrics(name)
        if path.is_file():
            frame = pd.read_csv(path)
            frame.insert(0, "run", run.name)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def spread(frame: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over runs (seeds) of each metric, per key."""
    grouped = frame.groupby(keys, dropna=False)[values]
    out = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=1).add_suffix("_sd")).join(
        grouped.size().rename("runs"))
    return out.reset_index()


@dataclass
class SummaryScope:
    """What notebook 06 summarises: one run, or the child runs of a sweep."""

    run_dir: Path  # the run, or the sweep folder
    runs: list[Path]
    is_sweep: bool
    config: object  # nrfm.config.Config
    description: str


def open_summary(config: str, run_dir: str) -> SummaryScope:
    """A sweep folder (``runs/*`` with metrics) or a single run (opened, or started when ``run_dir`` is empty)."""
    runs = find_runs(Path(run_dir)) if run_dir else []
    if run_dir and runs != [Path(run_dir)]:
        return SummaryScope(Path(run_dir), runs, True, load_config(config),
                            f"sweep over {len(runs)} runs: " + ", ".join(r.name for r in runs))
    ctx = open_run(config, run_dir)
    return SummaryScope(ctx.run_dir, [ctx.run_dir], False, ctx.config, describe_context(ctx))


def scope_verdicts(scope: SummaryScope) -> pd.DataFrame:
    """:func:`all_verdicts` of every run in the scope (each run its own Holm family), a ``run`` column first."""
    tables = []
    for run in scope.runs:
        cfg = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else scope.config
        thresholds = {"ki67": cfg.finetuning.ki67_threshold, "tp53_ihc": cfg.finetuning.tp53_ihc_threshold}
        table = all_verdicts(run, list(cfg.pretraining.methods), thresholds, cfg.analyses.bootstrap,
                             read_oracle(run), seed=cfg.seed, pca_components=cfg.analyses.embedding_pca_components)
        table.insert(0, "run", run.name)
        tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["run", *VERDICT_COLUMNS])


def write_verdicts(scope: SummaryScope, verdicts: pd.DataFrame) -> Path:
    """Replace ``metrics/verdicts.csv`` (every claim is recomputed: rows of an earlier version must not linger);
    a single run's file has no ``run`` column."""
    frame = verdicts if scope.is_sweep else verdicts.drop(columns="run", errors="ignore")
    return atomic_write_csv(RunLayout(scope.run_dir).metrics("verdicts"), frame)
