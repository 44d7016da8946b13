"""Baselines the fine-tuned backbones are compared with, and the fraction of the ceiling a model reaches.

Two baselines, both regularised linear models on fixed features, fitted per endpoint and fold:

* **linear probe** (``backbone = <method>``, ``objective = probe``): the frozen pretrained embedding
  (``artifacts/embeddings_<method>_pretrained.npz``, written by the fine-tuning stage). If fine-tuning does
  not beat it, fine-tuning added nothing the pretrained features did not already hold.
* **handcrafted** (``backbone = handcrafted``, ``objective = erm``): radiomics-style features of the
  tumour sub-regions (:mod:`nrfm.eval.handcrafted`). If a backbone does not beat it, it has not learned more from
  the images than volumes and intensity histograms say.

Binary endpoints: logistic regression with ``class_weight="balanced"``; continuous ones (Ki-67, TP53-IHC):
ridge on ``log1p(percent)``, predictions back in percent, clipped to [0, 100] (as the fine-tuned heads).
Features are median-imputed and standardised with training statistics. The penalty (C, alpha) is chosen on
the validation rows only (AUC for binary endpoints, squared error of ``log1p`` for continuous ones), the
model is fitted on the training rows, and decision thresholds are Youden's J on validation: the selection
rule of the fine-tuned models, so the comparison is like for like. Test labels are never read.

The predictions tables have the columns of the fine-tuning stage's ``predictions_*.csv`` (subject_id,
patient_id, site, split, fold, endpoint, y_true, y_score, threshold, seed), so
:func:`nrfm.eval.metrics.molecular_table` turns them into ``molecular.csv`` rows like any other model's.
Usage, after fine-tuning: ``run_baseline_stage(ctx, "dino", "loso")`` writes predictions_dino_probe_loso.csv.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import pandas as pd

from nrfm.config import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, PROTOCOLS, SSL_METHODS
from nrfm.data.splits import fold_rows
from nrfm.eval.handcrafted import feature_table_of_run
from nrfm.eval.metrics import binarize, molecular_table, youden_threshold
from nrfm.eval.site_invariance import load_embeddings
from nrfm.files import atomic_write_csv, atomic_write_json
from nrfm.models.backbones import build_backbone
from nrfm.train import finetune
from nrfm.train.finetune_data import cuts_of
from nrfm.train.fingerprints import weights_sha256
from nrfm.train.pretrain import pretraining_subjects

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
ALPHA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_C, DEFAULT_ALPHA = 0.1, 100.0  # used when validation cannot rank the grid (a single class, no labels)
HANDCRAFTED = "handcrafted"
PREDICTION_COLUMNS = ("subject_id", "patient_id", "site", "split", "fold", "endpoint", "y_true", "y_score",
                      "threshold", "seed")


@dataclass(frozen=True)
class BaselineFit:
    """Predictions of one fitted baseline model.

    ``train``/``val``/``test``: scores of each row set (probability for ``binary``, percent for ``continuous``;
    NaN when training had a single class). ``penalty``: the chosen C (logistic) or alpha (ridge).
    ``val_score``: the validation AUC (binary) or mean squared error of log1p (continuous) of that penalty.
    ``grid_scores``: the validation score of every penalty tried.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    penalty: float
    val_score: float
    grid_scores: dict[float, float] = field(default_factory=dict)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, dtype=float)
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def _model(kind: str, penalty: float, seed: int):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = (LogisticRegression(C=penalty, class_weight="balanced", max_iter=5000, random_state=seed)
            if kind == "binary" else Ridge(alpha=penalty))
    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), head)


