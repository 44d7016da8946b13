"""Linear mode with ``finetuning.selection: per_endpoint``: each endpoint's head fitted and selected on its own.

With a frozen backbone the heads are the whole model. :func:`_search_per_endpoint` runs
:func:`nrfm.train.finetune_fit.search_fit` once per endpoint (in two forked worker processes on a CPU) and puts the
heads together into one :class:`nrfm.train.finetune_fit.FinetuneModel` through :func:`folded_head_rows`.
"""
from __future__ import annotations

import copy
import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nrfm.config import FinetuningConfig
from nrfm.cores import can_fork, usable_cores
from nrfm.train.dro import GroupDRO, build_objective
from nrfm.train.finetune_data import apply_in_batches, build_groups, cuts_of, split_backbone, worst_site_mean_auc
from nrfm.train.finetune_fit import FinetuneModel, FitResult, search_fit


def folded_head_rows(heads: nn.Sequential) -> tuple[Tensor, Tensor]:
    """The heads (LayerNorm with scale g and shift b, then Linear W, c) as one linear map of the normalised
    embedding: (E, d) weights ``W * g`` and (E,) biases ``W @ b + c``; each endpoint's row is its whole head."""
    norm, linear = heads[0], heads[1]
    with torch.no_grad():
        return (linear.weight * norm.weight).detach().clone(), (linear.bias + linear.weight @ norm.bias).detach().clone()


def set_folded_heads(heads: nn.Sequential, weight: Tensor, bias: Tensor) -> None:
    """Load rows of :func:`folded_head_rows` into ``heads`` (the LayerNorm's scale set to 1 and its shift to 0),
    so that ``heads`` computes exactly the heads they were folded from."""
    norm, linear = heads[0], heads[1]
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


# the job of the endpoint fits of one _search_per_endpoint call, read by _fit_endpoint in this process or in forked
# workers (which inherit it: nothing large is pickled)
_ENDPOINT_JOB: dict[str, Any] = {}


def _fit_endpoint(endpoint: str) -> dict[str, Any]:
    """:func:`search_fit` of one endpoint alone (the job in ``_ENDPOINT_JOB``); what the composed model needs of it."""
    job = _ENDPOINT_JOB
    if job["worker"]:
        torch.set_num_threads(1)  # two workers on two cores
    cfg = dataclasses.replace(job["cfg"], endpoints=(endpoint,), selection="joint")
    fit = search_fit(job["backbone"], job["inputs"], job["manifest"], job["train_rows"], job["val_rows"], cfg,
                     job["objective"], job["device"], job["seed"], job["progress"], f"{job['desc']} {endpoint}")
    weight, bias = folded_head_rows(fit.model.heads)
    q = fit.objective.q.detach().cpu().tolist() if isinstance(fit.objective, GroupDRO) else None
    return {"weight": weight.cpu(), "bias": bias.cpu(), "mean": fit.model.target_mean.cpu(),
            "std": fit.model.target_std.cpu(), "history": fit.history, "best_epoch": fit.best_epoch,
            "setting": fit.setting, "search": fit.search, "val_worst_group_loss": fit.val_worst_group_loss,
            "groups": list(fit.groups.names), "q": q}


def _endpoint_workers(device: torch.device, n_endpoints: int) -> int:
    """Worker processes for the endpoint fits: 2 on a CPU with 2+ cores where fork exists, else 0 (in process).
    The fits are small-tensor steps bound by Python overhead on one core, so two processes take about half the time."""
    return 2 if device.type == "cpu" and usable_cores() >= 2 and can_fork() and n_endpoints > 1 else 0


