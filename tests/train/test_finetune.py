"""nrfm.train.finetune end to end on a tiny fake cohort, and its pieces (masking, groups, backbone split)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nrfm.config import BINARY_ENDPOINTS, CONTINUOUS_ENDPOINTS, ENDPOINTS, AnalysesConfig, Config, FinetuningConfig
from nrfm.pipeline.context import RunContext
from nrfm.train.finetune import load_finetuned, read_history, run_finetune_stage
from nrfm.train.finetune_fit import FinetuneModel, elementwise_loss
from nrfm.train.finetune_data import (build_groups, split_backbone, standardise_targets, worst_group_loss,
                                worst_site_mean_auc)

SIZE = 16
CUTS = {"ki67": 10.0, "tp53_ihc": 10.0}


class TinyBackbone(nn.Module):
    """Stand-in with the Backbone interface: embed (B, 4, D, H, W) -> (B, 6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 6, 3, stride=2)
        self.norm = nn.BatchNorm3d(6)
        self.embed_dim = 6
        self.arch = "tiny"

    def embed(self, x):
        return torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3, 4))

    def forward(self, x):
        return self.embed(x)


def fake_context(tmp_path, n=60, seed=0, **finetuning):
    """Three sites, splits 60/20/20, labels driven by one latent that also shifts channel 0 of the image."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"subject_id": [f"s{i:03d}" for i in range(n)], "patient_id": [f"p{i:03d}" for i in range(n)],
                       "site": np.array(["A", "B", "C"])[np.arange(n) % 3],
                       "split": np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 2)[rng.permutation(np.arange(n) % 10)]})
    latent = rng.normal(size=n)
    for endpoint in BINARY_ENDPOINTS:
        y = (latent + rng.normal(size=n) > 0).astype(float)
        y[rng.random(n) < 0.2] = np.nan
        df[endpoint] = y
    for endpoint in CONTINUOUS_ENDPOINTS:
        y = np.exp(2 + latent + 0.5 * rng.normal(size=n)).clip(0, 100)
        y[rng.random(n) < 0.2] = np.nan
        df[endpoint] = y
    images = rng.normal(size=(n, 4, SIZE, SIZE, SIZE)).astype(np.float32)
    images[:, 0] += latent[:, None, None, None]
    data = [{"image": images[i], "index": i} for i in range(n)]
    one_point = {"search_weight_decay": (), "search_head_l2": (), "search_dro_eta": ()}  # the search has its own test
    # joint selection unless a test asks for per-endpoint selection (its own tests below)
    cfg = Config(finetuning=FinetuningConfig(**{"epochs": 2, "batch_size": 8, "selection": "joint", **one_point,
                                                **finetuning}),
                 analyses=AnalysesConfig(bootstrap=20))
    return RunContext(config=cfg, run_dir=tmp_path, manifest=df, cohort_dir=tmp_path, _dataset=data)


def test_unknown_labels_are_masked_from_the_loss():
    raw = torch.randn(3, 3, requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.5], [float("nan"), 0.0, float("nan")], [0.0, 1.0, -1.0]])
    is_continuous = torch.tensor([False, False, True])
    losses, known = elementwise_loss(raw, targets, is_continuous)
    assert known.sum() == 6 and losses.shape == (6,)
    expected = [nn.functional.binary_cross_entropy_with_logits(raw[0, 0], torch.tensor(1.0)),
                (raw[0, 2] - 0.5) ** 2,
                nn.functional.binary_cross_entropy_with_logits(raw[1, 1], torch.tensor(0.0)),
                nn.functional.binary_cross_entropy_with_logits(raw[2, 0], torch.tensor(0.0)),
                nn.functional.binary_cross_entropy_with_logits(raw[2, 1], torch.tensor(1.0)),
                (raw[2, 2] + 1.0) ** 2]
    torch.testing.assert_close(losses, torch.stack(expected))
    losses.sum().backward()
    assert raw.grad[0, 1] == 0 and raw.grad[1, 0] == 0 and raw.grad[1, 2] == 0  # unknown labels: no gradient


def test_groups_are_endpoint_site_class_from_training_labels(tmp_path):
    frame = pd.DataFrame({"site": ["A", "A", "B", "B", "B"], "idh": [1, 0, 1, np.nan, 0], "ki67": [2, 30, 50, 1, 3]})
    spec = build_groups(frame, ("idh", "ki67"), np.array([0, 1, 2, 3]), "site_class", CUTS,
                        min_train=1)  # enumeration only: the small-group merge has its own test
    assert spec.names == ["idh|A|0", "idh|A|1", "idh|B|1", "ki67|A|0", "ki67|A|1", "ki67|B|0", "ki67|B|1"]
    assert spec.counts.tolist() == [1, 1, 1, 1, 1, 1, 1]
    assert spec.index[3, 0] == -1  # unknown label
    assert spec.index[4, 0] == -1  # (idh, B, 0) has no training example: no group
    assert spec.names[spec.index[2, 1]] == "ki67|B|1"  # 50 % >= 10 % cut
    by_site = build_groups(frame, ("idh",), np.arange(5), "site", CUTS)
    assert by_site.names == ["idh|A|*", "idh|B|*"] and by_site.counts.tolist() == [2, 2]
    with pytest.raises(ValueError, match="valid"):
        build_groups(frame, ("idh",), np.arange(5), "sites", CUTS)


def test_targets_and_selection_score():
    frame = pd.DataFrame({"site": ["A", "A", "B", "B"], "idh": [1, 0, 1, 0], "ki67": [1.0, 20.0, np.nan, 40.0]})
    targets = standardise_targets(frame, ("idh", "ki67"), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert torch.isnan(targets[2, 1])
    assert targets[1, 1].item() == pytest.approx((np.log1p(20.0) - 1.0) / 2.0)
    scores = torch.tensor([[0.9, 0.0], [0.1, 0.0], [0.2, 0.0], [0.8, 0.0]])
    score, per_site = worst_site_mean_auc(frame, ("idh", "ki67"), scores, CUTS)
    # A: idh perfect, ki67 tied (0.5); B: idh reversed, ki67 has one known label -> left out
    assert per_site == {"A": 0.75, "B": 0.0} and score == 0.0


@pytest.mark.parametrize("make", ["resnet", "vit"])
def test_partial_split_reproduces_the_embedding(make):
    from nrfm.models.backbones import ResNetBackbone, ViTBackbone

    backbone = (ResNetBackbone("resnet10", 8, (SIZE,) * 3) if make == "resnet"
                else ViTBackbone((SIZE,) * 3, 8, 24, 2, 2)).eval()
    split = split_backbone(backbone, "partial")
    x = torch.randn(2, 4, SIZE, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.trunk(x)), backbone.embed(x))
    trainable = {id(p) for m in split.tail_modules for p in m.parameters()}
    assert 0 < len(trainable) < len(list(backbone.parameters()))
    with pytest.raises(ValueError, match="valid"):
        split_backbone(backbone, "half")


def test_end_to_end_artifacts_and_round_trip(tmp_path):
    ctx = fake_context(tmp_path, mode="full", bf16=False, channels_last=False)
    torch.manual_seed(0)
    result = run_finetune_stage(ctx, "byol", "dro", "pooled", progress=False, backbone=TinyBackbone())
    pred = pd.read_csv(ctx.artifacts_dir / "predictions_byol_dro_pooled.csv", dtype={"subject_id": str})
    assert list(pred.columns) == ["subject_id", "patient_id", "site", "split", "fold", "endpoint", "y_true",
                                  "y_score", "threshold", "seed"]
    assert set(pred["endpoint"]) == set(ENDPOINTS) and set(pred["fold"]) == {"pooled"}
    assert pred["y_true"].notna().all()  # unknown labels are not predictions rows
    binary = pred[pred["endpoint"].isin(BINARY_ENDPOINTS)]
    assert binary["y_score"].between(0, 1).all()
    assert pred[pred["endpoint"] == "ki67"]["y_score"].between(0, 100).all()
    for stage in ("pretrained", "dro"):
        emb = np.load(ctx.artifacts_dir / f"embeddings_byol_{stage}.npz")
        assert emb["subject_id"].tolist() == ctx.manifest["subject_id"].tolist()
        assert emb["embedding"].shape == (60, 6) and emb["embedding"].dtype == np.float32
    # full mode trains the backbone: the embedding changed
    assert not np.allclose(np.load(ctx.artifacts_dir / "embeddings_byol_pretrained.npz")["embedding"], emb["embedding"])
    path = ctx.checkpoints_dir / "byol" / "finetune_dro_pooled.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["objective_state"]["q"].shape == (len(raw["groups"]),)
    q, task = raw["objective_state"]["q"], raw["objective_state"]["task"]
    assert task.shape == q.shape and [g.split("|")[0] for g in raw["groups"]] == [ENDPOINTS[t] for t in task]
    for t in task.unique():  # one distribution over site x class groups per endpoint
        assert q[task == t].sum().item() == pytest.approx(1.0, abs=1e-5)
    model = load_finetuned(ctx, "byol", "dro", backbone=TinyBackbone())
    assert isinstance(model, FinetuneModel) and model.endpoints == ENDPOINTS
    x = torch.from_numpy(np.stack([ctx.dataset()[i]["image"] for i in range(4)]))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, len(ENDPOINTS))
    test_rows = pred[(pred["subject_id"].isin(ctx.manifest["subject_id"][:4])) & (pred["endpoint"] == "idh")]
    for _, row in test_rows.iterrows():
        i = int(np.flatnonzero(ctx.manifest["subject_id"] == row["subject_id"])[0])
        assert torch.sigmoid(out[i, ENDPOINTS.index("idh")]).item() == pytest.approx(row["y_score"], abs=1e-5)
    molecular = ctx.read_metrics("molecular")
    assert len(molecular) == len(result.metrics) == len(ENDPOINTS) * 5
    history = read_history(ctx, "byol", "dro")
    epochs = history["folds"]["pooled"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2] and len(epochs[0]["q"]) == len(raw["groups"])


def test_loso_partial_with_a_real_backbone(tmp_path):
    from nrfm.models.backbones import ResNetBackbone

    ctx = fake_context(tmp_path, mode="partial")
    backbone = ResNetBackbone("resnet10", 8, (SIZE,) * 3)
    result = run_finetune_stage(ctx, "moco", "erm", "loso", progress=False, backbone=backbone)
    pred = pd.read_csv(result.predictions_path)
    assert set(pred["fold"]) == {"A", "B", "C"}
    for fold, part in pred.groupby("fold"):
        held = part[part["site"] == fold]
        assert (held["split"] == "test").all()
        assert (part[part["site"] != fold]["split"] != "test").all()
        # the held-out site's exams pretraining never saw (it used every site's train split) are tested
        unseen = ctx.manifest[(ctx.manifest["site"] == fold) & (ctx.manifest["split"] != "train")]
        assert set(held["subject_id"]) == set(unseen["subject_id"])
    assert set(result.metrics["protocol"]) == {"loso"}
    assert not (ctx.checkpoints_dir / "moco" / "finetune_erm_loso.pt").exists()
    # the frozen features are cached once per backbone (objectives and protocols reuse them)
    assert len(list((ctx.artifacts_dir / "cache").glob("finetune_inputs_moco_partial_*.pt"))) == 1


def test_unknown_names_raise(tmp_path):
    ctx = fake_context(tmp_path, mode="linear")
    with pytest.raises(ValueError, match="valid"):
        run_finetune_stage(ctx, "byol", "irm", "pooled", backbone=TinyBackbone())
    with pytest.raises(ValueError, match="valid"):
        run_finetune_stage(ctx, "byol", "dro", "kfold", backbone=TinyBackbone())


def test_figures_tables_and_paired_deltas(tmp_path):
    from sklearn.metrics import roc_auc_score

    from nrfm.plots import finetune as finetune_plots

    ctx = fake_context(tmp_path, mode="linear", selection="per_endpoint")  # the figures read a composed history
    for objective in ("erm", "dro"):
        run_finetune_stage(ctx, "byol", objective, "pooled", progress=False, backbone=TinyBackbone())
    for make in (finetune_plots.training_curves_figure, finetune_plots.group_weights_figure, finetune_plots.roc_figure):
        make(ctx, "byol")
    for name in ("finetune_curves_byol_pooled", "dro_group_weights_byol_pooled", "roc_byol_pooled"):
        assert (ctx.figures_dir / f"{name}.png").stat().st_size > 0
    table = finetune_plots.molecular_paper_table(ctx)
    assert list(table.index) == list(ENDPOINTS)
    assert ("all", "byol", "ERM") in table.columns and ("all", "byol", "+DRO") in table.columns
    deltas = finetune_plots.dro_deltas(ctx, methods=["byol"], n_boot=50)
    row = deltas[(deltas["site"] == "all") & (deltas["endpoint"] == "idh")].iloc[0]
    erm = pd.read_csv(ctx.artifacts_dir / "predictions_byol_erm_pooled.csv")
    dro = pd.read_csv(ctx.artifacts_dir / "predictions_byol_dro_pooled.csv")
    pick = lambda f: f[(f["split"] == "test") & (f["endpoint"] == "idh")].sort_values("subject_id")  # noqa: E731
    expected = roc_auc_score(pick(dro)["y_true"], pick(dro)["y_score"]) - roc_auc_score(pick(erm)["y_true"],
                                                                                         pick(erm)["y_score"])
    assert row["delta"] == pytest.approx(expected)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]


# ------------------------------------------------------------------------------ silent wrong answers (issue 17)
def test_loso_keeps_a_patient_scanned_at_two_sites_on_one_side(tmp_path):
    from nrfm.train.finetune import _fold_rows

    ctx = fake_context(tmp_path)
    manifest = ctx.manifest
    # s000 (site A) and s001 (site B): one patient, both exams in the validation split
    manifest.loc[[0, 1], "patient_id"] = "p000"
    manifest.loc[[0, 1], "split"] = "val"
    with pytest.warns(UserWarning) as record:
        folds = _fold_rows(manifest, "loso")
    messages = [str(w.message) for w in record]
    # each of the two folds says which of the patient's exams it leaves out of its test set
    for held, other in (("A", "B"), ("B", "A")):
        assert any(f"holding out '{held}': patient 'p000' also has exams at {other}" in m for m in messages), messages
    patients = manifest["patient_id"].to_numpy()
    for name, train, val, test in folds:
        assert not set(patients[test]) & (set(patients[train]) | set(patients[val])), name
    held_a = {name: test for name, _, _, test in folds}["A"]
    assert 0 not in held_a  # s000 left out of site A's test set


def test_loso_site_with_one_exam_splits_and_folds(tmp_path):
    from nrfm.train.finetune import _fold_rows
    from nrfm.data.splits import assign_splits

    ctx = fake_context(tmp_path)
    manifest = ctx.manifest.copy()
    manifest["split"] = ""
    manifest.loc[59, "site"] = "TINY"
    manifest = assign_splits(manifest, seed=0)
    assert manifest.loc[59, "split"] == "test"  # too small to split: evaluation only
    folds = {name: (train, val, test) for name, train, val, test in _fold_rows(manifest, "loso")}
    assert folds["TINY"][2].tolist() == [59]
    for train, val, _ in folds.values():
        assert 59 not in train and 59 not in val
    _, _, _, pooled_test = _fold_rows(manifest, "pooled")[0]
    assert 59 in pooled_test


def test_changed_finetuning_setting_retrains_and_unchanged_reuses(tmp_path, monkeypatch, caplog):
    import copy
    import logging

    import nrfm.train.pretrain
    from nrfm.train.finetune import ensure_finetuned

    torch.manual_seed(0)
    pretrained = TinyBackbone()
    monkeypatch.setattr(nrfm.train.finetune, "pretrained_backbone", lambda *a, **k: copy.deepcopy(pretrained))
    ctx = fake_context(tmp_path, mode="linear", objectives=("erm",))
    ensure_finetuned(ctx, "byol", progress=False)
    checkpoint = ctx.checkpoints_dir / "byol" / "finetune_erm_pooled.pt"
    first = checkpoint.stat().st_mtime_ns
    assert len(read_history(ctx, "byol", "erm")["folds"]["pooled"]["epochs"]) == 2
    ensure_finetuned(ctx, "byol", progress=False)  # nothing changed: reused
    assert checkpoint.stat().st_mtime_ns == first
    # the same run folder with another fine-tuning setting: the model is retrained, and the log says why
    changed = RunContext(config=ctx.config.replace(finetuning=FinetuningConfig(
        epochs=3, batch_size=8, mode="linear", objectives=("erm",))), run_dir=tmp_path, manifest=ctx.manifest,
        cohort_dir=tmp_path, _dataset=ctx.dataset())
    from nrfm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="finetuning.epochs"):
        load_finetuned(changed, "byol", "erm", backbone=TinyBackbone())  # a stale model is never used silently
    with caplog.at_level(logging.WARNING, logger="nrfm"):
        ensure_finetuned(changed, "byol", progress=False)
    assert len(read_history(changed, "byol", "erm")["folds"]["pooled"]["epochs"]) == 3
    assert "finetuning.epochs (2 -> 3)" in caplog.text
    load_finetuned(changed, "byol", "erm", backbone=TinyBackbone())
    # a changed label is a changed training set: retrained as well
    changed.manifest.loc[0, "idh"] = 1 - changed.manifest.loc[0, "idh"] if changed.manifest.loc[0, "idh"] in (0, 1) else 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nrfm"):
        ensure_finetuned(changed, "byol", progress=False)
    assert "manifest_sha256" in caplog.text


def test_frozen_feature_cache_is_keyed_by_spacing_and_input_content(tmp_path):
    from nrfm.models.backbones import ResNetBackbone
    from nrfm.config import PreprocessingConfig
    from nrfm.train.finetune_data import frozen_inputs

    ctx = fake_context(tmp_path, mode="partial", bf16=False, channels_last=False)
    backbone = ResNetBackbone("resnet10", 8, (SIZE,) * 3).eval()
    split = split_backbone(backbone, "partial")
    cache = ctx.artifacts_dir / "cache"
    frozen_inputs(ctx, "moco", backbone, split, progress=False)
    frozen_inputs(ctx, "moco", backbone, split, progress=False)
    assert len(list(cache.glob("*.pt"))) == 1  # unchanged: reused
    ctx.config = ctx.config.replace(preprocessing=PreprocessingConfig(spacing_mm=(2.0, 2.0, 2.0)))
    frozen_inputs(ctx, "moco", backbone, split, progress=False)
    assert len(list(cache.glob("*.pt"))) == 2  # another spacing: another entry
    ctx._dataset[0]["image"] = ctx._dataset[0]["image"] + 1.0  # the input's content changed
    after = frozen_inputs(ctx, "moco", backbone, split, progress=False)
    assert len(list(cache.glob("*.pt"))) == 3
    with torch.no_grad():
        expected = split.trunk(torch.as_tensor(ctx._dataset[0]["image"])[None])
    torch.testing.assert_close(after[0:1], expected, rtol=1e-4, atol=1e-4)
def test_worst_group_loss_is_the_mean_over_endpoints_of_each_worst_group():
    frame = pd.DataFrame({"site": ["A", "A", "B", "B"], "idh": [1, 0, 1, 0], "ki67": [1.0, 20.0, 2.0, 40.0]})
    groups = build_groups(frame, ("idh", "ki67"), np.arange(4), "site_class", CUTS, min_train=1)
    assert groups.task_names == ["idh", "ki67"] and groups.task.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    index = groups.index.flatten()
    losses = torch.tensor([0.1, 5.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])  # row-major (row, endpoint)
    score, per_group = worst_group_loss(losses, index, groups)
    # idh: worst group 0.6 (idh|B|1); ki67: worst 5.0 (ki67|A|0): a plain max over all groups would be 5.0
    assert score == pytest.approx((0.6 + 5.0) / 2) and len(per_group) == 8
    score, per_group = worst_group_loss(losses, index, groups, min_labels=2)
    assert np.isnan(score) and per_group == {}  # every group has one validation label


def test_regularisation_grid_and_selection_file(tmp_path):
    cfg = FinetuningConfig()
    assert cfg.objectives == ("erm", "reweighted", "dro")
    assert len(cfg.settings("erm")) == len(cfg.settings("reweighted")) == 3 and len(cfg.settings("dro")) == 6
    assert sorted({s["head_l2"] for s in cfg.settings("dro")}) == [0.0, 0.1, 1.0]
    ctx = fake_context(tmp_path, mode="linear", search_weight_decay=(1e-4, 1e-2), search_head_l2=(),
                       search_dro_eta=(0.01, 0.1))
    run_finetune_stage(ctx, "byol", "dro", "pooled", progress=False, backbone=TinyBackbone())
    run_finetune_stage(ctx, "byol", "erm", "pooled", progress=False, backbone=TinyBackbone())
    table = ctx.read_metrics("finetune_selection")
    assert list(table.columns) == ["backbone", "objective", "protocol", "fold", "endpoint", "setting", "weight_decay",
                                   "head_l2", "dro_eta", "dro_adjustment", "epochs_trained", "best_epoch",
                                   "val_worst_group_loss", "chosen", "selected_on"]
    assert set(table["endpoint"]) == {"all"}  # joint selection: one row per grid point
    dro = table[table["objective"] == "dro"]
    assert len(dro) == 4 and len(table[table["objective"] == "erm"]) == 2 and dro["chosen"].sum() == 1
    assert table[table["objective"] == "erm"]["dro_eta"].isna().all()  # eta is not a setting of ERM
    assert set(table["selected_on"]) <= {"worst_group_loss", "mean_val_loss"}
    chosen = dro[dro["chosen"]].iloc[0]
    assert chosen["val_worst_group_loss"] == dro["val_worst_group_loss"].min()
    history = read_history(ctx, "byol", "dro")["folds"]["pooled"]
    assert history["setting"]["setting"] == chosen["setting"]
    kept = history["epochs"][history["best_epoch"] - 1]
    assert kept["val_worst_group_loss"] == pytest.approx(chosen["val_worst_group_loss"])
    assert kept["val_worst_group_loss"] == min(e["val_worst_group_loss"] for e in history["epochs"])
    # a rerun of one (backbone, objective, protocol) replaces its rows and keeps the others
    ctx2 = fake_context(tmp_path, mode="linear")
    run_finetune_stage(ctx2, "byol", "dro", "pooled", progress=False, backbone=TinyBackbone())
    table = ctx2.read_metrics("finetune_selection")
    assert len(table[table["objective"] == "dro"]) == 1 and len(table[table["objective"] == "erm"]) == 2


def test_reweighted_runs_on_balanced_draws(tmp_path):
    ctx = fake_context(tmp_path, mode="linear")
    result = run_finetune_stage(ctx, "byol", "reweighted", "pooled", progress=False, backbone=TinyBackbone())
    assert set(result.metrics["objective"]) == {"reweighted"}
    assert read_history(ctx, "byol", "reweighted")["folds"]["pooled"]["setting"]["setting"] == "weight_decay=0.0001"


def test_successive_halving_trains_only_the_leader_to_the_end(tmp_path):
    ctx = fake_context(tmp_path, mode="linear", epochs=4, search_rung_epochs=1, search_weight_decay=(1e-4, 1e-2),
                       search_head_l2=(), search_dro_eta=(0.01, 0.1))
    run_finetune_stage(ctx, "byol", "dro", "pooled", progress=False, backbone=TinyBackbone())
    table = ctx.read_metrics("finetune_selection")
    chosen, others = table[table["chosen"]], table[~table["chosen"]]
    assert len(chosen) == 1 and chosen["epochs_trained"].tolist() == [4] and (others["epochs_trained"] == 1).all()
    assert (others["best_epoch"] == 1).all()
    # the leader at the rung is the point kept, and training on can only lower its score
    assert chosen["val_worst_group_loss"].iloc[0] <= others["val_worst_group_loss"].min()
    history = read_history(ctx, "byol", "dro")["folds"]["pooled"]
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3, 4]


def test_scratch_baseline_is_fine_tuned_like_the_model_and_written_under_its_own_label(tmp_path):
    """The from-scratch baseline: a seeded random-init backbone of the method's architecture, the same
    fine-tuning (ERM, same settings), results under objective ``scratch``, and no model files that later
    stages could mistake for the fine-tuned pretrained backbone."""
    from nrfm.config import PretrainingConfig
    from nrfm.eval.baselines import run_scratch_baseline

    ctx = fake_context(tmp_path, mode="linear")
    ctx.config = ctx.config.replace(pretraining=PretrainingConfig(cnn_width=8))
    first = run_scratch_baseline(ctx, "byol", "pooled", progress=False)
    assert first.objective == "scratch" and ctx.layout.predictions("byol", "scratch", "pooled").is_file()
    assert not list(ctx.layout.checkpoints_dir().glob("*/finetune_*.pt"))
    assert not ctx.layout.embeddings("byol", "pretrained").exists()
    assert set(ctx.read_metrics("molecular")["objective"]) == {"scratch"}
    assert read_history(ctx, "byol", "scratch")["trained_with"] == "erm"
    again = run_scratch_baseline(ctx, "byol", "pooled", progress=False)  # seeded by the run's seed
    pd.testing.assert_frame_equal(first.metrics.reset_index(drop=True), again.metrics.reset_index(drop=True))


def test_an_identical_random_network_is_fitted_once_and_the_copy_equals_a_fit(tmp_path, monkeypatch):
    """BYOL, DINO and MoCo share the ResNet architecture and the run's seed: their from-scratch baselines are
    one fit, recorded under each name; the copy equals what fitting again gives."""
    from nrfm.config import PretrainingConfig
    from nrfm.eval.baselines import run_scratch_baseline
    from nrfm.train import finetune

    ctx = fake_context(tmp_path, mode="linear")
    ctx.config = ctx.config.replace(pretraining=PretrainingConfig(cnn_width=8))
    done = {}
    run_scratch_baseline(ctx, "byol", "pooled", progress=False, done=done)
    fits = []
    monkeypatch.setattr(finetune, "run_finetune_stage", lambda *a, **k: fits.append(a))
    copied = run_scratch_baseline(ctx, "moco", "pooled", progress=False, done=done)
    assert not fits and "the same fit as byol" in copied.notes[0]
    monkeypatch.undo()
    molecular = ctx.read_metrics("molecular")
    def rows(frame):
        return frame.drop(columns="backbone").sort_values(["site", "endpoint"]).reset_index(drop=True)

    byol, moco = (rows(molecular[molecular["backbone"] == m]) for m in ("byol", "moco"))
    pd.testing.assert_frame_equal(byol, moco)
    run_scratch_baseline(ctx, "moco", "pooled", progress=False)  # no sharing: a fit of its own
    molecular = ctx.read_metrics("molecular")
    pd.testing.assert_frame_equal(rows(molecular[molecular["backbone"] == "moco"]), byol)
    assert read_history(ctx, "moco", "scratch")["method"] == "moco"


def test_small_groups_are_merged_as_validate_announces():
    """A (site, class) group with fewer than MIN_GROUP_TRAIN training labels joins <endpoint>|small|<class>."""
    from nrfm.data.splits import MIN_GROUP_TRAIN

    frame = pd.DataFrame({"site": ["A"] * 6 + ["B", "C"], "idh": [1, 1, 1, 0, 0, 0, 1, 1]})
    groups = build_groups(frame, ("idh",), np.arange(8), "site_class", CUTS)
    assert MIN_GROUP_TRAIN == 3 and groups.names == ["idh|A|0", "idh|A|1", "idh|small|1"]
    assert groups.counts.tolist() == [3, 3, 2]
    assert groups.index[6, 0] == groups.index[7, 0] == 2  # still trained on, in the merged group
    unmerged = build_groups(frame, ("idh",), np.arange(8), "site_class", CUTS, min_train=1)
    assert unmerged.names == ["idh|A|0", "idh|A|1", "idh|B|1", "idh|C|1"]


def test_heads_first_epochs_leave_the_backbone_as_pretrained_then_train_it(tmp_path):
    """LP-FT: during the first head_epochs only the heads move (the last stage keeps its pretrained weights);
    afterwards the last stage trains too; the history names each epoch's phase."""
    from nrfm.models.backbones import ResNetBackbone
    from nrfm.train.finetune_fit import _Training

    ctx = fake_context(tmp_path, mode="partial", epochs=3, head_epochs=2, bf16=False, channels_last=False)
    backbone = ResNetBackbone("resnet10", 8, (SIZE,) * 3).eval()
    split = split_backbone(backbone, "partial")
    with torch.no_grad():
        inputs = torch.cat([split.trunk(torch.as_tensor(d["image"])[None]) for d in ctx.dataset()])
    train = np.where(ctx.manifest["split"] == "train")[0]
    val = np.where(ctx.manifest["split"] == "val")[0]
    run = _Training(backbone, inputs, ctx.manifest, train, val, ctx.config.finetuning, "dro", torch.device("cpu"),
                    0, False, "t")
    tail = [p.detach().clone() for m in run.split.tail_modules for p in m.parameters()]
    heads = [p.detach().clone() for p in run.model.heads.parameters()]
    run.advance(2)
    assert all(torch.equal(a, p) for a, p in zip(tail, (p for m in run.split.tail_modules for p in m.parameters())))
    assert not all(torch.equal(a, p) for a, p in zip(heads, run.model.heads.parameters()))
    # the heads-only epochs score validation on the cached embedding: the same as the network itself
    direct = run.model.head_outputs(backbone.embed(torch.cat([torch.as_tensor(ctx.dataset()[i]["image"])[None]
                                                              for i in val]))).detach()
    assert torch.allclose(run._validation_outputs(), direct, atol=1e-4)
    run.advance(3)
    assert not all(torch.equal(a, p) for a, p in zip(tail, (p for m in run.split.tail_modules for p in m.parameters())))
    assert [e["phase"] for e in run.history] == ["heads", "heads", "backbone"]


