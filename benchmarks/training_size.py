"""How the ceiling fraction of a linear probe grows with the number of training exams.

Two probes, each the kit's linear-probe baseline per binary marker
(:func:`nrfm.eval.baselines.fit_predict_baseline`: logistic regression on the train exams, class-balanced, C chosen
on the validation AUC), scored as the pooled test ceiling fraction (mean over the eight markers of
(AUC - 0.5) / (bound - 0.5), the bound being the generator's posterior on the same test exams):

- ``latents``: on the generator's own latents (every phenotype latent exactly, the cue, the site), drawn without
  rendering for cohorts whose non-test sites are 1, 2, 4 and 8 times the default's (the fixed test sets stay;
  train/val split 71/29 by patient, three splits each). Seconds; it bounds what any model of the images can do
  with that many training exams.
- ``images``: on a rendered cohort (``--sites``), the handcrafted features of the preprocessed images
  (:mod:`nrfm.eval.handcrafted`) and the latents side by side, with the run's own splits and the training
  patients subsampled to 1/8, 1/4, 1/2 and all of them (three draws below all). Renders and preprocesses the
  cohort once under ``--data`` (minutes).

Usage::

    python benchmarks/training_size.py latents [--scenario no-shift]
    python benchmarks/training_size.py images --sites UCSF:840,UPenn:740,CUIMC:540 --data /tmp/nrfm-data
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from nrfm.config import BINARY_ENDPOINTS
from nrfm.eval import baselines
from nrfm.eval.baselines import fit_predict_baseline
from nrfm.synth.generate import latent_experiment
from nrfm.synth.markers import FEATURES

ROOT = Path(__file__).resolve().parents[1]


def latent_features(exams: pd.DataFrame) -> np.ndarray:
    """The generator's latents, the cue and the site (one-hot), as in ``benchmarks/readout_probe.py``."""
    columns = [f"f_{n}" for n in FEATURES] + ["artifact", "site"]
    return pd.get_dummies(exams[columns], columns=["site"]).to_numpy(float)


def ceiling_fraction(features: np.ndarray, labels: pd.DataFrame, bound: pd.DataFrame, train: np.ndarray,
                     val: np.ndarray, test: np.ndarray) -> float:
    """The kit's linear-probe baseline per binary marker (:func:`nrfm.eval.baselines.fit_predict_baseline`: train
    rows, C on validation AUC) and its pooled test ceiling fraction against ``bound`` (the oracle probabilities)."""
    aucs, bounds = {}, {}
    for marker in BINARY_ENDPOINTS:
        y = labels[marker].to_numpy(float)
        fit = fit_predict_baseline(features[train], y[train], features[val], y[val], features[test])
        scored = np.isfinite(y[test])
        aucs[marker] = roc_auc_score(y[test][scored], fit.test[scored])
        bounds[marker] = roc_auc_score(y[test][scored], bound[marker].to_numpy(float)[test][scored])
    return baselines.ceiling_fraction(aucs, bounds)


def run_latents(scenario: str) -> pd.DataFrame:
    rows = []
    for times in (1, 2, 4, 8):  # the default's non-test patients (170, 145, 65) times this; test sets as shipped
        sites = f"UCSF:{160 + 170 * times},UPenn:{160 + 145 * times},CUIMC:{280 + 65 * times}"
        exams = latent_experiment("default", 0, scenario, sites)[0].reset_index(drop=True)
        features = latent_features(exams)
        bound = exams[[f"oracle_{m}" for m in BINARY_ENDPOINTS]].set_axis(list(BINARY_ENDPOINTS), axis=1)
        # the labels a manifest reports (the exam table also holds the unreported truth)
        labels = pd.DataFrame({m: exams[m].where(exams[f"observed_{m}"]) for m in BINARY_ENDPOINTS})
        test = (exams["split"] == "test").to_numpy()
        patients = exams.loc[~test, "patient_id"].unique()
        for draw in range(3):
            rng = np.random.default_rng(draw)
            val_patients = rng.choice(patients, int(round(0.29 * len(patients))), replace=False)
            val = ~test & exams["patient_id"].isin(val_patients).to_numpy()
            train = ~test & ~val
            rows.append({"sites": sites, "train_exams": int(train.sum()), "draw": draw,
                         "latents": ceiling_fraction(features, labels, bound, train, val, test)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def run_images(sites: str, scenario: str, data: str) -> pd.DataFrame:
    from nrfm.config_loading import load_config
    from nrfm.eval.handcrafted import feature_table_of_run
    from nrfm.pipeline.context import open_run

    overrides = {"cohort.synth_sites": sites, "cohort.synth_scenario": scenario, "cohort.data_dir": data}
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    ctx = open_run(cfg, Path(data) / f"training-size-{scenario}-{sites.replace(':', '').replace(',', '_')}")
    man = ctx.manifest.reset_index(drop=True)
    handcrafted = feature_table_of_run(ctx).loc[man["subject_id"].astype(str)]
    exams = latent_experiment("default", 0, scenario, sites)[0].set_index("subject_id").loc[man["subject_id"]]
    latents = latent_features(exams)
    oracle = pd.read_csv(ctx.cohort_dir / "oracle.csv").pivot(index="subject_id", columns="endpoint", values="value")
    bound = oracle.loc[man["subject_id"]].reset_index(drop=True)
    split = man["split"].to_numpy()
    train_all, val, test = split == "train", split == "val", split == "test"
    features = handcrafted.to_numpy(float)  # NaN (an empty sub-region): the training median, inside the fit
    patients = man.loc[train_all, "patient_id"].unique()
    rows = []
    for share in (0.125, 0.25, 0.5, 1.0):
        for draw in range(3 if share < 1 else 1):
            keep = np.random.default_rng(draw).choice(patients, int(len(patients) * share), replace=False)
            train = train_all & man["patient_id"].isin(keep).to_numpy()
            rows.append({"sites": sites, "share": share, "train_exams": int(train.sum()), "draw": draw,
                         "handcrafted": ceiling_fraction(features, man, bound, train, val, test),
                         "latents": ceiling_fraction(latents, man, bound, train, val, test)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("latents", "images"))
    parser.add_argument("--scenario", default="site-shift", choices=("site-shift", "no-shift"))
    parser.add_argument("--sites", default="UCSF:840,UPenn:740,CUIMC:540", help="images: the rendered cohort's sites")
    parser.add_argument("--data", default=str(ROOT / "data"), help="images: where the cohort is rendered")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    table = run_latents(args.scenario) if args.what == "latents" else run_images(args.sites, args.scenario, args.data)
    value_columns = [c for c in ("handcrafted", "latents") if c in table]
    summary = table.groupby("share" if args.what == "images" else "sites", sort=False)
    print(summary[["train_exams", *value_columns]].agg(["mean", "std"]).round(3).to_string())


if __name__ == "__main__":
    main()
