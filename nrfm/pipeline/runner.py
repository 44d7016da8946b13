"""``nrfm run``: execute the ordered notebooks with papermill into a fresh run folder, then render the report.

A run folder ``reports/<run_id>/`` is created new for every run (never reused, never overwritten). The
resolved config is frozen in ``config.yaml`` and hashed into ``run.json``; each notebook gets ``config`` and
``run_dir`` as papermill parameters and writes only inside the run folder. A failing notebook stops the run:
the report still renders, showing the failing cell's error, and the command exits non-zero. A killed run
stays marked ``incomplete`` and ``nrfm run --resume RUN_ID`` continues after the last completed notebook
(pretraining itself resumes from its last epoch checkpoint).
"""
from __future__ import annotations

import itertools
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from nrfm.config import Config
from nrfm.config_loading import load_config
from nrfm.data.validation import validate_manifest
from nrfm.errors import ConfigError, ManifestError, RunError
from nrfm.files import atomic_write_text
from nrfm.pipeline.context import new_run_dir, resolve_config_paths
from nrfm.pipeline.layout import RunLayout
from nrfm.pipeline.provenance import RunRecord, now_iso
from nrfm.pipeline.report import render_index, render_run_report, render_sweep_report
from nrfm.pipeline.stages import with_prerequisites
from nrfm.pipeline.workspace import resolve_config_file, resolve_in_workspace, resource_dir, workspace_root


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main process on SIGTERM, so the run is recorded as interrupted."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise RunInterrupted(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def list_notebooks(only: Sequence[str] | None = None, configured: Sequence[str] = (),
                   notebook_dir: Path | None = None) -> list[Path]:
    """The ordered notebooks to run; ``only`` picks by name or numeric prefix (``02`` or ``02_finetune_dro``).

    A chosen notebook's prerequisites in the stage graph (:mod:`nrfm.pipeline.stages`) run first: a new run
    folder has none of their outputs.
    """
    notebook_dir = Path(notebook_dir) if notebook_dir else resource_dir("notebooks")
    available = sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if not available:
        raise RunError(f"{notebook_dir}: no notebooks found (expected files named like 00_name.ipynb)")
    wanted = list(only or configured or [])
    if not wanted:
        return available
    chosen = []
    for name in wanted:
        name = name.strip().removesuffix(".ipynb")
        match = [nb for nb in available if nb.stem == name or nb.stem.split("_")[0] == name]
        if not match:
            raise ConfigError(f"--only: unknown notebook {name!r}; valid: {[nb.stem for nb in available]}")
        chosen.extend(m for m in match if m not in chosen)
    stems = with_prerequisites([nb.stem for nb in chosen], [nb.stem for nb in available])
    return [nb for nb in available if nb.stem in stems]


def preflight(cfg: Config) -> None:
    """Refuse a bad imported manifest before any run folder exists (the table only; images are checked by
    ``nrfm validate`` and by the cohort notebook)."""
    if not cfg.cohort.manifest:
        return
    path = Path(cfg.cohort.manifest)
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: cohort.manifest: file not found: {path}")
    result = validate_manifest(path, check_images=False, progress=False)
    if not result.ok:
        more = f" (and {len(result.errors) - 1} more: nrfm validate {path})" if len(result.errors) > 1 else ""
        raise ManifestError(result.errors[0] + more)


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    report: Path
    status: str


def _execute(notebook: Path, run_dir: Path, config_file: Path, progress: bool, extra: Mapping[str, Any]) -> None:
    import papermill as pm

    out = RunLayout(run_dir).executed_notebook(notebook.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(notebook), str(out),
        parameters={"config": str(config_file), "run_dir": str(run_dir), **extra},
        kernel_name="python3", progress_bar=progress, cwd=str(workspace_root()), log_output=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # the kernel's transport notice is not the user's concern
    )