def test_head_l2_is_the_coupled_penalty_of_group_dro_and_shrinks_the_heads(tmp_path):
    """head_l2 adds lambda / 2 * (sum of squared head weights, biases excluded) to the objective (Sagawa et al.
    2020's strong L2); a strong one leaves smaller head weights than none, with the same batches and seed."""
    from nrfm.train.finetune_fit import head_l2_penalty

    heads = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 3))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    with torch.no_grad():
        expected = 0.5 * 0.3 * (heads[0].weight.pow(2).sum() + heads[1].weight.pow(2).sum())
        assert float(head_l2_penalty(heads, 0.3)) == pytest.approx(float(expected), rel=1e-6)
    norms = {}
    for l2 in (0.0, 1.0):
        ctx = fake_context(tmp_path / str(l2), mode="linear", epochs=8, lr=0.05, head_l2=l2)
        run_finetune_stage(ctx, "byol", "erm", "pooled", progress=False, backbone=TinyBackbone())
        model = load_finetuned(ctx, "byol", "erm", backbone=TinyBackbone())
        norms[l2] = float(model.heads[1].weight.detach().norm())
    assert norms[1.0] < 0.7 * norms[0.0]


def test_folded_heads_compute_the_same_outputs():
    from nrfm.train.finetune_endpoints import folded_head_rows, set_folded_heads

    torch.manual_seed(0)
    model = FinetuneModel(TinyBackbone(), ENDPOINTS)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_()  # a LayerNorm scale and shift away from 1 and 0
    z = torch.randn(7, model.backbone.embed_dim)
    expected = model.head_outputs(z)
    set_folded_heads(model.heads, *folded_head_rows(model.heads))
    torch.testing.assert_close(model.head_outputs(z), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.heads[0].weight, torch.ones_like(model.heads[0].weight))


