"""``nrfm bench``: speed and scale of the kit, measured as ratios in one process on the same data.

Parts (``run_benchmarks(parts=...)``):

* ``throughput``: pretraining volumes/s of nrfm's loop (:func:`nrfm.train.pretrain.train_method` with the
  config's fast path) against a plain loop written as the MONAI and lightly examples write it: fp32,
  default memory format, every augmentation per view in MONAI inside the DataLoader, ``loss.item()``
  after every step; same model, batch, data, workers and threads. Rates are the median per-step rate
  after a warm-up epoch, so a load spike from another process moves them less than a mean would.
* ``flops``: FLOPs of one training step (``torch.utils.flop_counter.FlopCounterMode``: matmuls and
  convolutions, forward and backward) over its measured time, against the rate of a square matmul in the
  step's dtype (bf16 when autocast is on) on the same threads.
* ``loader``: volumes/s the nrfm DataLoader delivers on its own against what the fast training step
  consumes (batch size over the median time of a step on fixed views, i.e. with data loading taken out).
* ``synth``: wall time of writing the default synthetic cohort from scratch.
* ``smoke`` / ``default`` / ``scaling`` / ``soak``: wall time and memory of whole pipelines, of one
  pretraining epoch at 1x, 2x, 4x cohort size, and of three pipelines in one process
  (:mod:`nrfm.bench.pipelines`).

The machine record (CPU model, avx512_bf16 / AMX flags, cores, load average, torch, CUDA device) goes with
every result into ``benchmarks/results/<date>.json``; keys of parts not run are null (a same-day file keeps
what an earlier invocation measured).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from nrfm.bench.pipelines import pipeline, scaling, soak
from nrfm.config import Config
from nrfm.config_loading import load_config
from nrfm.files import atomic_write_json
from nrfm.models.backbones import build_backbone, use_channels_last
from nrfm.pipeline.context import open_run
from nrfm.pipeline.workspace import resolve_config_file, workspace_root
from nrfm.ssl import build_method
from nrfm.synth.generate import generate_cohort
from nrfm.ssl.views import EpochSampler, SampleViews, ViewDataset, view_recipe
from nrfm.train.monitor import autocast_context, use_bf16
from nrfm.train.pretrain import build_optimizer, configure_threads, make_loader, train_method

PARTS = ("throughput", "flops", "loader", "scaling", "smoke", "default", "soak")
KEYS = ("pretrain_speedup_vs_baseline", "flops_fraction_of_matmul", "loader_over_training", "smoke_run_seconds",
        "default_run_seconds")


# ---------------------------------------------------------------------------------------------- machine
def machine_record() -> dict[str, Any]:
    """CPU model and flags, cores, load, torch version and CUDA device of this machine."""
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "amx_tile": "amx_tile" in flags, "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ------------------------------------------------------------------------------------------- throughput
def _step_rate(times: Sequence[tuple[int, float]], batch: int, skip_epochs: int = 1) -> float:
    """Median volumes/s over step intervals inside each epoch after ``skip_epochs`` warm-up epochs."""
    dt = [t1 - t0 for (e0, t0), (e1, t1) in zip(times, times[1:]) if e0 == e1 and e0 >= skip_epochs]
    return float(batch / np.median(dt)) if dt else float("nan")


def nrfm_loop_rate(cfg: Config, dataset, manifest, method: str = "byol", device: str = "cpu") -> float:
    """Volumes/s of :func:`nrfm.train.pretrain.train_method` (median step after the first epoch)."""
    times: list[tuple[int, float]] = []

    def tick(epoch: int, step: int) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((epoch, time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        train_method(method, cfg, dataset, manifest, Path(tmp), device, progress=False, step_callback=tick)
    return _step_rate(times, cfg.pretraining.batch_size)


def baseline_loop_rate(cfg: Config, dataset, manifest, method: str = "byol", device: str = "cpu") -> float:
    """Volumes/s of a plain loop as the MONAI / lightly examples write it (same model, batch, data, workers)."""
    from torch.utils.data import DataLoader

    pcfg, dev = cfg.pretraining, torch.device(device)
    train = np.flatnonzero(manifest["split"].astype(str).to_numpy() == "train")
    volume = tuple(dataset[int(train[0])]["image"].shape[1:])
    before = torch.get_num_threads()
    configure_threads(pcfg.threads, pcfg.num_workers)
    torch.manual_seed(cfg.seed)
    model = build_method(method, build_backbone(method, pcfg, volume), pcfg).to(dev)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=pcfg.lr,
                                  weight_decay=pcfg.weight_decay)
    views = SampleViews(view_recipe(method, pcfg), pcfg.view_size_of(method), pcfg.local_view_size, full_monai=True)
    sampler = EpochSampler(train, cfg.seed, pcfg.batch_size)
    loader = DataLoader(ViewDataset(dataset, views, cfg.seed), batch_size=pcfg.batch_size, sampler=sampler,
                        num_workers=pcfg.num_workers, persistent_workers=pcfg.num_workers > 0)
    total = pcfg.epochs * (len(sampler) // pcfg.batch_size)
    times, step = [], 0
    try:
        for epoch in range(pcfg.epochs):
            sampler.set_epoch(epoch)
            epoch_loss = 0.0
            for batch in loader:
                model.on_step(step, total)
                loss = model([v.to(dev) for v in batch["views"]])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += loss.item()
                step += 1
                times.append((epoch, time.perf_counter()))
    finally:
        torch.set_num_threads(before)
    return _step_rate(times, pcfg.batch_size)


# ------------------------------------------------------------------------------------------------ flops
def _fixed_step(cfg: Config, method: str, volume: Sequence[int], device: torch.device) -> tuple[Callable, int]:
    """A closure running one fast-path training step on fixed random views, and the number of FLOPs it does."""
    from torch.utils.flop_counter import FlopCounterMode

    pcfg = cfg.pretraining
    torch.manual_seed(cfg.seed)
    model = build_method(method, build_backbone(method, pcfg, volume), pcfg).to(device)
    fmt = torch.channels_last_3d if pcfg.channels_last else torch.contiguous_format
    if pcfg.channels_last:
        use_channels_last(model)
    optimizer = build_optimizer(model, cfg)  # the training loop's optimizer (fused AdamW where available)
    recipe = view_recipe(method, pcfg)
    sizes = [pcfg.view_size_of(method)] * recipe.n_global + [pcfg.local_view_size] * recipe.n_local
    views = [torch.randn(pcfg.batch_size, 4, *s, device=device).contiguous(memory_format=fmt) for s in sizes]

    def step() -> None:
        model.on_step(1, 100)
        with autocast_context(device, pcfg.bf16):
            loss = model(views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return step, int(counter.get_total_flops())


def _median_seconds(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def step_seconds(cfg: Config, volume: Sequence[int], method: str = "byol", device: str = "cpu",
                 repeats: int = 5) -> float:
    """Median seconds of one fast-path training step on fixed views (what training consumes, data aside)."""
    dev = torch.device(device)
    before = torch.get_num_threads()
    configure_threads(cfg.pretraining.threads, cfg.pretraining.num_workers)
    try:
        step, _ = _fixed_step(cfg, method, volume, dev)
        return _median_seconds(step, repeats, dev)
    finally:
        torch.set_num_threads(before)


def matmul_rate(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (the machine's attainable rate for that dtype)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * n ** 3 / _median_seconds(lambda: torch.mm(a, b), repeats, device)


def flops_fraction(cfg: Config, volume: Sequence[int], method: str = "byol", device: str = "cpu",
                   repeats: int = 5) -> dict[str, float]:
    """Achieved FLOP/s of the fast training step and its fraction of the same-dtype matmul rate."""
    dev = torch.device(device)
    before = torch.get_num_threads()
    configure_threads(cfg.pretraining.threads, cfg.pretraining.num_workers)
    try:
        step, flops = _fixed_step(cfg, method, volume, dev)
        seconds = _median_seconds(step, repeats, dev)
        bf16 = use_bf16(dev, cfg.pretraining.bf16)  # the dtype the step really runs in
        peak = matmul_rate(torch.bfloat16 if bf16 else torch.float32, dev)
        fp32 = peak if not bf16 else matmul_rate(torch.float32, dev)
    finally:
        torch.set_num_threads(before)
    return {"step_gflop": flops / 1e9, "step_seconds": seconds, "achieved_gflops": flops / seconds / 1e9,
            "matmul_gflops": peak / 1e9, "matmul_gflops_fp32": fp32 / 1e9, "batch_size": cfg.pretraining.batch_size,
            "flops_fraction_of_matmul": flops / seconds / peak}


def speedup_ceiling(throughput_details: dict[str, float], flops_details: dict[str, float]) -> dict[str, float]:
    """The largest speed-up over the plain loop that the machine allows for this training step.

    A step that ran at 100 % of the same-dtype matmul rate (no step can do better: convolutions and matmuls
    are the step's FLOPs) would process ``matmul rate / FLOPs per volume`` volumes/s; divided by the plain
    loop's measured volumes/s this bounds ``pretrain_speedup_vs_baseline`` on the machine.
    """
    per_volume = flops_details["step_gflop"] / flops_details["batch_size"]
    best = flops_details["matmul_gflops"] / per_volume
    return {"volumes_per_s_at_matmul_peak": best,
            "pretrain_speedup_ceiling": best / throughput_details["baseline_volumes_per_s"],
            "bf16_over_fp32_matmul": flops_details["matmul_gflops"] / flops_details["matmul_gflops_fp32"]}


# ----------------------------------------------------------------------------------------------- loader
def loader_rate(cfg: Config, dataset, manifest, method: str = "byol", batches: int = 20) -> float:
    """Volumes/s the nrfm pretraining DataLoader delivers on its own (after one warm-up batch)."""
    train = np.flatnonzero(manifest["split"].astype(str).to_numpy() == "train")
    before = torch.get_num_threads()
    configure_threads(cfg.pretraining.threads, cfg.pretraining.num_workers)
    loader, sampler = make_loader(dataset, train, method, cfg, torch.device("cpu"))
    count, t0, epoch = -1, 0.0, 0
    try:
        while count < batches:
            sampler.set_epoch(epoch)
            for _ in loader:
                count += 1
                if count == 0:
                    t0 = time.perf_counter()
                if count >= batches:
                    break
            epoch += 1
    finally:
        torch.set_num_threads(before)
    return batches * cfg.pretraining.batch_size / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ driver
def _bench_config(config: str, quick: bool) -> Config:
    cfg = load_config(resolve_config_file(config))
    return cfg.replace(pretraining=dataclasses.replace(cfg.pretraining, epochs=2 if quick else 3, warmup_epochs=1))


def fast_path_off(cfg: Config) -> Config:
    """The config with every fast-path switch off (fp32, default memory format, per-view MONAI augmentation)."""
    return cfg.replace(pretraining=dataclasses.replace(cfg.pretraining, bf16=False, channels_last=False,
                                                       batch_augment=False))


def throughput(cfg: Config, dataset, manifest, method: str = "byol", device: str = "cpu") -> dict[str, float]:
    """nrfm's loop against the plain baseline loop: volumes/s of each and their ratio."""
    fast = nrfm_loop_rate(cfg, dataset, manifest, method, device)
    base = baseline_loop_rate(cfg, dataset, manifest, method, device)
    return {"nrfm_volumes_per_s": fast, "baseline_volumes_per_s": base, "pretrain_speedup_vs_baseline": fast / base}


def run_benchmarks(parts: Sequence[str] = ("throughput", "flops", "loader"), out_dir: str | Path = "benchmarks/results",
                   quick: bool = False, config: str = "configs/default.yaml", method: str = "byol",
                   print_table: bool = True) -> dict[str, Any]:
    """Run the chosen ``parts`` (see the module docstring), print a table, write ``<out_dir>/<date>.json``.

    Returns:
        The record written: the :data:`KEYS` (null where not measured), per-part details and ``machine``.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown benchmark part(s) {unknown}; valid: {list(PARTS)}")
    record: dict[str, Any] = {key: None for key in KEYS}
    record.update(machine=machine_record(), config=config, method=method, quick=quick, details={})
    details = record["details"]
    cfg = _bench_config(config, quick)
    device = "cuda" if (cfg.device != "cpu" and torch.cuda.is_available()) else "cpu"
    if {"throughput", "flops", "loader"} & set(parts):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = open_run(cfg, tmp, progress=False)
            dataset, manifest = ctx.dataset(progress=False), ctx.manifest
            volume = tuple(dataset[0]["image"].shape[1:])
            if "throughput" in parts:
                details["throughput"] = throughput(cfg, dataset, manifest, method, device)
                record["pretrain_speedup_vs_baseline"] = details["throughput"]["pretrain_speedup_vs_baseline"]
            if "flops" in parts:
                details["flops"] = flops_fraction(cfg, volume, method, device, repeats=3 if quick else 7)
                record["flops_fraction_of_matmul"] = details["flops"]["flops_fraction_of_matmul"]
            if "throughput" in details and "flops" in details:
                details["ceiling"] = speedup_ceiling(details["throughput"], details["flops"])
            if "loader" in parts:
                rate = loader_rate(cfg, dataset, manifest, method, batches=5 if quick else 20)
                seconds = details.get("flops", {}).get("step_seconds") or step_seconds(cfg, volume, method, device)
                train_rate = cfg.pretraining.batch_size / seconds
                details["loader"] = {"loader_volumes_per_s": rate, "training_volumes_per_s": train_rate}
                record["loader_over_training"] = rate / train_rate
    for name in ("smoke", "default"):
        if name in parts:  # the measured runs are kept (reports/bench/): their numbers are the ones reported
            details[name] = pipeline(f"configs/{name}.yaml", workspace_root() / "reports" / "bench")
            if details[name]["returncode"] == 0:
                record[f"{name}_run_seconds"] = details[name]["seconds"]
    if "scaling" in parts:
        details["scaling"] = scaling(config, base=16 if quick else 40)
    if "synth" in parts:  # the default synthetic cohort, written from scratch (both scenarios cost the same)
        with tempfile.TemporaryDirectory() as tmp:
            t0, cpu0 = time.perf_counter(), time.process_time()
            result = generate_cohort(Path(tmp) / "cohort", profile="default", seed=0, progress=False)
            details["synth"] = {"exams": int(len(pd.read_csv(result.manifest_path))),
                                "cpu_seconds": time.process_time() - cpu0}
            record["synth_default_seconds"] = time.perf_counter() - t0
    if "soak" in parts:
        details["soak"] = soak(pipelines=not quick)
    record["machine"]["load_average_1m_end"] = os.getloadavg()[0]
    path = write_record(record, Path(out_dir))
    if print_table:
        print(format_table(record))
        print(f"written: {path}")
    return record


def write_record(record: dict[str, Any], out_dir: Path) -> Path:
    """Write ``<out_dir>/<UTC date>.json`` atomically, keeping values an earlier same-day run measured."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}.json"
    merged = dict(record)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        for key in KEYS:
            if merged.get(key) is None and old.get(key) is not None:
                merged[key] = old[key]
        merged["details"] = {**old.get("details", {}), **record["details"]}
    merged["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(path, merged)
    return path


def format_table(record: dict[str, Any]) -> str:
    """The benchmark table (markdown) with the machine it ran on."""
    m, d = record["machine"], record["details"]

    def num(value: Any, fmt: str = "{:.2f}") -> str:
        return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else fmt.format(value)

    rows = [("metric", "value", "detail")]
    if "throughput" in d:
        t = d["throughput"]
        rows.append(("pretraining speed-up vs plain loop", num(t["pretrain_speedup_vs_baseline"]) + "x",
                     f"{num(t['nrfm_volumes_per_s'], '{:.1f}')} vs {num(t['baseline_volumes_per_s'], '{:.1f}')} "
                     f"volumes/s ({record['method']})"))
    if "ceiling" in d:
        c = d["ceiling"]
        rows.append(("speed-up if the step ran at the matmul peak", num(c["pretrain_speedup_ceiling"]) + "x",
                     f"{num(c['volumes_per_s_at_matmul_peak'], '{:.1f}')} volumes/s; bf16 / fp32 matmul rate "
                     f"{num(c['bf16_over_fp32_matmul'])}x"))
    if "flops" in d:
        f = d["flops"]
        rows.append(("training step FLOP/s / matmul rate", num(f["flops_fraction_of_matmul"]),
                     f"{num(f['achieved_gflops'], '{:.1f}')} / {num(f['matmul_gflops'], '{:.1f}')} GFLOP/s"))
    if "loader" in d:
        lo = d["loader"]
        rows.append(("loader / training volumes/s", num(record["loader_over_training"]),
                     f"{num(lo['loader_volumes_per_s'], '{:.1f}')} / {num(lo['training_volumes_per_s'], '{:.1f}')}"))
    for name in ("smoke", "default"):
        if name in d:
            p = d[name]
            status = "" if p["returncode"] == 0 else f", FAILED (exit {p['returncode']})"
            rows.append((f"{name} pipeline", f"{p['seconds'] / 60:.1f} min",
                         f"peak RSS {p['peak_rss_mib']:.0f} MiB (process tree){status}"))
    for s in d.get("scaling", []):
        rows.append((f"pretraining epoch, {s['factor']}x cohort", f"{s['seconds']:.1f} s",
                     f"{s['n_train']} train subjects, peak RSS {s['peak_rss_mib']:.0f} MiB"))
    if "soak" in d:
        for key, values in d["soak"].items():
            if values:
                rows.append((f"soak: RSS after each {key.split('_rss')[0]}", " / ".join(f"{v:.0f}" for v in values),
                             "MiB, 3 rounds in one process"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    cpu = f"{m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, amx_bf16={m['amx_bf16']}"
    gpu = f", GPU {m['cuda_device']}" if m.get("cuda_device") else ", no GPU"
    load = f"load average {m['load_average_1m']:.2f} -> {m.get('load_average_1m_end', float('nan')):.2f}"
    return "\n".join(lines) + f"\n\nMachine: {cpu}{gpu}; torch {m['torch']}; {load}."


if __name__ == "__main__":  # pragma: no cover - `nrfm bench` is the entry point
    run_benchmarks()