def execute_run(run_dir: Path, record: RunRecord, config_file: Path, notebooks: Sequence[Path],
                progress: bool = True, extra: Mapping[str, Any] | None = None) -> RunOutcome:
    """Run the notebooks not yet completed in ``record``, then render the report; raise RunError on failure."""
    import papermill as pm

    done = set(record.completed_stages())
    failure: str | None = None
    with _terminate_as_interrupt():
        try:
            for notebook in notebooks:
                if notebook.name in done:
                    print(f"[nrfm] {notebook.stem}: already complete, skipped (resume)", flush=True)
                    continue
                print(f"[nrfm] {notebook.stem} ...", flush=True)
                started, t0 = now_iso(), time.perf_counter()
                try:
                    _execute(notebook, run_dir, config_file, progress, extra or {})
                except pm.PapermillExecutionError as err:
                    failure = f"{notebook.stem}: cell {err.exec_count}: {err.ename}: {err.evalue}".strip()
                    record.stage_done(notebook.name, started, time.perf_counter() - t0, "failed", failure)
                    break
                record.stage_done(notebook.name, started, time.perf_counter() - t0)
                print(f"[nrfm] {notebook.stem}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        except KeyboardInterrupt as err:
            record.finish("incomplete", f"interrupted ({err or 'SIGINT'}); continue with: nrfm run --resume "
                                        f"{run_dir.name} --out {run_dir.parent}")
            raise
    status = "failed" if failure else "complete"
    if not failure:
        RunLayout(run_dir).drop_rebuildable()  # the frozen-feature cache: rebuilt on demand if ever needed
    report = render_run_report(run_dir)
    record.finish(status, failure)
    report = render_run_report(run_dir)  # again, so the page shows the final status
    render_index(run_dir.parent)
    if failure:
        raise RunError(f"run {run_dir.name} failed in {failure} (report: {report})")
    return RunOutcome(run_dir, report, status)


def start_run(config_path: str | Path, out: str | Path = "reports", manifest: str | Path | None = None,
              only: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None,
              label: str | None = None, progress: bool = True, notebook_dir: Path | None = None) -> RunOutcome:
    """Start a new run of the pipeline (see module docstring)."""
    config_path = resolve_config_file(config_path)
    notebook_dir = Path(notebook_dir) if notebook_dir else resource_dir("notebooks")
    overrides = dict(overrides or {})
    if manifest:
        manifest_path = resolve_in_workspace(manifest)
        if not manifest_path.is_file():
            raise ConfigError(f"--manifest: file not found: {manifest}")
        overrides["cohort.manifest"] = str(manifest_path)
    cfg = resolve_config_paths(load_config(config_path, overrides))
    notebooks = list_notebooks(only, cfg.report.notebooks, notebook_dir)
    preflight(cfg)
    run_dir = new_run_dir(resolve_in_workspace(out), label or f"{config_path.stem}-seed{cfg.seed}")
    config_file = RunLayout(run_dir).config_yaml
    atomic_write_text(config_file, f"# resolved from {config_path}\n" + cfg.to_yaml())
    frozen = load_config(config_file)
    record = RunRecord.start(run_dir, frozen, config_file,
                             extra={"notebooks": [nb.name for nb in notebooks], "notebook_dir": str(Path(notebook_dir).resolve()),
                                    "overrides": overrides})
    print(f"[nrfm] run {run_dir.name}: config {config_path} (sha256 {frozen.sha256()[:12]}), "
          f"git {record.data['git']['commit'] or 'n/a'}{' (dirty)' if record.data['git']['dirty'] else ''}",
          flush=True)
    return execute_run(run_dir, record, config_file, notebooks, progress)


def resume_run(run_id: str, out: str | Path = "reports", progress: bool = True) -> RunOutcome:
    """Continue an interrupted run after its last completed notebook, with its frozen config."""
    out = resolve_in_workspace(out)
    run_dir = out / run_id
    if not RunLayout(run_dir).run_json.is_file():
        raise RunError(f"{run_dir}: no such run (no run.json); runs are listed in {Path(out) / 'index.html'}")
    record = RunRecord.load(run_dir)
    if record.data.get("status") == "complete":
        raise RunError(f"{run_dir}: run is already complete; start a new one instead")
    config_file = RunLayout(run_dir).config_yaml
    cfg = load_config(config_file)
    if cfg.sha256() != record.data.get("config_sha256"):
        raise RunError(f"{config_file}: config changed since the run started (sha256 differs); refusing to resume")
    notebook_dir = Path(record.data.get("notebook_dir") or resource_dir("notebooks"))
    notebooks = [notebook_dir / name for name in record.data.get("notebooks", [])]
    missing = [nb.name for nb in notebooks if not nb.is_file()]
    if missing:
        raise RunError(f"{run_dir}: notebooks of this run no longer exist: {missing}")
    record.data["status"] = "incomplete"
    record.data.setdefault("resumed", []).append(now_iso())
    record.save()
    print(f"[nrfm] resuming {run_id}: completed {record.completed_stages() or 'nothing yet'}", flush=True)
    return execute_run(run_dir, record, config_file, notebooks, progress)


def _sweep_summary(sweep_dir: Path, config_path: Path, notebook_dir: Path | None) -> Path:
    """Run the summary notebook over a sweep's child runs (mean and spread), then render the sweep page."""
    import papermill as pm

    notebook_dir = Path(notebook_dir) if notebook_dir else resource_dir("notebooks")
    children = sorted(p.parent.name for p in (sweep_dir / "runs").glob("*/run.json"))
    candidates = sorted(notebook_dir.glob("*_summary.ipynb"))
    record = RunRecord.start(sweep_dir, load_config(config_path), config_path,
                             extra={"notebooks": [p.name for p in candidates[-1:]], "sweep_runs": children})
    if candidates:
        summary = candidates[-1]
        started, t0 = now_iso(), time.perf_counter()
        try:
            _execute(summary, sweep_dir, config_path, progress=False, extra={})
            record.stage_done(summary.name, started, time.perf_counter() - t0)
            record.finish("complete")
        except pm.PapermillExecutionError as err:
            record.stage_done(summary.name, started, time.perf_counter() - t0, "failed", f"{err.ename}: {err.evalue}")
            record.finish("failed", f"{err.ename}: {err.evalue}")
    else:
        record.finish("complete")
    return render_sweep_report(sweep_dir)


def parse_sweep(items: Sequence[str]) -> list[dict[str, Any]]:
    """``["backbone=byol,dino", "seed=0,1,2"]`` -> the list of combinations as config overrides."""
    axes: list[list[tuple[str, Any]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--sweep {item!r}: expected name=value1,value2,...")
        name, raw = item.split("=", 1)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--sweep {item!r}: no values")
        if name == "backbone":
            axes.append([("pretraining.methods", [v]) for v in values])
        elif name == "seed":
            try:
                axes.append([("seed", int(v)) for v in values])
            except ValueError:
                raise ConfigError(f"--sweep {item!r}: seeds must be integers") from None
        else:
            axes.append([(name, yaml.safe_load(v)) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)]


def sweep_run(config_path: str | Path, sweep: Sequence[str], out: str | Path = "reports",
              manifest: str | Path | None = None, only: Sequence[str] | None = None,
              overrides: Mapping[str, Any] | None = None, progress: bool = True,
              notebook_dir: Path | None = None) -> RunOutcome:
    """One child run per combination under ``<out>/<sweep_id>/runs/``, then an aggregated summary page."""
    combos = parse_sweep(sweep)
    config_path = resolve_config_file(config_path)
    for combo in combos:  # validate every combination before running any
        load_config(config_path, {**dict(overrides or {}), **combo})
    sweep_dir = new_run_dir(resolve_in_workspace(out), f"sweep-{config_path.stem}")
    print(f"[nrfm] sweep {sweep_dir.name}: {len(combos)} runs", flush=True)
    failures = []
    for combo in combos:
        label = "-".join(f"{k.split('.')[-1]}-{v[0] if isinstance(v, list) else v}" for k, v in combo.items())
        try:
            start_run(config_path, out=sweep_dir / "runs", manifest=manifest, only=only,
                      overrides={**dict(overrides or {}), **combo}, label=label, progress=progress,
                      notebook_dir=notebook_dir)
        except RunError as err:
            failures.append(str(err))
    report = _sweep_summary(sweep_dir, config_path, notebook_dir)
    if failures:
        raise RunError(f"sweep {sweep_dir.name}: {len(failures)} run(s) failed; first: {failures[0]}")
    return RunOutcome(sweep_dir, report, "complete")
