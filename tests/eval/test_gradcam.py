"""Grad-CAM in 3D and the localization score, with tiny models whose evidence region is planted."""
from __future__ import annotations

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
from nrfm.eval.gradcam import (GradCAM3D, grad_cam_volumes, localization_scores, peritumoral_ring, resolve_target_layer,
                          gradcam_table, run_gradcam_stage)

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
    """Same interface as nrfm.train.finetune.FinetuneModel: forward -> (B, len(endpoints)), ``backbone``."""

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


def test_empty_mask_and_zero_cam_are_value_errors():
    with pytest.raises(ValueError, match="empty tumour mask"):
        localization_scores(np.ones((4, 4, 4)), np.zeros((4, 4, 4), bool), None, 1.0, (1, 1, 1))
    with pytest.raises(ValueError, match="zero everywhere"):
        localization_scores(np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), None, 1.0, (1, 1, 1))


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
        assert by.loc[(objective, "all"), "tumor_enrichment"] > 10
        low, high = by.loc[(objective, "all"), ["tumor_enrichment_ci_low", "tumor_enrichment_ci_high"]]
        assert 1 < low <= by.loc[(objective, "all"), "tumor_enrichment"] <= high
        assert by.loc[(objective, "all"), "explained_class"] == "positive 5"
        assert by.loc[(objective, "B"), "n"] == 2 and by.loc[(objective, "B"), "n_skipped"] == 1
        assert by.loc[(objective, "B"), "note"] == "1 subject(s) skipped: empty tumour mask"
        assert by.loc[(objective, "A"), "note"] == "" and by.loc[(objective, "A"), "n"] == 3
    subjects = pd.read_csv(ctx.artifacts_dir / "gradcam_subjects_tiny_erm_idh.csv")
    assert len(subjects) == 6
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
    if expected == "negative":
        # every head weight is positive: no evidence against idh anywhere, so every CAM is empty and skipped
        assert (scored["note"] == "skipped: the CAM is zero everywhere in the brain").all()
        assert table.set_index("site").loc["all", "n"] == 0
    else:
        assert (scored["note"] == "").all() and table.set_index("site").loc["all", "tumor_enrichment"] > 10
