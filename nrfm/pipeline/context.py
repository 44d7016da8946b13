"""The run context every notebook opens first: config, run folder, cohort with splits, data, outputs.

``open_run(config, run_dir)`` is idempotent: the first stage of a run makes the cohort (generating the
synthetic default when no manifest is configured), assigns splits by patient and freezes them in
``<run_dir>/data/manifest.csv``; every later stage reads that copy, so all stages of a run see the same
subjects in the same splits. Stages write through the context (``write_metrics``, ``save_figure``) so the
layout of a run folder is decided in one place.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from nrfm.config import Config
from nrfm.config_loading import load_config
from nrfm.cores import single_thread_blas
from nrfm.data.manifest import read_manifest
from nrfm.data.preprocessing import preprocessed_dataset
from nrfm.data.splits import assign_splits, check_no_patient_leak
from nrfm.errors import ConfigError, RunError
from nrfm.files import atomic_write_csv, atomic_write_text
from nrfm.pipeline.layout import RunLayout
from nrfm.pipeline.workspace import resolve_config_file, resolve_in_workspace, workspace_root
from nrfm.synth.generate import generate_cohort, generator_fingerprint


def _numeric_if_possible(column: pd.Series) -> pd.Series:
    if column.dtype != object:
        return column
    try:
        return pd.to_numeric(column.replace("", None))
    except (ValueError, TypeError):
        return column


def resolve_config_paths(cfg: Config) -> Config:
    """Make the config's relative paths absolute (relative to the workspace, see :mod:`nrfm.pipeline.workspace`)."""
    cohort = cfg.cohort
    if cohort.manifest:
        cohort = cohort.__class__(**{**cohort.__dict__, "manifest": str(resolve_in_workspace(cohort.manifest))})
    cohort = cohort.__class__(**{**cohort.__dict__, "data_dir": str(resolve_in_workspace(cohort.data_dir))})
    prep = cfg.preprocessing
    prep = prep.__class__(**{**prep.__dict__, "cache_dir": str(resolve_in_workspace(prep.cache_dir))})
    return cfg.replace(cohort=cohort, preprocessing=prep)


def new_run_dir(out_root: str | Path, label: str) -> Path:
    """Create a fresh, unique run folder ``<out_root>/<UTC time>-<label>`` (never reuses one)."""
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunError(f"{out_root}: cannot create the reports folder ({err.strerror or err})") from None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        name = f"{stamp}-{label}" + (f"-{attempt}" if attempt else "")
        try:
            (out_root / name).mkdir()
            return out_root / name
        except FileExistsError:
            continue
        except OSError as err:
            raise RunError(f"{out_root}: cannot create a run folder here ({err.strerror or err})") from None
    raise RunError(f"{out_root}: could not create a unique run folder")


