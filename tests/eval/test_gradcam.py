"""Grad-CAM in 3D and the localization score, with tiny models whose evidence region is planted."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from nrfm.config import Config
from nrfm.pipeline.context import RunContext
from nrfm.errors import ConfigError
from nrfm.eval.gradcam import (gradcam_table, localization_scores, mask_derangement, peritumoral_ring, random_init_copy,
                               run_gradcam_stage)
from nrfm.eval.gradcam_maps import GradCAM3D, grad_cam_volumes, resolve_target_layer

SIDE = 24
REGION = (slice(4, 12), slice(12, 20), slice(8, 16))  # the planted evidence region, 8^3 of 24^3 voxels


class TinyBackbone(nn.Module):
    """Sees only the planted region: the input is masked before the first (bias-free) convolution."""

    def __init__(self, stride: int = 2):
        super().__init__()
        region = torch.zeros(SIDE, SIDE, SIDE)
        region[REGION] = 1
        self.register_buffer("region", region)
        self.conv = nn.Conv3d(4, 6, 3, stride=stride, padding=1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x * self.region)).mean(dim=(2, 3, 4))

    def gradcam_target(self):
        return self.act, None


class TinyFinetuneModel(nn.Module):
    """Same interface as nrfm.train.finetune_fit.FinetuneModel: forward -> (B, len(endpoints)), ``backbone``."""

    endpoints = ("idh", "mgmt")

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = TinyBackbone()
        self.heads = nn.Linear(6, 2)
        with torch.no_grad():  # positive evidence for idh, so the ReLU'd CAM is not empty
            self.heads.weight.abs_()

    def forward(self, x):
        return self.heads(self.backbone(x))


def region_mask() -> np.ndarray:
    mask = np.zeros((SIDE, SIDE, SIDE), bool)
    mask[REGION] = True
    return mask


def test_localization_is_one_for_cam_equal_to_mask_and_volume_share_for_flat_cam():
    tumor = region_mask()
    brain = np.zeros_like(tumor)
    brain[2:22, 2:22, 2:22] = True
    s = localization_scores(tumor.astype(float), tumor, brain, 3.0, (1.0, 1.0, 1.0))
    assert s["cam_in_tumor"] == 1.0 and s["cam_in_peritumoral"] == 0.0
    flat = localization_scores(np.full(tumor.shape, 0.3), tumor, brain, 3.0, (1.0, 1.0, 1.0))
    assert flat["cam_in_tumor"] == pytest.approx(flat["tumor_volume_fraction"]) == pytest.approx(512 / 20 ** 3)
    assert flat["cam_in_peritumoral"] == pytest.approx(flat["peritumoral_volume_fraction"])
    # without a brain mask the whole crop is the reference region
    whole = localization_scores(np.ones(tumor.shape), tumor, None, 3.0, (1, 1, 1))
    assert whole["tumor_volume_fraction"] == 512 / 24 ** 3


def test_peritumoral_ring_is_a_margin_in_millimetres():
    tumor = np.zeros((9, 9, 9), bool)
    tumor[4, 4, 4] = True
    # isotropic 1 mm, 2 mm margin: the 33 lattice points with i^2 + j^2 + k^2 <= 4, minus the tumour voxel
    assert peritumoral_ring(tumor, 2.0, (1, 1, 1)).sum() == 32
    # 2 mm voxels along axis 0: (2i)^2 + j^2 + k^2 <= 4 has 13 points at i = 0 and one at i = +-1
    assert peritumoral_ring(tumor, 2.0, (2, 1, 1)).sum() == 14
    assert not peritumoral_ring(np.zeros((3, 3, 3), bool), 2.0, (1, 1, 1)).any()


def test_empty_mask_is_a_value_error_and_a_zero_cam_scores_as_a_flat_map():
    with pytest.raises(ValueError, match="empty tumour mask"):
        localization_scores(np.ones((4, 4, 4)), np.zeros((4, 4, 4), bool), None, 1.0, (1, 1, 1))
    tumor = np.zeros((6, 6, 6), bool)
    tumor[2:4, 2:4, 2:4] = True
    s = localization_scores(np.zeros((6, 6, 6)), tumor, None, 1.0, (1, 1, 1))
    assert s["empty_map"] == 1.0 and s["cam_in_tumor"] == s["tumor_volume_fraction"] == 8 / 216
    assert s["cam_in_peritumoral"] == s["peritumoral_volume_fraction"]


def test_regions_follow_the_brats_labels():
    # a 4x4x4 lesion: enhancing (4) and necrotic (1) core in one corner, oedema (2) elsewhere; 1 mm ring outside
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[3:7, 3:7, 3:7] = 2
    seg[3:5, 3:5, 3:5] = 4
    seg[3, 3, 3] = 1
    cam = np.zeros(seg.shape)
    cam[3:5, 3:5, 3:5] = 1.0  # all CAM mass on the core
    s = localization_scores(cam, seg, None, 1.0, (1, 1, 1))
    assert s["cam_in_core"] == 1.0 and s["core_volume_fraction"] == 8 / 1000
    assert s["cam_in_tumor"] == 1.0 and s["tumor_volume_fraction"] == 64 / 1000
    assert s["cam_in_peritumoral"] == 0.0 and s["peritumoral_volume_fraction"] == 6 * 16 / 1000  # one face layer
    cam = (seg == 2).astype(float)  # all mass on the oedema: in the lesion, not in the core
    s = localization_scores(cam, seg, None, 1.0, (1, 1, 1))
    assert s["cam_in_core"] == 0.0 and s["cam_in_tumor"] == 1.0


def test_mask_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 57):
        perm = mask_derangement(n, seed=3)
        assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).all()
    assert (mask_derangement(20, 1) == mask_derangement(20, 1)).all()
    assert (mask_derangement(20, 1) != mask_derangement(20, 2)).any()
    assert mask_derangement(1, 0).tolist() == [0]


def test_random_init_copy_keeps_architecture_and_buffers_and_redraws_weights():
    from nrfm.models.backbones import ViTBackbone

    model = TinyFinetuneModel()
    clone = random_init_copy(model, seed=0)
    assert clone.endpoints == model.endpoints and torch.equal(clone.backbone.region, model.backbone.region)
    assert not torch.equal(clone.heads.weight, model.heads.weight)
    assert not torch.equal(clone.backbone.conv.weight, model.backbone.conv.weight)
    assert torch.equal(random_init_copy(model, seed=0).heads.weight, clone.heads.weight)
    vit = ViTBackbone(input_size=(16, 16, 16), patch_size=8, hidden_size=12, num_layers=1, num_heads=2)
    for name, param in random_init_copy(vit, seed=0).named_parameters():
        if param.numel() > 1 and "norm" not in name and "bias" not in name:
            assert not torch.equal(param, dict(vit.named_parameters())[name]), name


def test_gradcam3d_equals_library_gradcam_at_input_resolution():
    # stride 1: no upsampling, so the only differences (upsampling, min-max) vanish: both are relu(cam) / max
    model = TinyFinetuneModel()
    model.backbone.conv.stride = (1, 1, 1)
    x = torch.randn(2, 4, SIDE, SIDE, SIDE)
    targets = [ClassifierOutputTarget(0)] * 2
    ours = GradCAM3D(model, [model.backbone.act])(x, targets)
    library = GradCAM(model, [model.backbone.act])(x, targets)
    assert ours.shape == library.shape == (2, SIDE, SIDE, SIDE)
    assert np.abs(ours - library).max() < 1e-5


def test_volumes_backward_stops_at_the_target_layer_and_equals_the_library():
    """grad_cam_volumes freezes the parameters for the call and starts the graph at the target layer's output:
    the maps equal the library's full backward, and the parameters' requires_grad flags are restored."""
    model = TinyFinetuneModel()
    model.backbone.conv.stride = (1, 1, 1)
    next(model.backbone.parameters()).requires_grad_(False)  # a mixed state, as in partial fine-tuning
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(3, 4, SIDE, SIDE, SIDE)
    ours = grad_cam_volumes(model, x, 0, model.backbone.act, signs=[1.0, -1.0, 1.0])
    from nrfm.eval.gradcam_maps import EndpointTarget
    reference = copy.deepcopy(model).requires_grad_(True)  # the library's full backward needs trainable weights
    library = GradCAM(reference, [reference.backbone.act])(x, [EndpointTarget(0, s) for s in (1.0, -1.0, 1.0)])
    assert np.abs(ours - library).max() < 1e-5
    assert [p.requires_grad for p in model.parameters()] == flags


def test_gradcam_puts_most_mass_where_the_output_looks():
    model = TinyFinetuneModel()
    cam = grad_cam_volumes(model, torch.randn(1, 4, SIDE, SIDE, SIDE), 0, model.backbone.act)[0]
    assert cam.shape == (SIDE, SIDE, SIDE) and cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    s = localization_scores(cam, region_mask(), None, 4.0, (1, 1, 1))
    # the region is 3.7% of the volume; the convolution's 1-voxel bleed and the 2x upsampling spread the rest
    assert s["cam_in_tumor"] > 0.5 and s["cam_in_tumor"] + s["cam_in_peritumoral"] > 0.95


def test_gradcam_works_with_frozen_parameters():
    model = TinyFinetuneModel()
    for p in model.parameters():
        p.requires_grad_(False)
    cam = grad_cam_volumes(model, torch.randn(1, 4, SIDE, SIDE, SIDE), 0, model.backbone.act)[0]
    assert cam.max() == pytest.approx(1.0)


def test_vit_reshape_transform_maps_tokens_to_the_patch_grid():
    from nrfm.models.backbones import ViTBackbone

    backbone = ViTBackbone(input_size=(16, 16, 16), patch_size=8, hidden_size=12, num_layers=1, num_heads=2)

    class ViTModel(nn.Module):
        endpoints = ("idh",)

        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(12, 1)

        def forward(self, x):
            return self.head(self.backbone.embed(x))

    model = ViTModel()
    layer, transform = resolve_target_layer(model)
    cam = grad_cam_volumes(model, torch.randn(1, 4, 16, 16, 16), 0, layer, transform)
    assert cam.shape == (1, 16, 16, 16) and np.isfinite(cam).all()


def test_bad_layer_name_lists_the_layers():
    with pytest.raises(ConfigError, match=r"no layer 'backbone\.layer9'.*available: backbone, backbone\.conv"):
        resolve_target_layer(TinyFinetuneModel(), "backbone.layer9")
    layer, transform = resolve_target_layer(TinyFinetuneModel(), "backbone.conv")
    assert isinstance(layer, nn.Conv3d) and transform is None


def make_ctx(tmp_path, gradcam_class: str = "positive") -> RunContext:
    """Two sites, 3 test subjects each; the tumour is the planted region; one subject has an empty mask."""
    rng = np.random.default_rng(0)
    rows, items = [], []
    for site in ("A", "B"):
        for i in range(4):
            rows.append({"subject_id": f"{site}{i}", "patient_id": f"P{site}{i}", "site": site,
                         "split": "train" if i == 0 else "test"})
            seg = np.zeros((1, SIDE, SIDE, SIDE), np.uint8)
            if (site, i) != ("B", 3):
                seg[(0, *REGION)] = 1
            brain = np.zeros((1, SIDE, SIDE, SIDE), bool)
            brain[:, 1:23, 1:23, 1:23] = True
            items.append({"image": torch.from_numpy(rng.normal(size=(4, SIDE, SIDE, SIDE)).astype(np.float32)),
                          "seg": torch.from_numpy(seg), "brain": torch.from_numpy(brain), "index": len(items)})
    cfg = Config()
    cfg = cfg.replace(analyses=cfg.analyses.__class__(peritumoral_margin_mm=6.0, gradcam_subjects_per_site=2,
                                                      gradcam_class=gradcam_class, bootstrap=200))
    return RunContext(config=cfg, run_dir=tmp_path, manifest=pd.DataFrame(rows), cohort_dir=tmp_path, _dataset=items)


class FollowingBackbone(nn.Module):
    """Bias-free convolution with positive weights: its evidence sits wherever the input is bright (the tumour)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 6, 3, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.abs_()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x)).mean(dim=(2, 3, 4))

    def gradcam_target(self):
        return self.act, None


