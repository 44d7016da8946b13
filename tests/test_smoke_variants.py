"""End to end, beside tests/test_notebooks.py: a three-seed sweep and an imported-style manifest with a one-exam site,
each a smoke run of its own (no shared run), in a file of their own so that `make test`'s two pytest workers
(pytest-xdist, one file per worker at a time) run them while the other worker runs the shared smoke run.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from nrfm.pipeline.runner import start_run

pytestmark = pytest.mark.slow  # end-to-end smoke runs; `pytest -m "not slow"` skips them

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


def test_three_seed_sweep_shows_mean_and_spread(hermetic):
    from nrfm.pipeline.runner import sweep_run

    overrides, base = hermetic
    outcome = sweep_run(SMOKE, ["backbone=byol", "seed=0,1,2"], out=base / "sweeps",
                        overrides={**overrides, "finetuning.protocols": ["pooled"]}, progress=False)
    children = sorted(p.parent for p in (outcome.run_dir / "runs").glob("*/run.json"))
    assert len(children) == 3
    assert all(json.loads((c / "run.json").read_text())["status"] == "complete" for c in children)
    assert sorted(json.loads((c / "run.json").read_text())["seed"] for c in children) == [0, 1, 2]
    verdicts = pd.read_csv(outcome.run_dir / "metrics" / "verdicts.csv")
    assert verdicts["run"].nunique() == 3 and set(verdicts["backbone"]) == {"byol"}
    page = outcome.report.read_text()
    assert "auc_mean" in page and "auc_sd" in page and "delta_sd" in page
    assert all(c.name in page for c in children)


def test_a_one_exam_site_and_a_cross_site_patient_complete_with_the_warnings_in_the_report(smoke_cohort, hermetic,
                                                                                            tmp_path):
    """The small-site rule end to end: an imported-style manifest whose smallest site has one exam and whose
    patient was scanned at two sites runs through every notebook, and the cohort section names both."""
    manifest = pd.read_csv(smoke_cohort / "manifest.csv", dtype=str, keep_default_na=False)
    for column in ("t1", "t1c", "t2", "flair", "seg"):
        manifest[column] = [str(smoke_cohort / p) if p else p for p in manifest[column]]
    manifest["split"] = ""  # an imported manifest: the run assigns every split
    tiny = manifest.index[manifest["site"] == "CUIMC"][0]
    manifest.loc[tiny, "site"] = "TINY"
    moved = manifest.index[manifest["site"] == "UPenn"][0]
    kept = manifest.index[manifest["site"] == "UCSF"][0]
    manifest.loc[moved, "patient_id"] = manifest.loc[kept, "patient_id"]
    manifest.loc[moved, ["os_days", "os_event"]] = ""  # a follow-up exam carries no survival
    path = tmp_path / "edge.csv"
    manifest.to_csv(path, index=False)
    overrides, base = hermetic
    outcome = start_run(SMOKE, out=base / "reports-edge", manifest=path, progress=False,
                        overrides={**overrides, "pretraining.methods": ["byol"]})
    assert json.loads((outcome.run_dir / "run.json").read_text())["status"] == "complete"
    page = (outcome.run_dir / "index.html").read_text()
    cohort_section = page[page.index("id='00_cohort'"): page.index("id='01_pretrain'")]
    assert "TINY" in cohort_section and "evaluation only" in cohort_section
    patient = manifest.loc[kept, "patient_id"]
    assert patient in cohort_section and "UPenn" in cohort_section
    frozen = pd.read_csv(outcome.run_dir / "data" / "manifest.csv", dtype=str, keep_default_na=False)
    assert frozen.loc[frozen["site"] == "TINY", "split"].tolist() == ["test"]
