"""The cue-visibility check: a probe for the planted cue on each model's features."""
from __future__ import annotations

import numpy as np
import pandas as pd

from nrfm.config import Config
from nrfm.eval.plant import cue_visibility
from nrfm.pipeline.context import RunContext


def _ctx(tmp_path, with_cue: bool = True) -> RunContext:
    rng = np.random.default_rng(0)
    n = 120
    manifest = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                             "site": np.array(["A", "B", "C"])[np.arange(n) % 3], "split": "train"})
    cue = (rng.random(n) < 0.4).astype(float)
    rows = [{"subject_id": s, "endpoint": "idh", "value": 0.3} for s in manifest["subject_id"]]
    if with_cue:
        rows += [{"subject_id": s, "endpoint": "artifact", "value": c} for s, c in zip(manifest["subject_id"], cue)]
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    pd.DataFrame(rows).to_csv(cohort / "oracle.csv", index=False)
    ctx = RunContext(config=Config(), run_dir=tmp_path / "run", manifest=manifest, cohort_dir=cohort)
    ctx.layout.embeddings("byol", "pretrained").parent.mkdir(parents=True, exist_ok=True)
    for method, strength in (("byol", 3.0), ("moco", 0.0)):  # byol's embedding carries the cue, moco's does not
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        emb[:, 0] += strength * cue
        np.savez(ctx.layout.embeddings(method, "pretrained"), subject_id=manifest["subject_id"].to_numpy(str),
                 embedding=emb)
    return ctx


def test_a_probe_finds_the_cue_where_the_features_carry_it(tmp_path):
    table = cue_visibility(_ctx(tmp_path), ["byol", "moco", "dino"]).set_index("features")
    assert table.loc["byol (pretrained embedding)", "cue_probe_auc"] > 0.9
    assert abs(table.loc["moco (pretrained embedding)", "cue_probe_auc"] - 0.5) < 0.15
    missing = table.loc["dino (pretrained embedding)"]
    assert np.isnan(missing["cue_probe_auc"]) and missing["note"].startswith("not scored")
    assert (table["exams"] == 120).all() and "handcrafted features" not in table.index  # no feature file in this run


def test_no_cue_flag_no_table(tmp_path):
    assert cue_visibility(_ctx(tmp_path, with_cue=False), ["byol"]) is None