def _fit(kind: str, penalty: float, x: np.ndarray, y: np.ndarray, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-NaN training columns are dropped by the imputer, on purpose
        return _model(kind, penalty, seed).fit(x, y)


def _predict(kind: str, model, x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "binary":
            return model.predict_proba(x)[:, 1]
        return model.predict(x)


def fit_predict_baseline(features_train: np.ndarray, y_train: np.ndarray, features_val: np.ndarray,
                         y_val: np.ndarray, features_test: np.ndarray, kind: str = "binary",
                         grid: Sequence[float] | None = None, seed: int = 0) -> BaselineFit:
    """Fit a regularised linear model on train, choose its penalty on validation, predict every row set.

    Args:
        features_train, features_val, features_test: (n, d) features (NaN allowed: median-imputed with the
            training medians, then standardised with the training mean and SD).
        y_train, y_val: labels: 0/1 for ``binary``; percent for ``continuous`` (regressed on ``log1p``).
            NaN labels are dropped. No test labels are taken: the test rows are only predicted.
        kind: ``binary`` (logistic regression, ``class_weight="balanced"``, C from :data:`C_GRID` by validation
            AUC; ties go to the smaller C) or ``continuous`` (ridge, alpha from :data:`ALPHA_GRID` by validation
            squared error of ``log1p``; ties go to the larger alpha).
        grid: penalties to try instead of the default grid.
        seed: random state of the solver.

    Returns:
        :class:`BaselineFit`. When validation cannot rank the grid (one class, or no known labels) the
        penalty is :data:`DEFAULT_C` / :data:`DEFAULT_ALPHA`; when training has a single class (binary) or
        fewer than two labels, every score is NaN.
    """
    if kind not in ("binary", "continuous"):
        raise ValueError(f"unknown baseline kind {kind!r}; valid: ['binary', 'continuous']")
    x_tr, x_va, x_te = (np.asarray(a, dtype=np.float64) for a in (features_train, features_val, features_test))
    widths = {x.shape[1] for x in (x_tr, x_va, x_te) if x.ndim == 2}
    if any(x.ndim != 2 for x in (x_tr, x_va, x_te)) or len(widths) != 1:
        raise ValueError(f"fit_predict_baseline: features must be (n, d) with one d; got shapes "
                         f"{x_tr.shape}, {x_va.shape}, {x_te.shape}")
    y_tr, y_va = np.asarray(y_train, dtype=np.float64), np.asarray(y_val, dtype=np.float64)
    if len(y_tr) != len(x_tr) or len(y_va) != len(x_va):
        raise ValueError(f"fit_predict_baseline: {len(y_tr)} / {len(y_va)} labels for {len(x_tr)} / {len(x_va)} "
                         "train / val rows")
    grid = tuple(C_GRID if kind == "binary" else ALPHA_GRID) if grid is None else tuple(grid)
    known_tr, known_va = np.isfinite(y_tr), np.isfinite(y_va)
    x_fit, y_fit = x_tr[known_tr], y_tr[known_tr]
    nan = BaselineFit(np.full(len(x_tr), np.nan), np.full(len(x_va), np.nan), np.full(len(x_te), np.nan),
                      float("nan"), float("nan"))
    if kind == "binary":
        y_fit = (y_fit > 0.5).astype(int)
        if len(np.unique(y_fit)) < 2:
            return nan
    else:
        if len(y_fit) < 2:
            return nan
        y_fit = np.log1p(np.clip(y_fit, 0, None))
    y_sel = y_va[known_va]
    y_sel = (y_sel > 0.5).astype(int) if kind == "binary" else np.log1p(np.clip(y_sel, 0, None))

    scores: dict[float, float] = {}
    models = {}
    for penalty in grid:
        model = _fit(kind, penalty, x_fit, y_fit, seed)
        models[penalty] = model
        pred = _predict(kind, model, x_va[known_va])
        if kind == "binary":
            scores[penalty] = _auc(y_sel, pred)
        else:
            scores[penalty] = float(np.mean((pred - y_sel) ** 2)) if len(y_sel) else float("nan")
    finite = {p: s for p, s in scores.items() if np.isfinite(s)}
    if finite:
        if kind == "binary":  # highest AUC; ties: the smallest C (strongest penalty)
            chosen = max(sorted(finite), key=lambda p: (finite[p], -p))
        else:  # lowest error; ties: the largest alpha
            chosen = min(sorted(finite), key=lambda p: (finite[p], -p))
        model = models[chosen]
    else:
        chosen = DEFAULT_C if kind == "binary" else DEFAULT_ALPHA
        model = models.get(chosen) or _fit(kind, chosen, x_fit, y_fit, seed)

    def out(x: np.ndarray) -> np.ndarray:
        pred = _predict(kind, model, x)
        return pred if kind == "binary" else np.clip(np.expm1(pred), 0.0, 100.0)

    return BaselineFit(out(x_tr), out(x_va), out(x_te), float(chosen), float(scores.get(chosen, np.nan)), scores)


# ---------------------------------------------------------------------------------------------- folds
def baseline_folds(manifest: pd.DataFrame, protocol: str) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(fold name, train rows, val rows, test rows) of ``protocol``, as positions in ``manifest``.

    The fine-tuning stage's folds (:func:`nrfm.data.splits.fold_rows`), so baselines and fine-tuned models
    are scored on the same subjects: ``pooled`` = the manifest's splits; ``loso`` = each site held out in turn,
    scoring only the held-out exams that self-supervised pretraining never saw (``analyses.loso_pretrain``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    manifest = manifest.reset_index(drop=True)
    if protocol == "pooled":
        split = manifest["split"].astype(str).to_numpy()
        return [("pooled", *(np.flatnonzero(split == s) for s in ("train", "val", "test")))]
    out = [(fold.name, fold.train, fold.val, fold.test)
           for fold in fold_rows(manifest, protocol, pretraining_subjects(manifest))]
    return out


def _feature_matrix(manifest: pd.DataFrame, features: pd.DataFrame | np.ndarray) -> np.ndarray:
    if isinstance(features, pd.DataFrame):
        ids = manifest["subject_id"].astype(str)
        index = features.index.astype(str)
        missing = sorted(set(ids) - set(index))
        if missing:
            raise ValueError(f"features lack {len(missing)} manifest subject(s), e.g. {missing[:3]}")
        return features.set_axis(index).loc[ids.tolist()].to_numpy(dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) != len(manifest):
        raise ValueError(f"features of shape {features.shape} do not match the manifest's {len(manifest)} rows")
    return features


def baseline_predictions(manifest: pd.DataFrame, features: pd.DataFrame | np.ndarray, endpoints: Sequence[str],
                         cuts: Mapping[str, float], seed: int, protocol: str = "pooled",
                         folds: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None = None,
                         ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Fit the baseline per fold and endpoint; the long predictions table of the fine-tuning stage's format.

    Args:
        manifest: the run's manifest (subject_id, patient_id, site, split and the endpoint columns).
        features: a DataFrame indexed by subject_id, or an (n_manifest_rows, d) array in manifest order.
        endpoints: endpoints to fit (binary -> logistic, continuous -> ridge).
        cuts: binarization cut per continuous endpoint (percent), for the Youden threshold.
        seed: written into the ``seed`` column and used as the solver's random state.
        protocol: ``pooled`` or ``loso`` (ignored when ``folds`` is given).
        folds: (fold, train rows, val rows, test rows) positions; default :func:`baseline_folds`.

    Returns:
        (predictions, choices): predictions with :data:`PREDICTION_COLUMNS`, known labels only, every row of a
        fold with its role in ``split``; choices: one dict per (fold, endpoint) with the chosen penalty and its
        validation score.
    """
    manifest = manifest.reset_index(drop=True)
    x = _feature_matrix(manifest, features)
    folds = baseline_folds(manifest, protocol) if folds is None else folds
    base_cols = manifest[["subject_id", "patient_id", "site"]].reset_index(drop=True)
    frames, choices = [], []
    for fold, train, val, test in folds:
        train, val, test = (np.asarray(r, dtype=int) for r in (train, val, test))
        for endpoint in endpoints:
            kind = "continuous" if endpoint in CONTINUOUS_ENDPOINTS else "binary"
            if kind == "binary" and endpoint not in BINARY_ENDPOINTS:
                valid = list(BINARY_ENDPOINTS + CONTINUOUS_ENDPOINTS)
                raise ValueError(f"unknown endpoint {endpoint!r}; valid: {valid}")
            y = manifest[endpoint].to_numpy(dtype=float)
            result = fit_predict_baseline(x[train], y[train], x[val], y[val], x[test], kind=kind, seed=seed)
            known_val = np.isfinite(y[val])
            threshold = youden_threshold(binarize(endpoint, y[val][known_val], cuts), result.val[known_val]) \
                if np.isfinite(result.val).all() else float("nan")
            choices.append({"fold": fold, "endpoint": endpoint, "kind": kind, "penalty": result.penalty,
                            "val_score": result.val_score,
                            "grid": {str(k): v for k, v in result.grid_scores.items()}})
            for role, rows, score in (("train", train, result.train), ("val", val, result.val),
                                      ("test", test, result.test)):
                frames.append(base_cols.iloc[rows].assign(split=role, fold=fold, endpoint=endpoint, y_true=y[rows],
                                                          y_score=score, threshold=threshold, seed=seed))
    if not frames:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS)), choices
    predictions = pd.concat(frames, ignore_index=True).dropna(subset=["y_true"])
    predictions = predictions.sort_values(["fold", "endpoint", "subject_id"], kind="stable").reset_index(drop=True)
    return predictions[list(PREDICTION_COLUMNS)], choices


# ---------------------------------------------------------------------------------------------- stage
@dataclass
class BaselineResult:
    backbone: str
    objective: str
    protocol: str
    table: pd.DataFrame  # molecular.csv rows
    predictions_path: Any
    choices: list[dict[str, Any]]
    seconds: float


def baseline_name(baseline: str) -> tuple[str, str]:
    """(backbone, objective) columns of a baseline: ``handcrafted`` -> (handcrafted, erm); ``<method>`` ->
    (<method>, probe)."""
    if baseline == HANDCRAFTED:
        return HANDCRAFTED, "erm"
    if baseline in SSL_METHODS:
        return baseline, "probe"
    raise ValueError(f"unknown baseline {baseline!r}; valid: {[HANDCRAFTED, *SSL_METHODS]}")


def handcrafted_features_of_run(ctx, progress: bool = True) -> pd.DataFrame:
    """The handcrafted feature table of a run, computed once and kept in ``artifacts/handcrafted_features.csv``."""
    path = ctx.layout.handcrafted_features()
    ids = ctx.manifest["subject_id"].astype(str).tolist()
    if path.is_file():
        table = pd.read_csv(path, dtype={"subject_id": str}).set_index("subject_id")
        if table.index.tolist() == ids:
            return table
    table = feature_table_of_run(ctx, progress=progress)
    atomic_write_csv(path, table.reset_index())
    return table


def run_baseline_stage(ctx, baseline: str, protocol: str = "pooled", progress: bool = True,
                       features: pd.DataFrame | np.ndarray | None = None,
                       folds: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]] | None = None) -> BaselineResult:
    """Fit one baseline under one protocol; write its predictions, choices and ``molecular.csv`` rows.

    Args:
        ctx: the run context.
        baseline: ``handcrafted`` or an SSL method name (the linear probe on that backbone's frozen pretrained
            embedding; needs ``artifacts/embeddings_<method>_pretrained.npz``, which the fine-tuning stage
            writes).
        protocol: ``pooled`` or ``loso``.
        features: use these instead (a DataFrame indexed by subject_id or an array in manifest order).
        folds: (fold, train rows, val rows, test rows) positions in ``ctx.manifest``; default
            :func:`baseline_folds`. Pass the fine-tuning stage's folds so both see the same subjects.

    Writes:
        ``artifacts/predictions_<backbone>_<objective>_<protocol>.csv`` (the fine-tuning predictions format),
        ``artifacts/baseline_<backbone>_<objective>_<protocol>.json`` (chosen penalty per fold and endpoint),
        ``artifacts/handcrafted_features.csv`` (handcrafted only), and merges the rows of
        :func:`nrfm.eval.metrics.molecular_table` into ``metrics/molecular.csv``.
    """
    start = time.perf_counter()
    backbone, objective = baseline_name(baseline)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {list(PROTOCOLS)}")
    cfg, seed = ctx.config.finetuning, ctx.config.seed
    if features is None:
        if baseline == HANDCRAFTED:
            features = handcrafted_features_of_run(ctx, progress)
        else:
            features = load_embeddings(ctx, baseline, "pretrained")
    endpoints, cuts = tuple(cfg.endpoints), cuts_of(cfg)
    predictions, choices = baseline_predictions(ctx.manifest, features, endpoints, cuts, seed, protocol, folds)
    path = atomic_write_csv(ctx.layout.predictions(backbone, objective, protocol), predictions)
    atomic_write_json(ctx.layout.baseline_choices(backbone, objective, protocol),
                      {"backbone": backbone, "objective": objective, "protocol": protocol, "seed": seed,
                       "selection": "penalty chosen on validation (AUC / log1p squared error), fit on train",
                       "config_sha256": ctx.config.sha256(), "choices": choices})
    table = molecular_table(predictions, backbone, objective, protocol, seed, cuts,
                            n_boot=ctx.config.analyses.bootstrap, oracle=ctx.oracle, endpoints=endpoints)
    ctx.write_metrics("molecular", table, key_columns=["backbone", "objective", "protocol", "seed", "site", "endpoint"])
    return BaselineResult(backbone, objective, protocol, table, path, choices, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- ceiling
def ceiling_fraction(auc_by_marker: Mapping[str, float], bound_by_marker: Mapping[str, float]) -> float:
    """Mean fraction of the achievable AUC gain over chance that a model reaches, over binary markers.

    ``mean_m (AUC_m - 0.5) / (bound_m - 0.5)`` over the binary markers (:data:`nrfm.config.BINARY_ENDPOINTS`)
    present in both mappings with finite values and ``bound_m > 0.5``: 0 is chance, 1 is the bound (e.g. the
    AUC of the synthetic cohort's oracle probabilities on the same test subjects), negative is worse than
    chance; a marker can exceed 1 when its test AUC beats the bound by sampling noise. Markers whose bound is
    at or below 0.5 carry no achievable gain and are left out. NaN when no marker is left.

    Example: AUC 0.70 against a bound of 0.90 is (0.20 / 0.40) = 0.5 of the ceiling.
    """
    fractions = []
    for marker in BINARY_ENDPOINTS:
        auc, bound = auc_by_marker.get(marker), bound_by_marker.get(marker)
        if auc is None or bound is None or not (np.isfinite(auc) and np.isfinite(bound)) or bound <= 0.5:
            continue
        fractions.append((float(auc) - 0.5) / (float(bound) - 0.5))
    return float(np.mean(fractions)) if fractions else float("nan")


def _test_rows(predictions: pd.DataFrame, site: str) -> pd.DataFrame:
    test = predictions[(predictions["split"] == "test") & predictions["y_true"].notna()]
    return test if site == "all" else test[test["site"].astype(str) == str(site)]


def auc_by_marker(predictions: pd.DataFrame, site: str = "all") -> dict[str, float]:
    """Test AUC per binary marker of a predictions table (``site``: one site or ``all``; folds pooled)."""
    test = _test_rows(predictions, site)
    return {m: _auc(part["y_true"].to_numpy(dtype=float), part["y_score"].to_numpy(dtype=float))
            for m, part in test.groupby("endpoint") if m in BINARY_ENDPOINTS}


def oracle_bounds(predictions: pd.DataFrame, oracle: pd.DataFrame, site: str = "all") -> dict[str, float]:
    """Per binary marker, the AUC of the oracle probabilities on the same test rows as ``predictions``.

    ``oracle``: long table subject_id, endpoint, value (``oracle.csv`` of a synthetic cohort, ``ctx.oracle``).
    """
    test = _test_rows(predictions, site)
    oracle = oracle.assign(subject_id=oracle["subject_id"].astype(str))
    out = {}
    for marker, part in test.groupby("endpoint"):
        if marker not in BINARY_ENDPOINTS:
            continue
        values = oracle[oracle["endpoint"] == marker].set_index("subject_id")["value"]
        score = part["subject_id"].astype(str).map(values).to_numpy(dtype=float)
        keep = np.isfinite(score)
        out[marker] = _auc(part["y_true"].to_numpy(dtype=float)[keep], score[keep]) if keep.any() else float("nan")
    return out


def ceiling_fraction_of_predictions(predictions: pd.DataFrame, bounds: Mapping[str, float] | pd.DataFrame,
                                    site: str = "all") -> float:
    """:func:`ceiling_fraction` of a predictions table's test AUCs against ``bounds``.

    Args:
        predictions: a ``predictions_*.csv`` table (any model or baseline).
        bounds: marker -> bound AUC, or a table with an ``endpoint`` column and a ``bound_auc`` or ``oracle_auc``
            column (e.g. ``molecular.csv`` rows of one model at ``site``, whose ``oracle_auc`` is the oracle on
            the same test subjects), or use :func:`oracle_bounds`.
        site: one site or ``all``.
    """
    if isinstance(bounds, pd.DataFrame):
        column = "bound_auc" if "bound_auc" in bounds else "oracle_auc"
        if column not in bounds or "endpoint" not in bounds:
            raise ValueError(f"bounds table needs columns endpoint and bound_auc or oracle_auc; has {list(bounds)}")
        rows = bounds[bounds["site"].astype(str) == str(site)] if "site" in bounds else bounds
        bounds = {str(e): float(v) for e, v in zip(rows["endpoint"], rows[column])}
    return ceiling_fraction(auc_by_marker(predictions, site), bounds)


def run_scratch_baseline(ctx, method: str, protocol: str, progress: bool = True, done: dict | None = None):
    """The from-scratch baseline: ``method``'s architecture randomly initialised (seeded by the run's seed) and
    fine-tuned exactly like the pretrained backbone (ERM, same mode, grid, budget and selection); results under
    objective ``scratch``. In partial mode the frozen stages keep their random weights, so the comparison with
    the fine-tuned pretrained backbone measures what pretraining puts into them. ``done`` (weights sha256 ->
    method) lets methods with an identical random network (BYOL, DINO, MoCo) share one fit."""
    torch.manual_seed(ctx.config.seed)
    size = tuple(ctx.dataset(progress=progress)[0]["image"].shape[1:])
    backbone = build_backbone(method, ctx.config.pretraining, size)
    key = (protocol, weights_sha256(backbone))
    if done is not None and key in done:
        return finetune.reuse_stage_outputs(ctx, done[key], method, "scratch", protocol)
    result = finetune.run_finetune_stage(ctx, method, "erm", protocol, progress=progress, backbone=backbone,
                                         label="scratch")
    if done is not None:
        done[key] = method
    return result


def run_baselines(ctx, methods: Sequence[str], protocols: Sequence[str], progress: bool = True) -> list:
    """The configured baselines of a run (``finetuning.baselines``) for every backbone and protocol."""
    chosen = ctx.config.finetuning.baselines
    results, scratch_done = [], {}
    for protocol in protocols:
        if "handcrafted" in chosen:
            results.append(run_baseline_stage(ctx, HANDCRAFTED, protocol, progress=progress))
        for method in methods:
            if "probe" in chosen:
                results.append(run_baseline_stage(ctx, method, protocol, progress=progress))
            if "scratch" in chosen:
                results.append(run_scratch_baseline(ctx, method, protocol, progress=progress, done=scratch_done))
    return results
