"""Fingerprints of the fine-tuning artifacts: what a pooled fine-tuned model depends on, and why one is stale.

The pooled checkpoint and embeddings carry the sha256 of :func:`finetune_fingerprint_inputs` (the settings, labels,
splits, seed and the pretrained weights, :func:`weights_sha256`); :func:`changed_settings` names what differs
between two such inputs, and :func:`_stale_reason` says why stored artifacts must be rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
from torch import nn

from nrfm.errors import CheckpointError
from nrfm.files import safe_torch_load


def weights_sha256(module: nn.Module) -> str:
    """sha256 of a module's parameter and buffer values (names included): the upstream artifact's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finetune_fingerprint_inputs(ctx, method: str, objective: str, backbone: nn.Module) -> dict[str, Any]:
    """Everything a pooled fine-tuned model depends on, as a JSON-able dict (its sha256 is the fingerprint).

    The fine-tuning settings (but not which objectives and protocols to run), the preprocessing settings (but
    not the cache folder), the cohort's split settings, the seed, the subjects with their patients, sites,
    splits and labels, and the pretrained backbone's weights (the upstream artifact).
    """
    cfg = ctx.config
    tuning = {k: v for k, v in dataclasses.asdict(cfg.finetuning).items() if k not in ("objectives", "protocols")}
    columns = ["subject_id", "patient_id", "site", "split", *cfg.finetuning.endpoints]
    table = ctx.manifest[columns].astype(str).to_csv(index=False)
    return json.loads(json.dumps({
        "method": method, "objective": objective, "seed": cfg.seed, "finetuning": tuning,
        "preprocessing": {k: v for k, v in dataclasses.asdict(cfg.preprocessing).items() if k != "cache_dir"},
        "cohort": {"split_endpoint": cfg.cohort.split_endpoint, "split_fractions": cfg.cohort.split_fractions},
        "manifest_sha256": hashlib.sha256(table.encode()).hexdigest(),
        "pretrained_backbone_sha256": weights_sha256(backbone)}, default=list))


def _sha256(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprint input dicts, with old -> new for short values."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            short = all(len(json.dumps(v)) <= 40 for v in (a, b))
            out.append(f"{prefix}{key}" + (f" ({json.dumps(a)} -> {json.dumps(b)})" if short else ""))
    return out


def _stale_reason(ctx, method: str, objective: str, inputs: dict[str, Any]) -> str:
    """Why the pooled model and embeddings of ``method``/``objective`` must be rebuilt ('' if they are current)."""
    path = ctx.layout.finetuned_model(method, objective)
    emb = ctx.layout.embeddings(method, objective)
    if not path.is_file():
        return f"{path.name} missing"
    if not emb.is_file():
        return f"{emb.name} missing"
    try:
        ckpt = safe_torch_load(path)
    except CheckpointError as err:
        return f"{path.name} unreadable ({err})"
    if ckpt.get("fingerprint") != _sha256(inputs):
        old = ckpt.get("fingerprint_inputs")
        if not old:
            return f"{path.name} has no fingerprint (made by an older nrfm)"
        return f"{path.name} was made with other settings: " + ", ".join(changed_settings(json.loads(old), inputs))
    try:
        with np.load(emb, allow_pickle=False) as data:
            stored = str(data["fingerprint"]) if "fingerprint" in data.files else ""
    except (OSError, ValueError) as err:
        return f"{emb.name} unreadable ({err})"
    if stored != _sha256(inputs):
        return f"{emb.name} does not belong to {path.name}"
    return ""
