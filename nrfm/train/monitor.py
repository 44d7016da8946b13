"""Representation monitor: does the embedding carry the marker (and the site) after each pretraining epoch?

Linear probing of frozen features is the standard SSL evaluation (MAE, DINO, BYOL all report it). Here an
L2-regularised, class-balanced logistic regression (scikit-learn, features standardised inside each fold)
is cross-validated over the TRAIN and VAL subjects together (stratified ``folds``-fold grouped by patient, so
two exams of one patient never sit on both sides of a fold; fixed seed); the test subjects are never touched.
Reported per epoch:

* ``probe_<endpoint>_auc``: ROC AUC of the out-of-fold decision values for ``cfg.monitor_endpoint``;
* ``probe_site_bacc``: balanced accuracy of the out-of-fold site predictions (chance = 1 / number of sites).

Why cross-validation and AUC: a first version fitted on TRAIN and scored balanced accuracy on the 61 VAL
subjects of the default cohort (about 10 IDH-mutant). One VAL positive moves that score by 0.05, and on the
same backbones it swung by +-0.1 from epoch to epoch, enough to rank a pretrained BYOL (0.58) below its random
initialisation (0.59). Out-of-fold AUC over the ~240 train + val subjects of the same checkpoints: BYOL 0.74
against 0.57 at random init, repeat-to-repeat SD 0.02. kNN (DINO's other evaluation) was dropped earlier: with
a 20 % prevalence its neighbourhoods vote for the majority class.

Epoch 0 scores the randomly initialised backbone of the same architecture: the baseline pretraining has to
beat. Embeddings are of the whole preprocessed volume, as later stages use it, with no augmentation.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import Dataset


_BF16_FALLBACK_WARNED: set = set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 natively: CUDA with bf16 support, or a CPU whose oneDNN has bf16 kernels
    (AVX-512 or newer). On an AVX2-only CPU bf16 is emulated: a ResNet step measured 12x slower than float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16(device: torch.device, requested: bool) -> bool:
    """``requested`` where ``device`` runs bf16 natively; otherwise False, with a one-time warning (float32 is
    then the faster and the more exact choice)."""
    if not requested:
        return False
    if native_bf16(device):
        return True
    if device.type not in _BF16_FALLBACK_WARNED:
        _BF16_FALLBACK_WARNED.add(device.type)
        cap = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
        warnings.warn(f"bf16 is set but this {device.type} ({cap}) has no native bf16 kernels: running in float32 "
                      "(set pretraining.bf16 / finetuning.bf16 to false to silence this)", RuntimeWarning, stacklevel=2)
    return False


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on CPU or CUDA when ``bf16`` is set and the device runs it natively (:func:`use_bf16`),
    otherwise a no-op context."""
    if device.type in ("cpu", "cuda") and use_bf16(device, bf16):
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


def _folds(labels: np.ndarray, folds: int, groups: np.ndarray | None = None) -> int:
    """Number of stratified folds usable for ``labels`` (0 if fewer than 2 per class, or one class only).

    With ``groups`` a class counts its distinct groups (patients), since a group never splits across folds.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        return 0
    if groups is None:
        smallest = int(np.unique(labels, return_counts=True)[1].min())
    else:
        groups = np.asarray(groups)
        smallest = min(len(np.unique(groups[labels == label])) for label in classes)
    return min(folds, smallest)


def cross_validated_probe(x: np.ndarray, y: np.ndarray, c: float = 0.1, folds: int = 5, seed: int = 0,
                          method: str = "predict", class_weight: str | None = "balanced",
                          groups: np.ndarray | None = None) -> np.ndarray | None:
    """Out-of-fold ``method`` outputs (``predict`` or, for two classes, ``decision_function``) of a logistic
    regression (class-balanced by default) on ``x`` standardised inside each fold; stratified folds, at most
    ``folds`` and at most the smallest class's count; None when a class has fewer than 2 subjects.

    ``groups`` (e.g. patient ids, (n,)): folds are ``StratifiedGroupKFold``, so all exams of a patient fall in the
    same fold (a probe must not be scored on a patient whose other exam it was trained on); the fold count is then
    capped by the smallest class's number of patients.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = _folds(y, folds, groups)
    if k < 2:
        return None
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight=class_weight, max_iter=2000))
    if groups is None:
        return cross_val_predict(probe, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed), method=method)
    cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    return cross_val_predict(probe, x, y, groups=np.asarray(groups).astype(str), cv=cv, method=method)


