"""SSL methods: each loss against a straight-line copy of its paper's formula, momentum updates, learning."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.utils.scheduler import cosine_schedule

from nrfm.models.backbones import build_backbone
from nrfm.config import PretrainingConfig
from nrfm.ssl import build_method
from nrfm.ssl.methods.mae import normalized_pixel_loss, patchify, unpatchify

CFG = PretrainingConfig(cnn_width=4, head_hidden_dim=16, head_out_dim=8, dino_out_dim=16, vit_patch_size=4,
                        vit_hidden_size=24, vit_layers=1, vit_heads=2, mae_decoder_hidden_size=12,
                        mae_decoder_layers=1, moco_memory_bank=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(method: str, cfg: PretrainingConfig = CFG, size=(12, 12, 12)):
    torch.manual_seed(0)
    return build_method(method, build_backbone(method, cfg, size), cfg)


def test_byol_loss_is_two_minus_two_cosine():
    g = torch.Generator().manual_seed(1)
    p0, z1, p1, z0 = (torch.randn(6, 8, generator=g) for _ in range(4))
    # Grill et al. eq. 2: ||q/|q| - z'/|z'|||^2 = 2 - 2 cos; mean over the batch and the two directions
    expected = 0.5 * (((F.normalize(p0, dim=1) - F.normalize(z1, dim=1)) ** 2).sum(1).mean()
                      + ((F.normalize(p1, dim=1) - F.normalize(z0, dim=1)) ** 2).sum(1).mean())
    assert make("byol").loss(p0, z1, p1, z0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dino_loss_matches_cross_entropy_with_centring_and_temperatures():
    dino = make("dino")
    dino.teacher_temp = 0.05
    g = torch.Generator().manual_seed(2)
    teacher = [torch.randn(5, 16, generator=g) for _ in range(2)]
    student = [torch.randn(5, 16, generator=g) for _ in range(4)]  # 2 global + 2 local
    center = torch.randn(1, 1, 16, generator=g) * 0.1
    dino.criterion.center.copy_(center)
    # Caron et al. Algorithm 1: H(t, s) = -sum softmax((t - C) / tpt) * log_softmax(s / tps), pairs t != s
    terms = []
    for ti, t in enumerate(teacher):
        pt = F.softmax((t - center[0]) / 0.05, dim=-1)
        for si, s in enumerate(student):
            if ti != si:
                terms.append(-(pt * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean())
    expected = torch.stack(terms).mean()
    loss = dino.loss(teacher, student)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # centre update: C <- m C + (1 - m) mean(teacher outputs), m = 0.9
    new_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0, keepdim=True)
    torch.testing.assert_close(dino.criterion.center, new_center)


def test_dino_teacher_temperature_warms_up_linearly():
    dino = make("dino")
    assert dino.teacher_temperature(0, 100) == pytest.approx(0.04)
    assert dino.teacher_temperature(15, 100) == pytest.approx(0.055)
    assert dino.teacher_temperature(30, 100) == pytest.approx(0.07)
    assert dino.teacher_temperature(99, 100) == pytest.approx(0.07)


def test_moco_loss_is_infonce_against_the_queue_and_enqueues_keys():
    moco = make("moco")
    bank = moco.criterion.memory_bank
    queue = bank.bank.clone()  # (K, dim), unit rows
    g = torch.Generator().manual_seed(3)
    q0, k1, q1, k0 = (torch.randn(4, 8, generator=g).requires_grad_(i % 2 == 0) for i in range(4))

    def infonce(q, k, negatives):  # He et al. eq. 1, tau = 0.2, with negatives from the queue
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / 0.2
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    # both directions read the queue as it was before the step (no subject meets its own key as a negative)
    expected = 0.5 * (infonce(q0, k1, queue) + infonce(q1, k0, queue))
    assert moco.loss(q0, k1, q1, k0).item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(bank.bank[:4], F.normalize(k1.detach(), dim=1))
    torch.testing.assert_close(bank.bank[4:8], F.normalize(k0.detach(), dim=1))
    assert int(bank.bank_ptr) == 0  # 8 keys filled the queue of 8 and the pointer wrapped


def test_moco_queue_travels_in_the_state_dict():
    moco = make("moco")
    moco.training_step([torch.randn(4, 4, 12, 12, 12), torch.randn(4, 4, 12, 12, 12)])
    other = make("moco")
    other.load_state_dict(moco.state_dict())
    assert torch.equal(other.criterion.memory_bank.bank, moco.criterion.memory_bank.bank)
    assert torch.equal(other.criterion.memory_bank.bank_ptr, moco.criterion.memory_bank.bank_ptr)


def test_mae_patch_order_matches_the_vit_tokens_and_loss_formula():
    mae = make("mae")
    x = torch.randn(2, 4, 12, 12, 12)
    # the conv patch embedding equals a linear map of patchify(x) with the kernel flattened in the same order
    conv = mae.backbone.vit.patch_embedding.patch_embeddings
    w = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.weight.shape[0], -1)
    tokens = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, patchify(x, 4) @ w.T + conv.bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(unpatchify(patchify(x, 4), 4, (3, 3, 3), 4), x)
    # He et al.: per-patch normalised target, MSE averaged over masked patches only
    pred, keep, masked = mae.reconstruct(x)
    assert keep.shape == (2, 6) and masked.shape == (2, 21)  # 27 patches, 75% masked
    target = patchify(x, 4)
    terms = []
    for b in range(2):
        for i in masked[b].tolist():
            t = target[b, i]
            t = (t - t.mean()) / torch.sqrt(t.var() + 1e-6)
            terms.append(((pred[b, i] - t) ** 2).mean())
    assert mae.loss(pred, x, masked).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    assert normalized_pixel_loss(target[:, :3], target[:, :3]).item() > 0  # raw != normalised target


@pytest.mark.parametrize("method", ["byol", "dino", "moco"])
def test_momentum_update_follows_the_ema_formula(method):
    model = make(method)
    pairs = model.momentum_pairs()
    for online, target in pairs:  # make online and target differ
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    before = [[p.clone() for p in t.parameters()] for _, t in pairs]
    model.on_step(3, 10)
    m = cosine_schedule(3, 10, CFG.momentum_base, 1.0)
    assert model.momentum == pytest.approx(m) and CFG.momentum_base < m < 1
    for (online, target), old in zip(pairs, before):
        for p_online, p_target, p_old in zip(online.parameters(), target.parameters(), old):
            torch.testing.assert_close(p_target, m * p_old + (1 - m) * p_online)
        assert not any(p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("method", ["byol", "dino", "mae", "moco"])
def test_a_few_steps_lower_the_loss(method):
    model = make(method)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 4, 12, 12, 12, generator=g)
    views = [x + 0.1 * torch.randn(x.shape, generator=g), x.flip(4)]
    if method == "dino":
        views += [x[:, :, 2:10, 2:10, 2:10].contiguous(), x[:, :, 4:, 4:, 4:][:, :, :8, :8, :8].contiguous()]
    if method == "mae":
        views = views[:1]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    torch.manual_seed(5)
    for step in range(25):
        model.on_step(step, 25)
        loss = model.training_step(views)
        opt.zero_grad()
        loss.backward()
        model.after_backward(step, 25)
        opt.step()
        losses.append(loss.item())
    # MoCo's first loss uses a random queue; compare once the queue holds real keys (step >= 1)
    first = np.mean(losses[1:4]) if method == "moco" else np.mean(losses[:3])
    assert np.mean(losses[-3:]) < first, losses


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown SSL method 'simclr'; valid: \['byol', 'dino', 'mae', 'moco'\]"):
        build_method("simclr", build_backbone("byol", CFG, (12, 12, 12)), CFG)


def test_mae_refuses_a_cnn_backbone():
    with pytest.raises(ValueError, match="MAE needs a ViT backbone"):
        build_method("mae", build_backbone("byol", CFG, (12, 12, 12)), CFG)


def test_forward_is_training_step_for_ddp():
    byol = make("byol")
    views = [torch.randn(4, 4, 12, 12, 12), torch.randn(4, 4, 12, 12, 12)]
    twin = copy.deepcopy(byol)
    assert byol(views).item() == pytest.approx(twin.training_step(views).item())
