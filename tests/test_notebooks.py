"""End to end: every notebook in notebooks/ executed by papermill under configs/smoke.yaml (none skipped).

One smoke run is shared by the tests of this module (session fixture); a second run is killed with SIGKILL
mid-pipeline and resumed, and its metrics must equal the uninterrupted run's (resume + determinism).
"""
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from nrfm.pipeline.runner import start_run

pytestmark = pytest.mark.slow  # end-to-end runs of every notebook; `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TIMING_COLUMNS = {"volumes_per_s", "seconds", "wall_seconds", "epoch_seconds"}  # measured speed, not results


@pytest.fixture(scope="session")
def smoke_run(hermetic):
    overrides, base = hermetic
    return start_run(SMOKE, out=base / "reports", overrides=overrides, progress=False)


def test_every_notebook_ran(smoke_run):
    record = json.loads((smoke_run.run_dir / "run.json").read_text())
    assert record["status"] == "complete"
    assert [s["notebook"] for s in record["stages"]] == NOTEBOOKS
    assert all(s["status"] == "complete" and s["wall_seconds"] > 0 for s in record["stages"])
    for name in NOTEBOOKS:
        executed = json.loads((smoke_run.run_dir / "notebooks" / name).read_text())
        errors = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, (name, errors[:1])


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.tables, self.scripts, self.text = set(), 0, 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            src = attrs.get("src", "")
            assert src.startswith(("data:image/png;base64,", "data:image/svg+xml;base64,")), "must be embedded"
            self.images += src.startswith("data:image/png")  # figures (SVG images are rendered equations)
        if tag == "table":
            self.tables += 1
        if tag in ("script", "link"):
            self.scripts.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_complete_and_self_contained(smoke_run):
    page = _Page()
    page.feed(smoke_run.report.read_text())
    expected = {Path(n).stem for n in NOTEBOOKS} | {"verdicts", "provenance"}
    assert expected <= page.ids
    assert page.images >= 2 * len(NOTEBOOKS)
    assert page.tables >= len(NOTEBOOKS)
    assert not page.scripts, "the report must not load anything (offline)"
    text = "".join(page.text)
    assert "Traceback" not in text and "Error:" not in text


def test_metrics_follow_the_contract(smoke_run):
    metrics = smoke_run.run_dir / "metrics"
    contract = {
        "molecular": ["backbone", "objective", "protocol", "seed", "site", "endpoint", "n", "n_pos",
                      "balanced_accuracy", "auc", "auc_ci_low", "auc_ci_high", "mae", "spearman"],
        "survival": ["backbone", "objective", "site", "n", "events", "c_index", "ci_low", "ci_high", "logrank_p"],
        "site_invariance": ["backbone", "stage", "pca_silhouette_site", "site_probe_bacc"],
        "gradcam": ["backbone", "objective", "endpoint", "site", "cam_in_tumor", "cam_in_peritumoral",
                    "tumor_volume_fraction"],
        "pretrain": ["backbone", "epoch", "loss", "volumes_per_s"],
    }
    for name, columns in contract.items():
        frame = pd.read_csv(metrics / f"{name}.csv")
        assert list(frame.columns[: len(columns)]) == columns, name
        assert len(frame) > 0, name
    molecular = pd.read_csv(metrics / "molecular.csv")
    # the fine-tuned backbones and the baselines (handcrafted features; probe and scratch as objectives)
    assert set(molecular["backbone"]) == {"byol", "dino", "mae", "moco", "handcrafted"}
    assert set(molecular["objective"]) == {"erm", "reweighted", "dro", "probe", "scratch"}
    assert set(molecular["protocol"]) == {"pooled", "loso"}
    ceiling = pd.read_csv(metrics / "ceiling.csv")
    assert {"ceiling_fraction", "ci_low", "ci_high"} <= set(ceiling) and len(ceiling) == 4 * 5 + 1
    assert {"all", "worst"} <= set(molecular["site"])
    # a missing metric is always explained
    binary = molecular[molecular["endpoint"].isin(["mgmt", "idh"]) & molecular["auc"].isna()]
    assert binary.empty or binary["note"].fillna("").str.len().gt(0).all()
    verdicts = pd.read_csv(metrics / "verdicts.csv")
    from nrfm.eval.claims import VERDICTS

    assert set(verdicts["verdict"]) <= VERDICTS
    assert {"scenario", "comparison", "objective", "adjusted_p"} <= set(verdicts)
    for claim in ("mean AUC", "PCA-silhouette", "c-index", "Grad-CAM"):
        assert verdicts["claim"].str.contains(claim).any(), claim


def _comparable(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    return frame.drop(columns=[c for c in frame.columns if c in TIMING_COLUMNS])


def test_killed_run_resumes_to_identical_metrics(smoke_run, hermetic):
    """SIGKILL during the pipeline, then `nrfm run --resume`: same metrics as the uninterrupted run."""
    overrides, base = hermetic
    out = base / "reports-killed"
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.Popen([sys.executable, "-m", "nrfm", "run", "--config", str(SMOKE), "--out", str(out),
                             "--quiet", *sets], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once the second notebook (pretraining) has written a checkpoint
        if list(out.glob("*/checkpoints/*/*.pt")):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = next(out.glob("*/run.json")).parent
    assert json.loads((run_dir / "run.json").read_text())["status"] == "incomplete"
    done = subprocess.run([sys.executable, "-m", "nrfm", "run", "--resume", run_dir.name, "--out", str(out),
                           "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    for name in ("pretrain", "molecular", "site_invariance", "survival", "gradcam"):
        pd.testing.assert_frame_equal(_comparable(run_dir / "metrics" / f"{name}.csv"),
                                      _comparable(smoke_run.run_dir / "metrics" / f"{name}.csv"))


def test_a_notebook_runs_alone_with_papermill(tmp_path):
    """The README's line: papermill notebooks/01_pretrain.ipynb out.ipynb -p backbone dino (smoke config default)."""
    out = tmp_path / "out.ipynb"
    done = subprocess.run([str(Path(sys.executable).parent / "papermill"), "notebooks/01_pretrain.ipynb", str(out),
                           "-p", "backbone", "dino", "-p", "run_dir", str(tmp_path / "run"), "--no-progress-bar"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log = pd.read_csv(tmp_path / "run" / "metrics" / "pretrain.csv")
    assert set(log["backbone"]) == {"dino"} and log["epoch"].max() >= 1
    assert (tmp_path / "run" / "checkpoints" / "dino" / "backbone.pt").is_file()
