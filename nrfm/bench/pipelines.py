"""Pipeline, scaling and soak measurements of ``nrfm bench`` (wall time and memory of whole processes).

* :func:`pipeline`: ``nrfm run`` of a config in a subprocess; wall time and the peak of the summed RSS of
  the process tree (notebook kernels included), sampled every 0.2 s.
* :func:`scaling`: one BYOL pretraining epoch at 1x, 2x, 4x train subjects, each in a fresh process
  (seconds and peak RSS): cost should grow linearly in subjects, memory should not grow.
* :func:`soak`: three smoke pipelines in one process (``nrfm.pipeline.runner.start_run``) and three rounds of the
  in-process stage functions (as a notebook kernel calls them), with this process's RSS after each.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nrfm.config_loading import load_config
from nrfm.pipeline.context import open_run
from nrfm.pipeline.runner import start_run
from nrfm.pipeline.workspace import resolve_config_file, workspace_root
from nrfm.train.finetune import run_finetune_stage
from nrfm.train.pretrain import run_pretraining_stage, train_method


def _tree_rss(proc) -> int:
    try:
        procs = [proc] + proc.children(recursive=True)
    except Exception:  # the process ended between samples
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except Exception:
            pass
    return total


def run_measured(cmd: Sequence[str], cwd: Path | None = None) -> dict[str, float]:
    """Wall seconds, exit status and peak summed RSS (MiB) of a command and all its children."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(list(cmd), cwd=str(cwd or workspace_root()), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, proc = 0, psutil.Process(child.pid)
    tail: list[str] = []
    reader = threading.Thread(target=lambda: tail.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.2)
    reader.join(timeout=5)
    return {"seconds": time.perf_counter() - t0, "returncode": child.returncode, "peak_rss_mib": peak / 2 ** 20,
            "output_tail": "".join(tail[-5:])}


def pipeline(config: str, out: Path) -> dict[str, float]:
    """``nrfm run --config <config>`` into ``out`` (a subprocess), measured."""
    return run_measured([sys.executable, "-m", "nrfm", "run", "--config", config, "--out", str(out), "--quiet"])


def _scaling_child(config: str, n_train: int, run_dir: str) -> None:
    """One BYOL epoch on ``n_train`` train subjects (subprocess entry of :func:`scaling`); prints JSON."""
    import resource

    cfg = load_config(resolve_config_file(config))
    cfg = cfg.replace(pretraining=dataclasses.replace(cfg.pretraining, epochs=1, warmup_epochs=0))
    ctx = open_run(cfg, run_dir, progress=False)
    manifest = ctx.manifest.copy()
    train = np.flatnonzero(manifest["split"].astype(str).to_numpy() == "train")
    reps = -(-n_train // len(train))
    rows = np.tile(train, reps)[:n_train]  # a larger cohort by repeating train subjects (same per-subject cost)
    others = np.flatnonzero(manifest["split"].astype(str).to_numpy() == "val")
    frame = manifest.iloc[np.concatenate([rows, others])].reset_index(drop=True)
    base = ctx.dataset(progress=False)
    index = np.concatenate([rows, others])

    class Subset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(index)

        def __getitem__(self, i: int) -> dict:
            return base[int(index[i])]

    t0 = time.perf_counter()
    train_method("byol", cfg, Subset(), frame, Path(run_dir) / f"ckpt{n_train}", ctx.device, progress=False)
    print(json.dumps({"n_train": n_train, "seconds": time.perf_counter() - t0,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def scaling(config: str = "configs/default.yaml", base: int = 40, factors: Sequence[int] = (1, 2, 4)) -> list[dict]:
    """Seconds and peak RSS of one pretraining epoch at ``base * factor`` train subjects, each in a new process."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in factors:
            code = (f"from nrfm.bench.pipelines import _scaling_child; _scaling_child({config!r}, {base * factor}, "
                    f"{str(Path(tmp) / 'run')!r})")
            res = subprocess.run([sys.executable, "-c", code], cwd=workspace_root(), capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"scaling child failed: {res.stderr.strip().splitlines()[-1:]}")
            out.append({"factor": factor, **json.loads(res.stdout.strip().splitlines()[-1])})
    return out


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def soak(config: str = "configs/smoke.yaml", rounds: int = 3, pipelines: bool = True) -> dict[str, list[float]]:
    """RSS (MiB) of this process after each of ``rounds`` smoke pipelines and rounds of in-process stages."""
    import gc

    out: dict[str, list[float]] = {"start_run_rss_mib": [], "stages_rss_mib": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds if pipelines else 0):
            start_run(config, out=Path(tmp) / "runs", progress=False)
            gc.collect()
            out["start_run_rss_mib"].append(_rss_mib())
        for r in range(rounds):
            ctx = open_run(resolve_config_file(config), Path(tmp) / f"stages{r}", progress=False)
            for method in ctx.config.pretraining.methods:
                run_pretraining_stage(ctx, method, progress=False)
                run_finetune_stage(ctx, method, "dro", "pooled", progress=False)
            del ctx
            gc.collect()
            out["stages_rss_mib"].append(_rss_mib())
    return out