class FollowingModel(TinyFinetuneModel):
    def __init__(self):
        super().__init__()
        self.backbone = FollowingBackbone()


def test_shuffled_mask_control_separates_a_model_that_follows_the_tumour(tmp_path):
    # each subject's tumour is a bright 6^3 cube at its own place: the trained maps sit on their own tumour, so
    # the lesion enrichment is far above 1 while another subject's mask catches almost none of the mass
    rng = np.random.default_rng(1)
    rows, items = [], []
    for i in range(8):
        rows.append({"subject_id": f"S{i}", "patient_id": f"P{i}", "site": "AB"[i % 2], "split": "test"})
        corner = [2 + 4 * (i % 4), 2 + 8 * (i // 4), 4 + 2 * i]
        box = tuple(slice(c, c + 6) for c in corner)
        seg = np.zeros((1, SIDE, SIDE, SIDE), np.uint8)
        seg[(0, *box)] = 1
        image = np.abs(rng.normal(size=(4, SIDE, SIDE, SIDE))).astype(np.float32) * 0.05
        image[(slice(None), *box)] += 3.0
        items.append({"image": torch.from_numpy(image), "seg": torch.from_numpy(seg),
                      "brain": torch.ones(1, SIDE, SIDE, SIDE, dtype=torch.bool), "index": i})
    cfg = Config()
    cfg = cfg.replace(analyses=cfg.analyses.__class__(peritumoral_margin_mm=2.0, gradcam_class="positive",
                                                      bootstrap=100))
    ctx = RunContext(config=cfg, run_dir=tmp_path, manifest=pd.DataFrame(rows), cohort_dir=tmp_path, _dataset=items)
    loader = lambda ctx, method, objective: FollowingModel()  # noqa: E731
    table = gradcam_table(ctx, ["tiny"], objectives=["erm"], load_model=loader, progress=False)
    row = table.set_index("site").loc["all"]
    assert row["lesion_enrichment"] > 5
    assert row["lesion_enrichment_ci_low"] > row["lesion_enrichment_shuffled_mask_ci_high"]
    assert row["lesion_enrichment_shuffled_mask"] < 2
    subjects = pd.read_csv(ctx.artifacts_dir / "gradcam_subjects_tiny_erm_idh.csv")
    assert (subjects["shuffled_mask_subject_id"] != subjects["subject_id"]).all()
    assert subjects["random_init_cam_in_tumor"].notna().all()


def test_stage_scores_planted_tumour_and_skips_empty_mask(tmp_path):
    from nrfm.plots.gradcam import plot_gradcam_slices

    ctx = make_ctx(tmp_path)
    loader = lambda ctx, method, objective: TinyFinetuneModel(seed=0 if objective == "erm" else 1)  # noqa: E731
    table = run_gradcam_stage(ctx, ["tiny"], load_model=loader, progress=False)
    written = pd.read_csv(ctx.metrics_dir / "gradcam.csv", keep_default_na=False)
    assert list(written.columns[:7]) == ["backbone", "objective", "endpoint", "site", "cam_in_tumor",
                                         "cam_in_peritumoral", "tumor_volume_fraction"]
    by = table.set_index(["objective", "site"])
    assert len(table) == 2 * 3 and set(table["endpoint"]) == {"idh"}
    for objective in ("erm", "dro"):
        assert by.loc[(objective, "all"), "cam_in_tumor"] > 0.5
        assert by.loc[(objective, "all"), "lesion_enrichment"] > 10
        low, high = by.loc[(objective, "all"), ["lesion_enrichment_ci_low", "lesion_enrichment_ci_high"]]
        assert 1 < low <= by.loc[(objective, "all"), "lesion_enrichment"] <= high
        # label 1 only: the core is the whole lesion
        assert by.loc[(objective, "all"), "core_enrichment"] == by.loc[(objective, "all"), "lesion_enrichment"]
        for control in ("shuffled_mask", "random_init"):
            assert np.isfinite(by.loc[(objective, "all"), f"lesion_enrichment_{control}_ci_low"])
        assert by.loc[(objective, "all"), "n_empty_maps"] == 0
        assert by.loc[(objective, "all"), "explained_class"] == "positive 5"
        assert by.loc[(objective, "B"), "n"] == 2 and by.loc[(objective, "B"), "n_skipped"] == 1
        assert by.loc[(objective, "B"), "note"] == "1 subject(s) skipped: empty tumour mask"
        assert by.loc[(objective, "A"), "note"] == "" and by.loc[(objective, "A"), "n"] == 3
    subjects = pd.read_csv(ctx.artifacts_dir / "gradcam_subjects_tiny_erm_idh.csv")
    assert len(subjects) == 6
    from nrfm.eval.gradcam import enrichment_view

    assert enrichment_view(table)["n_empty_maps"].tolist() == [0] * 6
    fig = plot_gradcam_slices(ctx, "tiny", load_model=loader)
    assert len(fig.axes) >= 4 * 6 and (ctx.figures_dir / "gradcam_tiny_idh.png").is_file()


def test_unknown_endpoint_is_a_config_error(tmp_path):
    ctx = make_ctx(tmp_path)
    loader = lambda ctx, method, objective: TinyFinetuneModel()  # noqa: E731
    ctx.config = ctx.config.replace(analyses=ctx.config.analyses.__class__(gradcam_endpoint="tert"))
    with pytest.raises(ConfigError, match=r"'tert' is not an output.*\['idh', 'mgmt'\]"):
        run_gradcam_stage(ctx, ["tiny"], load_model=loader, progress=False)


@pytest.mark.parametrize("threshold, expected", [(0.0, "positive"), (1.0, "negative")])
def test_predicted_class_follows_the_models_threshold(tmp_path, threshold, expected):
    ctx = make_ctx(tmp_path, gradcam_class="predicted")
    ctx.artifacts_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"endpoint": ["mgmt", "idh"], "threshold": [0.5, threshold]}).to_csv(
        ctx.artifacts_dir / "predictions_tiny_erm_pooled.csv", index=False)
    loader = lambda ctx, method, objective: TinyFinetuneModel()  # noqa: E731
    table = gradcam_table(ctx, ["tiny"], objectives=["erm"], load_model=loader, progress=False)
    subjects = pd.read_csv(ctx.artifacts_dir / "gradcam_subjects_tiny_erm_idh.csv", keep_default_na=False)
    scored = subjects[subjects["note"] != "skipped: empty tumour mask"]
    assert set(scored["explained_class"]) == {expected}
    assert (scored["note"] == "").all()
    overall = table.set_index("site").loc["all"]
    if expected == "negative":
        # every head weight is positive: no evidence against idh anywhere, so every CAM is empty; the subjects are
        # counted, not dropped, and score as flat maps (enrichment exactly 1)
        assert (scored["empty_map"].astype(float) == 1).all()
        assert overall["n"] == 5 and overall["n_empty_maps"] == 5 and "5 of 5 map(s) zero everywhere" in overall["note"]
        assert overall["lesion_enrichment"] == pytest.approx(1.0)
    else:
        assert overall["n_empty_maps"] == 0 and overall["lesion_enrichment"] > 10


