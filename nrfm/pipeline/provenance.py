"""Provenance of a run: code version, environment, device, and timings, kept in ``run.json``.

``run.json`` is rewritten atomically after every stage, so even a killed run leaves an accurate record of
what completed. ``status`` is ``incomplete`` until the last notebook succeeds and the report is written;
``failed`` when a notebook raised; ``complete`` at the end.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from nrfm import __version__
from nrfm.files import atomic_write_json
from nrfm.pipeline.layout import RunLayout
from nrfm.pipeline.workspace import source_checkout

PACKAGES = ("nrfm", "torch", "torchvision", "monai", "lightly", "lifelines", "scikit-learn", "umap-learn",
            "grad-cam", "nibabel", "nilearn", "numpy", "pandas", "scipy", "papermill", "nbconvert", "seaborn",
            "matplotlib")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_state(repo: Path | None) -> dict[str, Any]:
    """Commit hash and whether the work tree differs from it (None where this is not a git checkout)."""
    if repo is None:
        return {"commit": None, "dirty": None}
    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_record() -> dict[str, Any]:
    import torch

    record: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        record["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        pass
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(0)
    return record


class RunRecord:
    """The mutable contents of ``run.json``; ``save()`` writes it atomically."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def start(cls, run_dir: Path, config, config_file: Path, extra: dict[str, Any] | None = None):
        data = {
            "run_id": run_dir.name,
            "status": "incomplete",
            "started": now_iso(),
            "finished": None,
            "pid": os.getpid(),
            "git": git_state(source_checkout()),
            "config_source": config.source,
            "config_file": str(config_file),
            "config_sha256": config.sha256(),
            "config": json.loads(json.dumps(config.to_dict(), default=list)),
            "seed": config.seed,
            "packages": package_versions(),
            "device": device_record(),
            "stages": [],
            "error": None,
        }
        data.update(extra or {})
        record = cls(RunLayout(run_dir).run_json, data)
        record.save()
        return record

    @classmethod
    def load(cls, run_dir: Path) -> "RunRecord":
        path = RunLayout(run_dir).run_json
        return cls(path, json.loads(path.read_text(encoding="utf-8")))

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def completed_stages(self) -> list[str]:
        return [s["notebook"] for s in self.data["stages"] if s.get("status") == "complete"]

    def stage_done(self, notebook: str, started: str, seconds: float, status: str = "complete",
                   error: str | None = None) -> None:
        self.data["stages"] = [s for s in self.data["stages"] if s["notebook"] != notebook]
        self.data["stages"].append({"notebook": notebook, "status": status, "started": started,
                                    "finished": now_iso(), "wall_seconds": round(seconds, 2), "error": error})
        self.save()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = error
        self.data["finished"] = now_iso()
        self.save()


def describe_context(ctx) -> str:
    """The provenance line each notebook prints first: code, config, seed, device, data, run folder."""
    git = git_state(source_checkout())
    commit = (git["commit"] or "n/a")[:12] + (" (dirty)" if git["dirty"] else "")
    sites = ", ".join(f"{s} {n}" for s, n in ctx.manifest["site"].value_counts().sort_index().items())
    return (f"nrfm {__version__} · git {commit} · config {ctx.config.source} (sha256 {ctx.config.sha256()[:12]})"
            f" · seed {ctx.config.seed} · device {ctx.device}\n"
            f"cohort {ctx.cohort_dir} ({len(ctx.manifest)} exams: {sites})\nrun folder {ctx.run_dir}")
