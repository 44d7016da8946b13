"""The stage graph: what each stage of the pipeline reads and writes, and what it needs first.

Each stage is one notebook. A stage reads only what its prerequisites wrote into the run folder (through
:class:`~nrfm.pipeline.layout.RunLayout`) and never calls another stage's internals: when a notebook runs on
its own, it asks :func:`require` for its inputs, which runs the missing prerequisites' library entry points
in graph order. ``nrfm run --only X`` runs X's prerequisites first (:func:`with_prerequisites`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from nrfm.errors import ConfigError
from nrfm.pipeline.context import RunContext
from nrfm.train import finetune, pretrain


@dataclass(frozen=True)
class Stage:
    """One node of the graph. ``ensure(ctx, backbone, progress)`` makes the stage's outputs for one backbone exist
    and be current (reusing what matches this run's settings); None for stages whose outputs no later stage
    computes on demand."""

    name: str
    notebook: str
    needs: tuple[str, ...]
    reads: str
    writes: str
    ensure: Callable[[RunContext, str, bool], object] | None = None


def _pretrained(ctx: RunContext, backbone: str, progress: bool) -> None:
    pretrain.run_pretraining_stage(ctx, backbone, progress=progress)


def _finetuned(ctx: RunContext, backbone: str, progress: bool) -> None:
    finetune.ensure_finetuned(ctx, backbone, progress=progress)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("cohort", "00_cohort", (), "the manifest (or the synthetic cohort)",
          "data/manifest.csv (splits frozen), metrics/cohort.csv"),
    Stage("pretrain", "01_pretrain", ("cohort",), "preprocessed training volumes",
          "checkpoints/<backbone>/backbone.pt, metrics/pretrain.csv, metrics/pretrain_vs_random.csv", _pretrained),
    Stage("finetune", "02_finetune_dro", ("pretrain",), "checkpoints/<backbone>/backbone.pt",
          "checkpoints/<backbone>/finetune_<objective>_pooled.pt, artifacts/predictions_*, artifacts/embeddings_*, "
          "metrics/molecular.csv", _finetuned),
    Stage("site_invariance", "03_site_embeddings", ("finetune",), "artifacts/embeddings_*",
          "metrics/site_invariance.csv"),
    Stage("survival", "04_survival", ("finetune",), "artifacts/embeddings_*",
          "metrics/survival.csv, artifacts/survival_risk_*"),
    Stage("gradcam", "05_gradcam", ("finetune",), "checkpoints/<backbone>/finetune_*, artifacts/predictions_*",
          "metrics/gradcam.csv, artifacts/gradcam_subjects_*"),
    Stage("summary", "06_summary", ("finetune", "site_invariance", "survival", "gradcam"), "metrics/*.csv",
          "metrics/verdicts.csv"),
)}
BY_NOTEBOOK = {s.notebook: s for s in STAGES.values()}


def prerequisites(stage: str) -> list[str]:
    """Every stage ``stage`` needs, transitively, in graph order (``stage`` itself excluded)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; valid: {list(STAGES)}")
    order: list[str] = []

    def visit(name: str) -> None:
        for need in STAGES[name].needs:
            if need not in order:
                visit(need)
                order.append(need)

    visit(stage)
    return order


def require(ctx: RunContext, stage: str, backbones: Sequence[str], progress: bool = True) -> None:
    """Make sure the inputs of ``stage`` exist in the run folder for ``backbones``, computing what is missing.

    This is how a notebook run on its own (or after ``--only``) gets its inputs: through the prerequisites'
    library entry points, in graph order, never through another notebook's internals.
    """
    for name in prerequisites(stage):
        node = STAGES[name]
        if node.ensure is not None:
            for backbone in backbones:
                node.ensure(ctx, backbone, progress)


def with_prerequisites(notebook_stems: Iterable[str], available: Sequence[str],
                       completed: Iterable[str] = ()) -> list[str]:
    """The notebooks to run for ``--only``: the chosen ones plus their prerequisites not yet completed, in order.

    Notebooks that are not stages of the graph (a custom notebook folder) have no prerequisites.
    """
    chosen = set(notebook_stems)
    done = {name.removesuffix(".ipynb") for name in completed}
    for stem in list(chosen):
        if stem in BY_NOTEBOOK:
            for need in prerequisites(BY_NOTEBOOK[stem].name):
                if STAGES[need].notebook not in done:
                    chosen.add(STAGES[need].notebook)
    return [stem for stem in available if stem in chosen]