def test_scored_test_rows_is_a_fixed_sample_per_site():
    from nrfm.eval.gradcam import scored_test_rows
    manifest = pd.DataFrame({"site": ["A"] * 10 + ["B"] * 6 + ["C"] * 4,
                             "split": (["test"] * 8 + ["train"] * 2) + ["test"] * 6 + ["val"] * 4})
    everything = scored_test_rows(manifest, 0, seed=0)
    assert list(everything) == list(np.where(manifest["split"] == "test")[0])
    sample = scored_test_rows(manifest, 3, seed=0)
    assert list(sample) == sorted(sample) and set(sample) <= set(everything)
    assert manifest.iloc[sample]["site"].value_counts().to_dict() == {"A": 3, "B": 3}  # C has no test exam
    assert list(scored_test_rows(manifest, 3, seed=0)) == list(sample)  # the same for every backbone
    assert list(scored_test_rows(manifest, 100, seed=0)) == list(everything)


def test_batched_maps_score_as_one_volume_at_a_time(tmp_path, monkeypatch):
    """Grad-CAM runs GRADCAM_BATCH volumes per pass; in eval mode each map is that of the volume alone, so the
    per-subject scores (predicted class, trained maps, shuffled-mask and random-init controls) do not change."""
    from nrfm.eval import gradcam

    loader = lambda ctx, method, objective: TinyFinetuneModel(seed=0).eval()  # noqa: E731
    tables = []
    for batch in (1, 4):
        monkeypatch.setattr(gradcam, "GRADCAM_BATCH", batch)
        ctx = make_ctx(tmp_path / str(batch), gradcam_class="predicted")
        gradcam_table(ctx, ["tiny"], objectives=["erm"], load_model=loader, progress=False)
        tables.append(pd.read_csv(ctx.artifacts_dir / "gradcam_subjects_tiny_erm_idh.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=False, atol=1e-5)
    assert tables[0]["cam_in_tumor"].notna().sum() == 5 and set(tables[0]["explained_class"].dropna()) <= {
        "positive", "negative"}