def test_per_endpoint_selection_puts_together_the_fits_of_each_endpoint_alone(tmp_path):
    """In linear mode each head is fitted and selected on its own endpoint (search_fit with that endpoint only);
    the model put together predicts exactly what each endpoint's own fit predicts, the selection table has a row
    per endpoint and grid point with one chosen per endpoint, and the history records every endpoint's choice."""
    import dataclasses

    from nrfm.data.splits import fold_rows
    from nrfm.train.finetune_fit import search_fit

    grid = {"search_head_l2": (0.0, 1.0), "search_dro_eta": (0.01, 0.1), "epochs": 3, "search_rung_epochs": 1}
    ctx = fake_context(tmp_path, mode="linear", selection="per_endpoint", **grid)
    cfg = ctx.config.finetuning
    assert cfg.per_endpoint_selection
    manifest = ctx.manifest.reset_index(drop=True)
    fold = fold_rows(manifest, "pooled")[0]
    inputs = torch.randn(len(manifest), TinyBackbone().embed_dim)
    inputs[:, 0] += torch.from_numpy(manifest["idh"].fillna(0.5).to_numpy(dtype=np.float32))

    class Identity(nn.Module):
        embed_dim = TinyBackbone().embed_dim

        def embed(self, x):
            return x

    device = torch.device("cpu")
    for objective in ("erm", "dro"):
        whole = search_fit(Identity(), inputs, manifest, fold.train, fold.val, cfg, objective, device, seed=3,
                           progress=False)
        with torch.no_grad():
            out = whole.model.to_output(whole.model.head_outputs(inputs))
        assert set(whole.per_endpoint) == set(ENDPOINTS) and whole.setting == {"setting": "per endpoint"}
        for j, endpoint in enumerate(ENDPOINTS):
            alone = search_fit(Identity(), inputs, manifest, fold.train, fold.val,
                               dataclasses.replace(cfg, endpoints=(endpoint,), selection="joint"), objective, device,
                               seed=3, progress=False)
            with torch.no_grad():
                expected = alone.model.to_output(alone.model.head_outputs(inputs))[:, 0]
            torch.testing.assert_close(out[:, j], expected, rtol=1e-4, atol=1e-4)
            assert whole.per_endpoint[endpoint]["setting"] == alone.setting["setting"]
            assert whole.per_endpoint[endpoint]["epoch"] == alone.best_epoch
        if objective == "dro":  # the same in one process as in the two forked workers used on a CPU
            from nrfm.train.finetune_endpoints import _search_per_endpoint

            serial = _search_per_endpoint(Identity(), inputs, manifest, fold.train, fold.val, cfg, objective, device,
                                          seed=3, progress=False, desc="", workers=0)
            with torch.no_grad():
                torch.testing.assert_close(serial.model.to_output(serial.model.head_outputs(inputs)), out,
                                           rtol=1e-4, atol=1e-4)
            for endpoint, pick in whole.per_endpoint.items():  # the losses may differ in the last digits
                assert serial.per_endpoint[endpoint] == {**pick, "val_worst_group_loss": pytest.approx(
                    pick["val_worst_group_loss"], rel=1e-4, nan_ok=True)}
        if objective == "dro":  # q of every group comes from its endpoint's fit
            assert np.isfinite(whole.objective.q.numpy()).all() and len(whole.history[-1]["q"]) == len(whole.groups.names)

    run_finetune_stage(ctx, "byol", "dro", "pooled", progress=False, backbone=TinyBackbone())
    table = ctx.read_metrics("finetune_selection")
    assert set(table["endpoint"]) == set(ENDPOINTS) and len(table) == len(ENDPOINTS) * 4
    assert (table.groupby("endpoint")["chosen"].sum() == 1).all()
    history = read_history(ctx, "byol", "dro")["folds"]["pooled"]
    assert set(history["per_endpoint"]) == set(ENDPOINTS)


def test_per_endpoint_selection_is_the_linear_mode_default():
    """(A per_endpoint selection in another mode is refused by the config loader: tests/test_config.py.)"""
    assert FinetuningConfig(mode="linear").per_endpoint_selection  # auto
    assert not FinetuningConfig(mode="partial").per_endpoint_selection
    assert not FinetuningConfig(mode="linear", selection="joint").per_endpoint_selection
    assert FinetuningConfig(mode="linear", selection="per_endpoint").per_endpoint_selection
