"""The pretraining loop: exact resume, checkpoints, bad input, the stage entry points and figures."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from nrfm.config import Config, PretrainingConfig
from nrfm.pipeline.context import RunContext
from nrfm.errors import CheckpointError, ConfigError, TrainingError
from nrfm.files import safe_torch_load
from nrfm.train.pretrain import ensure_pretrained, load_backbone, run_pretraining_stage, train_method

N_SUBJECTS, SIDE = 24, 16


class FakeVolumes(torch.utils.data.Dataset):
    """Volumes like ctx.dataset(): a site-dependent intensity offset and an IDH-dependent bright blob."""

    def __init__(self, manifest: pd.DataFrame, seed: int = 0):
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"))
        blob = np.exp(-((grid - SIDE / 2) ** 2).sum(0) / 8.0)
        self.items = []
        for i, row in manifest.iterrows():
            image = rng.normal(size=(4, SIDE, SIDE, SIDE)).astype(np.float32)
            image += 0.5 * (row["site"] == "B") + 2.0 * float(row["idh"]) * blob
            self.items.append({"image": torch.from_numpy(image.astype(np.float32)), "index": i})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def fake_manifest() -> pd.DataFrame:
    split = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    return pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(N_SUBJECTS)],
                         "patient_id": [f"p{i:02d}" for i in range(N_SUBJECTS)],
                         "site": ["A", "B"] * (N_SUBJECTS // 2), "split": split,
                         "idh": [i % 3 == 0 for i in range(N_SUBJECTS)]}).astype({"idh": float})


def tiny_config(**changes) -> Config:
    pre = PretrainingConfig(cnn_width=4, head_hidden_dim=16, head_out_dim=8, dino_out_dim=16, vit_patch_size=4,
                            vit_hidden_size=24, vit_layers=1, vit_heads=2, mae_decoder_hidden_size=12,
                            mae_decoder_layers=1, moco_memory_bank=8, epochs=3, warmup_epochs=1, batch_size=4,
                            view_size=(12, 12, 12), local_view_size=(8, 8, 8), num_workers=0, threads=1,
                            monitor_c=0.1)
    return Config(pretraining=dataclasses.replace(pre, **changes))


@pytest.fixture(scope="module")
def data():
    manifest = fake_manifest()
    return manifest, FakeVolumes(manifest)


class Interrupt(Exception):
    pass


def _interrupt_at(epoch: int, step: int):
    def callback(e: int, s: int) -> None:
        if (e, s) == (epoch, step):
            raise Interrupt

    return callback


@pytest.mark.parametrize("method", ["byol", "dino", "mae", "moco"])
def test_resume_after_mid_epoch_kill_gives_identical_result(method, data, tmp_path):
    manifest, dataset = data
    cfg = tiny_config()
    full = train_method(method, cfg, dataset, manifest, tmp_path / "full", progress=False)
    with pytest.raises(Interrupt):  # killed during the third epoch, after epoch 2's checkpoint
        train_method(method, cfg, dataset, manifest, tmp_path / "resumed", progress=False,
                     step_callback=_interrupt_at(2, 1))
    assert safe_torch_load(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = train_method(method, cfg, dataset, manifest, tmp_path / "resumed", progress=False)
    assert list(full.log["epoch"]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(full.log["loss"].to_numpy(), resumed.log["loss"].to_numpy())
    a, b = safe_torch_load(full.checkpoint)["model"], safe_torch_load(resumed.checkpoint)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the last full checkpoint (heads, EMA copies, queue, optimiser) matches as well
    la, lb = safe_torch_load(tmp_path / "full" / "last.pt"), safe_torch_load(tmp_path / "resumed" / "last.pt")
    for key in la["model"]:
        if isinstance(la["model"][key], torch.Tensor):
            assert torch.equal(la["model"][key], lb["model"][key]), key


def test_loader_workers_do_not_change_the_result(data, tmp_path):
    manifest, dataset = data
    zero = train_method("byol", tiny_config(epochs=1, warmup_epochs=0), dataset, manifest, tmp_path / "w0",
                        progress=False)
    one = train_method("byol", tiny_config(epochs=1, warmup_epochs=0, num_workers=1), dataset, manifest,
                       tmp_path / "w1", progress=False)
    a, b = safe_torch_load(zero.checkpoint)["model"], safe_torch_load(one.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_log_rows_monitor_and_reload(data, tmp_path):
    manifest, dataset = data
    result = train_method("byol", tiny_config(epochs=2), dataset, manifest, tmp_path, progress=False)
    log = result.log
    assert list(log.columns[:4]) == ["backbone", "epoch", "loss", "volumes_per_s"]
    assert {"probe_idh_auc", "probe_site_bacc", "note"} <= set(log.columns)
    assert np.isnan(log.loc[0, "loss"]) and "random initialisation" in log.loc[0, "note"]
    assert np.isfinite(log.loc[1:, "loss"]).all() and (log.loc[1:, "volumes_per_s"] > 0).all()
    assert log[["probe_idh_auc", "probe_site_bacc"]].apply(lambda c: c.between(0, 1)).all().all()
    backbone = load_backbone(result.checkpoint, tiny_config(epochs=2), "byol")
    assert backbone.embed(torch.zeros(2, 4, SIDE, SIDE, SIDE)).shape == (2, backbone.embed_dim)
    # a finished run is not retrained: calling again returns the same log without touching the weights
    again = train_method("byol", tiny_config(epochs=2), dataset, manifest, tmp_path, progress=False)
    np.testing.assert_array_equal(again.log["loss"].to_numpy(), log["loss"].to_numpy())


def test_only_train_subjects_are_seen(data, tmp_path, monkeypatch):
    manifest, dataset = data
    seen = set()
    original = type(dataset).__getitem__

    def spy(self, i):
        seen.add(int(i))
        return original(self, i)

    from nrfm.train import monitor as monitor_module
    monkeypatch.setattr(monitor_module.RepresentationMonitor, "__call__", lambda self, backbone: {})
    monkeypatch.setattr(type(dataset), "__getitem__", spy)
    train_method("moco", tiny_config(epochs=1, warmup_epochs=0), dataset, manifest, tmp_path, progress=False)
    assert seen <= set(np.flatnonzero(manifest["split"] == "train"))


def test_crop_larger_than_volume(data, tmp_path):
    manifest, dataset = data
    with pytest.raises(ConfigError, match=r"pretraining.view_size: crop \[20, 20, 20\] is larger than"):
        train_method("byol", tiny_config(view_size=(20, 20, 20)), dataset, manifest, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="local_view_size"):
        train_method("dino", tiny_config(local_view_size=(24, 8, 8)), dataset, manifest, tmp_path, progress=False)


def test_resume_from_other_method_architecture_or_corrupt_file(data, tmp_path):
    manifest, dataset = data
    cfg = tiny_config(epochs=1, warmup_epochs=0)
    train_method("byol", cfg, dataset, manifest, tmp_path / "byol", progress=False)
    (tmp_path / "moco").mkdir()
    (tmp_path / "moco" / "last.pt").write_bytes((tmp_path / "byol" / "last.pt").read_bytes())
    with pytest.raises(CheckpointError, match="checkpoint of method 'byol'.*cannot resume 'moco'"):
        train_method("moco", cfg, dataset, manifest, tmp_path / "moco", progress=False)
    with pytest.raises(CheckpointError, match="architecture 'resnet10', cannot resume 'byol' / 'resnet18'"):
        train_method("byol", tiny_config(epochs=1, warmup_epochs=0, cnn_arch="resnet18"), dataset, manifest,
                     tmp_path / "byol", progress=False)
    with pytest.raises(CheckpointError, match="other settings"):
        train_method("byol", tiny_config(epochs=1, warmup_epochs=0, lr=5e-4), dataset, manifest,
                     tmp_path / "byol", progress=False)
    (tmp_path / "byol" / "last.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable nrfm checkpoint") as err:
        train_method("byol", cfg, dataset, manifest, tmp_path / "byol", progress=False)
    assert "\n" not in str(err.value)


def test_non_finite_loss_stops_with_training_error(data, tmp_path, monkeypatch):
    manifest, dataset = data
    from nrfm.ssl.methods.byol import BYOL

    original = BYOL.training_step
    monkeypatch.setattr(BYOL, "training_step", lambda self, views: original(self, views) * float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss at epoch 1"):
        train_method("byol", tiny_config(epochs=1, warmup_epochs=0), dataset, manifest, tmp_path, progress=False)
    assert not (tmp_path / "last.pt").exists()


def test_stage_entry_points_metrics_and_figures(data, tmp_path):
    manifest, dataset = data
    ctx = RunContext(config=tiny_config(epochs=1, warmup_epochs=0), run_dir=tmp_path, manifest=manifest,
                     cohort_dir=tmp_path, _dataset=dataset)
    result = run_pretraining_stage(ctx, "mae", progress=False)
    assert result.checkpoint == tmp_path / "checkpoints" / "mae" / "backbone.pt"
    csv = pd.read_csv(tmp_path / "metrics" / "pretrain.csv")
    assert list(csv.columns[:4]) == ["backbone", "epoch", "loss", "volumes_per_s"]
    assert list(csv["epoch"]) == [0, 1] and set(csv["backbone"]) == {"mae"}
    backbone = ensure_pretrained(ctx, "mae", progress=False)
    assert backbone.embed(torch.zeros(1, 4, SIDE, SIDE, SIDE)).shape == (1, 24)
    from nrfm.train.pretrain import random_init_monitor
    from nrfm.plots.pretrain import plot_example_views, plot_loss_curve, plot_monitor_curves

    assert random_init_monitor(ctx, "mae") == pytest.approx(
        {k: csv.loc[0, k] for k in ("probe_idh_auc", "probe_site_bacc")}, nan_ok=True)
    for fig in (plot_loss_curve(ctx, "mae"), plot_monitor_curves(ctx, "mae"), plot_example_views(ctx, "mae")):
        assert fig.axes
    for name in ("pretrain_loss_mae", "pretrain_monitor_mae", "pretrain_views_mae"):
        assert (tmp_path / "figures" / f"{name}.png").is_file()
    with pytest.raises(ValueError, match=r"unknown SSL method 'simclr'; valid: \['byol', 'dino', 'mae', 'moco'\]"):
        run_pretraining_stage(ctx, "simclr")


# ---- views --------------------------------------------------------------------------------------------------
def test_view_recipes_shapes_and_determinism():
    from nrfm.ssl.views import SampleViews, ViewDataset, view_recipe

    pcfg = tiny_config().pretraining
    volumes = [{"image": torch.randn(4, SIDE, SIDE, SIDE)} for _ in range(3)]
    for method, shapes in [("byol", [(4, 12, 12, 12)] * 2), ("moco", [(4, 12, 12, 12)] * 2),
                           ("mae", [(4, 12, 12, 12)]), ("dino", [(4, 12, 12, 12)] * 2 + [(4, 8, 8, 8)] * 2)]:
        for full in (False, True):
            ds = ViewDataset(volumes, SampleViews(view_recipe(method, pcfg), pcfg.view_size, pcfg.local_view_size,
                                                  full_monai=full), seed=0)
            a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
            assert [tuple(v.shape) for v in a["views"]] == shapes and a["index"] == 1
            assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))  # same (seed, epoch, index)
            assert not torch.equal(a["views"][0], c["views"][0])  # another epoch draws again
    with pytest.raises(ValueError, match="unknown SSL method 'simclr'"):
        view_recipe("simclr", pcfg)


def test_batch_augment_is_seeded_and_changes_each_sample_differently():
    from nrfm.ssl.views import BatchAugment, batch_generator

    x = torch.randn(6, 4, 12, 12, 12)
    cpu = torch.device("cpu")
    a = BatchAugment()(x, batch_generator(0, 1, 2, cpu))
    b = BatchAugment()(x, batch_generator(0, 1, 2, cpu))
    c = BatchAugment()(x, batch_generator(0, 1, 3, cpu))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape and torch.isfinite(a).all()
    changes = (a - x).flatten(1).abs().mean(1)
    assert len(set(changes.tolist())) == 6  # per-sample draws


def test_epoch_sampler_orders_by_seed_and_epoch_and_splits_ranks():
    from nrfm.ssl.views import EpochSampler

    s = EpochSampler(range(10), seed=0, batch_size=4)
    first = list(s)
    assert len(first) == 8 and {e for e, _ in first} == {0}  # trimmed to whole batches
    s.set_epoch(1)
    assert [i for _, i in s] != [i for _, i in first]
    s.set_epoch(0)
    assert list(s) == first
    ranks = [list(EpochSampler(range(10), 0, 2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert not {i for _, i in ranks[0]} & {i for _, i in ranks[1]} and all(len(r) == 4 for r in ranks)


def test_monitor_probe_scores_follow_a_planted_signal():
    from nrfm.train.monitor import probe_auc, probe_balanced_accuracy

    rng = np.random.default_rng(0)
    y = (rng.random(240) < 0.2).astype(int)
    noise = rng.standard_normal((240, 16))
    planted = noise.copy()
    planted[:, 3] += 4.0 * y
    assert probe_auc(planted, y) > 0.95
    assert abs(probe_auc(noise, y) - 0.5) < 0.12
    sites = np.array(["A", "B", "C"])[rng.integers(0, 3, 240)]
    offset = noise + 3.0 * (sites == "B")[:, None] - 3.0 * (sites == "C")[:, None]
    assert probe_balanced_accuracy(offset, sites) > 0.95
    assert abs(probe_balanced_accuracy(noise, sites) - 1 / 3) < 0.12
    # too few subjects of a class for 2 folds: NaN, not a crash
    assert np.isnan(probe_auc(noise[:10], np.r_[1, np.zeros(9, int)]))


def test_mae_epochs_and_monitor_every(data, tmp_path):
    manifest, dataset = data
    cfg = tiny_config(epochs=1, mae_epochs=3, monitor_every=2, warmup_epochs=0, mae_view_size=(SIDE,) * 3)
    assert cfg.pretraining.view_size_of("mae") == (SIDE,) * 3 and cfg.pretraining.view_size_of("byol") == (12,) * 3
    log = train_method("mae", cfg, dataset, manifest, tmp_path / "mae", progress=False).log
    assert list(log["epoch"]) == [0, 1, 2, 3]  # mae_epochs, not epochs
    scored = log["probe_site_bacc"].notna().tolist()
    assert scored == [True, False, True, True]  # epoch 0, every 2nd, and the last
    assert "not scored" in log.loc[1, "note"]
    assert list(train_method("byol", cfg, dataset, manifest, tmp_path / "byol", progress=False).log["epoch"]) == [0, 1]
