"""The cohort notebook's library (nrfm/cohort.py) on the synthetic default and on an imported cohort."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nrfm.data import cohort
from nrfm.config_loading import load_config
from nrfm.pipeline.context import open_run
from nrfm.data.importers import import_cohort

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_ctx(tmp_path_factory, smoke_workspace):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", smoke_workspace)
    return open_run(cfg, tmp_path_factory.mktemp("cohort") / "run", progress=False)


def test_site_effects_present_raw_and_much_smaller_after_preprocessing(smoke_ctx):
    effect = cohort.site_intensity_effect(smoke_ctx, contrast="t1c").set_index("stage")["site_eta_squared"]
    assert effect["raw"] > 0.6  # scanners dominate the raw intensity
    assert effect["preprocessed"] < effect["raw"] / 3


def test_cohort_table_counts(smoke_ctx):
    table = cohort.cohort_table(smoke_ctx).set_index("site")
    manifest = smoke_ctx.manifest
    assert table.loc["all", "exams"] == len(manifest)
    assert table.loc["all", "patients"] == manifest["patient_id"].nunique()
    assert table.loc["all", ["train", "val", "test"]].sum() == len(manifest)
    known = manifest["idh"].dropna()
    assert table.loc["all", "idh_%pos"] == pytest.approx(100 * known.mean())


def test_cohort_notebook_runs_on_an_imported_manifest(smoke_ctx, tmp_path):
    """Exams laid out as BraTS 2021 (real file names), imported, then 00_cohort.ipynb on that manifest."""
    root = tmp_path / "BraTS2021_Training_Data"
    rows = smoke_ctx.manifest.head(12).reset_index(drop=True)
    names = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
    for i, row in rows.iterrows():
        case = f"BraTS2021_{i:05d}"
        (root / case).mkdir(parents=True)
        for column, suffix in names.items():
            shutil.copy(row[column], root / case / f"{case}_{suffix}.nii.gz")
    labels = tmp_path / "train_labels.csv"
    pd.DataFrame({"BraTS21ID": [f"{i:05d}" for i in range(12)], "MGMT_value": [i % 2 for i in range(12)]}).to_csv(
        labels, index=False)
    manifest = tmp_path / "imported" / "manifest.csv"
    report = import_cohort("brats2021", root, manifest, mgmt_labels=labels, progress=False)
    assert report.n_rows == 12
    config = tmp_path / "imported.yaml"
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    smoke["cohort"] = {"manifest": str(manifest)}
    smoke["preprocessing"]["cache_dir"] = str(tmp_path / "cache")
    config.write_text(yaml.safe_dump(smoke))
    out = tmp_path / "out.ipynb"
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), "notebooks/00_cohort.ipynb", str(out),
                           "-p", "config", str(config), "-p", "run_dir", str(tmp_path / "run"), "--no-progress-bar"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "run" / "metrics" / "cohort.csv")
    assert set(table["site"]) == {"BraTS", "all"} and int(table.set_index("site").loc["all", "exams"]) == 12
    assert (tmp_path / "run" / "figures" / "cohort_example_slices.png").is_file()


def test_scenario_plant_and_site_probe_baseline(smoke_ctx):
    summary = cohort.scenario_summary(smoke_ctx)
    assert summary["scenario"] == "site-shift" and summary["smallest_site"] == "CUIMC"
    assert summary["cue_endpoint"] == "egfr" and "latent_dro_gain" in summary
    cue = cohort.cue_by_site_table(smoke_ctx)
    assert set(cue["site"]) <= {"UCSF", "UPenn", "CUIMC"} and cue["cue_rate"].between(0, 1).all()
    cindex = cohort.oracle_cindex_table(smoke_ctx)
    assert set(cindex["site"]) == {"UCSF", "UPenn", "CUIMC", "all"}
    probe = cohort.site_probe_baseline(smoke_ctx, per_site=10).iloc[0]
    assert probe["subjects"] == 30 and 0.0 <= probe["site_probe_bacc"] <= 1.0 and probe["chance"] == pytest.approx(1 / 3)


def test_fixed_test_patients_stay_test(smoke_ctx):
    source = pd.read_csv(smoke_ctx.cohort_dir / "manifest.csv", dtype=str, keep_default_na=False)
    fixed = set(source.loc[source["split"] == "test", "subject_id"])
    run = smoke_ctx.manifest.set_index("subject_id")["split"]
    assert fixed and (run.loc[sorted(fixed)] == "test").all()
    assert set(run.drop(sorted(fixed))) <= {"train", "val"}


def test_image_plant_check_runs_and_sees_the_cue(smoke_ctx):
    check = cohort.image_plant_check(smoke_ctx)
    assert list(check["objective"]) == ["erm", "dro"] and (check["site"] == "CUIMC").all()
    assert check["cue_detection_auc"].iloc[0] > 0.9  # the ghost is plainly visible in the stored images


def test_test_set_table_reads_the_floors_and_enrichment_from_cohort_json(tmp_path):
    import json
    from types import SimpleNamespace

    sites = [{"template": {"name": "A"}, "test_set": {"exams": 170, "survival_events": 60,
                                                       "labelled_positives": {"idh": 15, "egfr": 30},
                                                       "enrichment_exams": {"idh": 10}}},
             {"template": {"name": "B"}, "test_set": {"exams": 160, "survival_events": 50,
                                                       "labelled_positives": {"idh": 40, "egfr": 20}}}]
    (tmp_path / "cohort.json").write_text(json.dumps({"sites": sites}))
    table = cohort.test_set_table(SimpleNamespace(cohort_dir=tmp_path))
    assert table.loc["A", "idh +"] == 15 and table.loc["A", "enrichment exams"] == "idh 10"
    assert table.loc["B", "enrichment exams"] == "" and table.loc["B", "survival events"] == 50
    (tmp_path / "cohort.json").unlink()
    assert cohort.test_set_table(SimpleNamespace(cohort_dir=tmp_path)) is None
