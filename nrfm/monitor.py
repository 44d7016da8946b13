"""Representation monitor: does the embedding carry the marker (and the site) after each pretraining epoch?

A linear probe (L2-regularised logistic regression with class-balanced weights, scikit-learn, on
embeddings standardised with the training subjects' mean and standard deviation) is fitted on the TRAIN
subjects and scored on the VAL subjects with balanced accuracy, for ``cfg.monitor_endpoint`` and for
``site``. The test subjects are never touched. Linear probing of frozen features is the standard SSL
evaluation (MAE, DINO, BYOL all report it); it runs every epoch in well under a second. A kNN classifier
(DINO's other evaluation) was tried first and dropped: with a 20 % prevalence of IDH mutation its
neighbourhoods vote for the majority class and the balanced accuracy sat at 0.5 for random and pretrained
backbones alike. Epoch 0 scores the randomly initialised backbone of the same architecture: the baseline
pretraining has to beat.

Embeddings are of the whole preprocessed volume, as later stages use it, with no augmentation.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import Dataset


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CPU or CUDA when ``bf16`` is set, otherwise a no-op context."""
    if bf16 and device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def embed_volumes(backbone: nn.Module, dataset: Dataset, indices: Sequence[int], device: torch.device,
                  batch_size: int = 32, bf16: bool = False, channels_last: bool = False) -> np.ndarray:
    """Embeddings (len(indices), embed_dim) float32 of ``dataset[i]["image"]`` in eval mode, no augmentation."""
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for start in range(0, len(indices), batch_size):
            chunk = [dataset[int(i)]["image"] for i in indices[start:start + batch_size]]
            x = torch.stack([c.as_tensor() if hasattr(c, "as_tensor") else torch.as_tensor(c) for c in chunk])
            x = x.float().to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with autocast_context(device, bf16):
                out.append(backbone.embed(x).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(backbone, "embed_dim", 0)), np.float32)


def probe_balanced_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                            c: float = 0.1) -> float:
    """Balanced accuracy on ``val`` of a class-balanced logistic regression fitted on ``train``.

    NaN if either side has fewer than 2 classes.
    """
    if len(np.unique(train_y)) < 2 or len(np.unique(val_y)) < 2 or len(val_y) == 0:
        return float("nan")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = LogisticRegression(C=c, class_weight="balanced", max_iter=2000)
    probe.fit((train_x - mean) / std, train_y)
    return float(balanced_accuracy_score(val_y, probe.predict((val_x - mean) / std)))


class RepresentationMonitor:
    """Linear-probe balanced accuracy of a backbone's embedding on a marker and on site (train -> val subjects).

    Args:
        dataset: preprocessed volumes in manifest row order.
        manifest: the run's manifest (``split``, ``site`` and the endpoint column).
        endpoint: binary marker column; subjects with an unknown value are left out for that target.
        c: inverse L2 strength of the logistic regression.
        device, bf16, channels_last: as in training.
    """

    def __init__(self, dataset: Dataset, manifest: pd.DataFrame, endpoint: str, c: float = 0.1,
                 device: torch.device | str = "cpu", bf16: bool = False, channels_last: bool = False,
                 batch_size: int = 32):
        self.dataset, self.endpoint, self.c = dataset, endpoint, c
        self.device, self.bf16, self.channels_last = torch.device(device), bf16, channels_last
        self.batch_size = batch_size
        split = manifest["split"].astype(str).to_numpy()
        self.train_idx = np.flatnonzero(split == "train")
        self.val_idx = np.flatnonzero(split == "val")
        self.targets = {endpoint: pd.to_numeric(manifest[endpoint], errors="coerce").to_numpy()
                        if endpoint in manifest else np.full(len(manifest), np.nan),
                        "site": manifest["site"].astype(str).to_numpy()}

    @property
    def columns(self) -> list[str]:
        return [f"probe_{self.endpoint}_bacc", "probe_site_bacc"]

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """``{"probe_<endpoint>_bacc": ..., "probe_site_bacc": ...}`` (NaN where a split lacks two classes)."""
        emb = embed_volumes(backbone, self.dataset, np.concatenate([self.train_idx, self.val_idx]), self.device,
                            self.batch_size, self.bf16, self.channels_last)
        train_x, val_x = emb[:len(self.train_idx)], emb[len(self.train_idx):]
        scores = {}
        for name, column in zip((self.endpoint, "site"), self.columns):
            values = self.targets[name]
            tr, va = values[self.train_idx], values[self.val_idx]
            if name == "site":
                keep_tr, keep_va = np.ones(len(tr), bool), np.ones(len(va), bool)
            else:
                keep_tr, keep_va = ~pd.isna(tr), ~pd.isna(va)
                tr, va = tr.astype(float), va.astype(float)
            scores[column] = probe_balanced_accuracy(train_x[keep_tr], tr[keep_tr], val_x[keep_va], va[keep_va],
                                                     self.c)
        return scores
