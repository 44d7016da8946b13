"""Tumour readout: region masks, cell fractions, region means against a direct per-voxel computation, the splits of
every fine-tuning mode, Grad-CAM's layer, bad inputs, and that the readout only reads cells of each region."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nrfm.config import PretrainingConfig
from nrfm.models.backbones import build_backbone
from nrfm.models.readout import (REGIONS, TumourReadout, cell_fractions, model_input, readout_backbone, region_masks,
                                 region_means, uses_segmentation, with_segmentation)
from nrfm.train.finetune_data import split_backbone
from nrfm.train.finetune_fit import FinetuneModel

CFG = PretrainingConfig(cnn_width=4, vit_patch_size=4, vit_hidden_size=24, vit_layers=2, vit_heads=2,
                        mae_decoder_hidden_size=12)

pytestmark = pytest.mark.usefixtures("one_thread")


def _segmentation(batch: int = 2, side: int = 16) -> torch.Tensor:
    seg = torch.zeros(batch, 1, side, side, side)
    seg[:, :, 3:11, 4:12, 2:10] = 2  # oedema
    seg[:, :, 5:8, 6:9, 4:7] = 1  # necrotic core
    seg[0, :, 9:11, 4:6, 2:4] = 4  # enhancing in the first exam only
    seg[1, :, 9:10, 5:6, 3:4] = 3  # label 3 (older BraTS) counts as enhancing
    return seg


def test_region_masks_follow_the_brats_labels():
    seg = _segmentation()
    masks = region_masks(seg)
    assert masks.shape == (2, len(REGIONS), 16, 16, 16) and REGIONS == ("crop", "lesion", "necrotic", "oedema",
                                                                          "enhancing")
    assert masks[:, 0].all()
    assert torch.equal(masks[:, 1].bool(), (seg > 0)[:, 0])
    assert torch.equal(masks[:, 2].bool(), (seg == 1)[:, 0]) and torch.equal(masks[:, 3].bool(), (seg == 2)[:, 0])
    assert masks[0, 4].sum() == 8 and masks[1, 4].sum() == 1  # label 4 and label 3


def test_region_means_equal_the_voxelwise_weighted_mean():
    """Reference: upsample the feature map to voxels (each cell's value on its voxels) and average it over the region's
    voxels; the cell-fraction weighting must give exactly that."""
    torch.manual_seed(0)
    features = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    masks = region_masks(_segmentation())
    ours = region_means(features, cell_fractions(masks.double(), (4, 4, 4)))
    voxels = features.repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)  # (2, 3, 16, 16, 16)
    for b in range(2):
        for r in range(len(REGIONS)):
            inside = masks[b, r].bool()
            expected = voxels[b][:, inside].mean(dim=1)
            assert torch.allclose(ours[b, r * 3:(r + 1) * 3], expected, atol=1e-12), (b, REGIONS[r])


def test_an_absent_region_reads_zeros():
    features = torch.randn(1, 2, 4, 4, 4)
    seg = torch.zeros(1, 1, 16, 16, 16)
    seg[..., 2:6, 2:6, 2:6] = 2  # oedema only
    out = region_means(features, cell_fractions(region_masks(seg), (4, 4, 4))).view(len(REGIONS), 2)
    assert torch.equal(out[REGIONS.index("necrotic")], torch.zeros(2))
    assert torch.equal(out[REGIONS.index("enhancing")], torch.zeros(2))
    assert torch.allclose(out[REGIONS.index("crop")], features.mean((2, 3, 4))[0])
    assert torch.allclose(out[REGIONS.index("lesion")], out[REGIONS.index("oedema")])


@pytest.mark.parametrize("method", ["byol", "mae"])
@pytest.mark.parametrize("mode", ["linear", "partial", "full"])
def test_every_mode_splits_into_the_same_embedding(method, mode):
    torch.manual_seed(0)
    readout = TumourReadout(build_backbone(method, CFG, (16, 16, 16))).eval()
    x = with_segmentation(torch.randn(2, 4, 16, 16, 16), _segmentation())
    with torch.no_grad():
        embedding = readout.embed(x)
        split = split_backbone(readout, mode)
        assert torch.allclose(split.tail(split.trunk(x)), embedding, atol=1e-5)
    assert embedding.shape == (2, readout.embed_dim)
    trained = {id(p) for m in split.tail_modules for p in m.parameters()}
    if mode == "partial":  # the pooled stage / the last block trains, the stem does not
        first = readout.inner.net.conv1 if method == "byol" else readout.inner.vit.patch_embedding
        assert trained and not any(id(p) in trained for p in first.parameters())


def test_the_resnet_pools_the_gradcam_stage_and_reads_cells_of_the_lesion_only():
    inner = build_backbone("byol", CFG, (32, 32, 32)).eval()
    readout = TumourReadout(inner).eval()
    layer, _ = readout.gradcam_target()
    assert readout.stage == "layer1" and layer is inner.net.layer1
    assert readout.embed_dim == len(REGIONS) * 4  # width 4: layer1 has 4 channels
    seg = torch.zeros(1, 1, 32, 32, 32)
    seg[..., 8:16, 8:16, 8:16] = 2  # exactly cells (2, 2, 2)-(3, 3, 3) of the 8^3 map
    x = with_segmentation(torch.randn(1, 4, 32, 32, 32), seg).requires_grad_(True)
    seen = {}

    def keep(_module, _inputs, out):  # returns None: the output is not replaced
        out.retain_grad()
        seen["out"] = out

    layer.register_forward_hook(keep)
    readout.embed(x)[:, len(REGIONS) * 4 // 5:2 * len(REGIONS) * 4 // 5].sum().backward()  # the lesion block
    grad = seen["out"].grad[0].abs().sum(0)
    assert grad[2:4, 2:4, 2:4].min() > 0 and grad.sum() == grad[2:4, 2:4, 2:4].sum()


def test_input_checks_and_helpers():
    readout = readout_backbone(build_backbone("moco", CFG, (16, 16, 16)), "tumour")
    assert isinstance(readout, TumourReadout) and readout_backbone(readout, "tumour") is readout
    plain = build_backbone("moco", CFG, (16, 16, 16))
    assert readout_backbone(plain, "global") is plain
    with pytest.raises(ValueError, match="unknown readout 'mean'"):
        readout_backbone(plain, "mean")
    with pytest.raises(ValueError, match=r"\(B, 5, D, H, W\) \(four contrasts and the segmentation\)"):
        readout.embed(torch.randn(1, 4, 16, 16, 16))
    with pytest.raises(TypeError, match="ResNetBackbone or ViTBackbone"):
        TumourReadout(torch.nn.Linear(2, 2))
    model = FinetuneModel(readout, ("idh",))
    item = {"image": np.zeros((4, 16, 16, 16), np.float32), "seg": np.ones((1, 16, 16, 16), np.uint8)}
    assert uses_segmentation(model) and model_input(model, item).shape == (5, 16, 16, 16)
    assert model_input(model, item)[4].sum() == 16 ** 3
    assert not uses_segmentation(FinetuneModel(plain, ("idh",)))
    assert model_input(FinetuneModel(plain, ("idh",)), item).shape == (4, 16, 16, 16)
    assert model(torch.stack([model_input(model, item)] * 2)).shape == (2, 1)


def test_gradcam_of_a_layer_the_readout_never_reaches_is_one_clear_error():
    from nrfm.errors import ConfigError
    from nrfm.eval.gradcam_maps import grad_cam_volumes

    model = FinetuneModel(readout_backbone(build_backbone("byol", CFG, (32, 32, 32)), "tumour"), ("idh",)).eval()
    x = with_segmentation(torch.randn(1, 4, 32, 32, 32), torch.full((1, 1, 32, 32, 32), 2.0))
    cams = grad_cam_volumes(model, x, 0, model.backbone.inner.net.layer1)  # the pooled stage: a map
    assert cams.shape == (1, 32, 32, 32) and np.isfinite(cams).all()
    with pytest.raises(ConfigError, match="takes no part in the model's output"):
        grad_cam_volumes(model, x, 0, model.backbone.inner.net.layer4)
