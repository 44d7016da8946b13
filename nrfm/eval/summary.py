"""A run's or a sweep's verdicts, and the helpers of notebook 06 (the summary).

:func:`all_verdicts` runs every claim's tests on one run (:mod:`nrfm.eval.claim_rows`) and decides them together
(:func:`nrfm.eval.claims.decide`: one Holm family per run). :func:`open_summary` opens what notebook 06 summarises:
one run, or the child runs of a sweep (:class:`SummaryScope`); :func:`scope_verdicts` and :func:`write_verdicts`
compute and write their verdicts; :func:`collect_metrics` and :func:`spread` put the child runs' metrics side by side.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nrfm.config_loading import load_config
from nrfm.cores import can_fork, usable_cores
from nrfm.eval import bootstrap
from nrfm.eval.claim_rows import (cohort_scenario, gradcam_rows, molecular_rows, read_manifest, read_oracle,
                                  site_mixing_rows, survival_rows)
from nrfm.eval.claims import ALPHA, CLAIMS, COMPARISONS, VERDICT_COLUMNS, decide
from nrfm.files import atomic_write_csv
from nrfm.pipeline.context import open_run
from nrfm.pipeline.layout import RunLayout
from nrfm.pipeline.provenance import describe_context


def _verdict_workers(jobs: int) -> int:
    """Processes for the claims' tests: one per core (at most one per job) where fork exists, else 0 (in process)."""
    cores = usable_cores()
    return min(cores, jobs) if cores >= 2 and can_fork() else 0


def _call(job: tuple) -> list[dict]:
    function, args = job
    return function(*args)


def _other_rows(run_dir: Path, methods: list[str], n_boot: int, pca_components: int, seed: int, least: float,
                scenario: str) -> list[dict]:
    return (survival_rows(run_dir, methods, n_boot, seed, least)
            + site_mixing_rows(run_dir, methods, n_boot, pca_components, seed, least)
            + gradcam_rows(run_dir, methods, n_boot, seed, least, scenario))


def all_verdicts(run_dir: Path, methods: list[str], thresholds: dict[str, float], n_boot: int,
                 oracle: pd.DataFrame | None = None, seed: int = 0, pca_components: int = 10,
                 scenario: str | None = None, alpha: float = ALPHA, workers: int | None = None) -> pd.DataFrame:
    """Every claim's verdict for one run (``metrics/verdicts.csv``, columns
    :data:`nrfm.eval.claims.VERDICT_COLUMNS`).

    ``n_boot`` is raised to :func:`nrfm.eval.bootstrap.resamples_for_holm` of the largest possible family, so that
    the small p-values Holm decides on are estimated from enough resamples.

    The tests run as jobs (the molecular claims of each backbone, then the survival, site-mixing and Grad-CAM
    claims together) in ``workers`` forked processes (None: one per core, :func:`_verdict_workers`; 0: in this
    process). Each job is seeded on its own and the rows are put together in a fixed order, so the table does not
    depend on ``workers``.
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
    jobs = [(molecular_rows, (run_dir, [method], thresholds, n_boot, oracle, seed, least)) for method in methods]
    jobs.append((_other_rows, (run_dir, methods, n_boot, pca_components, seed, least, scenario)))
    workers = _verdict_workers(len(jobs)) if workers is None else workers
    if workers > 0:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_call, jobs))
    else:
        parts = [_call(job) for job in jobs]
    rows = [row for part in parts for row in part]
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
