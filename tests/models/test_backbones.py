"""3D backbones: shapes, widths, the ViT's patch grid, Grad-CAM targets, bad names, the bf16 small-conv guard."""
from __future__ import annotations

import pytest
import torch

from nrfm.models.backbones import (ResNetBackbone, SmallInputSafeConv3d, backbone_arch, build_backbone,
                                   use_channels_last)
from nrfm.config import PretrainingConfig
from nrfm.config_loading import config_from_dict
from nrfm.errors import ConfigError

CFG = PretrainingConfig(cnn_width=4, vit_patch_size=4, vit_hidden_size=24, vit_layers=1, vit_heads=2,
                        mae_decoder_hidden_size=12)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("method, dim, arch", [("byol", 32, "resnet10"), ("dino", 32, "resnet10"),
                                               ("moco", 32, "resnet10"), ("mae", 24, "vit")])
def test_embed_shapes_and_architecture(method, dim, arch):
    backbone = build_backbone(method, CFG, (16, 16, 16))
    assert backbone.embed_dim == dim and backbone.arch == arch == backbone_arch(method, CFG)
    out = backbone.embed(torch.randn(3, 4, 16, 16, 16))
    assert out.shape == (3, dim) and torch.isfinite(out).all()
    assert backbone(torch.randn(2, 4, 16, 16, 16)).shape == (2, dim)


def test_width_and_depth_follow_the_config():
    small = ResNetBackbone("resnet10", width=4)
    wide = ResNetBackbone("resnet10", width=8)
    deep = ResNetBackbone("resnet18", width=4)
    assert (small.embed_dim, wide.embed_dim) == (32, 64)
    assert small.net.conv1.in_channels == 4 and small.net.fc is None
    assert [len(getattr(deep.net, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(deep) and n(small) < n(wide)


def test_vit_embeds_other_grids_but_not_partial_patches():
    vit = build_backbone("mae", CFG, (16, 16, 16))
    assert vit.embed(torch.randn(2, 4, 8, 12, 16)).shape == (2, 24)  # pretraining crops vs whole volumes
    with pytest.raises(ValueError, match="multiple of patch_size=4"):
        vit.embed(torch.randn(1, 4, 10, 12, 12))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 4, D, H, W\)"):
        vit.embed(torch.randn(1, 3, 12, 12, 12))


def test_gradcam_targets_have_a_spatial_map():
    cnn = build_backbone("byol", CFG, (32, 32, 32))
    layer, reshape = cnn.gradcam_target()
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    cnn.embed(torch.randn(2, 4, 32, 32, 32))
    assert reshape is None and seen["shape"][2:] == (8, 8, 8)  # layer1: layer2 is 4^3, layer3 2^3 at 32^3
    assert cnn.stage_sizes() == {"layer1": 8, "layer2": 4, "layer3": 2, "layer4": 1}
    vit = build_backbone("mae", CFG, (16, 16, 16))
    layer, reshape = vit.gradcam_target()
    tokens = {}
    layer.register_forward_hook(lambda m, i, o: tokens.update(out=o))
    vit.embed(torch.randn(2, 4, 16, 16, 16))
    grid = reshape(tokens["out"])
    assert grid.shape == (2, 24, 4, 4, 4)
    assert torch.equal(grid[1, :, 1, 2, 3], tokens["out"][1, 1 * 16 + 2 * 4 + 3])  # raster order d, h, w


def test_gradcam_runs_on_the_resnet():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cnn = build_backbone("byol", CFG, (16, 16, 16)).eval()
    model = torch.nn.Sequential(cnn, torch.nn.Linear(cnn.embed_dim, 2))
    layer, reshape = cnn.gradcam_target()
    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=torch.randn(1, 4, 16, 16, 16), targets=[ClassifierOutputTarget(1)])
    assert maps.shape[0] == 1 and maps.ndim == 4


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown SSL method 'swav'; valid: \['byol', 'dino', 'mae', 'moco'\]"):
        build_backbone("swav", CFG, (16, 16, 16))
    with pytest.raises(ValueError, match=r"unknown CNN architecture 'resnet50'; valid: \['resnet10', 'resnet18'\]"):
        ResNetBackbone("resnet50")
    with pytest.raises(ConfigError, match=r"pretraining.cnn_arch.*valid: \['resnet10', 'resnet18'\]"):
        config_from_dict({"pretraining": {"cnn_arch": "resnet50"}}, source="my.yaml")


def test_small_maps_run_in_float32_under_cpu_autocast():
    """oneDNN's bf16 Conv3d backward is wrong when a side is smaller than the kernel; the guard avoids it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1, bias=False)
    conv.__class__ = SmallInputSafeConv3d
    x = torch.randn(8, 16, 2, 2, 2, requires_grad=True)
    ref_w = conv.weight.detach().double().requires_grad_(True)
    torch.nn.functional.conv3d(x.detach().double(), ref_w, padding=1).pow(2).sum().backward()
    for _ in range(3):
        conv.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.float32  # ran outside autocast
        y.pow(2).sum().backward()
        torch.testing.assert_close(conv.weight.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # maps at least as large as the kernel keep bf16
        assert conv(torch.randn(2, 16, 3, 3, 3)).dtype == torch.bfloat16
    assert all(type(m) is SmallInputSafeConv3d for m in ResNetBackbone(width=4).modules()
               if isinstance(m, torch.nn.Conv3d))


def test_channels_last_keeps_the_tiny_last_stages_contiguous_and_the_outputs():
    torch.manual_seed(0)
    plain = ResNetBackbone("resnet10", width=8, input_size=(24, 24, 24))
    fast = ResNetBackbone("resnet10", width=8, input_size=(24, 24, 24))
    fast.load_state_dict(plain.state_dict())
    use_channels_last(use_channels_last(fast))  # twice: the input hook is registered once
    sizes = fast.stage_sizes()  # 6, 3, 2, 1 voxels per side at 24^3
    cl = torch.channels_last_3d
    for name in ("layer1", "layer2", "layer3", "layer4"):
        weight = getattr(fast.net, name)[0].conv1.weight
        assert weight.is_contiguous(memory_format=cl) == (sizes[name] > 2), name
        assert len(getattr(fast.net, name)._forward_pre_hooks) == (sizes[name] <= 2), name
    assert fast.net.conv1.weight.is_contiguous(memory_format=cl)
    x = torch.randn(2, 4, 24, 24, 24)
    torch.testing.assert_close(fast.embed(x.contiguous(memory_format=cl)), plain.embed(x), atol=1e-4, rtol=1e-4)