def _search_per_endpoint(backbone: nn.Module, inputs: Tensor, manifest: pd.DataFrame, train_rows: np.ndarray,
                         val_rows: np.ndarray, cfg: FinetuningConfig, objective: str, device: torch.device, seed: int,
                         progress: bool, desc: str, workers: int | None = None) -> FitResult:
    """Linear mode, per-endpoint selection: each endpoint's head is its own model, searched and selected alone.

    With a frozen backbone the heads are the whole model, and one joint selection (one grid point and epoch for all
    ten heads, on the worst-group loss averaged over endpoints) keeps for every endpoint the compromise of all, while
    the multi-task loss weighs each endpoint by its share of the labels (about a tenth) against one L2 penalty on all
    heads. So each endpoint is fitted by :func:`search_fit` on its own (same objective, grid, seed and selection rule
    on that endpoint's groups), as the linear-probe baseline is, and the heads are put together into one model
    (:func:`folded_head_rows`). The history is the endpoints' chosen runs averaged per epoch (q of group DRO per
    group, each from its endpoint's run); ``per_endpoint`` records each endpoint's grid point and kept epoch.

    ``workers``: processes for the endpoint fits (forked, so they share the inputs); None = :func:`_endpoint_workers`,
    0 = in this process. The fits are seeded, so both give the same model up to float rounding.
    """
    endpoints = tuple(cfg.endpoints)
    workers = _endpoint_workers(device, len(endpoints)) if workers is None else workers
    _ENDPOINT_JOB.clear()
    _ENDPOINT_JOB.update(backbone=backbone, inputs=inputs, manifest=manifest, train_rows=train_rows, val_rows=val_rows,
                         cfg=cfg, objective=objective, device=device, seed=seed, desc=desc, worker=workers > 0,
                         progress=progress and workers == 0)
    try:
        bar = dict(desc=f"{desc} per endpoint", total=len(endpoints), leave=False, disable=not progress)
        if workers > 0:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                fits = dict(zip(endpoints, tqdm(pool.map(_fit_endpoint, endpoints), **bar)))
        else:
            fits = {e: _fit_endpoint(e) for e in tqdm(endpoints, **bar)}
    finally:
        _ENDPOINT_JOB.clear()
    mean = torch.cat([fits[e]["mean"] for e in endpoints])
    std = torch.cat([fits[e]["std"] for e in endpoints])
    model = FinetuneModel(copy.deepcopy(backbone), endpoints, mean, std).to(device)  # the caller's stays unchanged
    set_folded_heads(model.heads, torch.cat([fits[e]["weight"] for e in endpoints]).to(device),
                     torch.cat([fits[e]["bias"] for e in endpoints]).to(device))
    model.eval()

    groups = build_groups(manifest, endpoints, train_rows, cfg.dro_groups, cuts_of(cfg))
    composite = build_objective(objective, len(groups.names), groups.counts, cfg.dro_eta, cfg.dro_adjustment,
                                groups.names, groups.task).to(device)
    history = []
    for k in range(max(len(f["history"]) for f in fits.values())):
        entries = [f["history"][k] for f in fits.values() if k < len(f["history"])]
        entry: dict[str, Any] = {"epoch": k + 1, "phase": entries[0]["phase"]}
        for key in ("train_loss", "val_loss", "val_worst_group_loss"):
            values = [e[key] for e in entries if np.isfinite(e[key])]
            entry[key] = float(np.mean(values)) if values else float("nan")
        entry["val_group_loss"] = {g: v for e in entries for g, v in e["val_group_loss"].items()}
        if isinstance(composite, GroupDRO):
            q = {name: f["history"][k]["q"][i] for f in fits.values() if k < len(f["history"])
                 for i, name in enumerate(f["groups"])}
            entry["q"] = [q.get(name, float("nan")) for name in groups.names]
        history.append(entry)
    if isinstance(composite, GroupDRO):
        final = {name: f["q"][i] for f in fits.values() for i, name in enumerate(f["groups"])}
        with torch.no_grad():
            composite.q.copy_(torch.tensor([final.get(n, float(composite.q[i])) for i, n in enumerate(groups.names)]))

    split = split_backbone(model.backbone, cfg.mode)
    raw = apply_in_batches(lambda z: model.head_outputs(split.tail(z)), inputs[val_rows], device, cfg.bf16,
                           cfg.channels_last)
    scores = model.to_output(raw.to(device)).cpu()
    auc_score, per_site = worst_site_mean_auc(manifest.iloc[val_rows], endpoints, scores, cuts_of(cfg))
    epochs = [f["best_epoch"] for f in fits.values()]
    worst = [f["val_worst_group_loss"] for f in fits.values() if np.isfinite(f["val_worst_group_loss"])]
    result = FitResult(model, composite, history, max(set(epochs), key=epochs.count), groups,
                       val_worst_group_loss=float(np.mean(worst)) if worst else float("nan"),
                       selection_key=(0, float(np.mean(worst))) if worst else (2, float("inf")),
                       val_worst_site_auc=auc_score, val_site_auc=per_site)
    result.setting = {"setting": "per endpoint"}
    result.per_endpoint = {e: {**f["setting"], "epoch": f["best_epoch"], "val_worst_group_loss": f["val_worst_group_loss"]}
                           for e, f in fits.items()}
    result.search = [row for f in fits.values() for row in f["search"]]
    return result