def probe_auc(x: np.ndarray, y: np.ndarray, c: float = 0.1, folds: int = 5, seed: int = 0,
              groups: np.ndarray | None = None) -> float:
    """Cross-validated ROC AUC of a linear probe for a binary label (NaN if a class has < 2 subjects)."""
    scores = cross_validated_probe(x, np.asarray(y).astype(int), c, folds, seed, "decision_function", groups=groups)
    return float("nan") if scores is None else float(roc_auc_score(y, scores))


def probe_balanced_accuracy(x: np.ndarray, y: np.ndarray, c: float = 0.1, folds: int = 5, seed: int = 0,
                            groups: np.ndarray | None = None) -> float:
    """Cross-validated balanced accuracy of a linear probe for a categorical label (NaN if not enough subjects)."""
    pred = cross_validated_probe(x, np.asarray(y), c, folds, seed, groups=groups)
    return float("nan") if pred is None else float(balanced_accuracy_score(y, pred))


class RepresentationMonitor:
    """Cross-validated linear-probe scores of a backbone's embedding on a marker and on site (train + val subjects).

    Args:
        dataset: preprocessed volumes in manifest row order.
        manifest: the run's manifest (``split``, ``site`` and the endpoint column).
        endpoint: binary marker column; subjects with an unknown value are left out for that target.
        c: inverse L2 strength of the logistic regression.
        device, bf16, channels_last: as in training.
        folds, seed: stratified cross-validation grouped by ``patient_id`` (the same folds every epoch).
    """

    def __init__(self, dataset: Dataset, manifest: pd.DataFrame, endpoint: str, c: float = 0.1,
                 device: torch.device | str = "cpu", bf16: bool = False, channels_last: bool = False,
                 batch_size: int = 32, folds: int = 5, seed: int = 0):
        self.dataset, self.endpoint, self.c, self.folds, self.seed = dataset, endpoint, c, folds, seed
        self.device, self.bf16, self.channels_last = torch.device(device), bf16, channels_last
        self.batch_size = batch_size
        split = manifest["split"].astype(str).to_numpy()
        self.indices = np.flatnonzero(np.isin(split, ("train", "val")))
        marker = (pd.to_numeric(manifest[endpoint], errors="coerce").to_numpy() if endpoint in manifest
                  else np.full(len(manifest), np.nan))
        self.marker = marker[self.indices]
        self.site = manifest["site"].astype(str).to_numpy()[self.indices]
        patient = manifest["patient_id"] if "patient_id" in manifest else manifest.index.to_series()
        self.patient = patient.astype(str).to_numpy()[self.indices]

    @property
    def columns(self) -> list[str]:
        return [f"probe_{self.endpoint}_auc", "probe_site_bacc"]

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """``{"probe_<endpoint>_auc": ..., "probe_site_bacc": ...}`` (NaN where a class has < 2 subjects)."""
        emb = embed_volumes(backbone, self.dataset, self.indices, self.device, self.batch_size, self.bf16,
                            self.channels_last)
        known = ~np.isnan(self.marker)
        marker_col, site_col = self.columns
        return {marker_col: probe_auc(emb[known], self.marker[known], self.c, self.folds, self.seed,
                                      self.patient[known]),
                site_col: probe_balanced_accuracy(emb, self.site, self.c, self.folds, self.seed, self.patient)}