@dataclass
class RunContext:
    """Everything a stage needs; see :func:`open_run`."""

    config: Config
    run_dir: Path
    manifest: pd.DataFrame  # canonical columns, absolute paths, split assigned
    cohort_dir: Path  # folder of the source manifest (oracle.csv lives here for synthetic cohorts)
    _dataset: Any = field(default=None, repr=False)

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def layout(self) -> RunLayout:
        """Every path of this run folder (see :mod:`nrfm.pipeline.layout`)."""
        return RunLayout(self.run_dir)

    @property
    def metrics_dir(self) -> Path:
        return _made(self.layout.metrics_dir)

    @property
    def figures_dir(self) -> Path:
        return _made(self.layout.figures_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return _made(self.layout.checkpoints_dir())

    @property
    def artifacts_dir(self) -> Path:
        """Predictions, embeddings and other per-stage outputs read by later stages."""
        return _made(self.layout.artifacts_dir)

    # ---- data ---------------------------------------------------------------------------------------------
    @property
    def is_synthetic(self) -> bool:
        return (self.cohort_dir / "oracle.csv").is_file()

    @property
    def oracle(self) -> pd.DataFrame | None:
        """Long table subject_id, endpoint, value (true probability or value) for synthetic cohorts."""
        path = self.cohort_dir / "oracle.csv"
        return pd.read_csv(path, dtype={"subject_id": str}) if path.is_file() else None

    @property
    def sites(self) -> list[str]:
        return sorted(self.manifest["site"].unique())

    def dataset(self, progress: bool = True):
        """Preprocessed volumes of every manifest row, in manifest order (built once, cached on disk)."""
        if self._dataset is None:
            self._dataset = preprocessed_dataset(self.manifest, self.config.preprocessing, progress=progress)
        return self._dataset

    @property
    def device(self):
        import torch

        if self.config.device == "cuda" or (self.config.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ConfigError(f"{self.config.source}: device: cuda requested but no CUDA device is available")
            return torch.device("cuda")
        return torch.device("cpu")

    # ---- outputs ------------------------------------------------------------------------------------------
    def write_metrics(self, name: str, frame: pd.DataFrame, key_columns: Sequence[str]) -> Path:
        """Merge ``frame`` into ``metrics/<name>.csv``: rows with the same key values are replaced.

        Stages can be rerun one backbone at a time without losing the others' rows.
        """
        _made(self.layout.metrics_dir)
        path = self.layout.metrics(name)
        if path.is_file() and path.stat().st_size > 0:
            old = pd.read_csv(path, dtype=str, keep_default_na=False)
            new_keys = set(map(tuple, frame[list(key_columns)].astype(str).values))
            keep = [tuple(r) not in new_keys for r in old[list(key_columns)].values]
            frame = pd.concat([old[keep], frame.astype(object)], ignore_index=True)
            # re-infer numeric columns after concatenating the string-typed old rows
            frame = frame.apply(_numeric_if_possible)
        frame = frame.sort_values(list(key_columns), kind="stable").reset_index(drop=True)
        return atomic_write_csv(path, frame)

    def read_metrics(self, name: str) -> pd.DataFrame | None:
        path = self.layout.metrics(name)
        return pd.read_csv(path) if path.is_file() else None

    def save_figure(self, fig, name: str, formats: Sequence[str] = ("png",), show: bool | None = None) -> Path:
        """Save a matplotlib figure under figures/ with a stable name (``name`` without extension).

        Args:
            show: display the saved PNG in the notebook and close the figure, so that the inline backend does not
                draw it a second time at the end of the cell (a figure of 30 panels takes about a second per draw).
                Default: only inside a Jupyter kernel, and only when ``formats`` has ``png``.
        """
        first = png = None
        for fmt in formats:
            _made(self.layout.figures_dir)
            path = self.layout.figure(name, fmt)
            tmp = path.with_name(f".{path.name}.tmp")
            fig.savefig(tmp, format=fmt, dpi=110, bbox_inches="tight")
            os.replace(tmp, path)
            first = first or path
            png = path if fmt == "png" else png
        if png is not None and (_in_kernel() if show is None else show):
            _show_saved(fig, png)
        return first


def _in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (papermill's included), where figures are displayed inline."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _show_saved(fig, png: Path) -> None:
    """Display the saved PNG (the same pixels as the report's file) and close ``fig`` so it is not drawn again."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    display(Image(filename=str(png)))
    plt.close(fig)


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_parameter(name: str, value: str, valid: Sequence[str]) -> list[str]:
    """A notebook parameter naming one item or ``all``: the chosen items, or a ConfigError listing valid ones."""
    if value == "all":
        return list(valid)
    if value not in valid:
        raise ConfigError(f"notebook parameter {name}: unknown value {value!r}; valid: {[*valid, 'all']}")
    return [value]


def cohort_manifest_path(cfg: Config) -> Path:
    """Where the configured cohort's manifest is (the synthetic default is generated on demand, in a folder named
    by profile, scenario, seed and :func:`nrfm.synth.generate.generator_fingerprint`)."""
    if cfg.cohort.manifest:
        return resolve_in_workspace(cfg.cohort.manifest)
    name = (f"synthetic-{cfg.cohort.synth_profile}-{cfg.cohort.synth_scenario}-seed{cfg.cohort.synth_seed}"
            f"-g{generator_fingerprint()}")
    if cfg.cohort.synth_sites:
        import hashlib

        name += "-" + hashlib.sha256(cfg.cohort.synth_sites.encode()).hexdigest()[:8]
    return resolve_in_workspace(cfg.cohort.data_dir) / name / "manifest.csv"


def ensure_cohort(cfg: Config, progress: bool = True) -> Path:
    """Return the manifest path, generating the synthetic cohort first if it does not exist yet."""
    path = cohort_manifest_path(cfg)
    if cfg.cohort.manifest:
        if not path.is_file():
            raise ConfigError(f"{cfg.source}: cohort.manifest: file not found: {path}")
        return path
    if not path.is_file():
        generate_cohort(path.parent, profile=cfg.cohort.synth_profile, seed=cfg.cohort.synth_seed,
                        sites=cfg.cohort.synth_sites or None, progress=progress,
                        scenario=cfg.cohort.synth_scenario)
    return path


def open_run(config: str | Path | Config, run_dir: str | Path | None = None, progress: bool = True) -> RunContext:
    """Open (or start) a run: load the config, make sure the cohort exists, freeze the splits.

    Args:
        config: a YAML path (relative to the workspace, or a packaged config's name) or a Config.
        run_dir: the run folder; empty or None starts a new one under ``reports/`` (for notebooks run alone).
        progress: show progress bars.
    """
    cfg = config if isinstance(config, Config) else load_config(resolve_config_file(config))
    cfg = resolve_config_paths(cfg)
    if run_dir in (None, ""):
        run_dir = new_run_dir(workspace_root() / "reports", "notebook")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    source = ensure_cohort(cfg, progress=progress)
    layout = RunLayout(run_dir)
    frozen = layout.frozen_manifest
    if frozen.is_file():
        manifest = read_manifest(frozen)
    else:
        manifest = read_manifest(source)
        manifest = assign_splits(manifest, seed=cfg.seed, endpoint=cfg.cohort.split_endpoint,
                                 fractions=cfg.cohort.split_fractions,
                                 min_val_patients=cfg.cohort.split_min_val_patients)
        check_no_patient_leak(manifest, where=str(source))
        frozen.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(frozen, manifest)
        atomic_write_text(layout.manifest_source, f"{source}\n")
    check_no_patient_leak(manifest, where=str(frozen))
    single_thread_blas()  # a run's BLAS calls are small; two threads fight torch's (nrfm.cores)
    return RunContext(config=cfg, run_dir=run_dir, manifest=manifest, cohort_dir=source.parent)
