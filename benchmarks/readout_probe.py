"""What the frozen pretrained backbones of a finished run hold, by readout: linear probes and latent recovery.

For each backbone of a run on the synthetic cohort, and for the global embedding and the tumour readout of each
ResNet stage (:mod:`nrfm.models.readout`; the ViT: its encoded tokens), this prints

- the linear probe: per binary marker a logistic regression on train, C chosen on validation AUC (the mean of those
  validation AUCs is what a choice may use), and the pooled test ceiling fraction (for the record);
- how much of the generator's tumour phenotype latents the features carry: 5-fold cross-validated R^2 of a ridge
  regression over the non-test exams (necrosis, enhancement, oedema, T2-FLAIR mismatch, calcification, margin);
- the cue probe: cross-validated AUC of the site-shift cue (the ghost artifact) from the features.

And two references: a logistic regression on the generator's own latents (the ceiling fraction a model could reach
with this training set if it read every latent exactly) and the handcrafted features of the run.

Usage (a run folder of the default config, after notebook 02)::

    python benchmarks/readout_probe.py reports/<run_id> [byol dino mae moco]
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nrfm.config import BINARY_ENDPOINTS
from nrfm.models.readout import TumourReadout, cell_fractions, region_masks, region_means
from nrfm.pipeline.context import open_run
from nrfm.synth.generate import latent_experiment
from nrfm.synth.markers import FEATURES
from nrfm.train.pretrain import load_backbone

LATENTS = ("necrosis", "enhancement", "edema", "mismatch", "calcification", "margin")


def main(run_dir: str, methods: list[str]) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    run = Path(run_dir)
    ctx = open_run(run / "config.yaml", run, progress=False)
    man = ctx.manifest.reset_index(drop=True)
    data = ctx.dataset(progress=False)
    images = torch.stack([torch.as_tensor(np.asarray(data[i]["image"])) for i in range(len(man))]).float()
    seg = torch.stack([torch.as_tensor(np.asarray(data[i]["seg"])) for i in range(len(man))]).float()
    masks = region_masks(seg)
    cohort = ctx.config.cohort
    exams, _ = latent_experiment(cohort.synth_profile, cohort.synth_seed, cohort.synth_scenario)
    exams = exams.set_index("subject_id").loc[man["subject_id"]]
    oracle = pd.read_csv(ctx.cohort_dir / "oracle_auc.csv")
    bound = oracle[oracle["site"] == "all"].set_index("endpoint")["auc_test"]
    split = man["split"].to_numpy()
    train, val, test = (split == "train"), (split == "val"), (split == "test")

    def report(features: np.ndarray, name: str) -> None:
        features = np.nan_to_num(features)
        fractions, val_aucs = [], []
        for marker in BINARY_ENDPOINTS:
            y = man[marker].to_numpy(dtype=float)
            known = np.isfinite(y)
            best = None
            for c in (1e-3, 1e-2, 1e-1, 1.0):
                model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
                model.fit(features[train & known], y[train & known])
                score = roc_auc_score(y[val & known], model.predict_proba(features[val & known])[:, 1])
                if best is None or score > best[0]:
                    best = (score, model)
            auc = roc_auc_score(y[test & known], best[1].predict_proba(features[test & known])[:, 1])
            val_aucs.append(best[0])
            fractions.append((auc - 0.5) / (bound[marker] - 0.5))
        rest = ~test
        r2 = {}
        for latent in LATENTS:
            y = exams[f"f_{latent}"].to_numpy()
            ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 13)))
            pred = cross_val_predict(ridge, features[rest], y[rest], cv=5)
            r2[latent] = round(float(1 - np.mean((pred - y[rest]) ** 2) / np.var(y[rest])), 2)
        cue = exams["artifact"].to_numpy()
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
        cue_auc = roc_auc_score(cue[rest], cross_val_predict(probe, features[rest], cue[rest], cv=5,
                                                             method="predict_proba")[:, 1])
        print(f"{name:34s} d={features.shape[1]:4d}  val AUC {np.mean(val_aucs):.3f}  test ceiling fraction "
              f"{np.mean(fractions):.3f}  cue AUC {cue_auc:.3f}  latent R^2 {r2}", flush=True)

    latents = pd.get_dummies(exams[[f"f_{n}" for n in FEATURES] + ["artifact", "site"]], columns=["site"])
    report(latents.to_numpy(dtype=float), "generator latents (reference)")
    handcrafted = pd.read_csv(ctx.layout.handcrafted_features(), dtype={"subject_id": str}).set_index("subject_id")
    handcrafted = handcrafted.loc[man["subject_id"]]
    report(handcrafted.fillna(handcrafted[train].median()).to_numpy(), "handcrafted (reference)")
    for method in methods:
        inner = load_backbone(ctx.layout.pretrained_backbone(method), ctx.config, method).eval()
        readout = TumourReadout(inner).eval()
        out: dict[str, list] = {}
        maps: dict[str, torch.Tensor] = {}
        hooks = []
        if method != "mae":
            for stage in ("layer1", "layer2", "layer3"):
                hooks.append(getattr(inner.net, stage).register_forward_hook(
                    lambda _m, _i, o, stage=stage: maps.__setitem__(stage, o)))
        with torch.no_grad():
            for start in range(0, len(man), 64):
                x, m = images[start:start + 64], masks[start:start + 64]
                out.setdefault("global embedding", []).append(inner.embed(x))
                if method == "mae":
                    fmap = readout.feature_map(x)
                    fractions = cell_fractions(m, tuple(fmap.shape[2:]))
                    out.setdefault("tumour readout, tokens", []).append(region_means(fmap, fractions))
                    continue
                for stage, fmap in maps.items():
                    out.setdefault(f"tumour readout, {stage}", []).append(
                        region_means(fmap, cell_fractions(m, tuple(fmap.shape[2:]))))
        for hook in hooks:
            hook.remove()
        for name, parts in out.items():
            report(torch.cat(parts).numpy(), f"{method} {name}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:] or ["byol", "dino", "mae", "moco"])
