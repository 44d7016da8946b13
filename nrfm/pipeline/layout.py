"""Every path of a run folder, in one place: stages, notebooks, the summary and the report ask a RunLayout.

A run folder ``reports/<run_id>/``::

    run.json  config.yaml  index.html            provenance, the frozen config, the report
    data/manifest.csv  data/SOURCE               the cohort with its splits, frozen when the run opens
    notebooks/<NN_name>.ipynb                    executed notebooks
    figures/<name>.png                           stable figure names
    metrics/<name>.csv                           the machine-readable results (see DESIGN contracts)
    artifacts/                                   predictions, embeddings, per-subject scores read by later stages
    artifacts/cache/                             derived inputs that can be rebuilt (frozen features)
    checkpoints/<backbone>/backbone.pt           the pretrained backbone (kept)
    checkpoints/<backbone>/last.pt               pretraining resume state (dropped once pretraining completes)
    checkpoints/<backbone>/finetune_<objective>_pooled.pt   fine-tuned models used by later stages (kept)

What a completed run keeps: everything the report and a reload need (metrics, figures, notebooks, artifacts,
the pretrained and fine-tuned models). Resume state (:meth:`RunLayout.resume_state`) is deleted when its
stage completes unless ``report.keep_resume_state`` is set, and the rebuildable cache when the run completes.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

PRETRAINED_FILE = "backbone.pt"  # in checkpoints/<backbone>/ (train_method writes into any folder it is given)
RESUME_FILE = "last.pt"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder. Directory properties do not create anything; writers create parents."""

    root: Path

    # ---- the run record and report --------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def config_yaml(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report_html(self) -> Path:
        return self.root / "index.html"

    @property
    def notebooks_dir(self) -> Path:
        return self.root / "notebooks"

    def executed_notebook(self, name: str) -> Path:
        return self.notebooks_dir / name

    # ---- data -----------------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def frozen_manifest(self) -> Path:
        """The run's cohort with its splits, written once when the run opens."""
        return self.data_dir / "manifest.csv"

    @property
    def manifest_source(self) -> Path:
        """One line: where the frozen manifest came from."""
        return self.data_dir / "SOURCE"

    # ---- results --------------------------------------------------------------------------------------
    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def metrics(self, name: str) -> Path:
        """``metrics/<name>.csv`` (molecular, survival, site_invariance, gradcam, pretrain, verdicts, ...)."""
        return self.metrics_dir / f"{name}.csv"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str, fmt: str = "png") -> Path:
        return self.figures_dir / f"{name}.{fmt}"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def cache_dir(self) -> Path:
        """Rebuildable derived inputs (frozen-feature caches); removed when the run completes."""
        return self.artifacts_dir / "cache"

    def predictions(self, backbone: str, objective: str, protocol: str) -> Path:
        """Per-exam predictions of one fine-tuned model (columns: see ``nrfm.train.finetune``)."""
        return self.artifacts_dir / f"predictions_{backbone}_{objective}_{protocol}.csv"

    def history(self, backbone: str, objective: str, protocol: str) -> Path:
        """Training curves and group weights of one fine-tuning fit."""
        return self.artifacts_dir / f"history_{backbone}_{objective}_{protocol}.json"

    def embeddings(self, backbone: str, stage: str) -> Path:
        """Test-set embeddings of the pretrained (``stage="pretrained"``) or a fine-tuned backbone."""
        return self.artifacts_dir / f"embeddings_{backbone}_{stage}.npz"

    def survival_risk(self, backbone: str, objective: str) -> Path:
        """Per-patient predicted risk of the survival head (for paired bootstraps of the c-index)."""
        return self.artifacts_dir / f"survival_risk_{backbone}_{objective}.csv"

    def gradcam_subjects(self, backbone: str, objective: str, endpoint: str) -> Path:
        """Per-subject CAM shares of one model and endpoint."""
        return self.artifacts_dir / f"gradcam_subjects_{backbone}_{objective}_{endpoint}.csv"

    def gradcam_subject_files(self, backbone: str) -> list[tuple[str, str, Path]]:
        """(objective, endpoint, path) of every per-subject Grad-CAM file of ``backbone`` in this run."""
        prefix = f"gradcam_subjects_{backbone}_"
        found = []
        for path in sorted(self.artifacts_dir.glob(f"{prefix}*.csv")):
            objective, endpoint = path.stem[len(prefix):].split("_", 1)
            found.append((objective, endpoint, path))
        return found

    def handcrafted_features(self) -> Path:
        """Radiomics-style features of every exam (computed once per run)."""
        return self.artifacts_dir / "handcrafted_features.csv"

    def baseline_choices(self, backbone: str, objective: str, protocol: str) -> Path:
        """The penalty a baseline chose per fold and endpoint on validation."""
        return self.artifacts_dir / f"baseline_{backbone}_{objective}_{protocol}.json"

    def feature_cache(self, backbone: str, mode: str, key: str) -> Path:
        """Frozen early-stage features for partial fine-tuning, keyed by what made them."""
        return self.cache_dir / f"finetune_inputs_{backbone}_{mode}_{key}.pt"

    # ---- models ---------------------------------------------------------------------------------------
    def checkpoints_dir(self, backbone: str | None = None) -> Path:
        base = self.root / "checkpoints"
        return base / backbone if backbone else base

    def pretrained_backbone(self, backbone: str) -> Path:
        return self.checkpoints_dir(backbone) / PRETRAINED_FILE

    def pretrain_resume(self, backbone: str) -> Path:
        """Pretraining's resume state (model, optimiser, RNG); only needed while pretraining runs."""
        return self.checkpoints_dir(backbone) / RESUME_FILE

    def finetuned_model(self, backbone: str, objective: str) -> Path:
        """The pooled fine-tuned model that site invariance, survival and Grad-CAM reload."""
        return self.checkpoints_dir(backbone) / f"finetune_{objective}_pooled.pt"

    def resume_state(self) -> list[Path]:
        """Files that only resuming an interrupted stage needs."""
        return sorted(self.checkpoints_dir().glob(f"*/{RESUME_FILE}"))

    def drop_resume_state(self, backbone: str) -> None:
        """Delete one backbone's pretraining resume state (called when its pretraining completes)."""
        self.pretrain_resume(backbone).unlink(missing_ok=True)

    def drop_rebuildable(self) -> None:
        """Delete what a completed run can rebuild on demand (the frozen-feature cache)."""
        shutil.rmtree(self.cache_dir, ignore_errors=True)
